"""ConceptMonitor (CRP while training): results equal the CRP functions, a planted watermark concept is found with
reference crops on the mark, no side effects, labelled figures, state, errors."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from explain_callbacks import viz
from explain_callbacks.attribution.lrp import LRP, concept_atlas, conditional_relevance, layer_relevance
from explain_callbacks.callbacks import ConceptMonitor
from explain_callbacks.datasets.shapes import make_shapes
from explain_callbacks.models import LitClassifier

from .helpers_lightning import event_tags, image_loaders, lit, trainer

ROOT = Path(__file__).resolve().parents[1]


def _fit(tmp_path, callbacks, epochs=2, logger=True):
    train, val = image_loaders()
    model = lit()
    trainer(tmp_path, callbacks, max_epochs=epochs, logger=logger).fit(model, train, val)
    return model


def test_logs_and_equals_the_crp_functions(tmp_path):
    """Tags in the concepts section; shares equal concept_atlas over the reference set; the probe's top concepts
    are the largest concept relevances of layer_relevance; the references come from relevance maximisation."""
    mon = ConceptMonitor(
        num_reference=24, num_samples=4, model_attr="net", strict=True, atlas_top=2, top_k=2, budget=None
    )
    model = _fit(tmp_path, [mon])
    assert mon.layer_name == "features.0"  # the last convolution, found as Grad-CAM finds it
    assert [e for e, _ in mon.history] == [0, 1] and mon.ref_x.shape[0] == 24
    net = model.net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atlas = concept_atlas(LRP(), net, mon.ref_x, mon.ref_y, "features.0", top=2)
    assert atlas.classes == mon.atlas.classes
    assert torch.equal(atlas.concepts, mon.atlas.concepts)
    assert torch.allclose(atlas.relevance, mon.atlas.relevance, atol=1e-5)
    present = torch.tensor(atlas.classes)
    assert torch.allclose(mon.shares[present].sum(1), torch.ones(len(present)), atol=1e-4)  # shares sum to 1
    rel = layer_relevance(LRP(), net, mon.probe_x, mon.probe_y, "features.0").sum((2, 3))
    assert set(mon.references.concepts) >= set(rel[0].topk(2).indices.tolist()) | set(atlas.concepts.flatten().tolist())
    tags = event_tags(tmp_path)
    assert {"concepts/probes", "concepts/atlas"} <= tags["images"]
    assert "concepts/atlas/text_summary" in tags["text"]
    curves = {f"concepts/class_{c}/channel_{ch}" for c, chs in mon.tracked.items() for ch in chs}
    assert curves and curves <= tags["scalars"] and "cost/seconds/concepts" in tags["scalars"]
    for c in atlas.classes:  # every concept ever in a class's top has its curve
        assert set(atlas.concepts[atlas.classes.index(c)].tolist()) <= set(mon.tracked[c])


def test_bit_identical_weights_and_rng(tmp_path):
    """Monitor on vs off: the same weights bit for bit (BatchNorm, Dropout, Adam) and the same global RNG."""
    torch.manual_seed(0)
    off = _fit(tmp_path / "off", [], logger=False)
    rng_off = torch.get_rng_state()
    torch.manual_seed(0)
    on = _fit(
        tmp_path / "on", [ConceptMonitor(num_reference=16, num_samples=4, model_attr="net", strict=True, budget=None)]
    )
    rng_on = torch.get_rng_state()
    for (n, a), b in zip(off.state_dict().items(), on.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(rng_off, rng_on)


S = 16  # image side of the watermark data


def _watermarked(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two shapes; every class-1 image carries the class's corner watermark (3x3, rows 1-3, columns S-4..S-2),
    class 0 none (same images otherwise: make_shapes draws the same numbers whatever the watermark rate)."""
    marked, clean = make_shapes(n, S, seed, 2, watermark=1.0), make_shapes(n, S, seed, 2, watermark=0.0)
    assert torch.equal(marked.y, clean.y)
    x = torch.where((marked.y == 1).view(-1, 1, 1, 1), marked.x, clean.x)
    return x, marked.y


def test_planted_watermark_concept_found_while_training(tmp_path):
    """A small CNN trained for 3 epochs on shapes whose class 1 carries a corner watermark: among class 1's
    dominant concepts there is one whose reference crops are all watermarked class-1 images, cropped around
    the mark (the box holds the 3x3 mark and is at most a quarter of the image)."""
    x, y = _watermarked(256, 0)
    xv, yv = _watermarked(64, 1)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
    val = DataLoader(TensorDataset(xv, yv), batch_size=32)
    mon = ConceptMonitor(
        num_reference=48, num_samples=8, model_attr="net", strict=True, atlas_top=2, every_n_epochs=3, budget=None
    )
    trainer(tmp_path, [mon], max_epochs=3).fit(LitClassifier(net, lr=0.01), train, val)
    assert mon.layer_name == "3" and [e for e, _ in mon.history] == [2]
    rm = mon.references
    found = []
    for c in mon.atlas.concepts[mon.atlas.classes.index(1)].tolist():
        j = rm.concepts.index(c)
        refs = rm.indices[:, j]
        boxes = rm.boxes[:, j]  # (crops, 2 dims, [start, stop))
        on_mark = all(r0 <= 1 and r1 >= 4 and c0 <= S - 4 and c1 >= S - 1 for (r0, r1), (c0, c1) in boxes.tolist())
        small = bool(((boxes[:, :, 1] - boxes[:, :, 0]).prod(1) <= S * S / 4).all())
        if bool((yv[refs] == 1).all()) and on_mark and small:
            found.append(c)
    assert found, (mon.atlas.table(), rm)
    assert float(mon.shares[1, found[0]]) > 0.2  # a dominant concept of class 1, not a marginal one


def test_planted_detector_conditional_map_on_the_mark(tmp_path):
    """A hand-planted watermark detector (channel 2 of the only convolution, read by the head for class 1, as in
    test_lrp_crp): the monitor puts it first for class 1, its probe map sits on the mark, its crops hold it."""
    mark = torch.tensor([[1.0, -1, 1], [-1, 1, -1], [1, -1, 1]])
    conv, head = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 2)
    torch.manual_seed(0)
    with torch.no_grad():
        conv.weight.mul_(0.1)
        conv.weight[2, 0] = mark
        conv.bias[2] = -4.0
        head.weight.uniform_(-0.1, 0.1)
        head.weight[1, 2] = 200.0
        head.bias.copy_(torch.tensor([0.5, 0.0]))
    net = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    g = torch.Generator().manual_seed(2)
    x = 0.3 * torch.rand(24, 1, 12, 12, generator=g)
    y = torch.tensor([0, 1] * 12)
    where = {}
    for i in range(1, 24, 2):
        r, c = (int(v) for v in torch.randint(0, 9, (2,), generator=g))
        x[i, 0, r : r + 3, c : c + 3] = (mark + 1) / 2
        where[i] = (r, c)
    model = LitClassifier(net, lr=0.0)  # lr 0: the planted weights stay as they are
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    mon = ConceptMonitor(
        num_reference=24, num_samples=4, model_attr="net", strict=True, top_k=2, atlas_top=2, budget=None
    )
    trainer(tmp_path, [mon], max_epochs=1).fit(model, loader, loader)
    assert int(mon.atlas.concepts[1, 0]) == 2 and float(mon.atlas.relevance[1, 0]) > 0.5
    rm = mon.references
    j = rm.concepts.index(2)
    for r in range(rm.indices.shape[0]):
        i = int(rm.indices[r, j])
        top, left = where[i]
        (r0, r1), (c0, c1) = rm.boxes[r, j].tolist()
        assert r0 <= top + 1 < r1 and c0 <= left + 1 < c1
    # probe rows 1 and 3 (class 1): concept 2 first, its conditional map (as conditional_relevance's) on the mark
    for i in (1, 3):
        assert int(mon.probe_concepts[i, 0]) == 2 and float(mon.probe_shares[i, 0]) > 0.5
        maps, _ = conditional_relevance(LRP(), net.eval(), x[i : i + 1], y[i : i + 1], "0", [2, 0])
        assert torch.allclose(mon.probe_maps[i][0], maps[0, 0], atol=1e-6)
        top, left = where[i]
        m = mon.probe_maps[i][0, 0].clamp_min(0)
        assert float(m[top : top + 3, left : left + 3].sum()) > 0.9 * float(m.sum())


def test_figure_labels_and_fallback(monkeypatch):
    """concept_figure: a matplotlib figure with 'channel c: share %' titles and 'ref' crops; without matplotlib
    a (3, H, W) grid with one tile per cell."""
    pytest.importorskip("matplotlib")
    lead = torch.rand(3, 8, 8)
    groups = [[(torch.randn(8, 8), "channel 3: 40%", [torch.rand(3, 4, 4), torch.rand(3, 5, 3)])]]
    fig = viz.concept_figure([lead], ["y=1 · pred=1"], groups, 2, title="t")
    titles = [ax.get_title(loc) for ax in fig.axes for loc in ("center", "left")]
    assert "channel 3: 40%" in titles and "reference crops (best first)" in titles and "y=1 · pred=1" in titles
    atlas = viz.concept_figure([None], ["class 1"], [[(None, "channel 3: 40%", [torch.rand(3, 4, 4)])]], 2)
    assert any(t.get_text() == "class 1" for ax in atlas.axes for t in ax.texts)
    assert "channel 3: 40% · reference crops" in [ax.get_title("left") for ax in atlas.axes]
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(viz.figures, "_MATPLOTLIB", None)
    grid = viz.concept_figure([lead], ["x"], groups, 2)
    assert isinstance(grid, torch.Tensor) and grid.shape[0] == 3
    assert grid.shape[2] > 4 * grid.shape[1] / 1.2  # one row of 4 tiles: input, map, 2 crops


def test_state_round_trip():
    mon = ConceptMonitor(num_reference=4)
    mon.ref_x, mon.ref_y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    mon.history = [(0, torch.rand(2, 3)), (1, torch.rand(2, 3))]
    mon.tracked = {0: [1, 2], 1: [0]}
    state = mon.local_state_dict()
    other = ConceptMonitor(num_reference=4)
    other.load_local_state_dict(state)
    assert torch.equal(other.ref_x, mon.ref_x) and other._ref_frozen
    assert [e for e, _ in other.history] == [0, 1] and torch.equal(other.shares, mon.history[-1][1])
    assert other.tracked == mon.tracked
    assert "ref_x" in ConceptMonitor.probe_bound_state  # re-captured with the probe under another world size


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="target=None"):
        ConceptMonitor(target=None)
    with pytest.raises(ValueError, match="composite must be one of"):
        ConceptMonitor(composite="nope")
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        ConceptMonitor(top_k=0)
    # a layer name that is not there: strict raises, otherwise a warning and training goes on
    with pytest.raises(KeyError, match="No layer named"):
        _fit(tmp_path / "strict", [ConceptMonitor(layer="nope", num_samples=2, model_attr="net", strict=True)],
             epochs=1, logger=False)  # fmt: skip
    with pytest.warns(UserWarning, match="No layer named"):
        _fit(tmp_path / "lenient", [ConceptMonitor(layer="nope", num_samples=2, model_attr="net")], epochs=1,
             logger=False)  # fmt: skip


@pytest.mark.ddp
def test_under_ddp(tmp_path):
    """2-process DDP (gloo): the same global shares on both ranks, equal to the atlas over both reference sets;
    a failure on one rank skips the epoch on both without a hang; pictures written by rank zero only."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", PL_DISABLE_FORK="1")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "ddp_concepts.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "DDP_OK" in out.stdout
    assert len(list(tmp_path.rglob("events.out.tfevents.*"))) == 1  # only rank zero writes
    assert {"concepts/probes", "concepts/atlas"} <= event_tags(tmp_path)["images"]


def test_resume_keeps_references_and_history_and_test_logs_under_test(tmp_path):
    """A resumed fit continues the history with the same reference set; trainer.test explains (tags under test/)
    without adding a point to the training curves."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    train, val = image_loaders()
    mon1 = ConceptMonitor(budget=None, num_reference=16, num_samples=4, model_attr="net")
    trainer(tmp_path / "a", [mon1, ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)], logger=False).fit(
        lit(), train, val
    )
    mon2 = ConceptMonitor(budget=None, num_reference=16, num_samples=4, model_attr="net", strict=True)
    tr = trainer(tmp_path / "b", [mon2], max_epochs=3)
    tr.fit(lit(), train, val, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert torch.equal(mon2.ref_x, mon1.ref_x)
    assert [e for e, _ in mon2.history] == [0, 1, 2]
    assert torch.equal(mon2.history[1][1], mon1.history[1][1])
    tr.test(tr.lightning_module, val)
    assert [e for e, _ in mon2.history] == [0, 1, 2]
    tags = event_tags(tmp_path / "b")
    assert "test/concepts/probes" in tags["images"]
    assert any(t.startswith("test/concepts/class_") for t in tags["scalars"])
