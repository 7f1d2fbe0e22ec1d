"""LandscapeMonitor: runs at fit end, logs its section, leaves training bit-identical."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from explain_callbacks import LandscapeMonitor
from explain_callbacks.callbacks._logging import SECTIONS
from explain_callbacks.models import LitClassifier

from .helpers_lightning import event_tags, trainer
from .test_landscape import DRIVERS, _drivers_data


def _loaders():
    x, y = _drivers_data(n=320)
    train = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    val = DataLoader(TensorDataset(x[256:], y[256:]), batch_size=32)
    return train, val


def _fit(tmp_path, callbacks, epochs=6):
    train, val = _loaders()
    torch.manual_seed(0)
    # Dropout: the global RNG and the train/eval mode would show a side effect
    net = nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 2))
    model = LitClassifier(net, lr=0.05)
    tr = trainer(tmp_path, callbacks, max_epochs=epochs)
    tr.fit(model, train, val)
    return model


def test_monitor_bit_identical_logs_and_ranks_drivers(tmp_path):
    assert "landscape" in SECTIONS
    off = _fit(tmp_path / "off", [])
    rng_off = torch.get_rng_state()
    mon = LandscapeMonitor(num_train=256, n_hops=6, weight_decay=1e-3, model_attr="net", snapshot_every_n_epochs=3,
                           num_samples=32, budget=None)  # fmt: skip
    on = _fit(tmp_path / "on", [mon])
    rng_on = torch.get_rng_state()
    for (n, a), b in zip(off.state_dict().items(), on.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(rng_off, rng_on)
    assert on.training == off.training and all(p.requires_grad and p.grad is None for p in on.parameters())
    res = mon.result
    assert res is not None and len(mon.snapshots) == 2
    assert res.sample.n_minimisations == 1 + 6 + 2 and res.sample.origin.count("snapshot") == 2
    assert set(res.ranking[:3].tolist()) == set(DRIVERS)
    # saliency's global ranking over the probe: the same drivers, so the rankings agree
    assert set(torch.argsort(mon.attribution_scores, descending=True)[:3].tolist()) == set(DRIVERS)
    assert mon.agreement is not None and mon.agreement > 0.3
    tags = event_tags(tmp_path / "on")
    assert {"landscape/ranking", "landscape/minima"} <= tags["images"]
    assert any(t.startswith("landscape/ranking") for t in tags["text"])
    assert {"landscape/agreement/saliency", "landscape/minimisations", "cost/seconds/landscape"} <= tags["scalars"]


def test_every_n_epochs_and_errors(tmp_path):
    # model_attr=None: the LightningModule itself is deep-copied (its trainer shared, not copied)
    mon = LandscapeMonitor(budget=None, num_train=64, n_hops=1, weight_decay=1e-3, every_n_epochs=1, compare_with=None,
                           num_samples=8)  # fmt: skip
    calls = []
    original = mon.explain
    mon.explain = lambda *a: (calls.append(a[0].current_epoch), original(*a))  # type: ignore[method-assign]
    _fit(tmp_path, [mon], epochs=2)
    assert calls == [0, 1]  # every validation epoch, and not again at fit end
    assert mon.result is not None and mon.attribution_scores is None
    with pytest.raises(ValueError, match="loss must be one of"):
        LandscapeMonitor(loss="hinge")
    with pytest.raises(ValueError, match="sign_flips"):
        LandscapeMonitor(sign_flips="yes")


def test_unsupported_network_warns_and_training_continues(tmp_path):
    train, val = _loaders()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    mon = LandscapeMonitor(budget=None, num_train=64, n_hops=1, model_attr="net", num_samples=8)
    with pytest.warns(UserWarning, match=r"BatchNorm1d.*align=False"):
        trainer(tmp_path, [mon], max_epochs=1).fit(LitClassifier(net, lr=0.05), train, val)
    assert mon.result is None


def test_conv_network_without_alignment_and_state_roundtrip(tmp_path):
    """A CNN with BatchNorm (no alignment): scores per (channel, kernel position), saliency compared per channel;
    the training rows and snapshots travel in the callback's state."""
    from .helpers_lightning import image_loaders, lit

    train, val = image_loaders()
    mon = LandscapeMonitor(budget=None, num_train=48, n_hops=2, weight_decay=1e-3, model_attr="net", align=False,
                           snapshot_every_n_epochs=1, num_samples=8, max_iter=200, gtol=1e-3)  # fmt: skip
    trainer(tmp_path, [mon], max_epochs=2).fit(lit(), train, val)
    res = mon.result
    assert res is not None and not res.aligned and res.scores.score.shape == (1, 3, 3)
    assert mon.attribution_scores is not None and mon.attribution_scores.shape == (1,)
    assert len(mon.snapshots) == 2 and res.sample.n_minimisations == 1 + 2 + 2
    state = mon.state_dict()
    other = LandscapeMonitor(budget=None, num_train=48, n_hops=2, model_attr="net", align=False, num_samples=8)
    other.load_state_dict(state)
    assert torch.equal(other.train_x, mon.train_x) and all(
        torch.equal(a, b) for a, b in zip(other.snapshots, mon.snapshots)
    )
