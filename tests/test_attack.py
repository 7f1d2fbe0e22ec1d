"""Fragility attack on explanations (Ghorbani, Abid & Zou 2019): the targeted attacks change the map
more than random noise of the same size, inside the ε-ball, keeping the prediction, with no side
effects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain_callbacks.analysis import fragility_attack


@pytest.fixture
def net_and_images():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(0.2), nn.Linear(256, 5),
    )  # fmt: skip
    x = torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    return net, x


def test_targeted_attacks_beat_random_noise(net_and_images):
    net, x = net_and_images
    net.train()  # the attack must switch to eval mode by itself and restore training mode
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.random.get_rng_state()
    eps = 8 / 255
    rand = fragility_attack(net, x, objective="random", epsilon=eps)
    topk = fragility_attack(net, x, objective="topk", epsilon=eps, steps=20)
    centre = fragility_attack(net, x, objective="mass_centre", epsilon=eps, steps=20)
    assert topk.topk_intersection.mean() < rand.topk_intersection.mean() - 0.1
    assert centre.mass_centre_shift.mean() > 2 * rand.mass_centre_shift.mean()
    for res in (rand, topk, centre):
        assert (res.adversarial - x).abs().max() <= eps + 1e-6
        assert res.adversarial.min() >= 0 and res.adversarial.max() <= 1
        assert res.found.all()
        assert ((res.spearman >= -1) & (res.spearman <= 1)).all()
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(topk.adversarial).argmax(1), net(x).argmax(1))  # prediction kept
    net.train()
    assert net.training and all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # BatchNorm statistics too
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_counts_and_errors(net_and_images):
    net, x = net_and_images
    res = fragility_attack(net, x[:2], objective="topk", top_k=10, steps=2, clamp=None)
    assert res.topk_intersection.shape == (2,)
    assert ((res.topk_intersection * 10) % 1 == 0).all()  # shares of k = 10 features
    with pytest.raises(ValueError, match="objective"):
        fragility_attack(net, x, objective="nope")
    with pytest.raises(ValueError, match="not differentiable"):
        fragility_attack(net, x, method="occlusion")


def test_scores_equal_their_definitions_on_the_returned_inputs():
    """Spearman (against the map of x ranked once), top-k intersection and centre shift of each sample
    equal scipy's rank correlation and the plain set and centre-of-mass definitions, recomputed from the
    maps of x and of the adversarial input returned (ties included: ReLU saliency has exact zeros)."""
    from scipy.stats import spearmanr

    from explain_callbacks.attribution import Saliency

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(10, 12, generator=torch.Generator().manual_seed(2))
    res = fragility_attack(net, x, method="saliency", epsilon=0.3, steps=4, top_k=3, clamp=None)
    assert res.found.any()
    y = net(x).argmax(1)
    imp0, imp1 = Saliency()(net, x, y).abs(), Saliency()(net, res.adversarial, y).abs()
    for i in range(x.shape[0]):
        rho = spearmanr(imp0[i].numpy(), imp1[i].numpy()).statistic
        assert abs(float(res.spearman[i]) - (1.0 if rho != rho else rho)) < 1e-6, i  # NaN: a constant map
        top0, top1 = set(imp0[i].topk(3).indices.tolist()), set(imp1[i].topk(3).indices.tolist())
        assert abs(float(res.topk_intersection[i]) - len(top0 & top1) / 3) < 1e-6
        centre = lambda m: (m * torch.arange(12.0)).sum() / m.sum()  # noqa: E731
        assert abs(float(res.mass_centre_shift[i]) - abs(float(centre(imp1[i]) - centre(imp0[i])))) < 1e-4
