"""viz: shapes, ranges and the colour conventions the monitor relies on."""

from __future__ import annotations

import torch

from explain_callbacks import viz


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


def test_grid_curves_matrix_and_text():
    g = viz.make_grid(torch.rand(5, 3, 4, 4), nrow=2, pad=1)
    assert g.shape == (3, 3 * 5 + 1, 2 * 5 + 1)
    plot = viz.plot_curves({"a": torch.linspace(0, 1, 10), "b": torch.rand(10)}, title="t")
    assert plot.shape == (3, 240, 320) and (plot < 1).any()
    mat = viz.matrix_image(torch.randn(3, 4), "diverging", cell=2)
    assert mat.shape == (3, 6, 8)
    canvas = torch.ones(3, 10, 20)
    viz.draw_text(canvas, "IG 1", 1, 1, torch.zeros(3))
    assert (canvas == 0).any()
    assert viz.map_to_2d(torch.rand(2, 3, 4, 4)).shape == (2, 4, 4)
    assert viz.map_to_2d(torch.rand(2, 7)).shape == (2, 1, 7)
