"""Agreement with Quantus on the deterministic definitions (pixel flipping, sparseness, complexity,
patch infidelity) and on faithfulness correlation with the same subsets.

Quantus feeds its models float32 (``torch.Tensor(x)``), so both sides run the same float32 model.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from explain_callbacks.metrics import functional as MF

from .references import import_quantus

quantus = import_quantus()
pytestmark = pytest.mark.skipif(quantus is None, reason="quantus not installed (the dev extra)")

TOL = 1e-5


def _model(c: int = 2, k: int = 4) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(c, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, k)
    ).eval()  # fmt: skip


def _data(b: int = 5, c: int = 2):
    g = torch.Generator().manual_seed(11)
    x = torch.rand(b, c, 8, 8, generator=g)
    a = torch.randn(b, c, 8, 8, generator=g)  # continuous: no ties in the ordering
    y = torch.randint(0, 4, (b,), generator=g)
    return x, a, y


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize(("features_in_step", "c"), [(1, 1), (8, 2)])
def test_deletion_equals_quantus_pixel_flipping(features_in_step, c):
    model = _model(c)
    x, a, y = _data(c=c)
    q = quantus.PixelFlipping(features_in_step=features_in_step, perturb_baseline="black", disable_warnings=True)
    ref = np.array(_quiet(q, model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy().copy(), device="cpu"))
    _, curve, xs = MF.deletion(
        model, x, a, y, substrate="min", step=features_in_step, features="element", output="probability",
        return_curve=True, batch_size=64,
    )  # fmt: skip
    assert curve.shape == (5, c * 64 // features_in_step + 1)
    np.testing.assert_allclose(curve[:, 1:].numpy(), ref, atol=TOL)
    assert float(xs[0]) == 0.0 and float(xs[-1]) == 1.0


def test_sparseness_and_complexity_equal_quantus():
    x, a, y = _data()
    model = _model()
    sp = _quiet(quantus.Sparseness(disable_warnings=True), model=model, x_batch=x.numpy(), y_batch=y.numpy(),
                a_batch=a.numpy().copy(), device="cpu")  # fmt: skip
    cx = _quiet(quantus.Complexity(disable_warnings=True), model=model, x_batch=x.numpy(), y_batch=y.numpy(),
                a_batch=a.numpy().copy(), device="cpu")  # fmt: skip
    np.testing.assert_allclose(MF.sparseness(a).numpy(), np.array(sp), atol=TOL)
    np.testing.assert_allclose(MF.complexity(a).numpy(), np.array(cx), atol=TOL)


def test_patch_infidelity_equals_quantus():
    model = _model()
    x, a, y = _data()
    q = quantus.Infidelity(perturb_patch_sizes=[4], n_perturb_samples=2, perturb_baseline="black",
                           abs=False, normalise=False, disable_warnings=True)  # fmt: skip
    ref = np.array(_quiet(q, model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy().copy(),
                          device="cpu", softmax=False))  # fmt: skip
    ours = MF.infidelity(model, x, a, y, perturbation="patch_sequence", patch_size=4, baseline="min", output="logit")
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6, atol=TOL)  # float32 values up to ~70


def test_faithfulness_correlation_equals_quantus_with_fixed_subsets(monkeypatch):
    model = _model()
    x, a, y = _data()
    b, n, runs, k = x.shape[0], x[0].numel(), 20, 24
    g = torch.Generator().manual_seed(5)
    subsets = torch.stack([torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(runs)]) for _ in range(b)])
    # Quantus draws one subset per sample per run with np.random.choice, sample-major within a run.
    order = iter([subsets[i, r].numpy() for r in range(runs) for i in range(b)])
    monkeypatch.setattr(np.random, "choice", lambda *args, **kw: next(order))
    q = quantus.FaithfulnessCorrelation(nr_runs=runs, subset_size=k, perturb_baseline="black", abs=False,
                                       normalise=False, return_aggregate=False, disable_warnings=True)  # fmt: skip
    ref = np.array(_quiet(q, model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy().copy(),
                          device="cpu"))  # fmt: skip
    ours = MF.mufidelity(model, x, a, y, subsets=subsets, correlation="pearson", baseline="min", features="element",
                         output="logit")  # fmt: skip
    np.testing.assert_allclose(ours.numpy(), ref, atol=TOL)
    # The preset fills in Quantus' settings left at their defaults (here all but the subset size).
    p = MF.mufidelity(model, x, a, y, preset="quantus", subset_size=k)
    same = MF.mufidelity(model, x, a, y, correlation="pearson", baseline="min", features="element", subset_size=k)
    torch.testing.assert_close(p, same)
    assert p.shape == (b,) and torch.isfinite(p).all()


@pytest.mark.parametrize(
    ("name", "qname", "np_name"),
    [
        ("max_sensitivity", "MaxSensitivity", "uniform"),
        ("avg_sensitivity", "AvgSensitivity", "uniform"),
        ("local_lipschitz", "LocalLipschitzEstimate", "normal"),
    ],
)
def test_explainer_robustness_equals_quantus_with_the_same_noise(monkeypatch, name, qname, np_name):
    """Max/avg sensitivity (Yeh 2019) and the local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018)
    with Quantus' draws replaced by ours (it draws one (B, D) array per sample of noise)."""
    from explain_callbacks.attribution import Saliency

    model = _model()
    x, _, y = _data()
    sal = Saliency()
    a = sal(model, x, y).detach()
    b, n_s = x.shape[0], 6
    g = torch.Generator().manual_seed(4)
    if np_name == "uniform":
        noise = (torch.rand(b, n_s, *x.shape[1:], generator=g) * 2 - 1) * 0.02
        kw = {"lower_bound": 0.02}
    else:
        noise = torch.randn(b, n_s, *x.shape[1:], generator=g) * 0.1
        kw = {"perturb_std": 0.1}
    draws = iter([noise[:, r].reshape(b, -1).numpy() for r in range(n_s)])
    monkeypatch.setattr(np.random, np_name, lambda *args, **k: next(draws))

    def explain(model, inputs, targets, **_):
        return sal(model, torch.as_tensor(inputs), torch.as_tensor(targets).long()).detach().numpy()

    q = getattr(quantus, qname)(nr_samples=n_s, normalise=False, abs=False, disable_warnings=True, **kw)
    ref = np.array(_quiet(q, model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy().copy(),
                          explain_func=explain, device="cpu"))  # fmt: skip
    ours = getattr(MF, name)(model, x, y, sal, a, perturbations=noise)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4, atol=TOL)


def test_randomisation_with_reset_draws_equals_quantus_mprt():
    """Cascading randomisation (Adebayo et al. 2018) with ``draws="reset_parameters"`` re-draws each layer as
    Quantus' MPRT (``torch.manual_seed(seed + 1)``, then the layer's ``reset_parameters()``): equal values, and
    the global RNG left as found (Quantus moves it)."""
    from explain_callbacks.attribution import Saliency

    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 16),
        nn.ReLU(), nn.Linear(16, 4),
    ).eval()  # fmt: skip
    with torch.no_grad():  # trained-looking statistics, so that the reset of BatchNorm changes the maps
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    x, _, y = _data()
    sal = Saliency()
    a = sal(model, x, y).detach()

    def explain(model, inputs, targets, **_):
        return sal(model, torch.as_tensor(inputs), torch.as_tensor(targets).long()).detach().numpy()

    state = torch.get_rng_state()
    ours = MF.model_randomisation(model, x, y, sal, a, draws="reset_parameters", seed=42)
    assert torch.equal(torch.get_rng_state(), state)
    q = quantus.MPRT(return_last_correlation=True, disable_warnings=True)  # seed=42, top-down, |A|, Spearman
    ref = np.array(_quiet(q, model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy().copy(),
                          explain_func=explain, device="cpu"))  # fmt: skip
    np.testing.assert_allclose(ours.numpy(), ref.reshape(-1), rtol=1e-5, atol=TOL)
    # the seeded default draws other weights: other values (the check is not vacuous)
    assert not np.allclose(MF.model_randomisation(model, x, y, sal, a, seed=42).numpy(), ref.reshape(-1), atol=1e-3)
    with pytest.raises(ValueError, match="draws must be"):
        MF.model_randomisation(model, x, y, sal, a, draws="global")
