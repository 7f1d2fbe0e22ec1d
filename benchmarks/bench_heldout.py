"""Held-out-style benchmark: every attribution method and metric of the registry that applies to a small
ResNet, a tabular MLP, an LSTM and a small transformer (``heldout_models.py``), as

- ours / bare: ours (at ``batch_size="auto"``, what a user gets; ``--ours-batch-size``) against a replay
  of the very rows it sent to the model, in calls of the user's batch (``--batch-size``, default: the
  probe batch), each call replayed as the kind of pass it was: forward only, forward + input-gradient
  backward, or that backward with ``create_graph`` differentiated again (a double backward, as the
  fragility attack's steps make), under the softplus the ReLUs ran as; counted on a second run, after the
  first has measured ``batch_size="auto"`` (CPU time of the process on a CPU: a shared machine's other
  jobs are not counted);
- ours / Captum: against the fastest of several Captum settings (``internal_batch_size``,
  ``perturbations_per_eval``, ``nt_samples_batch_size``), values compared (max abs difference, relative to
  the largest |value|);
- ours / Quantus: metrics against Quantus at equal values (the same subsets / noise fed to Quantus by
  patching ``np.random``; values compared to ``--tol``).

Every ratio is the median over ``--repeats`` interleaved back-to-back pairs (which goes first
alternates), with the min-max over the pairs; 1 torch thread unless ``--threads``. Each row is marked
against issue 22's targets: gradient/path <= 1.05x the best of Captum and of the bare loop; metric <=
1.05x bare and faster than Quantus; black-box <= 1.3x bare (<= 1.1x on the CNN); LRP <= 1.05x Zennit's time
(``zennit_lrp``: the same composite and canonizers) at equal values, its ratio to the bare passes reported
(an LRP pass does more than a gradient by definition).

    python benchmarks/bench_heldout.py --quick                 # smaller settings, 8 rows (about 25 min on 2 busy cores)
    python benchmarks/bench_heldout.py --models resnet --device cuda
    python benchmarks/bench_heldout.py --quick --sections metrics --models mlp --only randomisation \
        --update benchmarks/results/bench_heldout_quick.md   # refresh some rows of a table, keep the others

Writes ``benchmarks/results/bench_heldout[_quick][_<device>].md`` (or ``--out``) and prints it; with
``--update TABLE`` the rows run replace the rows of TABLE with the same model and name (new ones go after
the last row of their model), the other rows and TABLE's header are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import patched, quiet  # sibling modules: the benchmarks run as scripts
from heldout_models import MODELS, build

from explain_callbacks._internal import model_guard
from explain_callbacks._internal.registry import ATTRIBUTIONS
from explain_callbacks.attribution.layers import last_conv_layer
from explain_callbacks.metrics import functional as MF
from explain_callbacks.metrics.functional.randomisation import randomisable_layers
from tests.references import import_zennit

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = {"gradient": 1.05, "blackbox": 1.3, "blackbox_cnn": 1.1, "metric": 1.05}


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK: Callable[[], float] = time.perf_counter  # main(): the process's CPU time on a CPU device


def pairs(a: Callable[[], Any], b: Callable[[], Any], repeats: int, device: torch.device,
          min_time: float = 0.02) -> tuple[float, list[float]]:  # fmt: skip
    """Best time of ``a`` and the ratios a / b over ``repeats`` interleaved back-to-back pairs (after a
    warm-up of each; which runs first alternates, so a drift of the machine's speed hits both). Calls
    shorter than ``min_time`` are repeated inside each timing, the same number of times for both, so
    that sub-millisecond calls (the MLP) are not timer noise."""
    s = CLOCK()
    a()
    b()
    sync(device)
    inner = max(1, math.ceil(min_time / max(CLOCK() - s, 1e-6)))
    ta: list[float] = []
    ratios: list[float] = []
    for r in range(repeats):
        order = (a, b) if r % 2 == 0 else (b, a)
        t = []
        for fn in order:
            s = CLOCK()
            for _ in range(inner):
                fn()
            sync(device)
            t.append((CLOCK() - s) / inner)
        t_a, t_b = (t[0], t[1]) if r % 2 == 0 else (t[1], t[0])
        ta.append(t_a)
        ratios.append(t_a / t_b)
    return min(ta), ratios


def summary(ratios: list[float] | None) -> str:
    if not ratios:
        return "—"
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"


def med(ratios: list[float] | None) -> float | None:
    return statistics.median(ratios) if ratios else None


# ----------------------------------------------------------------------------- bare passes
class Calls:
    """The model calls of one run of ``fn``, in order: rows, kind of pass (``"forward"`` without grad,
    ``"grad"``: forward + input-gradient backward, ``"double"``: that backward with ``create_graph`` and
    differentiated again) and the softplus β the ReLUs ran as (the fragility attack's surrogate; None:
    ReLU). Counted by a forward pre-hook on the model and a wrapper of ``torch.autograd.grad`` (a grad
    call with ``create_graph=True`` makes the last grad forward a double one), after one uncounted run
    of ``fn``: a first call per model and row shape measures ``batch_size="auto"`` (timed candidate
    calls that later runs do not make, so they are not replayed)."""

    def __init__(self, model: nn.Module, fn: Callable[[], Any]) -> None:
        from explain_callbacks._internal.softplus import _SoftplusForRelu

        fn()  # the warm-up run: the "auto" rows are measured here, once per model, row shape and pass kind
        self.calls: list[list[Any]] = []  # [row shape, kind, beta]

        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            kind = "grad" if torch.is_grad_enabled() and x.requires_grad else "forward"
            modes = torch.overrides._get_current_function_mode_stack()
            beta = next((m.beta for m in reversed(modes) if isinstance(m, _SoftplusForRelu)), None)
            self.calls.append([tuple(x.shape), kind, beta])

        grad = torch.autograd.grad

        def counting_grad(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("create_graph"):
                for c in reversed(self.calls):
                    if c[1] != "forward":
                        c[1] = "double"
                        break
            return grad(*args, **kwargs)

        h = model.register_forward_pre_hook(hook)
        torch.autograd.grad = counting_grad
        try:
            fn()
        finally:
            torch.autograd.grad = grad
            h.remove()

    @property
    def rows(self) -> tuple[int, int, int]:
        """Rows sent (double backward, forward + backward, forward only)."""
        return tuple(sum(s[0] for s, k, _ in self.calls if k == kind) for kind in ("double", "grad", "forward"))

    def label(self) -> str:
        d, g, f = self.rows
        if not d + g + f:
            return "none"
        return (f"{d} double + " if d else "") + (f"{g} grad + {f} fwd" if d + g else f"{f} fwd")

    def bare(self, model: nn.Module, bs: int, device: torch.device) -> Callable[[], None]:
        """The same rows in calls of ``bs`` rows, each kind of pass as ours made it (on fixed random
        rows): forward only; forward + input-gradient backward of the target's logits; or that backward
        with ``create_graph`` and the gradient of its squared sum (a double backward, through the math
        kernel of attention, as ours), under the same softplus β as ours."""
        from explain_callbacks._internal.batching import twice_differentiable
        from explain_callbacks._internal.softplus import relu_as_softplus

        groups: dict[tuple[str, float | None, tuple[int, ...]], int] = {}
        for shape, kind, beta in self.calls:  # rows of one kind, β and row shape, in the order first met
            key = (kind, beta, shape[1:])
            groups[key] = groups.get(key, 0) + shape[0]
        parts = [(kind, beta, torch.rand(n, *row, device=device)) for (kind, beta, row), n in groups.items()]

        def run() -> None:
            for kind, beta, rows in parts:  # a double backward through attention: its math kernel, as ours
                with relu_as_softplus(beta), twice_differentiable(kind == "double"):
                    for s in range(0, rows.shape[0], bs):
                        xb = rows[s : s + bs]
                        if kind == "forward":
                            with torch.no_grad():
                                model(xb)
                            continue
                        xb = xb.detach().requires_grad_(True)
                        (g,) = torch.autograd.grad(model(xb)[:, 0].sum(), xb, create_graph=kind == "double")
                        if kind == "double":
                            torch.autograd.grad(g.square().sum(), xb)

        return run


# ----------------------------------------------------------------------------- Quantus helpers


# ----------------------------------------------------------------------------- LRP's peer
LRP_NOTE = ("an LRP pass does more than a gradient by definition (z⁺: a second convolution per layer; ε: "
            "stabilised divisions): judged against Zennit")  # fmt: skip


NO_PEER = {"lstm": "LSTMs (ours: Arras et al. 2017)", "transformer": "attention or LayerNorm (ours: AttnLRP)"}


def zennit_lrp(name: str, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Callable[[], Tensor]]:
    """Zennit (Anders et al. 2021; LGPL, benchmark-only) with the same composite as ours: EpsilonPlusFlat, BatchNorm
    merged into the layer before it (SequentialMergeBatchNorm) and, on the ResNet, each block's ``+`` as Zennit's
    Sum layer (the canonizer of tests/test_lrp_zennit.py), on a copy of the model (Zennit's canonizers rewrite
    the model while they run). Empty where Zennit has no rules (attention, LayerNorm, LSTMs)."""
    if name not in ("resnet", "mlp"):
        return {}
    import copy

    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    if name == "resnet":
        from tests.test_lrp_zennit import zennit_resnet_canonizers

        canonizers = zennit_resnet_canonizers()
    else:
        canonizers = [SequentialMergeBatchNorm()]
    composite = EpsilonPlusFlat(canonizers=canonizers)
    zmodel = copy.deepcopy(model)
    with torch.no_grad():
        onehot = torch.zeros_like(model(x[:1]).expand(x.shape[0], -1)).scatter_(1, y[:, None], 1.0)

    def run() -> Tensor:  # the explained score's own value as the output relevance, as ours
        with Gradient(model=zmodel, composite=composite) as attributor:
            return attributor(x, lambda out: out * onehot)[1]

    return {"EpsilonPlusFlat": run}


# ----------------------------------------------------------------------------- method cases
def method_cases(
    name: str, model: nn.Module, x: Tensor, y: Tensor, bs: int, quick: bool, ours_bs: int | str
) -> list[dict[str, Any]]:
    """(label, kind, ours, Captum settings) for each registered method that applies to the model."""
    import captum.attr as ca

    image, tabular = x.ndim == 4, x.ndim == 2
    seq = x.ndim == 3
    n_ig = 16 if quick else 50
    n_sg = 8 if quick else 25
    cases: list[dict[str, Any]] = []

    def add(label: str, kind: str, spec: str, captum: dict[str, Callable[[], Tensor]] | None = None,
            compare: bool = True, bare_note: str = "", peer: str = "Captum", note: str = "",
            **kw: Any) -> None:  # fmt: skip
        cases.append({"label": label, "kind": kind, "method": ATTRIBUTIONS.build(spec, batch_size=ours_bs, **kw),
                      "captum": captum or {}, "compare": compare, "bare_note": bare_note, "peer": peer,
                      "note": note})  # fmt: skip

    ibs = {"internal_batch_size=B": bs, "internal_batch_size=256": 256, "one call": n_ig * x.shape[0]}
    add("saliency", "gradient", "saliency", {"Saliency": lambda: ca.Saliency(model).attribute(x, target=y, abs=False)})
    add("input_x_gradient", "gradient", "input_x_gradient",
        {"InputXGradient": lambda: ca.InputXGradient(model).attribute(x, target=y)})  # fmt: skip
    nt = {f"nt_samples_batch_size={k}": (lambda k=k: ca.NoiseTunnel(ca.Saliency(model)).attribute(
        x, target=y, nt_type="smoothgrad", nt_samples=n_sg, stdevs=0.1, abs=False, nt_samples_batch_size=k))
        for k in (1, n_sg)}  # fmt: skip
    add(f"smoothgrad n={n_sg}", "gradient", "smoothgrad", nt, compare=False, n_samples=n_sg, stdev=0.1)
    ig = {k: (lambda v=v: ca.IntegratedGradients(model).attribute(x, target=y, n_steps=n_ig, internal_batch_size=v))
          for k, v in ibs.items()}  # fmt: skip
    add(f"ig n_steps={n_ig}", "gradient", "ig", ig, n_steps=n_ig, completeness=False)
    ref = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))]
    add(f"expected_gradients n={n_sg}", "gradient", "expected_gradients",
        {"GradientShap": lambda: ca.GradientShap(model).attribute(x, baselines=ref, target=y, n_samples=n_sg,
                                                                     stdevs=0.0)},
        compare=False, n_samples=n_sg, reference=ref)  # fmt: skip
    if image:
        layer = last_conv_layer(model)
        add("gradcam", "gradient", "gradcam",
            {"LayerGradCam": lambda: ca.LayerAttribution.interpolate(
                ca.LayerGradCam(model, layer).attribute(x, target=y, relu_attributions=True), x.shape[2:],
                "bilinear")}, compare=False,
            # its input needs no gradient, so the replay counts forwards: the backward from the score to the
            # layer is not replayed, and the row is judged against Captum's LayerGradCam alone
            bare_note="bare: forwards only (its backward to the layer is not replayed); judged against Captum",
        )  # fmt: skip
    zen = zennit_lrp(name, model, x, y)
    no_peer = "" if zen else f"; no peer: Zennit has no rules for {NO_PEER.get(name, 'this model')}"
    add("lrp (epsilon_plus_flat)", "lrp", "lrp", zen, peer="Zennit", note=LRP_NOTE + no_peer)
    if image:
        st = 4 if quick else 2
        win, stride = (3, 4, 4), (3, st, st)
        occ_kw: dict[str, Any] = {"window": 4, "stride": st}
    elif tabular:
        win, stride = (1,), (1,)
        occ_kw = {}
    else:
        win, stride = (4, 1), (2, 1)
        occ_kw = {}
    occ = {f"perturbations_per_eval={k}": (lambda k=k: ca.Occlusion(model).attribute(
        x, sliding_window_shapes=win, strides=stride, baselines=0.0, target=y, perturbations_per_eval=k))
        for k in ((8, 64) if quick else (1, 8, 64))}  # fmt: skip
    add("occlusion", "blackbox", "occlusion", occ, **occ_kw)
    n_rise = 100 if quick else 4000
    add(f"rise n_masks={n_rise}", "blackbox", "rise", n_masks=n_rise)
    add("sobol", "blackbox", "sobol", n_designs=4 if quick else 32)
    add("hsic", "blackbox", "hsic", n_designs=100 if quick else 1500)
    add("neflag", "blackbox", "neflag", n_points=3 if quick else 20)
    add("nonlinear_saliency", "blackbox", "nonlinear_saliency", max_steps=5 if quick else 50)
    add("meaningful_perturbation", "blackbox", "meaningful_perturbation", n_steps=10 if quick else 300)
    del seq
    return cases


# ----------------------------------------------------------------------------- metric cases
def metric_cases(model: nn.Module, x: Tensor, y: Tensor, a: Tensor, sal: Any, bs: int | str, quick: bool,
                 masks: Tensor | None) -> list[dict[str, Any]]:  # fmt: skip
    """(label, ours, Quantus call giving comparable values) for each metric that applies."""
    import quantus

    b = x.shape[0]
    shape = tuple(x.shape[1:])
    n_el = int(np.prod(shape))
    xn, yn, an = x.cpu().numpy(), y.cpu().numpy(), a.detach().cpu().numpy()
    qdev = "cuda" if x.device.type == "cuda" else "cpu"
    cases: list[dict[str, Any]] = []
    image = x.ndim == 4

    def q_explain(model: Any, inputs: np.ndarray, targets: np.ndarray, **kw: Any) -> np.ndarray:
        m = model.get_model() if hasattr(model, "get_model") else model
        xi = torch.as_tensor(inputs, device=x.device, dtype=torch.float32).reshape(-1, *shape)
        ti = torch.as_tensor(targets, device=x.device).long()
        return sal(m, xi, ti).detach().cpu().numpy().reshape(inputs.shape)

    def q_call(metric: Any, **kw: Any) -> Callable[[], np.ndarray]:
        return lambda: np.asarray(quiet(lambda: metric(model=model, x_batch=xn, y_batch=yn, a_batch=an.copy(),
                                                       device=qdev, **kw)), dtype=float)  # fmt: skip

    def add(label: str, ours: Callable[[], Tensor], quantus_fn: Callable[[], np.ndarray] | None = None,
            ours_value: Callable[[Any], Tensor] = lambda v: v, note: str = "") -> None:  # fmt: skip
        cases.append({"label": label, "ours": ours, "quantus": quantus_fn, "value": ours_value, "note": note})

    # deletion = Quantus PixelFlipping (element features, min substrate = "black", probability curve)
    # features per step: a divisor of the positions (Quantus flips whole pixels of images: 64 divides 32 x 32)
    step = (256 if quick else 64) if image else max(1, n_el // (16 if quick else 64))
    kw = dict(substrate="min", step=step, features="element", output="probability", batch_size=bs, ties="index")
    add(f"deletion ({math.ceil(n_el / step)} steps)", lambda: MF.deletion(model, x, a, y, return_curve=True, **kw),
        q_call(quantus.PixelFlipping(features_in_step=step, perturb_baseline="black", disable_warnings=True)),
        ours_value=lambda v: v[1][:, 1:], note="curves vs PixelFlipping")  # fmt: skip
    add("insertion (32 steps)", lambda: MF.insertion(model, x, a, y, n_steps=32, batch_size=bs))
    add("insertion_deletion (32 steps)", lambda: MF.insertion_deletion(model, x, a, y, n_steps=32, batch_size=bs))
    add("abc (32 steps)", lambda: MF.abc(model, x, a, y, n_steps=32, batch_size=bs))
    runs, k = (10 if quick else 100), max(1, n_el // 14)
    g = torch.Generator().manual_seed(0)
    subsets = torch.stack([torch.stack([torch.randperm(n_el, generator=g)[:k] for _ in range(runs)])
                           for _ in range(b)]).to(x.device)  # fmt: skip
    seq = [subsets[i, r].cpu().numpy() for r in range(runs) for i in range(b)]

    def q_mu() -> np.ndarray:
        qm = quantus.FaithfulnessCorrelation(nr_runs=runs, subset_size=k, perturb_baseline="black", abs=False,
                                             normalise=False, return_aggregate=False,
                                             disable_warnings=True)  # fmt: skip
        with patched("choice", iter(seq)):
            return q_call(qm)()

    add(f"mufidelity ({runs} subsets of {k})", lambda: MF.mufidelity(
        model, x, a, y, subsets=subsets, correlation="pearson", baseline="min", features="element", output="logit",
        batch_size=bs), q_mu)  # fmt: skip
    if image:
        n_blocks = (shape[1] // 4) * (shape[2] // 4)
        add(f"infidelity ({n_blocks} patches)", lambda: MF.infidelity(
            model, x, a, y, perturbation="patch_sequence", patch_size=4, baseline="min", output="logit",
            batch_size=bs), q_call(quantus.Infidelity(perturb_patch_sizes=[4], n_perturb_samples=1,
                                                    perturb_baseline="black", abs=False, normalise=False,
                                                    disable_warnings=True), softmax=False))  # fmt: skip
    add("infidelity (32 gaussian draws)", lambda: MF.infidelity(model, x, a, y, n_perturb=32, batch_size=bs))
    add("completeness_error", lambda: MF.completeness_error(model, x, a * x, y, batch_size=bs))
    add("sparseness", lambda: MF.sparseness(a), q_call(quantus.Sparseness(disable_warnings=True)))
    add("complexity", lambda: MF.complexity(a), q_call(quantus.Complexity(disable_warnings=True)))
    if image and masks is not None:
        a_pix = a.sum(1, keepdim=True)
        add("pointing_game", lambda: MF.pointing_game(a_pix, masks, tolerance=0))
        add("energy_pointing_game", lambda: MF.energy_pointing_game(a_pix, masks))
        add("dabkowski", lambda: MF.dabkowski_saliency(model, x, a, y, batch_size=bs))
    n_s = 3 if quick else 10
    noise_u = (torch.rand(b, n_s, *shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 0.02
    noise_g = torch.randn(b, n_s, *shape, generator=torch.Generator().manual_seed(2)) * 0.1
    for label, fn, qcls, noise, npname in (
        ("max_sensitivity", MF.max_sensitivity, quantus.MaxSensitivity, noise_u, "uniform"),
        ("avg_sensitivity", MF.avg_sensitivity, quantus.AvgSensitivity, noise_u, "uniform"),
        ("local_lipschitz", MF.local_lipschitz, quantus.LocalLipschitzEstimate, noise_g, "normal"),
    ):
        kwq = {"lower_bound": 0.02} if npname == "uniform" else {"perturb_std": 0.1}

        def q_sens(qcls: Any = qcls, noise: Tensor = noise, npname: str = npname, kwq: dict = kwq) -> np.ndarray:
            qm = qcls(nr_samples=n_s, normalise=False, abs=False, disable_warnings=True, **kwq)
            with patched(npname, iter([noise[:, r].reshape(b, -1).numpy() for r in range(n_s)])):
                return q_call(qm, explain_func=q_explain)()

        add(f"{label} ({n_s} draws)", lambda fn=fn, noise=noise: fn(model, x, y, sal, a,
            perturbations=noise.to(x.device), batch_size=bs), q_sens)  # fmt: skip
    add("completeness_soundness", lambda: MF.completeness_soundness(model, x, y, sal, a, n_other=1, n_steps=8,
                                                                     batch_size=bs)[1])  # fmt: skip
    n_att = 2 if quick else 10
    add(
        f"fragility ({n_att} attack steps)",
        lambda: MF.fragility(model, x, y, sal, a, steps=n_att),
        note="bare: each attack step's double backward replayed as one (ReLU as softplus, as the attack)",
    )
    layers = randomisable_layers(model)
    # Quantus MPRT's draws (each layer's reset_parameters after torch.manual_seed(43)) where every layer has one
    resets = all(callable(getattr(m, "reset_parameters", None)) for _, m in layers)
    draws = {"draws": "reset_parameters", "seed": 42} if resets else {}
    add(f"randomisation (cascade, {len(layers)} layers)",
        lambda: MF.model_randomisation(model, x, y, sal, a, return_cascade=True, batch_size=bs, **draws),
        lambda: q_call(quantus.MPRT(return_last_correlation=True, disable_warnings=True), explain_func=q_explain)(),
        ours_value=lambda v: v[1][-1],
        note="draws='reset_parameters', seed=42: Quantus MPRT's draws" if resets
        else "seeded draws (a layer without reset_parameters): values not comparable")  # fmt: skip
    return cases


def quantus_refusal(e: Exception) -> str:
    """The table's note for a metric Quantus did not run: its two known refusals in words, else the error."""
    text = str(e).splitlines()[0] if str(e) else ""
    if "dimensions of attribution and input per sample" in text:
        return "Quantus refuses (B,T,D) maps"
    if "'subset_size' must be smaller than input size" in text:
        return "Quantus refuses subsets of this size on a table"
    return f"Quantus failed: {type(e).__name__}: {text[:70]}"


# ----------------------------------------------------------------------------- running
def verdict(kind: str, r_bare: float | None, r_ref: float | None, cnn: bool) -> str:
    """'yes' / 'no' against issue 22's target of the row's kind."""
    if r_bare is None:
        return "—"
    # "at most 1.05x the best of Captum's settings and the bare loop": within 1.05x of each
    if kind == "gradient":
        ok = r_bare <= TARGET["gradient"] and (r_ref is None or r_ref <= TARGET["gradient"])
    elif kind == "blackbox":
        ok = r_bare <= TARGET["blackbox_cnn" if cnn else "blackbox"] and (r_ref is None or r_ref <= TARGET["gradient"])
    else:  # a metric: within 1.05x of its bare passes and faster than Quantus
        ok = r_bare <= TARGET["metric"] and (r_ref is None or r_ref < 1.0)
    return "yes" if ok else "**no**"


def verdict_peer(r_ref: float | None, diff: float | None, tol: float) -> str:
    """'yes' / 'no' for a method judged against its peer library alone (LRP against Zennit): at most 1.05x the
    peer's time at equal values; '—' without a peer."""
    if r_ref is None:
        return "—"
    return "yes" if r_ref <= TARGET["gradient"] and diff is not None and diff <= tol else "**no**"


def rel_diff(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float | None:
    a_ = np.asarray(a.detach().cpu().double() if isinstance(a, Tensor) else a, dtype=float)
    b_ = np.asarray(b.detach().cpu().double() if isinstance(b, Tensor) else b, dtype=float)
    if a_.size != b_.size:
        return None
    a_, b_ = a_.reshape(-1), b_.reshape(-1)
    scale = max(float(np.nanmax(np.abs(b_))), 1e-12)
    return float(np.nanmax(np.abs(a_ - b_))) / scale


def run_model(name: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    model, x, y = build(name, n=args.batch, device=device)
    bs = args.batch if args.batch_size == "batch" else int(args.batch_size)  # the bare passes' rows per call
    ours_bs: int | str = args.ours_batch_size if args.ours_batch_size == "auto" else int(args.ours_batch_size)
    masks = None
    if name == "resnet":
        from explain_callbacks.datasets.shapes import make_shapes

        masks = make_shapes(args.batch, size=32, seed=123).mask.to(device)
    rows: list[dict[str, Any]] = []
    cnn = x.ndim == 4
    only = set(args.only.split(",")) if args.only else None
    with model_guard(model):
        if "methods" in args.sections:
            for case in method_cases(name, model, x, y, bs, args.quick, ours_bs):
                if only and not any(o in case["label"] for o in only):
                    continue
                row = {"model": name, "what": case["label"], "kind": case["kind"]}
                m = case["method"]
                try:
                    ours = lambda m=m: m(model, x, y)  # noqa: E731
                    calls = Calls(model, ours)
                    t, r_bare = pairs(ours, calls.bare(model, bs, device), args.repeats, device)
                except Exception as e:  # a method that does not apply to this model: say why
                    row.update(note=f"not run: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
                    rows.append(row)
                    print(f"  {name} {case['label']}: {row['note']}", file=sys.stderr)
                    continue
                row.update(t=t, r_bare=r_bare, rows=calls.label())
                best, r_cap, diff, t_best = None, None, None, math.inf
                for setting, fn in case["captum"].items():  # each setting timed once; the fastest is paired
                    try:
                        fn()
                        s = CLOCK()
                        fn()
                        sync(device)
                        tc = CLOCK() - s
                    except Exception as e:
                        print(f"  captum {setting} failed: {e}", file=sys.stderr)
                        continue
                    if tc < t_best:
                        best, t_best = setting, tc
                if best is not None:
                    r_cap = pairs(ours, case["captum"][best], args.repeats, device)[1]
                if best is not None and case["compare"]:
                    diff = rel_diff(ours(), case["captum"][best]())
                row.update(r_ref=r_cap, ref=f"{case['peer']} {best}" if best else "", diff=diff)
                if case["note"]:
                    row["note"] = case["note"]
                if case["kind"] == "lrp":  # judged against its peer at equal values; its bare ratio is reported
                    row["ok"] = verdict_peer(med(r_cap), diff, args.tol)
                elif case["bare_note"]:  # the replay undercounts this method's passes: its reference decides
                    row["note"] = case["bare_note"]
                    row["ok"] = verdict(case["kind"], med(r_cap), med(r_cap), cnn)
                else:
                    row["ok"] = verdict(case["kind"], med(r_bare), med(r_cap), cnn)
                rows.append(row)
                print(f"  {name} {case['label']}: bare {summary(r_bare)} {case['peer']} {summary(r_cap)}",
                      file=sys.stderr)  # fmt: skip
        if "metrics" in args.sections:
            sal = ATTRIBUTIONS.build("saliency", batch_size=ours_bs)
            a = sal(model, x, y).detach()
            for case in metric_cases(model, x, y, a, sal, ours_bs, args.quick, masks):
                if only and not any(o in case["label"] for o in only):
                    continue
                row = {"model": name, "what": case["label"], "kind": "metric", "note": case["note"]}
                try:
                    calls = Calls(model, case["ours"])
                    sent = sum(calls.rows)
                    if sent:
                        t, r_bare = pairs(case["ours"], calls.bare(model, bs, device), args.repeats, device)
                    else:  # a map-only metric: no model call, only Quantus to compare with
                        t, r_bare = min(pairs(case["ours"], case["ours"], 1, device)[0] for _ in range(3)), None
                except Exception as e:
                    row.update(note=f"not run: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
                    rows.append(row)
                    print(f"  {name} {case['label']}: {row['note']}", file=sys.stderr)
                    continue
                row.update(t=t, r_bare=r_bare, rows=calls.label())
                if case["quantus"] is not None:
                    try:
                        qv = case["quantus"]()
                        # interleaved with ours as every ratio (Quantus is slow: half the pairs)
                        r_q = pairs(case["ours"], case["quantus"], max(1, args.repeats // 2), device)[1]
                        row.update(r_ref=r_q, ref="Quantus", diff=rel_diff(case["value"](case["ours"]()), qv))
                    except Exception as e:
                        row["note"] = (row["note"] + "; " if row["note"] else "") + quantus_refusal(e)
                row["ok"] = verdict("metric", med(r_bare), med(row.get("r_ref")), cnn) if sent else (
                    "yes" if row.get("r_ref") and med(row["r_ref"]) < 1 else "—")  # fmt: skip
                rows.append(row)
                print(f"  {name} {case['label']}: bare {summary(r_bare)} ref {summary(row.get('r_ref'))}",
                      file=sys.stderr)  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]], header: str, tol: float) -> str:
    out = [header, "", "| model | method / metric | rows sent | ours (s) | ours / bare at B | reference | "
           "ours / reference | max rel diff | target met | notes |",
           "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        d = r.get("diff")
        flag = "" if d is None or d <= tol or "not comparable" in r.get("note", "") else " (!)"
        dtxt = "—" if d is None else f"{d:.1e}{flag}"
        t = r.get("t")
        out.append(f"| {r['model']} | {r['what']} | {r.get('rows', '—')} | {'—' if t is None else f'{t:.4f}'} | "
                   f"{summary(r.get('r_bare'))} | {r.get('ref', '') or '—'} | {summary(r.get('r_ref'))} | {dtxt} | "
                   f"{r.get('ok', '—')} | {r.get('note', '')} |")  # fmt: skip
    return "\n".join(out) + "\n"


def _table_rows(text: str) -> tuple[list[str], list[str]]:
    """(lines up to and including the table's separator line, the table's row lines) of a results table."""
    lines = text.rstrip("\n").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            return lines[: i + 1], [r for r in lines[i + 1 :] if r.startswith("| ")]
    raise ValueError("no results table (a '|---' separator line) found in the file to update.")


def _row_key(line: str) -> tuple[str, str]:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    return cells[0], cells[1]


def merge_table(old: str, new: str) -> str:
    """``old`` with each row of ``new`` in place of ``old``'s row of the same (model, name); a row ``old``
    lacks goes after the last row of its model (at the end for a new model). ``old``'s header is kept."""
    head, old_rows = _table_rows(old)
    _, new_rows = _table_rows(new)
    fresh = {_row_key(r): r for r in new_rows}
    merged = [fresh.pop(_row_key(r), r) for r in old_rows]
    for key, r in fresh.items():  # rows the table did not have
        last = max((i for i, m in enumerate(merged) if _row_key(m)[0] == key[0]), default=len(merged) - 1)
        merged.insert(last + 1, r)
    return "\n".join(head + merged) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--sections", default="methods,metrics")
    p.add_argument("--only", default="", help="comma-separated substrings of the rows to run")
    p.add_argument("--batch", type=int, default=32, help="probe rows")
    p.add_argument("--batch-size", default="batch", help="the user's rows per call: 'batch' (the probe) or an int")
    p.add_argument(
        "--ours-batch-size",
        default="auto",
        help="our methods' and metrics' batch_size: 'auto' (the default a user gets) or an int",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tol", type=float, default=1e-4, help="max relative difference of values counted as equal")
    p.add_argument("--quick", action="store_true", help="smaller settings, 3 pairs: a few minutes")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--update",
        default=None,
        metavar="TABLE",
        help="an existing results table: replace its rows of the same model and name by the rows run, keep the others",
    )
    p.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="on a CPU device: the process's CPU time (default) or wall time; CUDA: always wall time",
    )
    args = p.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.batch = min(args.batch, 8)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    global CLOCK
    if device.type == "cpu" and args.clock == "cpu":
        # the process's CPU time: on a shared machine a wall clock also counts the time the scheduler
        # gives other processes (tens of ms slices, in any pair); with 1 torch thread every pass runs
        # on this thread, so CPU time is the work done
        CLOCK = time.process_time
    if device.type == "cuda":  # full float32 on every side, so values can be compared
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    import captum

    import_zennit()  # Quantus imports Zennit, which imports torchvision's ResNet blocks: stubbed when absent
    import quantus

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    user_bs = args.batch if args.batch_size == "batch" else args.batch_size
    dev = f"CUDA {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "CPU"
    header = (f"Device: {dev}; CPU {cpu} ({torch.get_num_threads()} torch threads, {__import__('os').cpu_count()} "
              f"logical cores); torch {torch.__version__}, captum {captum.__version__}, quantus {quantus.__version__}; "
              f"probe {args.batch} rows, bare passes in calls of the user's batch, {user_bs} rows; "
              f"ours at batch_size={args.ours_batch_size!r}, {args.repeats} interleaved pairs per "
              f"ratio (median, min–max){', quick settings' if args.quick else ''}; values equal when the max "
              f"relative difference <= {args.tol:g}; clock: "
              f"{'process CPU time' if CLOCK is time.process_time else 'wall time'}.")  # fmt: skip
    rows: list[dict[str, Any]] = []
    RESULTS.mkdir(exist_ok=True)
    suffix = ("_quick" if args.quick else "") + ("" if device.type == "cpu" else f"_{device.type}")
    out = Path(args.out) if args.out else RESULTS / f"bench_heldout{suffix}.md"
    if args.update:
        out = Path(args.update)
        if not out.is_file():
            raise SystemExit(f"--update {out}: no such table; run without --update to write one.")
    for name in args.models.split(","):
        print(f"{name} ...", file=sys.stderr)
        rows += run_model(name, args, device)
        text = table(rows, header, args.tol)
        if args.update:
            text = merge_table(out.read_text(), text)
        out.write_text(text)  # after each model: a run cut short keeps the models it finished
        if args.update:  # the rows are in the table now: the next model's merge adds only its own
            rows = []
    print(text)
    print(f"written: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
