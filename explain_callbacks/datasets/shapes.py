"""A procedural shapes data set with ground-truth segmentation masks and an optional spurious watermark.

Each image (3 × size × size, values in [0, 1]) shows one bright object (circle, square, triangle or
cross; random centre, size, rotation and colour) on a darker striped, noisy background; the class is
the shape and the mask marks the object's pixels, so localisation metrics (pointing game, energy
pointing game) have real ground truth. With ``watermark=p`` an image carries, with probability p, a
small class-coded mark (a bright 3 × 3 patch in the corner of its class): a spurious feature a model
can learn instead of the shape. The mark is *not* part of the mask, so maps that point at it lose
the pointing game. Everything is drawn from a seeded ``torch.Generator``, vectorised over images:
the same seed gives the same data on every machine.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from .tabular_images import seeded_loader

__all__ = ["SHAPES", "ShapesData", "ShapesDataModule", "make_shapes"]

SHAPES = ("circle", "square", "triangle", "cross")


class ShapesData(NamedTuple):
    """Images (N,3,S,S) float32, labels (N,) long, object masks (N,1,S,S) float32 in {0, 1}, and the
    watermark masks (N,1,S,S) float32 (all zero where an image has no mark)."""

    x: Tensor
    y: Tensor
    mask: Tensor
    watermark: Tensor


def _shape_masks(u: Tensor, v: Tensor, r: Tensor, theta: Tensor) -> Tensor:
    """Boolean masks (N, 4, S, S) of the four shapes, in coordinates relative to the centre (N,S,S)."""
    c, s = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
    ru, rv = c * u + s * v, -s * u + c * v
    r = r.view(-1, 1, 1)
    circle = u**2 + v**2 <= r**2
    half = r * 0.8
    square = (ru.abs() <= half) & (rv.abs() <= half)
    tri = torch.ones_like(circle)
    for k in range(3):  # equilateral triangle: three half-planes at distance r/2 from the centre
        a = math.pi / 2 + 2 * math.pi * k / 3
        tri &= ru * math.cos(a) + rv * math.sin(a) <= r * 0.55
    arm = r / 3
    cross = ((ru.abs() <= r) & (rv.abs() <= arm)) | ((rv.abs() <= r) & (ru.abs() <= arm))
    return torch.stack([circle, square, tri, cross], 1)


def make_shapes(
    n: int,
    size: int = 32,
    seed: int = 0,
    n_classes: int = 4,
    watermark: float = 0.0,
    noise: float = 0.05,
) -> ShapesData:
    """Generate ``n`` images deterministically from ``seed``.

    Args:
        n: number of images (classes balanced up to one image, in random order).
        size: side in pixels (32 by default; at least 16).
        n_classes: how many of the shapes ``SHAPES`` are used (2 to 4).
        watermark: probability that an image carries its class's corner mark (0 = never).
        noise: standard deviation of the pixel noise.
    """
    if not 2 <= n_classes <= len(SHAPES):
        raise ValueError(f"n_classes must be between 2 and {len(SHAPES)}, got {n_classes}.")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}.")
    if not 0.0 <= watermark <= 1.0:
        raise ValueError(f"watermark is a probability in [0, 1], got {watermark}.")
    g = torch.Generator().manual_seed(int(seed))

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=g)

    y = torch.arange(n) % n_classes
    y = y[torch.randperm(n, generator=g)]
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # pixel centres in (0, 1)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    # background: dark base colour modulated by stripes of random orientation and frequency
    base = 0.1 + 0.35 * rand(n, 3)
    angle, freq, phase = math.pi * rand(n), 3 + 5 * rand(n), 2 * math.pi * rand(n)  # freq: cycles per image
    proj = gx * torch.cos(angle).view(-1, 1, 1) + gy * torch.sin(angle).view(-1, 1, 1)
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * freq.view(-1, 1, 1) * proj + phase.view(-1, 1, 1))
    img = base.view(n, 3, 1, 1) * (0.65 + 0.35 * stripes.unsqueeze(1))
    # object: bright colour, centre away from the border, radius 18-30 % of the side, random rotation
    radius = 0.18 + 0.12 * rand(n)
    cx = radius + 0.04 + (1 - 2 * radius - 0.08) * rand(n)
    cy = radius + 0.04 + (1 - 2 * radius - 0.08) * rand(n)
    theta = 2 * math.pi * rand(n)
    colour = 0.55 + 0.45 * rand(n, 3)
    shapes = _shape_masks(gx - cx.view(-1, 1, 1), gy - cy.view(-1, 1, 1), radius, theta)
    mask = shapes[torch.arange(n), y].unsqueeze(1)  # (N,1,S,S)
    img = torch.where(mask, colour.view(n, 3, 1, 1).expand_as(img), img)
    # spurious watermark: a bright 3 x 3 patch in the corner of the class (clockwise from top-left)
    wm = torch.zeros(n, 1, size, size, dtype=torch.bool)
    has = rand(n) < watermark
    corners = [(1, 1), (1, size - 4), (size - 4, size - 4), (size - 4, 1)]
    for k in range(n_classes):
        r0, c0 = corners[k % 4]
        sel = has & (y == k)
        wm[sel, :, r0 : r0 + 3, c0 : c0 + 3] = True
    wm &= ~mask
    img = torch.where(wm, torch.ones_like(img), img)
    img = img + noise * torch.randn(img.shape, generator=g)
    return ShapesData(img.clamp(0, 1).float(), y.long(), mask.float(), wm.float())


class ShapesDataModule(pl.LightningDataModule):
    """Procedural shapes with masks; batches are tuples ``(x, y, mask)``: x (B,3,S,S), y (B,), mask (B,1,S,S).

    Args:
        n_train, n_val, n_test: split sizes (each split drawn from its own seed: seed, seed+1, seed+2).
        size: image side (32).
        n_classes: shapes used (2-4).
        watermark: probability of the class-coded watermark in the training split.
        val_watermark: the same for validation and test (``None``: as training; 0 shows whether the model
            took the shortcut).
        noise: pixel noise.
        batch_size, val_batch_size, num_workers, seed: loader settings (shuffling uses its own generator).

    The monitors take the masks from the batches' third item by themselves (``mask_key=2`` says so explicitly).
    """

    def __init__(
        self,
        n_train: int = 2000,
        n_val: int = 400,
        n_test: int = 400,
        size: int = 32,
        n_classes: int = 4,
        watermark: float = 0.0,
        val_watermark: float | None = None,
        noise: float = 0.05,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.size, self.n_classes, self.noise = size, n_classes, noise
        self.watermark = watermark
        self.val_watermark = watermark if val_watermark is None else val_watermark
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.num_classes = n_classes
        self.input_shape = (3, size, size)
        self.class_names = list(SHAPES[:n_classes])
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def _split(self, n: int, offset: int, watermark: float) -> TensorDataset:
        d = make_shapes(n, self.size, self.seed + offset, self.n_classes, watermark, self.noise)
        return TensorDataset(d.x, d.y, d.mask)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._split(self.n_train, 0, self.watermark)
            self.val_set = self._split(self.n_val, 1, self.val_watermark)
            self.test_set = self._split(self.n_test, 2, self.val_watermark)

    def train_dataloader(self) -> DataLoader:
        return seeded_loader(self.train_set, self.batch_size, self.seed, shuffle=True, num_workers=self.num_workers,
                             module=self)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return seeded_loader(self.val_set, self.val_batch_size, self.seed, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return seeded_loader(self.test_set, self.val_batch_size, self.seed, num_workers=self.num_workers)
