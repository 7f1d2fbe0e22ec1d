"""Fast paths of the fragility attack (Ghorbani, Abid & Zou 2019) and of the softplus surrogate: equal to a
naive reference of the attack (every score of every candidate computed at every step, the ball and the
valid range clamped one after the other), and subnormal floats flushed only inside ``relu_as_softplus``."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from explain_callbacks._internal.softplus import flush_denormals, relu_as_softplus
from explain_callbacks.analysis import fragility_attack
from explain_callbacks.attribution import build_attributor

SUBNORMAL = 1e-39  # below float32's smallest normal number (1.18e-38)


def _flushed() -> bool:
    return float(torch.tensor(SUBNORMAL, dtype=torch.float32) * 1.0) == 0.0


def test_subnormals_flushed_only_inside_the_softplus_context():
    assert not _flushed()
    with relu_as_softplus(10.0):
        assert _flushed()
        with relu_as_softplus(5.0), flush_denormals():  # nested: the outer state comes back
            assert _flushed()
        assert _flushed()
    assert not _flushed()
    with relu_as_softplus(None):  # the network as is: nothing changes
        assert not _flushed()
    with pytest.raises(RuntimeError, match="inside"), relu_as_softplus(10.0):
        raise RuntimeError("inside")
    assert not _flushed()  # restored on an error too


def _naive_attack(model, x, method, objective, epsilon, steps, top_k, beta, clamp, seed=0):
    """Algorithm 1 of Ghorbani et al. written out: every candidate scored in full (intersection, Spearman by
    scipy, centre shift), the best kept per sample."""
    attributor = build_attributor(method)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        label = model(x).argmax(1)

    def importance(a):
        a = a.abs()
        return a.sum(1) if a.ndim >= 3 else a

    def centre(imp):
        total = imp.flatten(1).sum(1).clamp_min(1e-12)
        cs = []
        for d in range(1, imp.ndim):
            other = [i for i in range(1, imp.ndim) if i != d]
            marg = imp.sum(other) if other else imp
            cs.append((marg * torch.arange(imp.shape[d], dtype=imp.dtype)).sum(1) / total)
        return torch.stack(cs, 1)

    imp0 = importance(attributor(model, x, label))
    n = imp0[0].numel()
    k = max(1, min(n, round(top_k * n) if isinstance(top_k, float) else int(top_k)))
    top0 = [set(r.topk(k).indices.tolist()) for r in imp0.flatten(1)]

    def project(v):
        v = torch.max(torch.min(v, x + epsilon), x - epsilon)
        return v.clamp(*clamp) if clamp is not None else v

    def scores(xa):
        imp = importance(attributor(model, xa, label).detach())
        inter = torch.tensor([len(top0[i] & set(r.topk(k).indices.tolist())) / k for i, r in enumerate(imp.flatten(1))])
        rho = torch.tensor([spearmanr(a.numpy(), b.numpy())[0] for a, b in zip(imp0.flatten(1), imp.flatten(1))])
        shift = (centre(imp) - centre(imp0)).norm(dim=1)
        with torch.no_grad():
            kept = model(xa).argmax(1) == label
        return inter, rho, shift, kept

    b = x.shape[0]
    if objective == "random":
        g = torch.Generator().manual_seed(seed)
        xa = project(x + epsilon * (torch.randint(0, 2, x.shape, generator=g).to(x.dtype) * 2 - 1))
        inter, rho, shift, kept = scores(xa)
        return torch.where(kept, inter, 1.0), torch.where(kept, rho, 1.0), torch.where(kept, shift, 0.0), kept
    best = [(1.0, 1.0, 0.0, False)] * b
    xa = x.clone()
    step = 2 * epsilon / steps
    for _ in range(steps):
        xg = xa.clone().requires_grad_(True)
        with relu_as_softplus(beta):
            imp = importance(attributor(model, xg, label, create_graph=True))
        if objective == "topk":
            mask = torch.zeros_like(imp.flatten(1))
            for i, s in enumerate(top0):
                mask[i, list(s)] = 1.0
            loss = -((imp.flatten(1) * mask).sum(1) / imp.flatten(1).sum(1).clamp_min(1e-12)).sum()
        else:
            loss = (centre(imp) - centre(imp0)).norm(dim=1).sum()
        (grad,) = torch.autograd.grad(loss, xg)
        xa = project(xa + step * grad.sign())
        inter, rho, shift, kept = scores(xa)
        for i in range(b):
            better = inter[i] < best[i][0] if objective == "topk" else shift[i] > best[i][2]
            if kept[i] and better:
                best[i] = (float(inter[i]), float(rho[i]), float(shift[i]), True)
    return tuple(torch.tensor([r[j] for r in best]) for j in range(4))


@pytest.mark.parametrize(
    ("net", "shape", "clamp"),
    [
        ("cnn", (6, 2, 10, 10), (0.0, 1.0)),  # x partly outside the clamp range: ball and range compose
        ("mlp", (7, 12), None),
    ],
)
@pytest.mark.parametrize("objective", ["topk", "mass_centre", "random"])
def test_attack_equals_naive_reference(net, shape, clamp, objective):
    torch.manual_seed(0)
    if net == "cnn":
        model = nn.Sequential(
            nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 3),
        )  # fmt: skip
    else:
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 1.4 - 0.2
    kw = dict(objective=objective, epsilon=0.15, steps=4, top_k=0.2, clamp=clamp)
    res = fragility_attack(model, x, None, "saliency", softplus_beta=10.0, **kw)
    inter, rho, shift, found = _naive_attack(model, x, "saliency", beta=10.0, **kw)
    assert found.any() and torch.equal(res.found, found)
    torch.testing.assert_close(res.topk_intersection, inter.to(res.topk_intersection.dtype))
    torch.testing.assert_close(res.spearman.double(), rho.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.mass_centre_shift, shift.to(res.mass_centre_shift.dtype), atol=1e-5, rtol=1e-5)
    lo, hi = x - 0.15, x + 0.15
    if clamp is not None:
        lo, hi = lo.clamp(*clamp), hi.clamp(*clamp)
    assert ((res.adversarial >= lo) & (res.adversarial <= hi)).all()
