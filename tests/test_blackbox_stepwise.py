"""The step-by-step black-box methods (nonlinear saliency, meaningful perturbation) against plain,
independent implementations of their definitions (methods.md section 2): the fast paths (carried rows,
packed state, closed-form mask gradients) must give the maps the naive loops give."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from explain_callbacks._internal.masks import score_outputs
from explain_callbacks.attribution import NonlinearSaliency
from explain_callbacks.attribution.blackbox import nonlinear_saliency as ns_module


def _naive_nonlinear(model, x, t, *, step_size, max_steps, drop, classify, output):
    """One sample at a time, autograd of the explained scalar, a plain loop: the flow of methods.md."""
    res = {k: [] for k in ("secant", "path_integral", "displacement", "steps", "output_change")}
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        ti = None if t is None else t[i : i + 1]

        def fg(z, ti=ti):
            z = z.detach().clone().requires_grad_(True)
            out = model(z)
            y = score_outputs(out, ti, output)
            (g,) = torch.autograd.grad(y.sum(), z)
            multi = out.ndim == 2 and out.shape[1] > 1
            return g.detach(), y.detach()[0], (int(out.argmax(1)) if multi else -1), multi

        d = xi.numel()
        norm = float(xi.norm())
        h = step_size * (norm if norm > 0 else math.sqrt(d))
        g, f0, p0, multi = fg(xi)
        cur, f, integral, steps = xi, f0, torch.zeros_like(xi), 0
        if float(g.norm()) > 1e-12:
            for _ in range(max_steps):
                dx = -h * g / g.norm()
                nxt = cur + dx
                g2, f2, p2, _ = fg(nxt)
                integral = integral + 0.5 * (g + g2) * dx
                cur, f, g, steps = nxt, f2, g2, steps + 1
                if f2 <= f0 - drop * abs(f0) or float(g2.norm()) <= 1e-12 or (classify and multi and p2 != p0):
                    break
        disp = cur - xi
        dist2 = float(disp.pow(2).sum())
        res["secant"].append(-disp * (f0 - f) / dist2 if dist2 > 0 else torch.zeros_like(disp))
        res["path_integral"].append(integral)
        res["displacement"].append(disp)
        res["steps"].append(steps)
        res["output_change"].append(float(f - f0))
    return {
        k: torch.cat(v)
        if isinstance(v[0], torch.Tensor)
        else torch.tensor(v, dtype=torch.float64 if k == "output_change" else torch.long)
        for k, v in res.items()
    }


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).double().eval()
    one = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 1)).double().eval()
    return mlp, one


@pytest.mark.parametrize("drop_rows", ["carry", "drop"])
@pytest.mark.parametrize(
    "settings",
    [
        dict(step_size=0.05, max_steps=12, drop=0.5, stop_on_class_change=True, output="logit"),
        dict(step_size=0.05, max_steps=7, drop=0.02, stop_on_class_change=False, output="softmax"),
        dict(step_size=0.1, max_steps=20, drop=0.2, stop_on_class_change=True, output="logit", batch_size=3),
    ],
    ids=["class-change", "max-steps-softmax", "chunked"],
)
def test_nonlinear_saliency_equals_the_naive_flow(settings, drop_rows, monkeypatch):
    # carried rows (stopped samples stay in the calls) and dropped rows (re-indexed at every stop) alike
    monkeypatch.setattr(
        ns_module.NonlinearSaliency, "_row_seconds", lambda *a: 0.0 if drop_rows == "carry" else math.inf
    )
    mlp, _ = _models()
    x = torch.randn(7, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[3] = 0.0  # a zero input: the step length falls back to step_size·√D
    t = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    kw = dict(settings)
    ref = _naive_nonlinear(
        mlp, x, t, classify=kw.pop("stop_on_class_change"), **{k: v for k, v in kw.items() if k != "batch_size"}
    )
    m = NonlinearSaliency(map="secant", stop_on_class_change=settings["stop_on_class_change"], **kw)
    a = m(mlp, x, t)
    assert len(set(ref["steps"].tolist())) > 1  # samples stop at different steps
    torch.testing.assert_close(a, ref["secant"], rtol=1e-9, atol=1e-12)
    for k in ("path_integral", "displacement", "steps"):
        torch.testing.assert_close(m.last_info[k], ref[k], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(m.last_info["output_change"], ref["output_change"], rtol=1e-9, atol=1e-12)
    forwards = m.last_info["forwards"]
    if drop_rows == "drop":  # every row leaves the calls when its sample stops
        assert torch.equal(forwards, ref["steps"] + 1)
    else:  # stopped rows ride along until the last sample stops
        assert torch.equal(forwards, torch.full_like(forwards, int(ref["steps"].max()) + 1))


def test_nonlinear_saliency_single_output_and_zero_gradient(monkeypatch):
    _, one = _models()
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for rows in (0.0, math.inf):
        monkeypatch.setattr(ns_module.NonlinearSaliency, "_row_seconds", lambda *a, r=rows: r)
        m = NonlinearSaliency(max_steps=6, drop=0.3)
        a = m(one, x, None)
        ref = _naive_nonlinear(one, x, None, step_size=0.02, max_steps=6, drop=0.3, classify=True, output="logit")
        torch.testing.assert_close(a, ref["secant"], rtol=1e-9, atol=1e-12)
        # a model with no gradient at all: every sample stops before its first step, maps are zero
        flat = nn.Sequential(nn.Linear(10, 3), nn.ReLU(), nn.Linear(3, 2)).double()
        with torch.no_grad():
            flat[0].bias.fill_(-100.0)
        z = m(flat, x, torch.tensor([0, 1, 0, 1]))
        assert torch.equal(z, torch.zeros_like(z)) and torch.equal(
            m.last_info["steps"], torch.zeros(4, dtype=torch.long)
        )
        assert torch.equal(m.last_info["forwards"], torch.ones(4, dtype=torch.long))


@pytest.mark.parametrize("output", ["logit", "softmax", "auto"])
def test_score_seeder_equals_score_seed_and_autograd(output):
    """The seed the step loops reuse (bound once to targets and one-hot rows) is score_seed's, bit for bit,
    and differentiating through it gives autograd's gradient of the explained scalar."""
    from explain_callbacks._internal.masks import score_seed, score_seeder

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 4))
    x = torch.randn(5, 6, requires_grad=True)
    t = torch.tensor([0, 3, 1, 2, 3])
    out = model(x)
    seed = score_seeder(out, t, output)
    y, dz = seed(out.detach())
    y2, dz2 = score_seed(out, t, output)
    assert torch.equal(y, y2) and torch.equal(dz, dz2)
    (g,) = torch.autograd.grad(out, x, dz, retain_graph=True)
    (ref,) = torch.autograd.grad(score_outputs(out, t, output).sum(), x)
    torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y, score_outputs(out, t, output).detach())
    assert score_seeder(out, t, "log_softmax") is None and score_seeder(out[:, :1], t, "logit") is None


@pytest.mark.parametrize("variant", ["deletion", "extremal"])
def test_meaningful_later_steps_gradient_equals_autograd(variant):
    """Steps after the first take the seeded fast path (no score_grad): their closed-form gradient still
    equals autograd of the objective as written, for images, sequences and tabular inputs."""
    from explain_callbacks._internal.masks import make_substrate
    from explain_callbacks.attribution import MeaningfulPerturbation
    from explain_callbacks.attribution.blackbox.meaningful import _MaskProblem
    from tests.test_blackbox_learned import _objective_as_written

    torch.manual_seed(0)
    conv2d = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(360, 4))
    cases = [
        ((3, 2, 12, 10), conv2d, (5, 4)),
        ((3, 2, 16), nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4)), (6,)),
        ((3, 6), nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)), (6,)),
    ]
    tgt = torch.tensor([0, 1, 3])
    for shape, model, low in cases:
        model = model.double()
        x = torch.rand(shape, dtype=torch.float64)
        tab = x.ndim == 2
        mp = MeaningfulPerturbation(variant=variant, n_steps=10, substrate="mean" if tab else "blur")
        sub = make_substrate(x, mp.substrate, sigma=1.0)
        size = (x.shape[1],) if tab else tuple(x.shape[2:])
        prob = _MaskProblem(mp, x, sub, low, size)
        mshape = (3, *low) if tab else (3, 1, *low)
        prob.grad(model, torch.rand(mshape, dtype=torch.float64), tgt, 0, [0, 0])  # the first step
        assert prob.seed is not None  # later steps seed the score's gradient in closed form
        for t, shift in ((1, [1, -2]), (4, [-2, 2]), (7, [0, 0])):
            m = torch.rand(mshape, dtype=torch.float64, requires_grad=True)
            (ref,) = torch.autograd.grad(_objective_as_written(mp, model, x, sub, m, tgt, t, shift, size), m)
            torch.testing.assert_close(prob.grad(model, m.detach(), tgt, t, shift), ref, rtol=1e-9, atol=1e-12)
