"""Per-call fixed cost of the one-pass gradient methods on the held-out-style models (``heldout_models.py``).

One call of saliency, input x gradient (and Grad-CAM on the ResNet) on a probe of ``--batch`` rows against

- **bare**: one forward and input-gradient backward of the same rows, written as a plain loop
  (``x.requires_grad_(); autograd.grad(model(x)[:, 0].sum(), x)``); none for Grad-CAM (its backward stops at
  the layer, so a full input-gradient pass is no reference: Captum's ``LayerGradCam`` is);
- **Captum**: the same method (``Saliency``, ``InputXGradient``, ``LayerGradCam`` + ``interpolate``).

The models are in eval mode with frozen parameters (as inside the monitors' model guard). Each ratio is the
median (min-max) over ``--rounds`` rounds in which the three run back to back, in alternating order, each
repeated to ~20 ms; CPU time of the process, one torch thread (on a shared machine the wall clock also counts
other jobs' time slices). ``batch_size="auto"`` is resolved (and its measurement made) before timing.

    python benchmarks/bench_fixed_cost.py                      # about a minute on 2 busy cores
    python benchmarks/bench_fixed_cost.py --models mlp,lstm --rounds 31
    python benchmarks/bench_fixed_cost.py --ops --models mlp   # the tensor ops ours runs that bare does not

``--ops`` lists, per model and method, the operators (``torch.profiler``, CPU) one call of ours runs more or
fewer times than the bare pass (counts per call): what a call adds to the model's own passes, op by op (the
rest of the difference is Python).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heldout_models import MODELS, build  # sibling module: the benchmarks run as scripts

from explain_callbacks._internal import model_guard
from explain_callbacks._internal.registry import ATTRIBUTIONS
from explain_callbacks.attribution.layers import last_conv_layer


def per_call(fn: Callable[[], object], inner: int) -> float:
    t = time.process_time()
    for _ in range(inner):
        fn()
    return (time.process_time() - t) / inner


def rounds(fns: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    """Seconds per call of each function in each of ``n`` rounds (order alternating between rounds)."""
    for fn in fns.values():
        fn()  # warm-up (and "auto" rows resolved)
    t = time.process_time()
    first = next(iter(fns.values()))
    first()
    inner = max(1, int(0.02 / max(time.process_time() - t, 1e-6)))
    out: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    for r in range(n):
        for k, fn in items if r % 2 == 0 else items[::-1]:
            out[k].append(per_call(fn, inner))
    return out


def ratio(a: list[float], b: list[float]) -> str:
    rs = [x / y for x, y in zip(a, b)]
    return f"{statistics.median(rs):.2f} ({min(rs):.2f}–{max(rs):.2f})"


def bare_pass(model: torch.nn.Module, x: torch.Tensor) -> None:
    """The bare pass a one-pass gradient method stands against: a forward and the input-gradient backward."""
    xb = x.detach().requires_grad_(True)
    torch.autograd.grad(model(xb)[:, 0].sum(), xb)


def run_model(name: str, batch: int, n_rounds: int) -> list[str]:
    """The table rows of one model."""
    import captum.attr as ca

    model, x, y = build(name, n=batch)
    lines = []
    with model_guard(model):

        bare = functools.partial(bare_pass, model, x)

        cases: dict[str, tuple[Callable[[], object] | None, Callable[[], object]]] = {
            "saliency": (bare, lambda: ca.Saliency(model).attribute(x, target=y, abs=False)),
            "input_x_gradient": (bare, lambda: ca.InputXGradient(model).attribute(x, target=y)),
        }
        if x.ndim == 4:
            layer = last_conv_layer(model)

            def captum_cam() -> torch.Tensor:
                cam = ca.LayerGradCam(model, layer).attribute(x, target=y, relu_attributions=True)
                return ca.LayerAttribution.interpolate(cam, x.shape[2:], "bilinear")

            cases["gradcam"] = (None, captum_cam)  # no bare pass: Captum's is the reference
        for method, (ref, captum) in cases.items():
            m = ATTRIBUTIONS.build(method)
            fns = {"ours": lambda m=m: m(model, x, y), "captum": captum}
            if ref is not None:
                fns["bare"] = ref
            t = rounds(fns, n_rounds)
            ours_ms, captum_ms = statistics.median(t["ours"]) * 1e3, statistics.median(t["captum"]) * 1e3
            bare_ms, bare_ratio = ("—", "—") if ref is None else (
                f"{statistics.median(t['bare']) * 1e3:.3f}", ratio(t["ours"], t["bare"]))  # fmt: skip
            lines.append(
                f"| {name} | {method} | {ours_ms:.3f} | {bare_ms} | {bare_ratio} | {captum_ms:.3f} | "
                f"{ratio(t['ours'], t['captum'])} |"
            )
            print(lines[-1], flush=True)
    return lines


def op_counts(fn: Callable[[], object], n: int = 10) -> Counter:
    """Operator and autograd-node calls per call of ``fn`` (``torch.profiler``, CPU), after a warm-up."""
    fn()
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn()
    counts: Counter = Counter(e.name for e in prof.events())
    return Counter({k: v / n for k, v in counts.items()})


def op_lines(name: str, batch: int) -> list[str]:
    """Per method: the ops one call of ours runs more (+) or fewer (-) times than the bare pass."""
    model, x, y = build(name, n=batch)
    lines = []
    with model_guard(model):

        bare = functools.partial(bare_pass, model, x)

        ref = op_counts(bare)
        for method in ("saliency", "input_x_gradient"):
            m = ATTRIBUTIONS.build(method)
            ours = op_counts(lambda m=m: m(model, x, y))
            diff = {k: ours.get(k, 0) - ref.get(k, 0) for k in set(ours) | set(ref)}
            more = ", ".join(f"{k} {d:+g}" for k, d in sorted(diff.items()) if d > 0)
            fewer = ", ".join(f"{k} {d:+g}" for k, d in sorted(diff.items()) if d < 0)
            lines.append(f"| {name} | {method} | {more or '—'} | {fewer or '—'} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--ops", action="store_true", help="list the ops ours runs more or fewer times than bare")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # Captum warns that the inputs did not require grad
    if args.ops:
        print("| model | method | ours runs more (per call) | ours runs fewer (per call) |")
        print("|---|---|---|---|")
        for name in args.models.split(","):
            op_lines(name, args.batch)
        return
    print("| model | method | ours (ms) | bare (ms) | ours / bare | Captum (ms) | ours / Captum |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        run_model(name, args.batch, args.rounds)


if __name__ == "__main__":
    main()
