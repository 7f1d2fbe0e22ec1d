"""viz: the figures' content (labels, colour bars, shared and centred scales, tile size) read off the matplotlib
Figure objects, the plain-image fallback without matplotlib, and the colour conventions the monitors rely on."""

from __future__ import annotations

import sys

import pytest
import torch

from explain_callbacks import viz

matplotlib = pytest.importorskip("matplotlib")


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib hidden as if it were not installed (an import of it raises ImportError)."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not viz.has_matplotlib()


def _images(fig):
    """(axes, AxesImage) pairs of a figure, colour-bar axes excluded."""
    out = []
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        out += [(ax, im) for im in ax.get_images()]
    return out


def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_colorize_diverging_centres_zero_and_orders_signs():
    m = torch.tensor([[[-1.0, 0.0, 1.0]]])
    rgb = viz.colorize(m, "diverging", symmetric=True)
    assert rgb.shape == (1, 3, 1, 3) and rgb.min() >= 0 and rgb.max() <= 1
    neg, zero, pos = rgb[0, :, 0, 0], rgb[0, :, 0, 1], rgb[0, :, 0, 2]
    assert neg[2] > neg[0] and pos[0] > pos[2]  # blue for negative, red for positive
    assert zero.min() > 0.9  # near white at zero


def test_overlay_shows_image_where_map_is_zero():
    img = torch.rand(2, 1, 8, 8)
    maps = torch.zeros(2, 8, 8)
    maps[:, 0, 0] = 5.0
    out = viz.overlay(img, maps)
    assert out.shape == (2, 3, 8, 8)
    grey = out[:, :, 4, 4]
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    assert out[0, 0, 0, 0] > out[0, 2, 0, 0]  # strong positive attribution drawn red


def test_grid_matrix_and_map_reduction():
    g = viz.make_grid(torch.rand(5, 3, 4, 4), nrow=2, pad=1)
    assert g.shape == (3, 3 * 5 + 1, 2 * 5 + 1)
    mat = viz.matrix_image(torch.randn(3, 4), "diverging", cell=2)
    assert mat.shape == (3, 6, 8)
    assert viz.map_to_2d(torch.rand(2, 3, 4, 4)).shape == (2, 4, 4)
    assert viz.map_to_2d(torch.rand(2, 7)).shape == (2, 1, 7)


def test_the_bitmap_font_is_gone():
    import importlib

    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("explain_callbacks.viz.font")
    assert not hasattr(viz, "draw_text") and not hasattr(viz, "label_image") and not hasattr(viz, "plot_curves")


def test_attribution_figure_rows_captions_shared_centred_scales_and_tile_size():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 16, 16)
    signed = torch.randn(3, 16, 16)
    signed[1] *= 10  # one sample much stronger: still on the method's one scale
    unsigned = torch.rand(3, 8, 8)  # lower resolution (Grad-CAM-like)
    captions = ["true cat · pred cat (0.91)", "true dog · pred cat (0.55)", "true dog · pred dog (0.80)"]
    fig = viz.attribution_figure(x, {"ig": signed, "gradcam": unsigned}, None, captions, [False, True, False])
    assert viz.is_figure(fig)
    images = _images(fig)
    assert len(images) == 3 * 3  # per sample: input, ig, gradcam
    titles = [ax.get_title().replace("\n", " · ") for ax in fig.axes]  # long captions break at " · "
    assert all(c in titles for c in captions) and "ig" in titles and "gradcam" in titles
    wrong = next(ax for ax, t in zip(fig.axes, titles) if t == captions[1])
    assert wrong.title.get_color() != "black"  # a wrong prediction's caption stands out
    by_cmap: dict[str, list] = {}
    for _, im in images:
        by_cmap.setdefault(im.get_cmap().name, []).append(im)
    ig, cam = by_cmap[viz.DIVERGING], by_cmap[viz.SEQUENTIAL]
    assert len(ig) == 3 and len(cam) == 3
    # one scale per method, shared by its samples; signed maps centred at zero
    assert len({(im.norm.vmin, im.norm.vmax) for im in ig}) == 1
    assert ig[0].norm.vmin == pytest.approx(-ig[0].norm.vmax) and ig[0].norm.vmax > 0
    assert ig[0].norm.vmax == pytest.approx(float(torch.quantile(signed.abs().flatten(), 0.995)))
    assert len({(im.norm.vmin, im.norm.vmax) for im in cam}) == 1 and cam[0].norm.vmin == 0.0
    # one colour bar per method, labelled
    bars = _colorbars(fig)
    assert len(bars) == 2
    labels = sorted(b.get_xlabel() for b in bars)
    assert labels == ["signed (0 = white)", "unsigned (≥ 0)"]
    # tiles large enough to read: >= 96 px each side
    viz.figure_to_array(fig)
    renderer = fig.canvas.get_renderer()
    for ax, _ in images:
        box = ax.get_window_extent(renderer)
        assert box.width >= 96 and box.height >= 96, (box.width, box.height)


def test_tabular_figure_names_features_and_samples():
    maps = {"ig": torch.randn(4, 5), "occlusion": torch.rand(4, 5)}
    names = ["age", "bmi", "bp", "s1", "s2"]
    fig = viz.tabular_figure(maps, names, ["0: a", "1: b", "2: c", "3: d"])
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [t.get_text() for t in axes[0].get_yticklabels()] == names
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["0: a", "1: b", "2: c", "3: d"]
    assert axes[0].get_ylabel() == "feature" and axes[0].get_xlabel() == "probe sample"
    assert axes[0].get_images()[0].get_array().shape == (5, 4)  # feature × sample
    assert len(_colorbars(fig)) == 2
    many = viz.tabular_figure({"ig": torch.randn(2, 100)}, max_features=10)
    assert len(many.axes[0].get_yticklabels()) == 10


def test_sequence_figure_time_on_x_axis():
    x = torch.randn(2, 3, 50)  # (N, channels, time)
    maps = {"saliency": torch.randn(2, 3, 50), "rise": torch.rand(2, 1, 50)}
    fig = viz.sequence_figure(x, maps, captions=["a", "b"])
    ims = _images(fig)
    assert len(ims) == 4
    for _, im in ims:
        left, right, _, _ = im.get_extent()
        assert (left, right) == (-0.5, 49.5)  # time along x
    bottom = [ax for ax in fig.axes if ax.get_xlabel() == "time step"]
    assert len(bottom) == 3  # input, saliency, rise
    assert len(_colorbars(fig)) == 2
    assert len(fig.axes[0].get_lines()) == 3  # a few channels are drawn as lines


def test_curves_figure_axis_titles_and_one_legend_entry_per_method():
    curves = {"ig": torch.linspace(1, 0, 11), "saliency": torch.linspace(1, 0.2, 11)}
    fig = viz.curves_figure(curves, x=torch.linspace(0, 1, 11), title="deletion", xlabel="fraction deleted",
                            ylabel="probability", scores={"ig": 0.5, "saliency": 0.6}, score_name="AUC")  # fmt: skip
    (ax,) = fig.axes
    assert ax.get_xlabel() == "fraction deleted" and ax.get_ylabel() == "probability" and ax.get_title() == "deletion"
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["ig (AUC 0.5)", "saliency (AUC 0.6)"]
    assert len(ax.get_lines()) == 2


def test_matrix_figure_labels_colour_bars_shared_centred_scale():
    labels = ["a", "b", "c"]
    m1, m2 = torch.randn(3, 3), 5 * torch.randn(3, 3)
    fig = viz.matrix_figure([("mean |score|", m1.abs(), False), ("sample 0", m1, True), ("sample 1", m2, True)],
                            labels, axis_label="feature group")  # fmt: skip
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.get_visible()]
    assert len(panels) == 3
    for ax in panels:
        assert [t.get_text() for t in ax.get_xticklabels()] == labels
        assert ax.get_xlabel() == "feature group" and ax.get_ylabel() == "feature group"
    signed = [ax.get_images()[0] for ax in panels[1:]]
    assert signed[0].norm.vmin == signed[1].norm.vmin == -signed[0].norm.vmax  # shared and centred
    assert signed[0].get_cmap().name == viz.DIVERGING
    assert len(_colorbars(fig)) == 2  # the unsigned panel's and the signed panels' shared one


def test_tiles_and_hierarchy_figures():
    fig = viz.tiles_figure([torch.randn(8, 8), torch.randn(8, 8)], ["cluster 0: 5 of 9", "cluster 1: 4 of 9"])
    assert [ax.get_title() for ax in fig.axes[:2]] == ["cluster 0: 5 of 9", "cluster 1: 4 of 9"]
    ims = [ax.get_images()[0] for ax in fig.axes[:2]]
    assert ims[0].norm.vmin == ims[1].norm.vmin == -ims[0].norm.vmax  # one shared, centred scale
    lab = torch.zeros(8, 8, dtype=torch.long)
    lab[2:4, 2:4] = 1
    levels = [(lab, "level 0: 1 components"), (lab * 2, "level 1: 1 components")]
    fig = viz.hierarchy_figure(levels, torch.rand(1, 8, 8))
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["level 0: 1 components", "level 1: 1 components"]


def test_figures_leave_pyplot_and_rcparams_alone():
    rc = dict(matplotlib.rcParams)
    fig = viz.attribution_figure(torch.rand(2, 1, 8, 8), {"ig": torch.randn(2, 8, 8)})
    arr = viz.figure_to_array(fig)
    assert arr.dtype.name == "uint8" and arr.ndim == 3 and arr.shape[2] == 3
    assert dict(matplotlib.rcParams) == rc  # our font sizes were scoped to the drawing
    if "matplotlib.pyplot" in sys.modules:  # some other library imported it: our figures are not in it
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_fallback_without_matplotlib_gives_plain_grids(no_matplotlib):
    x = torch.rand(3, 1, 8, 8)
    pic = viz.attribution_figure(x, {"ig": torch.randn(3, 8, 8), "cam": torch.rand(3, 4, 4)})
    assert isinstance(pic, torch.Tensor) and pic.shape[0] == 3 and pic.min() >= 0 and pic.max() <= 1
    assert pic.shape[1] >= 3 * 96  # three rows of tiles >= 96 px
    assert viz.curves_figure({"ig": torch.rand(5)}) is None  # unlabelled lines would not say which is which
    assert viz.tabular_figure({"ig": torch.randn(4, 6)}).shape[0] == 3
    assert viz.sequence_figure(torch.randn(2, 3, 20), {"ig": torch.randn(2, 3, 20)}).shape[0] == 3
    assert viz.matrix_figure([("m", torch.randn(3, 3), True)]).shape[0] == 3
    assert viz.tiles_figure([torch.randn(8, 8)]).shape[0] == 3


def test_fallback_shares_one_scale_per_method(no_matplotlib):
    """Without matplotlib the tiles of a method still share one scale: a weak map stays pale."""
    x = torch.zeros(2, 1, 4, 4)
    m = torch.ones(2, 4, 4)
    m[1] *= 0.01
    pic = viz.attribution_figure(x, {"ig": m}, {"ig": True})
    tile = 96  # 4 px upscaled to 96
    strong = pic[:, 2 + tile // 2, 2 + tile + 2 + tile // 2]
    weak = pic[:, 2 + tile + 2 + tile // 2, 2 + tile + 2 + tile // 2]
    assert strong[0] > strong[2] and weak.min() > 0.9  # red vs near-white


def test_colour_bar_ticks_stay_short_for_tiny_values():
    """Grad-CAM's bar in the segmentation experiment read "0 8e-05 0.00016 0.00024", labels running together under a
    tile; the ticks are now at most four and each label short."""
    pytest.importorskip("matplotlib")
    from explain_callbacks.viz.figures import attribution_figure, tick_label

    assert [tick_label(v) for v in (0, 8e-05, 0.00016, -0.0025, 0.5, 25000, 1.0)] == [
        "0", "8e-5", "1.6e-4", "-2.5e-3", "0.5", "2.5e4", "1",
    ]  # fmt: skip
    maps = {"gradcam": torch.rand(2, 8, 8) * 2.4e-4}
    fig = attribution_figure(torch.rand(2, 3, 8, 8), maps, {"gradcam": False})
    bar = next(ax for ax in fig.axes if ax.get_label() == "<colorbar>")
    fig.canvas.draw()
    labels = [t.get_text() for t in bar.get_xticklabels() if t.get_text()]
    assert 2 <= len(labels) <= 4 and all(len(t) <= 6 for t in labels), labels


def test_three_line_captions_stay_clear_of_the_row_above():
    """"true square · pred circle (0.52) · explains square" wraps onto three lines, which ran into the row above."""
    pytest.importorskip("matplotlib")
    from explain_callbacks.viz.figures import attribution_figure

    caption = "true square · pred circle (0.52) · explains square"
    fig = attribution_figure(torch.rand(2, 3, 8, 8), {"ig": torch.randn(2, 8, 8)}, captions=[caption, caption])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inputs = [ax for ax in fig.axes if "true" in ax.get_title()]  # the input tiles, one per row
    above, below = inputs[0].get_window_extent(renderer), inputs[1].title.get_window_extent(renderer)
    assert below.y1 <= above.y0 + 0.5, (below, above)  # display coordinates: y grows upwards
