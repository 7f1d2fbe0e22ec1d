"""LRP against Zennit (Anders et al. 2021), a test-only LGPL reference: same composite, same
canonizer, same maps to 1e-5 on a VGG-like net and a BatchNorm net.

Zennit imports torchvision's ResNet blocks when it is imported; torchvision is not a dependency here,
so a stub ``torchvision.models.resnet`` is put into ``sys.modules`` for the import (tests/references.py).
Install with ``pip install --no-deps zennit`` (its metadata pulls torchvision and CUDA wheels).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from explain_callbacks.attribution import LRP

from .references import import_zennit

zennit = import_zennit()
pytestmark = pytest.mark.skipif(zennit is None, reason="zennit not installed (pip install --no-deps zennit)")


def vgg_like() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 5),
    ).double().eval()  # fmt: skip


def bn_net(eps: float = 1e-12) -> nn.Module:
    """Zennit's merge leaves each BatchNorm computing x / sqrt(1 + eps) instead of x (it sets the running
    variance to 1, not 1 - eps), a relative change of eps/2 per BatchNorm; ours keeps the function exactly.
    A tiny eps makes the two comparable to 1e-5 (see test_default_eps_gap_is_zennits_eps_over_2)."""
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.BatchNorm1d(16),
        nn.ReLU(), nn.Linear(16, 5),
    ).double()  # fmt: skip
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
                mod.eps = eps
    return m.eval()


def _inputs(low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return low + (high - low) * torch.rand(6, 3, 16, 16, generator=g, dtype=torch.float64)


def _zennit_map(model, x, target, composite):
    model = copy.deepcopy(model)
    from zennit.attribution import Gradient

    with Gradient(model=model, composite=composite) as attributor:
        _, rel = attributor(x, lambda out: out * torch.eye(out.shape[1], dtype=out.dtype)[target])
    return rel


def _composites(low, high):
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat
    from zennit.rules import WSquare
    from zennit.types import Linear as ZLinear

    canon = [SequentialMergeBatchNorm()]
    return {
        "epsilon_plus_flat": (LRP(), EpsilonPlusFlat(canonizers=canon)),
        "epsilon_alpha2_beta1": (LRP("epsilon_alpha2_beta1"), EpsilonAlpha2Beta1(canonizers=canon)),
        "epsilon_gamma_box": (
            LRP("epsilon_gamma_box", low=low, high=high, gamma=0.5),
            EpsilonGammaBox(low=low, high=high, gamma=0.5, canonizers=canon),
        ),
        "wsquare_first_by_name": (
            LRP(name_map={"0": "wsquare"}),
            EpsilonPlusFlat(first_map=[(ZLinear, WSquare())], canonizers=canon),
        ),
    }


@pytest.mark.parametrize("net", [vgg_like, bn_net])
@pytest.mark.parametrize(
    "name", ["epsilon_plus_flat", "epsilon_alpha2_beta1", "epsilon_gamma_box", "wsquare_first_by_name"]
)
def test_equals_zennit(net, name):
    model = net()
    low, high = -1.0, 2.0
    x = _inputs(low, high)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    ours, ref_composite = _composites(low, high)[name]
    ref = _zennit_map(model, x, target, ref_composite)
    got = ours(model, x, target)
    scale = ref.abs().max()
    assert scale > 0
    torch.testing.assert_close(got, ref, atol=1e-5 * float(scale), rtol=1e-5)
    # the maps are not trivially equal across composites: the comparison can tell them apart
    other = LRP("epsilon")(model, x, target)
    assert (other - ref).abs().max() > 1e-3 * scale


def test_bn_merge_matches_zennit_and_unmerged_differs():
    """canonize=False leaves BatchNorm to the pass rule (Zennit without canonizer); merged differs."""
    from zennit.composites import EpsilonPlusFlat

    model, x, target = bn_net(), _inputs(), torch.tensor([1, 2, 3, 4, 0, 1])
    ref = _zennit_map(model, x, target, EpsilonPlusFlat())
    got = LRP(canonize=False)(model, x, target)
    torch.testing.assert_close(got, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)
    merged = LRP()(model, x, target)
    assert (merged - got).abs().max() > 1e-3 * ref.abs().max()


def test_default_eps_gap_is_zennits_eps():
    """With BatchNorm's default eps=1e-5 the maps differ by Zennit's own approximation only (each of its
    "identity" BatchNorms scales by 1/sqrt(1 + eps)): a gap of order eps that vanishes with eps."""
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    x, target = _inputs(), torch.tensor([1, 2, 3, 4, 0, 1])
    gaps = {}
    for eps in (1e-5, 1e-12):
        model = bn_net(eps=eps)
        ref = _zennit_map(model, x, target, EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()]))
        gaps[eps] = float((LRP()(model, x, target) - ref).abs().max() / ref.abs().max())
    assert 1e-7 < gaps[1e-5] < 3 * 1.5e-5 and gaps[1e-12] < 1e-10, gaps


def heldout_resnet(eps: float = 1e-12) -> nn.Module:
    """The held-out small ResNet of benchmarks/heldout_models.py (residuals written ``a + b``), in float64 with
    random BatchNorm statistics and affine parameters (a trained-looking BatchNorm, not the identity)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from heldout_models import make
    finally:
        sys.path.pop(0)
    m = make("resnet").double()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(torch.rand(n, generator=g, dtype=torch.float64) - 0.5)
                mod.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g, dtype=torch.float64))
                mod.weight.copy_(0.5 + torch.rand(n, generator=g, dtype=torch.float64))
                mod.bias.copy_(0.6 * torch.rand(n, generator=g, dtype=torch.float64) - 0.3)
                mod.eps = eps
    return m.eval()


def zennit_resnet_canonizers():
    """Zennit's ResNet canonizer for the held-out BasicBlock (Zennit's own targets torchvision's class): the
    block's forward rewritten to sum ``stack([shortcut, out])`` with Zennit's Sum layer (Norm rule), and
    SequentialMergeBatchNorm for every Conv -> BatchNorm pair."""
    from zennit.canonizers import AttributeCanonizer, SequentialMergeBatchNorm
    from zennit.layer import Sum as ZSum

    def forward(self, x):
        h = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.canonizer_sum(torch.stack([self.short(x), self.bn2(self.conv2(h))], dim=-1)))

    def attribute_map(_name, module):
        if type(module).__name__ == "BasicBlock":
            return {"forward": forward.__get__(module), "canonizer_sum": ZSum()}
        return None

    return [SequentialMergeBatchNorm(), AttributeCanonizer(attribute_map)]


@pytest.mark.parametrize("name", ["epsilon_plus_flat", "epsilon_alpha2_beta1"])
def test_heldout_resnet_with_plus_equals_zennit_resnet_canonizer(name):
    """The held-out ResNet, its residuals written ``a + b``: our sum rule at the ``+`` equals Zennit with its
    ResNet canonizer (blocks rewritten with its Sum layer, BatchNorm merged), to 1e-8 of the largest |R|
    (float64; BatchNorm eps 1e-12, see bn_net: Zennit's merge changes each BatchNorm by eps/2)."""
    from zennit.composites import EpsilonAlpha2Beta1, EpsilonPlusFlat

    model = heldout_resnet()
    x = torch.nn.functional.interpolate(_inputs()[:3], size=32)
    target = torch.tensor([0, 1, 3])
    ref_cls = {"epsilon_plus_flat": EpsilonPlusFlat, "epsilon_alpha2_beta1": EpsilonAlpha2Beta1}[name]
    ref = _zennit_map(model, x, target, ref_cls(canonizers=zennit_resnet_canonizers()))
    got = LRP(name)(model, x, target)
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(got, ref, atol=1e-8 * scale, rtol=1e-6)  # measured: 5e-10 of the largest |R|
    if name == "epsilon_plus_flat":  # without the ResNet canonizer (the gradient copies the relevance at each +)
        doubled = _zennit_map(model, x, target, ref_cls(canonizers=zennit_resnet_canonizers()[:1]))
        assert (doubled - ref).abs().max() > 1e-2 * scale  # Zennit's map is another one: the check can tell
