"""InfluenceMonitor: live TracIn equals the functional twin on the same epochs, no side effects, flipped labels."""

from __future__ import annotations

import contextlib

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from explain_callbacks.analysis import adam_preconditioner, layer_parameters, self_influence, tracin_scores
from explain_callbacks.callbacks import InfluenceMonitor
from explain_callbacks.models import LitClassifier

from .helpers_lightning import event_tags, image_loaders, lit, trainer


class Snapshots(pl.Callback):
    """Records the weights and Adam's preconditioner wherever the monitor takes its checkpoints."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.states, self.pre = names, [], []

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.states.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})
        self.pre.append(adam_preconditioner(trainer.optimizers[0], pl_module.net, self.names))


def _fit(tmp_path, callbacks, epochs=2, seed=0):
    train, val = image_loaders()
    model = lit(seed=seed)
    tr = trainer(tmp_path, callbacks, max_epochs=epochs)
    tr.fit(model, train, val)
    return model, tr


@pytest.mark.parametrize("metric", ["sgd", "adam"])
def test_live_scores_equal_functional_on_the_same_checkpoints(tmp_path, metric):
    net_names = layer_parameters(lit().net, "last")
    snaps = Snapshots(net_names)
    mon = InfluenceMonitor(
        budget=None, num_train=40, num_samples=6, model_attr="net", optimizer_metric=metric, batch_size=16
    )
    with pytest.warns(UserWarning, match="Adam-like") if metric == "sgd" else contextlib.nullcontext():
        model, _ = _fit(tmp_path, [snaps, mon], epochs=3)
    assert mon.epochs == [0, 1, 2] and mon.lrs == [0.01] * 3
    assert mon.scores.shape == (6, 40) and mon.self_influence.shape == (40,)
    # the subset is the seeded draw from the train dataset
    expected_idx = torch.randperm(96, generator=torch.Generator().manual_seed(0))[:40]
    assert torch.equal(mon.train_indices, expected_idx)
    pre = snaps.pre if metric == "adam" else None
    ref = tracin_scores(snaps.states, mon.train_x, mon.train_y, mon.probe_x, mon.probe_y, layers="last",
                        lrs=mon.lrs, model=model.net, preconditioners=pre)  # fmt: skip
    ref_self = self_influence(snaps.states, mon.train_x, mon.train_y, layers="last", lrs=mon.lrs,
                              model=model.net, preconditioners=pre)  # fmt: skip
    assert torch.allclose(mon.scores, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    assert torch.allclose(mon.self_influence, ref_self, rtol=1e-5)
    tags = event_tags(tmp_path)
    assert {"influence/probe_0", "influence/self_influence/top"} <= tags["images"]
    assert "influence/self_influence" in tags["histograms"]


def test_bit_identical_weights_rng_and_no_side_effects(tmp_path):
    """Monitor on vs off: the same weights bit for bit and the same global RNG (BatchNorm, Dropout, Adam)."""
    off, _ = _fit(tmp_path / "off", [])
    rng_off = torch.get_rng_state()
    mon = InfluenceMonitor(budget=None, num_train=32, num_samples=4, model_attr="net", layers=None, projection_dim=16)
    on, _ = _fit(tmp_path / "on", [mon])
    rng_on = torch.get_rng_state()
    assert mon.epochs == [0, 1]
    for (n, a), b in zip(off.state_dict().items(), on.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(rng_off, rng_on)

    # a direct call inside training state: modes, grads and requires_grad untouched
    model = lit()
    model.train()
    x, y = mon.probe_x, mon.probe_y
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = {n: m.training for n, m in model.named_modules()}
    self_influence(model.net, x, y, layers=None)
    assert {n: m.training for n, m in model.named_modules()} == before
    assert all(torch.equal(p.grad, g) and p.requires_grad for p, g in zip(model.parameters(), grads))


def _digits(flip_frac=0.05, n=600):
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32) / 16.0
    y = torch.tensor(d.target[:n])
    g = torch.Generator().manual_seed(0)
    flip = torch.randperm(n, generator=g)[: int(flip_frac * n)]
    noisy = y.clone()
    noisy[flip] = (y[flip] + torch.randint(1, 10, (len(flip),), generator=g)) % 10
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[flip] = True
    return x, noisy, flipped


def test_monitor_self_influence_finds_planted_flips(tmp_path):
    """Through Lightning: 5 % flipped digit labels rank first by accumulated self-influence (AUC >= 0.9)."""
    x, y, flipped = _digits()
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=32)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    model = LitClassifier(net, lr=0.01)
    mon = InfluenceMonitor(
        budget=None, num_train=600, num_samples=4, model_attr="net", batch_size=600, optimizer_metric="adam"
    )
    tr = trainer(tmp_path, [mon], max_epochs=5)
    tr.fit(model, train, val)
    tags = event_tags(tmp_path)  # tabular inputs: tables and histogram, no images
    assert {"influence/self_influence/top/text_summary", "influence/probe_0/table/text_summary"} <= tags["text"]
    assert not any(t.startswith("influence/") for t in tags["images"])
    s = mon.self_influence
    truth = flipped[mon.train_indices]
    pos, neg = s[truth], s[~truth]
    auc = float((pos[:, None] > neg[None, :]).double().mean())
    print(f"monitor AUC {auc:.3f}")
    assert auc >= 0.9, auc


class _Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


def test_streamed_subset_and_errors(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    mon = InfluenceMonitor(budget=None, num_train=20, num_samples=4, model_attr="net", layers=["features.0"])
    tr = trainer(tmp_path, [mon], max_epochs=1, logger=False)
    tr.fit(lit(), DataLoader(_Stream(x, y), batch_size=16), DataLoader(TensorDataset(x[:8], y[:8]), batch_size=8))
    assert torch.equal(mon.train_x, x[:20]) and torch.equal(mon.train_indices, torch.full((20,), -1))
    assert mon.scores.shape == (4, 20) and torch.isfinite(mon.scores).all()
    with pytest.raises(ValueError, match="optimizer_metric"):
        InfluenceMonitor(optimizer_metric="rmsprop")
    with pytest.raises(ValueError, match="loss must be"):
        InfluenceMonitor(loss="hinge")
    with pytest.raises(ValueError, match="train_source"):
        InfluenceMonitor(train_source="files")
    # a wrong layer name: a clear error under strict, a warning (training goes on) otherwise
    bad = InfluenceMonitor(budget=None, num_train=8, num_samples=2, model_attr="net", layers=["head.9"])
    with pytest.warns(UserWarning, match="no module named 'head.9'"):
        trainer(tmp_path / "bad", [bad], max_epochs=1, logger=False).fit(
            lit(), *image_loaders()
        )
    assert bad.epochs == [] and bad.scores is None


def test_untrained_layers_fail_clearly(tmp_path):
    model = lit()
    for p in model.net.head.parameters():
        p.requires_grad_(False)

    class Frozen(LitClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net.features.parameters(), lr=0.1)

    frozen = Frozen(model.net, lr=0.1)
    mon = InfluenceMonitor(budget=None, num_train=8, num_samples=2, model_attr="net", strict=True)
    train, val = image_loaders()
    with pytest.raises(ValueError, match="is trained by an optimizer"):
        trainer(tmp_path, [mon], max_epochs=1, logger=False).fit(frozen, train, val)


def test_resume_continues_the_sum_and_validate_adds_nothing(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    names = layer_parameters(lit().net, "last")
    train, val = image_loaders()
    snaps1, mon1 = Snapshots(names), InfluenceMonitor(budget=None, num_train=24, num_samples=4, model_attr="net")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    model = lit()
    trainer(tmp_path, [snaps1, mon1, ckpt], max_epochs=2, logger=False).fit(model, train, val)
    # the functional twin reads the Lightning checkpoint file itself (weights_only), with the lr saved in it
    last = str(tmp_path / "ck" / "last.ckpt")
    from_file = self_influence([last], mon1.train_x, mon1.train_y, layers="last", model=lit())
    from_snapshot = self_influence([snaps1.states[-1]], mon1.train_x, mon1.train_y, layers="last", lrs=0.01,
                                   model=lit().net)  # fmt: skip
    assert torch.allclose(from_file, from_snapshot, rtol=1e-6)
    snaps2, mon2 = Snapshots(names), InfluenceMonitor(budget=None, num_train=24, num_samples=4, model_attr="net")
    tr = trainer(tmp_path, [snaps2, mon2, ModelCheckpoint(dirpath=tmp_path / "ck2")], max_epochs=3, logger=False)
    tr.fit(lit(), train, val, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert mon2.epochs == [0, 1, 2] and torch.equal(mon2.train_indices, mon1.train_indices)
    ref = tracin_scores(snaps1.states + snaps2.states, mon2.train_x, mon2.train_y, mon2.probe_x, mon2.probe_y,
                        layers="last", lrs=mon2.lrs, model=model.net)  # fmt: skip
    assert torch.allclose(mon2.scores, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    before = mon2.scores.clone()
    tr.validate(tr.lightning_module, val)  # adds no checkpoint
    assert mon2.epochs == [0, 1, 2] and torch.equal(mon2.scores, before)
    alone = InfluenceMonitor(budget=None, num_train=24, num_samples=4, model_attr="net")
    with pytest.warns(UserWarning, match="add nothing"):  # attached to validate only: said why nothing happens
        trainer(tmp_path, [alone], logger=False).validate(lit(), val)
    assert alone.epochs == [] and alone.scores is None


def test_figures_with_and_without_matplotlib(monkeypatch):
    """Labelled figures: matplotlib when importable, the viz grid otherwise; tabular samples give none."""
    import builtins

    mon = InfluenceMonitor()
    rows = torch.rand(5, 1, 8, 8)
    texts = [f"y={i}" for i in range(5)]
    fig = mon._figure(rows, texts, 3)
    assert fig is not None and fig.shape[0] == 3 and float(fig.min()) >= 0 and float(fig.max()) <= 1
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    grid = mon._figure(rows, texts, 3)
    assert grid is not None and grid.shape == (3, 2 * 48 + 3 * 2, 3 * 48 + 4 * 2)  # 2 rows of 3 upscaled tiles
    assert mon._figure(torch.rand(5, 64), texts, 3) is None


def test_unreadable_training_subset_warns_and_training_goes_on(tmp_path):
    """A subset it cannot read (wrong label_key) is a warning, not a crash (strict=False); strict raises."""
    train, val = image_loaders()
    mon = InfluenceMonitor(budget=None, num_train=8, num_samples=2, model_attr="net", label_key="nope")
    with pytest.warns(UserWarning, match="could not read its training subset"):
        trainer(tmp_path, [mon], max_epochs=1, logger=False).fit(lit(), train, val)
    assert mon.train_x is None and mon.scores is None
    strict = InfluenceMonitor(budget=None, num_train=8, num_samples=2, model_attr="net", label_key="nope", strict=True)
    with pytest.raises(KeyError):
        trainer(tmp_path, [strict], max_epochs=1, logger=False).fit(lit(), train, val)
