"""The real-time masker (Dabkowski & Gal 2017) and the SaliencyMasker callback (methods.md section 3)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from explain_callbacks.attribution import (
    MaskerObjective,
    MaskingNetwork,
    RealTimeSaliency,
    build_attributor,
    cw_hinge,
    train_masker_step,
)
from explain_callbacks.callbacks.saliency_masker import SaliencyMasker
from explain_callbacks.models import LitClassifier, SmallCNN
from tests.test_blackbox_core import CHECKER, NEAR, REGION, mass_in_region


class PlantedBinary(nn.Module):
    """Two classes read from the sign of the region's correlation with a checkerboard."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pattern", CHECKER)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = (x[:, :, 20:28, 4:12] * self.pattern).mean((1, 2, 3))
        return torch.stack([8 * r, -8 * r], 1)


def planted_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.5 + 0.1 * torch.randn(n, 1, 32, 32, generator=g)
    x[:, :, 20:28, 4:12] = 0.5 + 0.4 * CHECKER * (1 - 2 * y.float()).view(-1, 1, 1, 1)
    return x, y


def test_cw_hinge():
    z = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.5]])
    t = torch.tensor([0, 2])
    torch.testing.assert_close(cw_hinge(z, t, 2.0, keep=True), torch.tensor([0.0, 2.5]))
    torch.testing.assert_close(cw_hinge(z, t, 5.0, keep=False), torch.tensor([7.0, 4.5]))


def test_masker_learns_the_planted_region():
    clf = PlantedBinary().eval()
    torch.manual_seed(0)
    masker = MaskingNetwork(1, 2, width=8)
    opt = torch.optim.Adam(masker.parameters(), lr=3e-3)
    obj = MaskerObjective()
    gen = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in clf.parameters()]
    for step in range(80):
        x, y = planted_batch(16, step)
        train_masker_step(clf, masker, opt, obj, x, y, gen, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, clf.parameters()))
    xt, yt = planted_batch(8, 999)
    a = RealTimeSaliency(masker)(clf, xt, yt)
    assert a.shape == (8, 1, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert (mass_in_region(a, REGION) > 0.6).all(), mass_in_region(a, REGION)
    assert (mass_in_region(a, NEAR) > 0.9).all()
    assert a[:, 0][:, ~NEAR].mean() < 0.05


class _Data(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(48, 1, 16, 16, generator=g)
        self.y = torch.randint(0, 3, (48,), generator=g)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:32], self.y[:32]), batch_size=8, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[32:], self.y[32:]), batch_size=8)


def _fit(callbacks: list, tmp_path: Path, logger: bool = False) -> tuple[LitClassifier, pl.Trainer]:
    pl.seed_everything(7, verbose=False)
    model = LitClassifier(SmallCNN(1, 3, width=4), lr=1e-2)
    log = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb") if logger else False
    trainer = pl.Trainer(
        max_epochs=2, callbacks=callbacks, logger=log, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=1, accelerator="cpu", devices=1,
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(model, datamodule=_Data())
    return model, trainer


def test_callback_leaves_the_classifier_bit_identical_and_logs(tmp_path):
    plain, _ = _fit([], tmp_path / "a")
    rng_plain = torch.get_rng_state()
    cb = SaliencyMasker(budget=None, width=4, num_samples=8, batch_size=16, strict=True)
    with_cb, trainer = _fit([cb], tmp_path / "b", logger=True)
    assert torch.equal(torch.get_rng_state(), rng_plain)
    for (k, a), (_, b) in zip(plain.state_dict().items(), with_cb.state_dict().items()):
        assert torch.equal(a, b), k  # weights, BatchNorm statistics and counters
    assert cb.masker is not None and cb._steps == 8  # 4 batches x 2 epochs
    m = trainer.callback_metrics
    for key in ("faithfulness/saliency_metric/masker", "maps/area/masker", "masker/train_loss/loss"):
        assert key in m and torch.isfinite(m[key]), key
    assert any((tmp_path / "b").rglob("events.out.tfevents*"))
    # The checkpointed state rebuilds the same masker.
    state = cb.state_dict()
    cb2 = SaliencyMasker(budget=None, width=4, num_samples=8)
    cb2.load_state_dict(state)
    cb2._build(with_cb, cb.probe_x[:2])
    for a, b in zip(cb.masker.state_dict().values(), cb2.masker.state_dict().values()):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0)
    maps = cb2.saliency()(with_cb, cb.probe_x, cb.probe_y)
    assert maps.shape == (8, 1, 16, 16)


def test_errors_and_registry():
    with pytest.raises(ValueError, match="no trained masking network"):
        build_attributor("realtime_saliency")(nn.Linear(4, 2), torch.rand(2, 1, 2, 2).flatten(1), 0)
    with pytest.raises(ValueError, match="images"):
        RealTimeSaliency(MaskingNetwork(1, 2))(nn.Linear(4, 2), torch.rand(2, 4), 0)
    with pytest.raises(ValueError, match="alt"):
        MaskerObjective(alt="gray")
    with pytest.raises(ValueError, match="image batches"):
        SaliencyMasker()._build(nn.Linear(4, 2), torch.rand(2, 4))


def test_hydra_config_instantiates():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "callbacks" / "saliency_masker.yaml")
    cb = instantiate(conf.saliency_masker)
    assert isinstance(cb, SaliencyMasker) and isinstance(cb.objective, MaskerObjective)
    assert cb.objective.area == conf.saliency_masker.objective.area


def test_a_failing_masker_step_stops_the_masker_not_training(tmp_path):
    """Unlabelled batches (here: the label key points nowhere) stop the masker with a warning; the
    classifier trains on, bit-identically. strict=True raises instead."""
    plain, _ = _fit([], tmp_path / "a")
    cb = SaliencyMasker(budget=None, width=4, num_samples=8, label_key=lambda batch: None)
    with pytest.warns(UserWarning, match="stopped training its masker"):
        with_cb, _ = _fit([cb], tmp_path / "b")
    assert cb.masker is None and cb._disabled
    for (k, a), (_, b) in zip(plain.state_dict().items(), with_cb.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="labelled batches"):
        _fit([SaliencyMasker(width=4, num_samples=8, label_key=lambda batch: None, strict=True)], tmp_path / "c")
