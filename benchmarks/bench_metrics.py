"""Metrics benchmark: each metric against Quantus on the same model, batch and settings (time ratio and
values side by side) and against the bare forward (or attribution) passes it needs.

    .venv/bin/python benchmarks/bench_metrics.py [--batch 32] [--repeats 3] [--device cpu] [--threads N] [--quick]
    .venv/bin/python benchmarks/bench_metrics.py --width 64 --size 64    # a larger CNN: the fixed costs weigh less

Model: SmallCNN (3 -> 4 classes, ``--width``) trained one epoch on the procedural shapes (3 x size x size); maps:
Saliency. Where Quantus draws random subsets / noise with NumPy's global RNG, the benchmark feeds it
the very subsets / noise our functions use (by patching ``np.random``), so the values must agree;
MPRT re-initialises layers differently, so only its distribution is comparable. "bare" is the time of
the model calls (or method calls, for explainer metrics) on the same number of rows, in the same
chunks of ``batch_size`` rows (``"auto"``: resolved for this model, as ours does), on precomputed
inputs: the floor any implementation pays. Times are
the best of ``--repeats`` runs after a warm-up (Quantus: one run); "ours / bare" is the median of the
per-round ratios of ``--repeats`` interleaved back-to-back rounds of ours and its bare passes (a shared
machine's load drifts between separately timed runs); "Quantus / bare" bounds the speed-up any
implementation with the same passes can reach.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import paired_times, patched, quiet, sync, timed  # a sibling module: the benchmarks run as scripts

from explain_callbacks._internal.batching import resolve_batch_size
from explain_callbacks.attribution import Saliency
from explain_callbacks.datasets.shapes import make_shapes
from explain_callbacks.metrics import functional as MF
from explain_callbacks.metrics.functional.randomisation import randomisable_layers
from explain_callbacks.models.nets import SmallCNN

BS = 256  # rows per model call of the bare passes: main() sets it to what ours resolves (OURS_BS)
OURS_BS: int | str = "auto"  # the metrics' batch_size argument (--batch-size)
SECTIONS = ("deletion", "insertion", "mufidelity", "infidelity", "maps", "completeness", "explainer")


def bare_forward(model: nn.Module, n_rows: int, shape: tuple[int, ...], device: torch.device) -> Callable[[], None]:
    """The model calls alone: ``n_rows`` forward rows in chunks of ``BS`` (a callable to time)."""
    rows = torch.rand(n_rows, *shape, device=device)

    def run() -> None:
        with torch.no_grad():
            for s in range(0, n_rows, BS):
                model(rows[s : s + BS])
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def bare_method(method: Callable, model: nn.Module, n_rows: int, x: Tensor, y: Tensor) -> Callable[[], None]:
    """The attribution method alone on ``n_rows`` rows in chunks of ``BS`` (a callable to time)."""
    reps = math.ceil(n_rows / x.shape[0])
    rows = x.repeat(reps, 1, 1, 1)[:n_rows] + 0.01
    tg = y.repeat(reps)[:n_rows]

    def run() -> None:
        for s in range(0, n_rows, BS):
            method(model, rows[s : s + BS], tg[s : s + BS])
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    return run


def paired(
    fn: Callable[[], Any], bare: Callable[[], Any] | list[Callable[[], Any]], repeats: int
) -> tuple[float, Any, float, float]:
    """Ours and its bare passes timed back to back (:func:`_timing.paired_times`, after a warm-up): the
    best time of each, the last result, and the median of the per-round ratios (steadier than a ratio
    of separate bests on a shared machine)."""
    bares = bare if isinstance(bare, list) else [bare]
    result: list[Any] = [None]

    def run() -> None:
        result[0] = fn()
        sync()

    def run_bare() -> None:
        for f in bares:
            f()
        sync()

    run()
    run_bare()
    t_ours, t_bare, ratio = paired_times(run, run_bare, repeats)
    return t_ours, result[0], t_bare, ratio




def train_model(device: torch.device, width: int = 16, size: int = 32) -> nn.Module:
    d = make_shapes(1024, size=size, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SmallCNN(3, 4, width=width)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    perm = torch.randperm(1024, generator=g)
    for i in range(0, 1024, 64):
        idx = perm[i : i + 64]
        loss = nn.functional.cross_entropy(model(d.x[idx]), d.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer steps/samples (a smoke run)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--width", type=int, default=16, help="SmallCNN width (16: the small default; 64: a larger CNN)")
    p.add_argument("--size", type=int, default=32, help="image side of the shapes data (32 or 64)")
    p.add_argument("--batch-size", default="auto", help="rows per model call: 'auto' (the default) or an int")
    args = p.parse_args()
    global BS, OURS_BS
    if args.threads:
        torch.set_num_threads(args.threads)
    import quantus

    device = torch.device(args.device)
    if device.type == "cuda":  # full float32 on both sides, so values can be compared
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    qdev = "cuda" if device.type == "cuda" else "cpu"
    b, reps = args.batch, args.repeats
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        p.error(f"unknown sections {sorted(sections - set(SECTIONS))}; choose from {SECTIONS}")
    model = train_model(device, args.width, args.size)
    for prm in model.parameters():
        prm.requires_grad_(False)
    data = make_shapes(b, size=args.size, seed=123)
    x, y, masks = data.x.to(device), data.y.to(device), data.mask.to(device)
    OURS_BS = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    BS = resolve_batch_size(OURS_BS, model, x)  # the bare passes use the chunks ours resolves to
    sal = Saliency(batch_size=OURS_BS)
    a = sal(model, x, y).detach()
    a_pix = a.sum(1, keepdim=True)  # channel-summed map (B,1,H,W) for the localisation metrics
    xn, yn, an = x.cpu().numpy(), y.cpu().numpy(), a.cpu().numpy()
    shape = tuple(x.shape[1:])
    n_el = int(np.prod(shape))
    q_model = model
    rows: list[dict[str, Any]] = []

    def q_explain(model: Any, inputs: np.ndarray, targets: np.ndarray, **kw: Any) -> np.ndarray:
        m = model.get_model() if hasattr(model, "get_model") else model
        xi = torch.as_tensor(inputs, device=device, dtype=torch.float32)
        ti = torch.as_tensor(targets, device=device).long()
        return sal(m, xi, ti).detach().cpu().numpy()

    def add(name: str, ours_t: float, ours_v: Tensor, bare_t: float | None, q_t: float | None = None,
            q_v: np.ndarray | None = None, note: str = "", ratio: float | None = None) -> None:  # fmt: skip
        ov = ours_v.detach().double().cpu().numpy()
        row = {"metric": name, "ours_s": ours_t, "ours_val": float(np.nanmean(ov)), "bare_s": bare_t, "q_s": q_t,
               "q_val": None, "max_diff": None, "note": note, "ratio": ratio}  # fmt: skip
        if q_v is not None:
            qv = np.asarray(q_v, dtype=float).reshape(-1)
            row["q_val"] = float(np.nanmean(qv))
            if qv.shape == ov.shape:
                row["max_diff"] = float(np.nanmax(np.abs(qv - ov)))
        rows.append(row)
        print(f"  {name}: done", file=sys.stderr)

    # ---------------------------------------------------------------- deletion (pixel flipping)
    if "deletion" in sections:
        step = 64 if not args.quick else 256
        kw = dict(substrate="min", step=step, features="element", output="probability", batch_size=OURS_BS)
        n_steps = n_el // step
        t, (_auc, curve, _), bare, ratio = paired(
            lambda: MF.deletion(model, x, a, y, return_curve=True, **kw),
            bare_forward(model, (n_steps + 1) * b, shape, device),
            reps,
        )
        qm = quantus.PixelFlipping(features_in_step=step, perturb_baseline="black", disable_warnings=True)
        tq, qv = timed(
            lambda: quiet(lambda: qm(model=q_model, x_batch=xn, y_batch=yn, a_batch=an.copy(), device=qdev)), 1
        )
        qv = np.asarray(qv)
        curve_ok = float(np.abs(qv - curve[:, 1:].cpu().numpy()).max())
        add("deletion (pixel flipping)", t, curve[:, 1:].mean(1), bare, tq, qv.mean(1), ratio=ratio,
            note=f"{n_steps} steps of {step} features; curves max abs diff {curve_ok:.1e}")  # fmt: skip

    # ---------------------------------------------------------------- insertion, insertion - deletion, ABC
    if "insertion" in sections:
        t, v, bt, ratio = paired(
            lambda: MF.insertion(model, x, a, y, n_steps=32, batch_size=OURS_BS),
            bare_forward(model, 33 * b, shape, device),
            reps,
        )
        add("insertion", t, v, bt, ratio=ratio, note="32 steps, blur substrate")
        t, v, bt, ratio = paired(
            lambda: MF.insertion_deletion(model, x, a, y, n_steps=32, batch_size=OURS_BS),
            bare_forward(model, 66 * b, shape, device),
            reps,
        )
        add("insertion_deletion", t, v, bt, ratio=ratio, note="32 steps each")
        t, v, bt, ratio = paired(
            lambda: MF.abc(model, x, a, y, n_steps=32, batch_size=OURS_BS),
            bare_forward(model, 33 * b, shape, device),
            reps,
        )
        add("abc", t, v, bt, ratio=ratio, note="32 steps, logits")

    # ---------------------------------------------------------------- faithfulness correlation
    if "mufidelity" in sections:
        runs, k = (100, 224) if not args.quick else (10, 224)
        g = torch.Generator().manual_seed(0)
        subsets = torch.stack(
            [torch.stack([torch.randperm(n_el, generator=g)[:k] for _ in range(runs)]) for _ in range(b)]
        )
        kw_mu = dict(correlation="pearson", baseline="min", features="element", output="logit", batch_size=OURS_BS)
        t, v, bt, ratio = paired(
            lambda: MF.mufidelity(model, x, a, y, subsets=subsets.to(device), **kw_mu),
            bare_forward(model, (runs + 1) * b, shape, device),
            reps,
        )
        t_rand, _ = timed(
            lambda: MF.mufidelity(model, x, a, y, preset="quantus", n_subsets=runs, batch_size=OURS_BS), reps
        )
        qm = quantus.FaithfulnessCorrelation(nr_runs=runs, subset_size=k, perturb_baseline="black", abs=False,
                                             normalise=False, return_aggregate=False,
                                             disable_warnings=True)  # fmt: skip
        seq = iter([subsets[i, r].numpy() for r in range(runs) for i in range(b)])
        with patched("choice", seq):
            tq, qv = timed(lambda: quiet(lambda: qm(model=q_model, x_batch=xn, y_batch=yn, a_batch=an.copy(),
                                                    device=qdev)), 1)  # fmt: skip
        add("mufidelity (faithfulness corr.)", t, v, bt, tq, qv, ratio=ratio,
            note=f"{runs} subsets of {k}, Pearson, fixed subsets; own random subsets: {t_rand:.3f} s")  # fmt: skip

    # ---------------------------------------------------------------- infidelity (patches)
    if "infidelity" in sections:
        kw_inf = dict(perturbation="patch_sequence", patch_size=4, baseline="min", output="logit", batch_size=OURS_BS)
        n_blocks = (shape[1] // 4) * (shape[2] // 4)
        t, v, bt, ratio = paired(
            lambda: MF.infidelity(model, x, a, y, **kw_inf),
            bare_forward(model, (n_blocks + 1) * b, shape, device),
            reps,
        )
        qm = quantus.Infidelity(perturb_patch_sizes=[4], n_perturb_samples=1, perturb_baseline="black", abs=False,
                                normalise=False, disable_warnings=True)  # fmt: skip
        tq, qv = timed(lambda: quiet(lambda: qm(model=q_model, x_batch=xn, y_batch=yn, a_batch=an.copy(), device=qdev,
                                                softmax=False)), 1)  # fmt: skip
        add("infidelity (patch sequence)", t, v, bt, tq, qv, ratio=ratio,
            note=f"{n_blocks} cumulative 4x4 patches")  # fmt: skip
        t, v, bt, ratio = paired(
            lambda: MF.infidelity(model, x, a, y, n_perturb=32, batch_size=OURS_BS),
            bare_forward(model, 33 * b, shape, device),
            reps,
        )
        add("infidelity (gaussian)", t, v, bt, ratio=ratio, note="32 draws")

    # ---------------------------------------------------------------- complexity, localisation (no model calls)
    if "maps" in sections:
        for name, fn, qcls in (("sparseness", MF.sparseness, quantus.Sparseness), ("complexity", MF.complexity,
                                                                                     quantus.Complexity)):  # fmt: skip
            t, v = timed(lambda fn=fn: fn(a), reps)
            qm = qcls(disable_warnings=True)
            tq, qv = timed(lambda qm=qm: quiet(lambda: qm(model=q_model, x_batch=xn, y_batch=yn, a_batch=an.copy(),
                                                           device=qdev)), 1)  # fmt: skip
            add(name, t, v, None, tq, qv)
        mn = masks.cpu().numpy()
        t, v = timed(lambda: MF.pointing_game(a_pix, masks, tolerance=0), reps)
        qm = quantus.PointingGame(disable_warnings=True)
        tq, qv = timed(lambda: quiet(lambda: qm(model=q_model, x_batch=xn, y_batch=yn, a_batch=a_pix.cpu().numpy(),
                                                s_batch=mn, device=qdev)), 1)  # fmt: skip
        add("pointing_game", t, v, None, tq, np.asarray(qv, dtype=float), note="tolerance 0")
        t, v = timed(lambda: MF.energy_pointing_game(a_pix, masks), reps)
        qm = quantus.AttributionLocalisation(
            disable_warnings=True, abs=False, normalise=False, positive_attributions=True
        )
        tq, qv = timed(lambda: quiet(lambda: qm(model=q_model, x_batch=xn, y_batch=yn, a_batch=a_pix.cpu().numpy(),
                                                s_batch=mn, device=qdev)), 1)  # fmt: skip
        add("energy_pointing_game", t, v, None, tq, qv, note="Quantus AttributionLocalisation")

    # ---------------------------------------------------------------- completeness error, Dabkowski
    if "completeness" in sections:
        ig_like = a * x  # any map: the cost is two forward passes
        t, v, bt, ratio = paired(
            lambda: MF.completeness_error(model, x, ig_like, y, batch_size=OURS_BS),
            bare_forward(model, 2 * b, shape, device),
            reps,
        )
        add("completeness_error", t, v, bt, ratio=ratio)
        t, v, bt, ratio = paired(
            lambda: MF.dabkowski_saliency(model, x, a, y, batch_size=OURS_BS),
            bare_forward(model, b, shape, device),
            reps,
        )
        add("dabkowski", t, v, bt, ratio=ratio, note="includes connected components")

    # ---------------------------------------------------------------- explainer metrics
    if "explainer" in sections:
        n_s = 10 if not args.quick else 3
        noise_u = (torch.rand(b, n_s, *shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 0.02
        noise_g = torch.randn(b, n_s, *shape, generator=torch.Generator().manual_seed(2)) * 0.1
        bare_sens = bare_method(sal, model, n_s * b, x, y)
        for name, fn, qcls, noise, npname in (
            ("max_sensitivity", MF.max_sensitivity, quantus.MaxSensitivity, noise_u, "uniform"),
            ("avg_sensitivity", MF.avg_sensitivity, quantus.AvgSensitivity, noise_u, "uniform"),
            ("local_lipschitz", MF.local_lipschitz, quantus.LocalLipschitzEstimate, noise_g, "normal"),
        ):
            t, v, bt, ratio = paired(lambda fn=fn, noise=noise: fn(model, x, y, sal, a, perturbations=noise.to(device),
                                                                   batch_size=OURS_BS), bare_sens, reps)  # fmt: skip
            kwq = {"lower_bound": 0.02} if npname == "uniform" else {"perturb_std": 0.1}
            qm = qcls(nr_samples=n_s, normalise=False, abs=False, disable_warnings=True, **kwq)
            seq = iter([noise[:, r].reshape(b, -1).numpy() for r in range(n_s)])
            with patched(npname, seq):
                tq, qv = timed(lambda qm=qm: quiet(lambda: qm(model=q_model, x_batch=xn, y_batch=yn, a_batch=an.copy(),
                                                               explain_func=q_explain, device=qdev)), 1)  # fmt: skip
            add(name, t, v, bt, tq, qv, ratio=ratio, note=f"{n_s} draws, same noise")
        bare_cs = [bare_method(sal, model, 2 * b, x, y), bare_forward(model, (3 * 17 + 1) * b, shape, device)]
        t, v, bt, ratio = paired(lambda: MF.completeness_soundness(model, x, y, sal, a, n_other=2, n_steps=16,
                                                                   batch_size=OURS_BS)[1], bare_cs, reps)  # fmt: skip
        add("completeness_soundness", t, v, bt, ratio=ratio, note="2 other labels, 16 steps; value: soundness")
        n_layers = len(randomisable_layers(model))
        t, v, bt, ratio = paired(
            lambda: MF.model_randomisation(model, x, y, sal, a, batch_size=OURS_BS),
            bare_method(sal, model, b, x, y),
            reps,
        )
        add("randomisation (full)", t, v, bt, ratio=ratio, note="one method call")
        bare_casc = [bare_method(sal, model, b, x, y)] * n_layers  # one call per randomised model
        t, (_names, casc), bt, ratio = paired(
            lambda: MF.model_randomisation(model, x, y, sal, a, return_cascade=True, batch_size=OURS_BS),
            bare_casc,
            reps,
        )
        qm = quantus.MPRT(return_last_correlation=True, disable_warnings=True)
        tq, qv = timed(lambda: quiet(lambda: qm(model=q_model, x_batch=xn, y_batch=yn, a_batch=an.copy(),
                                                explain_func=q_explain, device=qdev)), 1)  # fmt: skip
        add("randomisation (cascade)", t, casc[-1], bt, tq, qv, ratio=ratio,
            note=f"{n_layers} layers; different re-initialisation: compare distributions")  # fmt: skip

    # ---------------------------------------------------------------- table
    def fmt(v: float | None, spec: str = ".3f") -> str:
        return "—" if v is None else format(v, spec)

    print(f"\nMachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {device}; torch {torch.__version__}, quantus {quantus.__version__}; batch {b} x {shape}, "
          f"SmallCNN width {args.width}, Saliency maps, batch_size {OURS_BS!r} ({BS} rows per call).\n")  # fmt: skip
    print("| metric | ours (s) | Quantus (s) | speed-up | ours value | Quantus value | max abs diff | "
          "bare passes (s) | ours / bare | Quantus / bare | notes |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = None if r["q_s"] is None else r["q_s"] / r["ours_s"]
        ratio = r["ratio"]
        q_ratio = None if r["bare_s"] is None or r["q_s"] is None else r["q_s"] / r["bare_s"]
        sp = "—" if speed is None else f"{speed:.1f}x"
        print(f"| {r['metric']} | {fmt(r['ours_s'], '.4f')} | {fmt(r['q_s'], '.3f')} | {sp} | "
              f"{fmt(r['ours_val'], '.4f')} | {fmt(r['q_val'], '.4f')} | {fmt(r['max_diff'], '.1e')} | "
              f"{fmt(r['bare_s'], '.4f')} | {fmt(ratio, '.2f')} | {fmt(q_ratio, '.1f')} | {r['note']} |")  # fmt: skip


if __name__ == "__main__":
    main()
