"""InteractionMonitor end to end, and the Hydra configs of the interaction package."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from explain_callbacks.callbacks.interaction_monitor import InteractionMonitor
from explain_callbacks.interaction import ACD, InteractionMethod
from explain_callbacks.models import MLP, LitClassifier

from .helpers_lightning import event_tags, image_loaders, lit, trainer

CONF = Path(__file__).resolve().parents[1] / "conf"


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_images_no_side_effects_and_logging(tmp_path):
    train, val = image_loaders()
    m0 = lit()
    trainer(tmp_path / "a", max_epochs=2, logger=False).fit(m0, train, val)
    train, val = image_loaders()
    m1 = lit()
    mon = InteractionMonitor(
        budget=None,
        methods=["cd", {"name": "integrated_hessians", "n_steps": 3}],
        groups=2,
        acd={"tile": 2, "percentile": 90, "num_iters": 2},
        num_samples=6,
        strict=True,
    )
    trainer(tmp_path / "b", callbacks=[mon], max_epochs=2).fit(m1, train, val)
    w0, w1 = _weights(m0), _weights(m1)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k  # BatchNorm buffers and RNG untouched
    tags = event_tags(tmp_path / "b")
    images = {"interactions/matrix/cd", "interactions/top_pairs/cd", "interactions/matrix/integrated_hessians"}
    assert images <= tags["images"]
    assert "interactions/acd_hierarchy/sample_0" in tags["images"]
    scalars = {"interactions/mean_abs/cd", "interactions/top_pair/cd", "interactions/consistency/integrated_hessians"}
    assert scalars <= tags["scalars"]
    summary = mon.last_scores["cd"]
    assert summary["matrix"].shape == (4, 4)
    assert len(summary["pairs"]) == 5 and len(summary["per_sample"]) == 6
    assert 0.0 <= summary["consistency"] <= 1.0


def test_tabular_planted_interaction_and_table(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(512, 4, generator=g) * 2 - 1
    y = (x[:, 0] * x[:, 1] > 0).long()  # an XOR-like interaction of features 0 and 1
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(1))
    val = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=64)
    torch.manual_seed(0)
    model = LitClassifier(MLP(4, 2, hidden=(32, 32)), lr=0.02)
    mon = InteractionMonitor(
        budget=None,
        methods=[{"name": "integrated_hessians", "n_steps": 4}],
        num_samples=32,
        top_k=3,
        feature_names=["a", "b", "c", "d"],
        model_attr="net",
        strict=True,
    )
    trainer(tmp_path, callbacks=[mon], max_epochs=6, logger=False).fit(model, train, val)
    pi, pj = mon.last_scores["integrated_hessians"]["pairs"][0][:2]
    assert (pi, pj) == (0, 1)
    text = mon.pair_table(
        mon.last_scores["integrated_hessians"], mon.methods["integrated_hessians"].last_info["groups"]
    )
    assert "a × b" in text


def test_errors_become_warnings_unless_strict(tmp_path):
    class Softmaxed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 3)

        def forward(self, x):
            return torch.softmax(self.fc(x.flatten(1)), 1)

    train, val = image_loaders()
    model = LitClassifier(Softmaxed())
    mon = InteractionMonitor(budget=None, methods=["cd"], num_samples=4)
    with pytest.warns(UserWarning, match="no rule for"):
        trainer(tmp_path, callbacks=[mon], max_epochs=1, logger=False).fit(model, train, val)
    with pytest.raises(ValueError, match="at least one method"):
        InteractionMonitor(methods=[])


def test_hydra_configs_instantiate():
    cfg = OmegaConf.load(CONF / "callbacks" / "interaction.yaml")
    mon = instantiate(cfg.interaction)
    assert isinstance(mon, InteractionMonitor)
    # CD alone: integrated Hessians every epoch spent 87 % of the main job (bench_callback_costs.py); the config's
    # comment adds them with a budget
    assert list(mon.methods) == ["cd"] == list(InteractionMonitor().methods)
    for name in ("cd", "integrated_hessians", "sobol", "hsic"):
        obj = instantiate(OmegaConf.load(CONF / "interaction" / f"{name}.yaml"))
        assert isinstance(obj, InteractionMethod) and obj.name == name
    assert isinstance(instantiate(OmegaConf.load(CONF / "interaction" / "acd.yaml")), ACD)
    data = OmegaConf.merge({"seed": 3}, {"data": OmegaConf.load(CONF / "data" / "nid.yaml")})
    dm = instantiate(data.data, function=5, n_samples=200)
    dm.setup()
    xb, _ = next(iter(dm.train_dataloader()))
    assert xb.shape[1] == 10 and dm.truth[0, 1] and not dm.truth[0, 3]


def test_matrix_axes_say_what_a_group_is():
    """Patches of an image grid, windows of a sequence, features of tabular data (NID's 10 features were labelled
    as windows of a sequence by a first version; before, every axis read "feature group")."""
    from explain_callbacks.callbacks.interaction_monitor import group_axis_label
    from explain_callbacks.interaction.base import make_groups

    image, signal, table = torch.rand(2, 3, 16, 16), torch.rand(2, 2, 40), torch.rand(2, 10)
    assert group_axis_label(make_groups(image, 4), image) == "patch (row, col) of the 4×4 grid"
    assert group_axis_label(make_groups(table), table) == "feature"
    assert group_axis_label(make_groups(signal, 8, channels_first=True), signal) == "window of the sequence (8 windows)"


def test_mean_panel_leaves_the_main_effects_out(monkeypatch):
    """The sample panels zero the diagonal (main effects, another quantity than a pair's interaction); the probe-mean
    panel drew them, so a strong main effect outshone every pair there. Both now show pairs only."""
    from types import SimpleNamespace

    from explain_callbacks import viz
    from explain_callbacks.interaction.base import make_groups

    drawn = []
    monkeypatch.setattr(viz, "matrix_figure", lambda panels, *a, **k: drawn.append(panels))
    mon = InteractionMonitor(methods=["cd"], num_samples=2)
    x = torch.rand(2, 10)
    scores = torch.rand(2, 10, 10) + 10 * torch.eye(10)  # main effects far above the pairs
    groups = make_groups(x)
    summary = mon.summarise(scores, groups)
    trainer = SimpleNamespace(global_rank=0, loggers=[], state=SimpleNamespace(fn=None), current_epoch=0,
                              datamodule=None, val_dataloaders=None)  # fmt: skip
    mon._log_pictures(trainer, "cd", x, scores, summary, groups, torch.tensor([0, 1]))
    for _title, matrix, _signed in drawn[0]:
        assert float(matrix.diagonal().abs().max()) == 0.0
    assert drawn[0][1][0] == "sample 0 · 0 (signed)"  # no class names in the data: the label's index
