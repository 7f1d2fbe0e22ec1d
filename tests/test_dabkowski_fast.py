"""The Dabkowski & Gal (2017) saliency metric, all samples at once (boxes kept in NumPy from the scipy labels
to the crops' sampling grid), equals the metric written out per sample: threshold at the mean, the largest
8-connected component by ``scipy.ndimage.label`` (ties: the first in raster order), its box, the crop resized
by ``F.interpolate``, the class probability on it, log(max(a, 0.05)) − log p."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explain_callbacks.metrics import functional as MF


def _naive(model, x, a, y, min_area=0.05):
    ndimage = pytest.importorskip("scipy.ndimage")
    out = []
    h, w = x.shape[2], x.shape[3]
    for i in range(x.shape[0]):
        rel = a[i].sum(0).double().numpy() if a.ndim == 4 else a[i].double().numpy()
        fg = rel > rel.mean()
        lab, n = ndimage.label(fg, structure=np.ones((3, 3)))
        if n == 0:
            y0, x0, y1, x1 = 0, 0, h - 1, w - 1
        else:
            sizes = np.bincount(lab.ravel())[1:]
            first = [np.flatnonzero(lab.ravel() == k + 1)[0] for k in range(n)]  # raster order of each component
            best = min(np.flatnonzero(sizes == sizes.max()), key=lambda k: first[k]) + 1
            ys, xs = np.nonzero(lab == best)
            y0, x0, y1, x1 = ys.min(), xs.min(), ys.max(), xs.max()
        crop = F.interpolate(x[i : i + 1, :, y0 : y1 + 1, x0 : x1 + 1], size=(h, w), mode="bilinear",
                             align_corners=False)  # fmt: skip
        with torch.no_grad():
            p = model(crop).softmax(1)[0, y[i]].double()
        area = (y1 - y0 + 1) * (x1 - x0 + 1) / (h * w)
        out.append(np.log(max(area, min_area)) - torch.log(p).item())
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("map_shape", ["input", "one_channel", "plane"])
def test_dabkowski_equals_per_sample_reference(dtype, map_shape):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4)
    ).to(dtype)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    x = torch.rand(10, 3, 13, 17, generator=g, dtype=dtype)
    a = torch.randn(10, 3, 13, 17, generator=g, dtype=dtype) * (torch.rand(10, 1, 13, 17, generator=g) < 0.35)
    a[0] = 0.0  # a constant map: the whole image
    a[1] = (torch.rand(1, 13, 17, generator=g) < 0.3).to(dtype)  # 0/1 map: components tied in size
    if map_shape == "one_channel":
        a = a.sum(1, keepdim=True)
    elif map_shape == "plane":
        a = a.sum(1)
    y = torch.randint(0, 4, (10,), generator=g)
    ours = MF.dabkowski_saliency(model, x, a, y, batch_size=4)
    ref = _naive(model, x, a if a.ndim == 4 else a.unsqueeze(1), y)
    torch.testing.assert_close(ours, ref, atol=1e-5 if dtype == torch.float32 else 1e-10, rtol=0)
