"""Target operators: regions of dense outputs, positions, boxes, several targets at once (docs/dense.md)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from explain_callbacks import (
    BoxTarget,
    ClassTarget,
    MultiTarget,
    PositionTarget,
    PredictedRegion,
    RegionTarget,
)
from explain_callbacks.attribution import build_attributor
from explain_callbacks.metrics.functional import completeness_error, deletion, insertion
from tests.helpers_lightning import event_tags, trainer


class LinearDense(nn.Module):
    """out[n, c, p] = Σ_i W[c, p, i] x[n, i] + b[c, p]: a linear dense model with a closed-form gradient."""

    def __init__(self, c: int = 3, h: int = 4, w: int = 5, d: int = 12) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(c, h, w, d, generator=g, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(c, h, w, generator=g, dtype=torch.float64))

    def forward(self, x):
        return torch.einsum("chwd,nd->nchw", self.weight, x) + self.bias


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=2, dilation=2)
    ).double()


def _region(h: int = 8, w: int = 8) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[2:5, 3:7] = True
    return m


def test_region_gradient_equals_closed_form():
    model = LinearDense()
    x = torch.randn(6, 12, dtype=torch.float64)
    mask = torch.zeros(4, 5)
    mask[1:3, 2:5] = 1.0
    mask[0, 0] = 0.5  # a float mask weighs its positions
    cls = torch.tensor([0, 1, 2, 0, 1, 2])
    for reduce, scale in (("sum", 1.0), ("mean", 1 / float(mask.sum()))):
        got = build_attributor("saliency", abs=False)(model, x, RegionTarget(mask, cls, reduce=reduce))
        want = scale * torch.einsum("hw,nhwd->nd", mask.double(), model.weight.detach()[cls])
        torch.testing.assert_close(got, want)
    # input x gradient of a linear model: x_i * Σ mask W; IG (a straight path from zeros) gives the same
    ixg = build_attributor("input_x_gradient")(model, x, RegionTarget(mask, cls))
    ig = build_attributor("ig", n_steps=4)(model, x, RegionTarget(mask, cls))
    want = x * torch.einsum("hw,nhwd->nd", mask.double(), model.weight.detach()[cls])
    torch.testing.assert_close(ixg, want)
    torch.testing.assert_close(ig, want)
    # completeness of IG for the region's score: Σ A = t(x) - t(0) exactly for a linear model (the metric joins
    # the rows of x and of the baseline with torch.cat([target, target]))
    err = completeness_error(model, x, ig, RegionTarget(mask, cls), relative=False)
    assert err.shape == (6,) and float(err.max()) < 1e-9


@pytest.mark.parametrize("method", ["saliency", "ig", "occlusion", "lrp", "cd"])
def test_region_equals_sum_of_its_pixels(method):
    """Linearity: the map of a region target is the sum of the maps of its pixels (for every method whose
    map is linear in the explained output: gradients, path integrals, occlusion differences, LRP's output
    relevance)."""
    model = _conv_net()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    mask = _region()
    kw = {"abs": False} if method == "saliency" else {"n_steps": 6} if method == "ig" else {}
    attr = build_attributor(method, **kw)
    whole = attr(model, x, RegionTarget(mask, 1))
    pixels = torch.zeros_like(whole)
    for i, j in mask.nonzero().tolist():
        one = torch.zeros_like(mask)
        one[i, j] = True
        pixels += attr(model, x, RegionTarget(one, 1))
    torch.testing.assert_close(whole, pixels)


def test_full_region_equals_class_index_and_per_sample_masks():
    model = _conv_net()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    sal = build_attributor("saliency", abs=False)
    everything = torch.ones(8, 8, dtype=torch.bool)
    # a plain class index of a dense output sums its map over the positions: the full region
    torch.testing.assert_close(sal(model, x, RegionTarget(everything, 2)), sal(model, x, 2))
    # per-sample masks (B, H, W) and classes (B,): each row as if explained alone
    masks = torch.rand(4, 8, 8) > 0.5
    cls = torch.tensor([0, 3, 1, 2])
    batched = sal(model, x, RegionTarget(masks, cls))
    for n in range(4):
        torch.testing.assert_close(batched[n : n + 1], sal(model, x[n : n + 1], RegionTarget(masks[n], int(cls[n]))))


@pytest.mark.parametrize("method", ["saliency", "ig", "occlusion"])
def test_multitarget_equals_separate_calls(method):
    model = _conv_net()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    targets = [RegionTarget(_region(), 1), RegionTarget(~_region(), 0, reduce="mean"), 3, torch.tensor([0, 1, 2])]
    kw = {"n_steps": 6} if method == "ig" else {}
    # 12 rows in calls of 5: chunks span two targets; calls of 24: two steps / masks of all 12 rows per call, the
    # targets interleaved (0 1 2 3 0 1 2 3 by blocks of samples)
    for rows in (5, 24):
        attr = build_attributor(method, batch_size=rows, **kw)
        both = attr(model, x, MultiTarget(targets))
        assert both.shape == (3, 4, 3, 8, 8)
        for k, t in enumerate(targets):
            torch.testing.assert_close(both[:, k], build_attributor(method, **kw)(model, x, t))
        if method == "ig":  # per-sample side results come back as (B, K)
            assert attr.last_info["completeness_error"].shape == (3, 4)


def test_position_and_box_targets_select_their_entry():
    g = torch.Generator().manual_seed(0)
    seq = nn.Linear(6, 5).double()  # (B, T, 6) -> (B, T, 5): position t's output depends on x[:, t] only
    x = torch.randn(2, 7, 6, generator=g, dtype=torch.float64)
    pos = torch.tensor([2, -1])
    got = build_attributor("saliency", abs=False)(seq, x, PositionTarget(pos, torch.tensor([4, 1])))
    want = torch.zeros_like(x)
    want[0, 2] = seq.weight[4].detach()
    want[1, 6] = seq.weight[1].detach()
    torch.testing.assert_close(got, want)
    # (B, C, T) outputs with class_dim=1
    out = torch.randn(2, 5, 7, generator=g)
    assert torch.equal(PositionTarget(3, 2, class_dim=1)(out), out[:, 2, 3])

    boxes = torch.randn(2, 4, 5 + 3, generator=g)  # (B, N boxes, x y w h obj + 3 classes)
    assert torch.equal(BoxTarget(torch.tensor([1, 3]), 2)(boxes), torch.stack([boxes[0, 1, 7], boxes[1, 3, 7]]))
    assert torch.equal(BoxTarget(0, score="objectness")(boxes), boxes[:, 0, 4])
    assert torch.equal(BoxTarget(2, 1, score="coordinate")(boxes), boxes[:, 2, 1])
    # the metrics' "probability": softmax over the class columns only
    torch.testing.assert_close(BoxTarget(1, 2)(boxes, "probability"), boxes[:, 1, 5:].softmax(-1)[:, 2])
    # dict outputs: the entry at key
    assert torch.equal(BoxTarget(1, 0, key="pred")({"pred": boxes, "aux": None}), boxes[:, 1, 5])


def test_region_probability_is_the_softmax_over_classes_per_pixel():
    out = torch.randn(2, 4, 8, 8)
    mask = _region()
    got = RegionTarget(mask, 1, reduce="mean")(out, "probability")
    want = out.softmax(1)[:, 1][:, mask].mean(1)
    torch.testing.assert_close(got, want)


def test_metrics_take_a_region_target():
    model = _conv_net()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    t = RegionTarget(_region(), 1)
    maps = build_attributor("saliency")(model, x, t)
    # deletion of nothing-to-everything: its curve starts at the region's summed class probability
    _, curve, _ = deletion(model, x, maps, t, n_steps=4, output="logit", substrate=0.0, return_curve=True)
    torch.testing.assert_close(curve[:, 0].double(), t(model(x)).double())
    ins = insertion(model, x, maps, t, n_steps=4, output="probability")
    assert ins.shape == (4,) and torch.isfinite(ins).all()
    with pytest.raises(TypeError, match="MultiTarget"):
        deletion(model, x, maps, MultiTarget([t, 1]))


def test_bad_targets_name_the_problem():
    model = _conv_net()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    sal = build_attributor("saliency")
    with pytest.raises(ValueError, match="output's spatial dims"):
        sal(model, x, RegionTarget(torch.ones(4, 4, dtype=torch.bool), 1))
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 3\]"):
        sal(model, x, RegionTarget(_region(), 7))
    with pytest.raises(ValueError, match="one per sample"):
        sal(model, x, RegionTarget(torch.ones(3, 8, 8, dtype=torch.bool), 1))
    with pytest.raises(ValueError, match="spatial dims"):
        RegionTarget(torch.ones(8), 1)
    with pytest.raises(ValueError, match="box indices"):
        BoxTarget(9, 0)(torch.randn(2, 4, 8))
    with pytest.raises(TypeError, match="integer"):
        ClassTarget(torch.tensor([0.5, 1.0]))
    with pytest.raises(TypeError, match="class indices of a classifier"):  # a cross-entropy against the label
        build_attributor("sound_mask")(model, x, RegionTarget(_region(), 1))
    with pytest.raises(ValueError, match="target operator"):
        from explain_callbacks.callbacks import AttributionMonitor

        AttributionMonitor(target=MultiTarget([1, 2]))


def test_predicted_region_factory():
    model = _conv_net()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    pred = model(x).argmax(1)
    assert int(((pred == 2).flatten(1).sum(1) == 0).sum()) == 1  # class 2 is predicted nowhere in one sample:
    with pytest.warns(UserWarning, match="no pixel of class 2 in 1 of 3 samples"):  # said, not silently zero maps
        t = PredictedRegion(cls=2)(model, x, None)
    assert torch.equal(t.bind(3).mask, pred == 2)
    auto = PredictedRegion()(model, x, None).bind(3)  # the most frequent class other than 0, per sample
    counts = torch.stack([(pred == c).flatten(1).sum(1) for c in range(4)], 1)
    counts[:, 0] = -1
    assert torch.equal(auto.cls, counts.argmax(1))


def centre_of_object_class(model, inputs, labels):
    """A target factory: the class-(label + 1) logits over the centre 6x6 output pixels of each probe image."""
    square = torch.zeros(inputs.shape[-2:], dtype=torch.bool)
    square[5:11, 5:11] = True
    return RegionTarget(square, labels + 1, reduce="mean")


def test_monitor_explains_a_region_of_a_segmentation_model(tmp_path):
    """The AttributionMonitor on the shapes segmentation model: maps of a region of the output chosen by a target
    factory (a plain function of the probe set), metrics on them, and the attribution figure with the region
    outlined (TensorBoard images). The predicted region (PredictedRegion) runs through the monitor in the
    experiment=shapes_segmentation command test (tests/test_hydra_more.py)."""
    from explain_callbacks.callbacks import AttributionMonitor
    from explain_callbacks.datasets.shapes import ShapesDataModule
    from explain_callbacks.models import LitSegmenter, SegNet

    torch.manual_seed(0)
    dm = ShapesDataModule(n_train=64, n_val=16, n_test=16, size=16, batch_size=16)
    model = LitSegmenter(SegNet(3, 4, width=4), lr=0.01)
    mon = AttributionMonitor(
        budget=None,
        methods=["saliency", {"name": "ig", "n_steps": 4}, "gradcam"], metrics=["deletion", "insertion"],
        target=centre_of_object_class, num_samples=4, max_images=4, strict=True,
    )  # fmt: skip
    figures = []
    log_image = mon.log_image

    def keep(trainer_, tag, fig, *args, **kwargs):  # what the figure holds before logging closes it
        axes = getattr(fig, "axes", [])
        inputs = [ax for ax in axes if "px" in ax.get_title()]  # the input tiles, captioned with the region
        figures.append((tag, [ax.get_title() for ax in inputs], sum(len(ax.collections) for ax in inputs)))
        return log_image(trainer_, tag, fig, *args, **kwargs)

    mon.log_image = keep
    trainer(tmp_path, [mon], max_epochs=1, limit_train_batches=2).fit(model, dm)
    assert set(mon.last_scores) == {"saliency", "ig", "gradcam"}
    titles, contours = next((t, c) for tag, t, c in figures if tag == "maps/attributions")
    if titles:  # matplotlib: captions say what is explained, the predicted regions are outlined
        assert len(titles) == 4, titles
        assert contours >= 3  # a region's outline on the inputs (an empty or full predicted region has none)
        # the explained channel is label + 1 (channel 0 the background): named as the label's shape, not by index
        # (was "true square · class 2, 36 px": the data's names read one channel off)
        assert model.class_names == ["background", *dm.class_names]
        for title in titles:
            found = re.fullmatch(r"true (\w+)\s*(?:·\s*)?class (\w+), \d+ px", title)  # wrapped at " · "
            assert found is not None, title
            truth, explained = found.groups()
            assert truth == explained and truth in dm.class_names, title
    assert all("deletion" in s and "insertion" in s for s in mon.last_scores.values())
    tags = event_tags(tmp_path)
    assert "maps/attributions" in tags["images"] and "faithfulness/deletion_curve" in tags["images"]


def test_captions_name_the_output_classes():
    """describe() names classes by the output's class names (an index beyond them stays an index); the names of a
    model's outputs are its own ``class_names`` when it has them, else the labels' names."""
    from explain_callbacks.callbacks._logging import output_class_names

    names = ["background", "circle", "square"]
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True
    region = RegionTarget(mask, torch.tensor([1, 5])).bind(2, "cpu")
    assert region.describe(names) == ["class circle, 4 px", "class 5, 0 px"]
    assert region.describe() == ["class 1, 4 px", "class 5, 0 px"]
    assert PositionTarget(3, 2).bind(1, "cpu").describe(names) == ["position 3 · class square"]
    assert BoxTarget(0, 2, score="coordinate").bind(1, "cpu").describe(names) == ["box 0 · coordinate 2"]
    assert MultiTarget([1, 2]).stacked(1, torch.device("cpu")).describe(names) == ["class circle", "class square"]
    net, lit = torch.nn.Linear(2, 3), torch.nn.Module()
    assert output_class_names(net, lit, default=["a", "b", "c"]) == ["a", "b", "c"]  # a classifier: its labels
    lit.class_names = names
    assert output_class_names(net, lit, default=["circle", "square"]) == names


def test_hydra_builds_the_segmentation_experiment():
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from explain_callbacks.models import LitSegmenter

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=shapes_segmentation"])
    mon = instantiate(cfg.callbacks.attribution)
    assert isinstance(mon.target, PredictedRegion) and mon.target.reduce == "mean"
    assert isinstance(instantiate(cfg.model), LitSegmenter)


def test_region_is_drawn_over_the_input():
    pytest.importorskip("matplotlib")
    from explain_callbacks import viz

    x = torch.rand(2, 3, 16, 16)
    maps = {"saliency": torch.rand(2, 16, 16), "gradcam": torch.rand(2, 4, 4)}
    region = torch.zeros(2, 16, 16)
    region[:, 4:10, 5:12] = 1
    fig = viz.attribution_figure(x, maps, regions=region)
    # one contour on the input and one on each map, per sample
    assert sum(len(ax.collections) for ax in fig.axes) >= 2 * 3
