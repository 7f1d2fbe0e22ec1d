"""Gradient and path methods against autograd, closed forms and Captum (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain_callbacks.attribution import (
    ExpectedGradients,
    GradCAM,
    InputXGradient,
    IntegratedGradients,
    NeuronRegionIG,
    Saliency,
    SmoothGrad,
    build_attributor,
    quadrature,
)

captum_attr = pytest.importorskip("captum.attr")


def test_saliency_equals_autograd(tiny_cnn, images):
    t = torch.tensor([0, 1, 2, 3])
    x = images.clone().requires_grad_(True)
    out = tiny_cnn(x).gather(1, t.view(-1, 1)).sum()
    (ref,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(Saliency()(tiny_cnn, images, t), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("abs_", [True, False])
def test_saliency_matches_captum(tiny_cnn, images, abs_):
    t = torch.tensor([4, 1, 0, 2])
    ref = captum_attr.Saliency(tiny_cnn).attribute(images, target=t, abs=abs_)
    torch.testing.assert_close(Saliency(abs=abs_)(tiny_cnn, images, t), ref, rtol=1e-6, atol=1e-6)


def test_input_x_gradient_matches_captum(tiny_cnn, images):
    t = torch.tensor([4, 1, 0, 2])
    ref = captum_attr.InputXGradient(tiny_cnn).attribute(images, target=t)
    torch.testing.assert_close(InputXGradient()(tiny_cnn, images, t), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [("gausslegendre", "gausslegendre"), ("riemann_left", "riemann_left"), ("riemann_right", "riemann_right"),
     ("riemann_middle", "riemann_middle")],
)  # fmt: skip
def test_ig_matches_captum(tiny_cnn, images, ours, theirs):
    t = torch.tensor([3, 1, 0, 2])
    base = torch.full_like(images, 0.1)
    ref = captum_attr.IntegratedGradients(tiny_cnn).attribute(images, base, target=t, n_steps=20, method=theirs)
    ig = IntegratedGradients(n_steps=20, rule=ours, baseline=base, batch_size=7)  # odd chunking on purpose
    torch.testing.assert_close(ig(tiny_cnn, images, t), ref, rtol=1e-6, atol=1e-6)


def test_trapezoid_is_exact_for_linear_gradients():
    """f = Σ a x²: the integrand is linear in α, so the trapezoid rule (ours sums to 1) is exact."""

    class Quad(nn.Module):
        def forward(self, x):
            return (3.0 * x**2).sum(1, keepdim=True)

    x = torch.randn(5, 4, dtype=torch.float64)
    base = torch.randn(5, 4, dtype=torch.float64)
    ig = IntegratedGradients(n_steps=3, rule="riemann_trapezoid", baseline=base)(Quad(), x, None)
    torch.testing.assert_close(ig, 3.0 * (x**2 - base**2), rtol=1e-12, atol=1e-12)
    _, w = quadrature(7, "riemann_trapezoid")
    assert abs(float(w.sum()) - 1.0) < 1e-12


def test_ig_linear_model_exact():
    lin = nn.Linear(6, 3).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    t = torch.tensor([0, 2, 1, 2])
    for rule in ("gausslegendre", "riemann_left", "riemann_middle"):
        ig = IntegratedGradients(n_steps=5, rule=rule)(lin, x, t)
        torch.testing.assert_close(ig, x * lin.weight[t], rtol=1e-12, atol=1e-12)


def test_gauss_legendre_16_beats_riemann_middle_64(smooth_mlp):
    x = torch.randn(16, 6, dtype=torch.float64) * 2
    t = torch.arange(16) % 3
    gl = IntegratedGradients(n_steps=16, rule="gausslegendre")
    gl(smooth_mlp, x, t)
    rm = IntegratedGradients(n_steps=64, rule="riemann_middle")
    rm(smooth_mlp, x, t)
    assert gl.last_info["completeness_error"].mean() < rm.last_info["completeness_error"].mean()
    assert gl.last_info["completeness_error"].max() < 1e-6


def test_ig_completeness_error_reported(tiny_cnn, images):
    ig = IntegratedGradients(n_steps=64)
    a = ig(tiny_cnn, images, torch.tensor([0, 1, 2, 3]))
    fx = tiny_cnn(images)[torch.arange(4), [0, 1, 2, 3]]
    f0 = tiny_cnn(torch.zeros_like(images))[torch.arange(4), [0, 1, 2, 3]]
    torch.testing.assert_close(ig.last_info["output_change"], (fx - f0).detach())
    gap = a.sum((1, 2, 3)) - (fx - f0)
    torch.testing.assert_close(ig.last_info["delta"], gap.detach())


@pytest.mark.parametrize("baseline", ["zeros", "blur", "mean", "uniform", 0.5])
def test_ig_baselines_complete(images, baseline):
    torch.manual_seed(0)
    smooth = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Conv2d(4, 4, 3), nn.Tanh(),
                           nn.Flatten(), nn.Linear(144, 5)).double()  # fmt: skip
    ig = IntegratedGradients(n_steps=24, baseline=baseline)
    ig(smooth, images, torch.tensor([0, 1, 2, 3]))
    assert ig.last_info["completeness_error"].max() < 1e-6


def test_ig_create_graph_gives_parameter_gradients():
    lin = nn.Linear(5, 2).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    t = torch.tensor([1, 1, 1])
    ig = IntegratedGradients(n_steps=4)(lin, x, t, create_graph=True)
    (gw,) = torch.autograd.grad(ig.sum(), lin.weight)
    expected = torch.zeros_like(lin.weight)
    expected[1] = x.sum(0)  # d/dW_1 Σ x ⊙ W_1 = Σ_n x_n
    torch.testing.assert_close(gw, expected)
    assert lin.weight.grad is None


def test_smoothgrad_closed_forms():
    class Quad(nn.Module):
        def forward(self, x):
            return (2.0 * x**2).sum(1, keepdim=True)

    x = torch.randn(3, 4, dtype=torch.float64)
    sigma = 0.3
    sg = SmoothGrad(n_samples=4000, stdev=sigma, batch_size=1000)(Quad(), x, None)
    torch.testing.assert_close(sg, 4 * x, atol=0.05, rtol=0)  # E[4(x+ε)] = 4x
    sq = SmoothGrad(n_samples=4000, stdev=sigma, variant="smoothgrad_sq")(Quad(), x, None)
    torch.testing.assert_close(sq, 16 * (x**2 + sigma**2), atol=0.25, rtol=0.05)
    vg = SmoothGrad(n_samples=4000, stdev=sigma, variant="vargrad")(Quad(), x, None)
    torch.testing.assert_close(vg, torch.full_like(x, 16 * sigma**2), atol=0.12, rtol=0)


def test_smoothgrad_zero_noise_equals_saliency(tiny_cnn, images):
    t = torch.tensor([0, 1, 2, 3])
    sg = SmoothGrad(n_samples=3, stdev=0.0)(tiny_cnn, images, t)
    torch.testing.assert_close(sg, Saliency()(tiny_cnn, images, t))


def test_random_methods_seeded_and_global_rng_untouched(tiny_cnn, images):
    t = torch.tensor([0, 1, 2, 3])
    state = torch.get_rng_state()
    for method in (SmoothGrad(n_samples=5, seed=3), ExpectedGradients(n_samples=5, seed=3),
                   IntegratedGradients(baseline="uniform", n_steps=4)):  # fmt: skip
        a1, a2 = method(tiny_cnn, images, t), method(tiny_cnn, images, t)
        torch.testing.assert_close(a1, a2, rtol=0, atol=0)
    assert torch.equal(state, torch.get_rng_state())
    assert not torch.equal(
        SmoothGrad(n_samples=5, seed=4)(tiny_cnn, images, t), SmoothGrad(n_samples=5, seed=3)(tiny_cnn, images, t)
    )


def test_expected_gradients_single_reference_is_exact_on_linear():
    lin = nn.Linear(6, 3).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    ref = torch.randn(1, 6, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 0])
    eg = ExpectedGradients(reference=ref, n_samples=7)(lin, x, t)
    torch.testing.assert_close(eg, (x - ref) * lin.weight[t])
    # completeness in expectation: Σ EG = f(x) − f(x')
    torch.testing.assert_close(eg.sum(1), (lin(x) - lin(ref)).gather(1, t.view(-1, 1)).squeeze(1).detach())


def test_gradcam_matches_captum(tiny_cnn, images):
    t = torch.tensor([0, 1, 2, 3])
    layer = tiny_cnn.conv2
    ref = captum_attr.LayerGradCam(tiny_cnn, layer).attribute(images, target=t, relu_attributions=True)
    ours = GradCAM(layer="conv2", upsample=False)(tiny_cnn, images, t)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-8)
    up = GradCAM(upsample=True)(tiny_cnn, images, t)  # last conv found automatically
    ref_up = captum_attr.LayerAttribution.interpolate(ref, (8, 8), "bilinear")
    torch.testing.assert_close(up, ref_up, rtol=1e-6, atol=1e-8)


def test_neuron_region_ig_sums_to_region_ig(tiny_cnn, images):
    t = torch.tensor([0, 1, 2, 3])
    region = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    region[..., 2:6, 1:5] = True
    nig = NeuronRegionIG(layer="bn", region=region, n_steps=16)(tiny_cnn, images, t)
    assert nig.shape == (4, 4, 8, 8)
    ig = IntegratedGradients(n_steps=16, completeness=False)(tiny_cnn, images, t)
    torch.testing.assert_close(nig.sum((1, 2, 3)), (ig * region).sum((1, 2, 3)), rtol=1e-8, atol=1e-10)


def test_chunking_bounds_rows_per_call(tiny_cnn, images):
    calls = []

    class Spy(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            calls.append(x.shape[0])
            return self.m(x)

    spy = Spy(tiny_cnn)
    t = torch.tensor([0, 1, 2, 3])
    calls.clear()
    IntegratedGradients(n_steps=10, batch_size=9, completeness=False)(spy, images, t)
    assert max(calls) <= 9 and sum(calls) == 1 + 40  # one probe (the target check) + 10 steps x 4 samples
    calls.clear()
    SmoothGrad(n_samples=6, batch_size=8)(spy, images, t)
    assert max(calls) <= 8 and sum(calls) == 24  # the probe is cached per model and input shape


def test_captum_adapter(tiny_cnn, images):
    t = torch.tensor([0, 1, 2, 3])
    m = build_attributor(captum_attr.IntegratedGradients)
    ours = IntegratedGradients(n_steps=50, completeness=False)(tiny_cnn, images, t)
    torch.testing.assert_close(m(tiny_cnn, images, t), ours, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="black-box"):
        m(tiny_cnn, images, t, create_graph=True)


def test_bad_inputs_have_clear_errors(tiny_cnn, images):
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 4\]"):
        Saliency()(tiny_cnn, images, torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="unsqueeze"):
        Saliency()(tiny_cnn, images[0, 0, 0], 0)
    bad = images.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf in samples \[1\]"):
        Saliency()(tiny_cnn, bad, 0)
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        Saliency()(tiny_cnn, images, torch.tensor([0, 1]))
    with pytest.raises(KeyError, match="Unknown attribution 'nope'"):
        build_attributor("nope")
    with pytest.raises(ValueError, match="no convolution"):
        GradCAM()(nn.Linear(4, 2), torch.randn(2, 1, 4), 0)


class _SmoothCNN(nn.Module):
    """Softplus CNN: every attribution is a smooth function of the parameters (for gradcheck)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.softplus(self.conv(x), beta=3).flatten(1))


@pytest.mark.parametrize(
    "method",
    [
        Saliency(),
        InputXGradient(),
        SmoothGrad(n_samples=3, noise_level=0.1),
        build_attributor("smoothgrad_sq", n_samples=3),
        build_attributor("vargrad", n_samples=3),
        IntegratedGradients(n_steps=4, completeness=False),
        ExpectedGradients(reference=torch.rand(2, 2, 5, 5, dtype=torch.float64), n_samples=3),
        GradCAM(layer="conv"),
        NeuronRegionIG(layer="conv", n_steps=3),
    ],
    ids=lambda m: type(m).__name__ + getattr(m, "name", ""),
)
def test_create_graph_parameter_gradient_matches_finite_differences(method):
    """Penalties (RRR, attribution priors) need d map / d θ: check it against finite differences."""
    torch.manual_seed(0)
    net = _SmoothCNN().double()
    x = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    t = torch.tensor([0, 2])
    names = ["conv.weight", "fc.weight"]
    params = {k: v.detach() for k, v in net.named_parameters()}

    def attribution(cw: torch.Tensor, fw: torch.Tensor) -> torch.Tensor:
        for k, v in zip(names, (cw, fw)):
            *path, leaf = k.split(".")
            mod = net.get_submodule(".".join(path))
            delattr(mod, leaf)
            setattr(mod, leaf, v)  # a plain tensor, so the map is a function of it
        try:
            return method.attribute(net, x, t, create_graph=True)
        finally:
            for k in names:
                *path, leaf = k.split(".")
                mod = net.get_submodule(".".join(path))
                delattr(mod, leaf)
                mod.register_parameter(leaf, nn.Parameter(params[k].clone()))

    inputs = tuple(params[k].clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(attribution, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_expected_gradients_complete_in_expectation(smooth_mlp):
    """With many (reference, α) draws, Σ EG → f(x) − E f(x') (Erion et al. 2021)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    refs = torch.randn(16, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    eg = ExpectedGradients(reference=refs, n_samples=4000, seed=1)(smooth_mlp, x, t)
    with torch.no_grad():
        fx = smooth_mlp(x).gather(1, t.view(-1, 1)).squeeze(1)
        fr = smooth_mlp(refs)[:, t].mean(0)
    gap = (fx - fr).abs()
    assert ((eg.sum(1) - (fx - fr)).abs() < 0.05 * gap + 0.01).all()
