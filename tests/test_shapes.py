"""The procedural shapes data set: determinism, masks, classes, watermark, data module, Hydra config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from explain_callbacks.datasets.shapes import SHAPES, ShapesDataModule, make_shapes

ROOT = Path(__file__).resolve().parents[1]


def test_deterministic_by_seed_and_global_rng_untouched():
    rng = torch.get_rng_state()
    a = make_shapes(64, seed=3, watermark=0.5)
    assert torch.equal(rng, torch.get_rng_state())
    torch.manual_seed(999)
    b = make_shapes(64, seed=3, watermark=0.5)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    c = make_shapes(64, seed=4, watermark=0.5)
    assert not torch.equal(a.x, c.x)


def test_shapes_types_ranges_and_balanced_classes():
    d = make_shapes(200, size=32, seed=0)
    assert d.x.shape == (200, 3, 32, 32) and d.x.dtype == torch.float32
    assert d.mask.shape == (200, 1, 32, 32) and d.y.dtype == torch.long
    assert float(d.x.min()) >= 0.0 and float(d.x.max()) <= 1.0
    assert torch.bincount(d.y, minlength=4).tolist() == [50, 50, 50, 50]
    assert set(d.mask.unique().tolist()) <= {0.0, 1.0}
    assert float(d.watermark.sum()) == 0.0  # no watermark by default


def test_masks_mark_the_bright_object():
    d = make_shapes(100, seed=1, noise=0.0)
    area = d.mask.flatten(1).mean(1)
    assert (area > 0.02).all() and (area < 0.4).all()
    bright = d.x.mean(1, keepdim=True)
    inside = (bright * d.mask).flatten(1).sum(1) / d.mask.flatten(1).sum(1)
    outside = (bright * (1 - d.mask)).flatten(1).sum(1) / (1 - d.mask).flatten(1).sum(1)
    assert (inside > outside + 0.15).all()
    # circles: the mask area is close to pi r^2 with r in [0.18, 0.30] of the side
    circ = area[d.y == 0]
    assert (circ > math.pi * 0.17**2).all() and (circ < math.pi * 0.31**2).all()
    # within a shape the object colour is constant (noise 0)
    for i in range(5):
        pix = d.x[i][:, d.mask[i, 0] > 0]
        assert float((pix - pix[:, :1]).abs().max()) < 1e-6


def test_watermark_is_class_coded_spurious_and_outside_the_mask():
    d = make_shapes(400, seed=2, watermark=0.5)
    has = d.watermark.flatten(1).sum(1) > 0
    assert 0.4 < float(has.float().mean()) < 0.6
    assert float((d.watermark * d.mask).sum()) == 0.0
    corners = {0: (2, 2), 1: (2, 29), 2: (29, 29), 3: (29, 2)}
    for k, (r, c) in corners.items():
        sel = has & (d.y == k)
        assert sel.any()
        assert (d.watermark[sel, 0, r, c] > 0).float().mean() > 0.9  # (the object may cover a corner pixel)
        other = has & (d.y != k)
        assert float(d.watermark[other, 0, r, c].sum()) == 0.0
    always = make_shapes(50, seed=2, watermark=1.0)
    assert (always.watermark.flatten(1).sum(1) > 0).all()
    with pytest.raises(ValueError, match="probability"):
        make_shapes(4, watermark=2.0)
    with pytest.raises(ValueError, match="n_classes"):
        make_shapes(4, n_classes=7)


def test_data_module_batches_and_splits():
    dm = ShapesDataModule(n_train=40, n_val=20, n_test=20, batch_size=8, watermark=1.0, val_watermark=0.0, seed=5)
    dm.setup("fit")
    x, y, m = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,) and m.shape == (8, 1, 32, 32)
    assert dm.num_classes == 4 and dm.input_shape == (3, 32, 32) and dm.class_names == list(SHAPES)
    train_x = dm.train_set.tensors[0]
    val_x = dm.val_set.tensors[0]
    assert not torch.equal(train_x[:20], val_x)  # splits come from different seeds
    # the training split carries watermarks, the validation split does not
    assert float((train_x[:, :, 1:4, 1:4] == 1).float().mean()) > 0.05
    batches = list(dm.val_dataloader())
    assert sum(b[0].shape[0] for b in batches) == 20
    again = ShapesDataModule(n_train=40, n_val=20, n_test=20, batch_size=8, seed=5)
    again.setup()
    first = [b[1] for b in again.train_dataloader()]
    second = [b[1] for b in again.train_dataloader()]
    assert all(torch.equal(p, q) for p, q in zip(first, second))  # shuffling from its own generator


def test_hydra_config_instantiates():
    hydra_utils = pytest.importorskip("hydra.utils")
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.load(ROOT / "conf" / "data" / "shapes.yaml")
    cfg = omegaconf.OmegaConf.merge({"seed": 0}, {"data": cfg})
    dm = hydra_utils.instantiate(cfg.data, n_train=8, n_val=4, n_test=4)
    assert isinstance(dm, ShapesDataModule) and dm.seed == 0
    dm.setup()
    assert len(dm.train_set) == 8
