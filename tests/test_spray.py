"""SpRAy (Lapuschkin et al. 2019): planted strategies are found, counted by the eigengap, and the
callback logs them during training."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from explain_callbacks.analysis import kmeans, spray
from explain_callbacks.callbacks import SpRAyMonitor

from .helpers_lightning import event_tags, trainer


def _planted_maps(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy maps of three groups that look at the centre, a top-left and a bottom-left patch."""
    g = torch.Generator().manual_seed(seed)
    maps = 0.2 * torch.rand(n, 3, 32, 32, generator=g)
    group = torch.zeros(n, dtype=torch.long)
    group[: n * 3 // 10] = 1
    group[n * 3 // 10 : n // 2] = 2
    maps[group == 0, :, 12:20, 12:20] += 1.0
    maps[group == 1, :, 0:4, 0:4] += 1.0
    maps[group == 2, :, 26:32, 0:6] += 1.0
    perm = torch.randperm(n, generator=g)
    return maps[perm], group[perm]


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two labelings split the samples the same way (up to renaming)."""
    return bool(((a.view(-1, 1) == a.view(1, -1)) == (b.view(-1, 1) == b.view(1, -1))).all())


def test_planted_groups_are_found_and_counted():
    maps, group = _planted_maps()
    res = spray(maps)
    assert res.eigengap_clusters == 3 and res.n_clusters == 3
    assert _same_partition(res.labels, group)
    assert res.sizes.tolist() == [30, 18, 12]  # numbered by decreasing size
    # three disconnected groups: three zero eigenvalues of the normalised Laplacian, then a gap
    assert res.eigenvalues[:3].abs().max() < 1e-8 and res.eigenvalues[3] > 0.3
    # the mean map of the largest cluster looks at the centre
    centre = res.means[0]
    assert centre[6:10, 6:10].mean() > 3 * centre[:3, :3].mean()
    assert res.means.shape == (3, 16, 16)


def test_fixed_cluster_count_seeded_and_rng_untouched():
    maps, _ = _planted_maps(seed=1)
    state = torch.random.get_rng_state()
    a, b = spray(maps, n_clusters=2, seed=3), spray(maps, n_clusters=2, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.labels, b.labels) and a.n_clusters == 2 and a.eigengap_clusters == 3


def test_tabular_and_sequence_maps():
    g = torch.Generator().manual_seed(0)
    tab = 0.1 * torch.rand(40, 12, generator=g)
    tab[:25, 0] += 1
    tab[25:, 7] += 1
    assert _same_partition(spray(tab).labels, (torch.arange(40) >= 25).long())
    seq = 0.1 * torch.rand(40, 2, 50, generator=g)
    seq[:20, :, :5] += 1
    seq[20:, :, -5:] += 1
    assert _same_partition(spray(seq).labels, (torch.arange(40) >= 20).long())


def test_kmeans_recovers_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.0, 6.0]])
    truth = torch.arange(90) % 3
    x = centres[truth] + 0.3 * torch.randn(90, 2, generator=g)
    labels, found = kmeans(x, 3, generator=torch.Generator().manual_seed(1))
    assert _same_partition(labels, truth)
    assert torch.cdist(found, centres).amin(1).max() < 0.3


def test_bad_inputs():
    with pytest.raises(FloatingPointError, match="NaN"):
        spray(torch.full((5, 8), float("nan")))
    with pytest.raises(ValueError, match="at least 3"):
        spray(torch.rand(2, 8))
    with pytest.raises(ValueError, match="maps"):
        spray(torch.rand(4, 1, 2, 8, 8))


class CornerOrCentre(nn.Module):
    """A planted Clever Hans: images with a bright top-left corner are classified by the corner, the
    others by their centre, so their gradient maps follow two strategies."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = x[:, :, :4, :4].mean((1, 2, 3))
        centre = x[:, :, 12:20, 12:20].mean((1, 2, 3))
        use_corner = (corner > 0.7).float()
        evidence = use_corner * 4 * corner + (1 - use_corner) * centre
        return evidence.view(-1, 1) * self.scale


class Lit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = CornerOrCentre()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_callback_finds_the_watermark_subgroup(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 96
    x = 0.5 * torch.rand(n, 1, 32, 32, generator=g)
    marked = torch.arange(n) % 4 == 0  # a quarter of the images carry the corner mark
    x[marked, :, :4, :4] = 1.0
    y = torch.zeros(n, dtype=torch.long)
    loaders = (DataLoader(TensorDataset(x, y), batch_size=32), DataLoader(TensorDataset(x, y), batch_size=32))
    mon = SpRAyMonitor(budget=None, method="saliency", num_samples=64, per_class=None, every_n_epochs=1, strict=True)
    torch.manual_seed(0)
    trainer(tmp_path, callbacks=[mon], max_epochs=1).fit(Lit(), *loaders)
    res = mon.last_result[0]
    assert res.eigengap_clusters == 2
    assert _same_partition(res.labels, marked[:64].long())
    tags = event_tags(tmp_path)
    assert "concepts/cluster_means/class_0" in tags["images"]
    assert "concepts/strategies/class_0" in tags["scalars"]


def test_degenerate_classes_skipped_with_one_warning(tmp_path):
    """Classes SpRAy cannot analyse (fewer than 3 maps) warned one by one (ten warnings on digits); now once."""
    import warnings

    class Lit5(Lit):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 5))

    g = torch.Generator().manual_seed(0)
    x = torch.rand(28, 1, 32, 32, generator=g)
    y = torch.tensor([0] * 20 + [1, 2, 3, 4] * 2)  # classes 1-4: two maps each
    loaders = (DataLoader(TensorDataset(x, y), batch_size=28), DataLoader(TensorDataset(x, y), batch_size=28))
    mon = SpRAyMonitor(
        budget=None, method="saliency", num_samples=28, per_class=None, min_per_class=1, every_n_epochs=1
    )
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks=[mon], max_epochs=2).fit(Lit5(), *loaders)
    ours = [str(w.message) for w in caught if "SpRAyMonitor" in str(w.message)]
    assert len(ours) == 1, ours  # two epochs, four classes: one warning
    assert "classes [1, 2, 3, 4] skipped" in ours[0] and "at least 3 maps" in ours[0]
