"""RISE masks against the authors' ``generate_masks`` (Petsiuk, Das & Saenko 2018; github.com/eclique/RISE,
``explanations.py``): a binary s×s grid resized with ``skimage.transform.resize(grid, (s + 1)·cell,
order=1, mode="reflect", anti_aliasing=False)`` and cropped at a random offset in [0, cell)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from explain_callbacks._internal.masks import mask_layout, random_offsets, render_masks, sample_designs
from explain_callbacks.attribution import RISE
from explain_callbacks.attribution.base import make_generator

resize = pytest.importorskip("skimage.transform").resize


def _authors_masks(designs: torch.Tensor, offsets: torch.Tensor, grid: tuple[int, ...], size: tuple[int, ...]):
    """The body of the authors' ``generate_masks`` loop, fed our draws (grid cells and offsets)."""
    cell = np.ceil(np.array(size) / np.array(grid))
    up = tuple(((np.array(grid) + 1) * cell).astype(int))
    out = []
    for d, o in zip(designs.double().numpy(), offsets.numpy()):
        big = resize(d.reshape(grid), up, order=1, mode="reflect", anti_aliasing=False)
        out.append(big[tuple(slice(int(a), int(a) + n) for a, n in zip(o, size))])
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize(("shape", "s"), [((3, 32, 32), 7), ((1, 12, 12), 5), ((3, 20, 17), 4), ((2, 8, 8), 7)])
def test_image_masks_equal_the_authors(shape, s):
    g = torch.Generator().manual_seed(1)
    lay = mask_layout(torch.zeros(1, *shape), s)
    designs = sample_designs(64, lay.d, "bernoulli", g)
    offsets = random_offsets(64, lay, g)
    ours = render_masks(designs, lay, "bilinear", offsets)[:, 0]
    ref = _authors_masks(designs, offsets, lay.grid, lay.size)
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=0)


def test_sequence_masks_mirror_the_same_way():
    g = torch.Generator().manual_seed(2)
    lay = mask_layout(torch.zeros(1, 2, 50), 6)
    designs = sample_designs(32, lay.d, "bernoulli", g)
    offsets = random_offsets(32, lay, g)
    ours = render_masks(designs, lay, "bilinear", offsets)[:, 0]
    torch.testing.assert_close(ours.double(), _authors_masks(designs, offsets, lay.grid, lay.size), atol=1e-6, rtol=0)


def test_rise_map_is_the_authors_estimator_with_the_same_draws():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 5)).eval()
    x = torch.rand(2, 3, 12, 12)
    t = torch.tensor([1, 3])
    n, s, p = 64, 5, 0.5
    rise = RISE(n_masks=n, grid_size=s, p=p, seed=7, batch_size=16)
    got = rise(model, x, t)
    # the draws RISE makes, in its order: designs, then offsets, from its seeded generator
    gen = make_generator(x.device, 7)
    lay = mask_layout(x, s)
    designs = sample_designs(n, lay.d, "bernoulli", gen, p=p)
    offsets = random_offsets(n, lay, gen)
    masks = _authors_masks(designs, offsets, lay.grid, lay.size).float()  # (N, H, W)
    with torch.no_grad():
        probs = model((masks[:, None, None] * x[None]).reshape(-1, 3, 12, 12)).softmax(-1).view(n, 2, -1)
    want = torch.einsum("nb,nhw->bhw", probs[:, torch.arange(2), t], masks) / (n * p)
    torch.testing.assert_close(got[:, 0], want, atol=1e-5, rtol=1e-5)
    assert math.isclose(float(masks.mean()), p, abs_tol=0.1)
