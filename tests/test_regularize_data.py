"""DecoyDigits and ColorDigits follow the CDEP protocols; RandomPixelGroups draws foreground pixels."""

from __future__ import annotations

import pytest
import torch

from explain_callbacks.datasets.decoy import (
    ColorDigitsDataModule,
    DecoyDigitsDataModule,
    RandomPixelGroups,
    corner_masks,
    digit_colors,
    make_color_digits,
    make_decoy_digits,
)


def _patch_values(x: torch.Tensor, corner: torch.Tensor, p: int = 5) -> torch.Tensor:
    cm = corner_masks(x.shape[-1], p)[corner].bool()  # (N, H, W)
    vals = x[:, 0][cm].view(x.shape[0], p * p)
    assert torch.allclose(vals, vals[:, :1].expand_as(vals))  # a uniform grey patch
    return vals[:, 0]


def test_decoy_rules_encode_the_label_in_training_only():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 32, 32) * 0.5
    y = torch.arange(40) % 10
    xt, ct = make_decoy_digits(x, y, rule="train", generator=g)
    assert torch.allclose(_patch_values(xt, ct), (255 - 25 * y.float()) / 255)
    xi, ci = make_decoy_digits(x, y, rule="inverse", generator=g)
    assert torch.allclose(_patch_values(xi, ci), 25 * y.float() / 255)
    xr, cr = make_decoy_digits(x, y, rule="random", generator=g)
    levels = ((255 - 255 * _patch_values(xr, cr)) / 25).round()
    assert ((levels >= 0) & (levels <= 9)).all() and (levels != y.float()).any()
    # outside the patch the image is untouched, and all four corners are used
    outside = ~corner_masks(32, 5)[ct].bool().unsqueeze(1)
    assert torch.equal(xt[outside], x[outside])
    assert set(ct.tolist()) == {0, 1, 2, 3}
    xn, _ = make_decoy_digits(x, y, rule="none", generator=g)
    assert torch.equal(xn, x)


def test_corner_masks():
    m = corner_masks(32, 5)
    assert m.shape == (4, 32, 32) and m.sum().item() == 100
    assert m[0, 0, 0] == 1 and m[1, 0, 31] == 1 and m[2, 31, 0] == 1 and m[3, 31, 31] == 1
    with pytest.raises(ValueError, match="patch_size"):
        corner_masks(8, 5)


def test_decoy_datamodule_batches_and_masks():
    dm = DecoyDigitsDataModule(batch_size=16, seed=0)
    dm.setup("fit")
    x, y, m = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 32, 32) and y.shape == (16,) and m.shape == (16, 1, 32, 32)
    assert torch.equal(m[0, 0], corner_masks(32, 5).amax(0))
    dm_patch = DecoyDigitsDataModule(mask="patch", seed=0)
    dm_patch.setup("fit")
    xtr, ytr, mtr = dm_patch.train_set.tensors
    xt, yt, mt = dm_patch.test_set.tensors
    assert mtr.sum((1, 2, 3)).eq(25).all()
    patch_value = lambda x, m: x[m.bool()].view(x.shape[0], 25).mean(1)  # noqa: E731
    # train follows 255 − 25y, test 25y (the CDEP code's test set)
    assert torch.allclose(patch_value(xtr, mtr), (255 - 25 * ytr.float()) / 255)
    assert torch.allclose(patch_value(xt, mt), 25 * yt.float() / 255)
    with pytest.raises(ValueError, match="test_decoy"):
        DecoyDigitsDataModule(test_decoy="sometimes")
    with pytest.raises(ValueError, match="decoy"):
        DecoyDigitsDataModule(decoy=True)


def test_colors_and_color_digits():
    c = digit_colors(10)
    assert torch.allclose(c[0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)  # red
    assert torch.allclose(c[9], torch.tensor([128 / 255, 0.0, 128 / 255]), atol=2e-3)  # purple #800080
    assert len({tuple(v.tolist()) for v in c}) == 10
    x = torch.rand(20, 1, 4, 4)
    y = torch.arange(20) % 10
    tr = make_color_digits(x, y, rule="train")
    te = make_color_digits(x, y, rule="inverse")
    assert torch.allclose(tr, x * c[y].view(-1, 3, 1, 1))
    assert torch.allclose(te, x * c[9 - y].view(-1, 3, 1, 1))
    dm = ColorDigitsDataModule(batch_size=8)
    dm.setup("fit")
    xb, _yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 3, 32, 32)


def test_random_pixel_groups():
    x = torch.zeros(4, 3, 8, 8)
    x[:, :, 2:6, 3:5] = 1  # foreground: 8 pixels
    sampler = RandomPixelGroups(n_groups=5, seed=0)
    m = sampler((x, None))
    assert m.shape == (1, 5, 1, 8, 8)
    assert m.sum((2, 3, 4)).eq(1).all()  # one pixel per group
    assert (m.sum(1)[0, 0] <= x[0, 0]).all()  # on the foreground, distinct
    m2 = sampler((x, None))
    assert not torch.equal(m, m2)  # a fresh draw each step
    assert torch.equal(RandomPixelGroups(n_groups=5, seed=0)((x, None)), m)  # seeded
    union = RandomPixelGroups(n_groups=5, grouped=False, seed=0)({"x": x})
    assert union.shape == (1, 1, 8, 8) and union.sum() == 5
    state = torch.get_rng_state()
    sampler(x)
    assert torch.equal(state, torch.get_rng_state())
