"""Black-box and learned-mask attributions: cost against their bare model calls, against Captum, and
quality per cost on a digits CNN trained inside the benchmark.

    python benchmarks/bench_blackbox.py --quick    # smoke run (a minute)
    python benchmarks/bench_blackbox.py --sections overhead,captum,neflag,masker   # about 5 minutes
    python benchmarks/bench_blackbox.py --sections quality --budgets 264,528       # one part of section 3
    python benchmarks/bench_blackbox.py --sections quality --budgets 2112 --methods sobol
    python benchmarks/bench_blackbox.py --sections report                          # tables + plot only
    python benchmarks/bench_blackbox.py --sections cheap --repeats 9   # defaults on a tabular MLP and a small CNN

Each run merges its sections into ``benchmarks/results/bench_blackbox.json`` (the per-image scores
of section 3 are kept per method and budget, so its parts can run separately, each short enough for
a shared machine; ``report`` rebuilds its table and plot from the stored scores). The CNN is trained
with a fixed seed, so every run explains the same network (checked through its test accuracy).

Sections (Markdown tables on stdout; a JSON dump and a PNG plot in benchmarks/results/):

1. overhead: each method's time against a replay of exactly the model calls it made (same row count
   per call; forward only for sampling methods, forward + input-gradient backward for the
   optimisation and gradient-path methods): the median over interleaved rounds of the ratio of the
   two, run back to back (times shown: the fastest of each);
2. Captum references: Occlusion with the same window/stride/baseline, KernelShap and Lime on an 8×8
   grid of superpixels (time per image and deletion AUC);
3. deletion AUC against the number of forward passes for RISE, Sobol and HSIC (table + PNG);
4. insertion − deletion for NeFLAG-1/10/20 (point search reconstructed; projected descent in scale
   coordinates) against IG and SmoothGrad, NeFLAG-20 in input coordinates (the default before), with
   uniform sampling in input coordinates (antithetic pairs, the default before that; and independent
   points), and |gradient × input| (a one-pass diagnostic: the sign-less ranking that scale coordinates
   tend to), scored as the metric sorts (ties in raster order) and with ties broken at random, with an
   all-zero map as a reference;
5. the real-time masker trained against the frozen CNN: deletion AUC and time per map.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from _timing import bare_pass, paired_times
from torch import nn

from explain_callbacks._internal import model_guard
from explain_callbacks.attribution import (
    HSIC,
    RISE,
    IntegratedGradients,
    MaskerObjective,
    MaskingNetwork,
    MeaningfulPerturbation,
    NeFLAG,
    NonlinearSaliency,
    Occlusion,
    RealTimeSaliency,
    Saliency,
    SmoothGrad,
    Sobol,
    SoundMask,
    train_masker_step,
)
from explain_callbacks.datasets import DigitsDataModule
from explain_callbacks.models import SmallCNN

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def metrics_fns():
    """Deletion / insertion from the metrics package (imported lazily: written by another helper)."""
    from explain_callbacks.metrics.functional import deletion, insertion_deletion

    return deletion, insertion_deletion


# ------------------------------------------------------------------------------------------ utils


CLOCK = time.perf_counter


def timeit(fns, repeats: int, warmup: bool = True) -> list[float]:
    """Fastest time of each function over ``repeats`` interleaved rounds (so load drifts hit all alike).

    With one thread the clock is the process's CPU time (``--clock cpu``, the default), which a
    shared, loaded machine disturbs far less than wall time; the minimum is the least disturbed run."""
    if warmup:
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = CLOCK()
            fn()
            times[i].append(CLOCK() - t)
    return [min(ts) for ts in times]


class Recorder(nn.Module):
    """Records (rows, needs input gradient) of every model call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], x.requires_grad))
        return self.inner(x)


def replay(model: nn.Module, calls: list[tuple[int, bool]], pool: torch.Tensor) -> None:
    """The bare model calls: the same rows per call, forward (and input-gradient backward where the
    method took one), on ready-made inputs."""
    for rows, grad in calls:
        bare_pass(model, pool[:rows], grad)


def train_cnn(epochs: int, seed: int = 0) -> tuple[nn.Module, DigitsDataModule, float, float]:
    torch.manual_seed(seed)
    dm = DigitsDataModule(batch_size=64, seed=seed)
    dm.setup()
    net = SmallCNN(1, 10)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    start = time.perf_counter()
    for _ in range(epochs):
        net.train()
        for x, y in dm.train_dataloader():
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    xs, ys = dm.test_set.tensors
    with torch.no_grad():
        acc = float((net(xs).argmax(1) == ys).float().mean())
    return net, dm, acc, time.perf_counter() - start


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def mean_sem(v: torch.Tensor) -> tuple[float, float]:
    v = v.double()
    return float(v.mean()), float(v.std() / max(v.numel(), 1) ** 0.5) if v.numel() > 1 else 0.0


# ------------------------------------------------------------------------------------------ sections


def overhead(net, x, y, repeats: int, quick: bool, only: list[str] | None = None, x_big=None, y_big=None) -> list[list]:
    """Nonlinear saliency takes 1-3 steps per digit, so 16 images give a workload of a few
    milliseconds whose ratio swings by ±0.2 between runs: it is measured on ``x_big`` (128 images)."""
    background = x.flip(0)
    # Sample counts are lowered where the ratio does not depend on them (each mask / step costs the same),
    # so the section runs in a couple of minutes; HSIC keeps its default p (its estimator grows as p²).
    methods = [
        ("occlusion", Occlusion()),
        ("rise (N=1000)", RISE(n_masks=500 if quick else 1000)),
        ("sobol (N=16)", Sobol(n_designs=8 if quick else 16)),
        ("hsic (p=1500)", HSIC(n_designs=500 if quick else 1500)),
        ("meaningful_perturbation (100 steps)", MeaningfulPerturbation(n_steps=30 if quick else 100)),
        ("extremal_perturbation (100 steps)", MeaningfulPerturbation(variant="extremal", n_steps=30 if quick else 100)),
        ("sound_mask (20 steps x 10 fills)", SoundMask(reference=background, n_steps=5 if quick else 20)),
        ("neflag20", NeFLAG(n_points=20)),
        ("nonlinear_saliency", NonlinearSaliency()),
    ]
    pool = x.repeat(256 // x.shape[0] + 1, 1, 1, 1)[:256].contiguous()
    rows = []
    for name, m in methods:
        if only and not any(name.startswith(o) for o in only):
            continue
        xm, ym = (x_big, y_big) if name == "nonlinear_saliency" and x_big is not None else (x, y)
        rec = Recorder(net)
        m(rec, xm, ym)  # records the calls, and warms up
        calls = rec.calls
        replay(net, calls, pool)
        n_rows = sum(r for r, _ in calls)
        per_sample = int(m.last_info["forwards"].double().mean()) if "forwards" in m.last_info else None
        pool_m = pool if xm is x else xm
        t_m, t_b, ratio = paired_times(
            lambda m=m, xm=xm, ym=ym: m(net, xm, ym),
            lambda c=calls, p=pool_m: replay(net, c, p),
            repeats if xm is x else 2 * repeats + 1,
            clock=CLOCK,
        )
        kind = "fwd+bwd" if any(g for _, g in calls) else "fwd"
        label = name if xm is x else f"{name} ({xm.shape[0]} images)"
        rows.append([label, per_sample, kind, n_rows, t_b * 1e3, t_m * 1e3, ratio])
    return rows


def _small_resnet_like() -> nn.Module:
    """A small CNN with residual-free stages of 16/32/64 channels for 3×32×32 inputs (an untuned model)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    cin = 3
    for w in (16, 32, 64):
        layers += [nn.Conv2d(cin, w, 3, 2 if cin != 3 else 1, 1), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


def cheap_models(repeats: int, quick: bool) -> list[list]:
    """Issue 22, item 2: each sampling method at its defaults against the bare forwards it makes, on models
    where a forward is cheap: a tabular MLP (30 features, 64-64 hidden, 2 classes; 16 rows) and a small CNN
    (3×32×32, 16/32/64 channels; 8 images). Interleaved pairs (method, then a replay of the same model calls
    on ready-made rows, alternating which goes first); median, min and max of the ratio over the pairs."""
    from explain_callbacks.models import MLP

    torch.manual_seed(0)
    mlp = MLP(30, 2).eval()
    cnn = _small_resnet_like()
    g = torch.Generator().manual_seed(0)
    cases = [("MLP 30-64-64-2", mlp, torch.randn(16, 30, generator=g), torch.randint(0, 2, (16,), generator=g))]
    if not quick:
        xc, yc = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        cases.append(("CNN 3x32x32", cnn, xc, yc))
    rows = []
    for label, net, x, y in cases:
        for name, m in [("rise", RISE()), ("sobol", Sobol()), ("hsic", HSIC()), ("occlusion", Occlusion())]:
            if net is cnn and quick:
                continue
            rec = Recorder(net)
            m(rec, x, y)
            calls = rec.calls
            pool = x.repeat(max(r for r, _ in calls) // x.shape[0] + 1, *([1] * (x.ndim - 1))).contiguous()
            tm, tb = [], []
            n = max(3, repeats if net is mlp else min(repeats, 3))
            for r in range(n):
                pair = [
                    (lambda m=m, net=net, x=x, y=y: m(net, x, y), tm),
                    (lambda c=calls, p=pool, net=net: replay(net, c, p), tb),
                ]
                for fn, acc in pair if r % 2 == 0 else pair[::-1]:
                    t = CLOCK()
                    fn()
                    acc.append(CLOCK() - t)
            ratios = sorted(a / b for a, b in zip(tm, tb))
            med = ratios[len(ratios) // 2]
            rows.append([label, name, int(m.last_info["forwards"][0]), len(calls), min(tb) * 1e3, min(tm) * 1e3,
                         med, f"{ratios[0]:.2f}-{ratios[-1]:.2f}"])  # fmt: skip
            print(f"  {label} {name}: x{med:.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})", flush=True)
    return rows


def captum_refs(net, x, y, repeats: int, quick: bool) -> list[list]:
    import captum.attr as ca

    deletion, _ = metrics_fns()
    n_samples = 250 if quick else 1000
    grid = (torch.arange(32) // 4).view(1, -1)
    fmask = (grid.t() * 8 + grid).view(1, 1, 32, 32)  # 8x8 superpixels of 4x4 pixels
    ours = Occlusion(window=4, stride=2)
    cap_occ = ca.Occlusion(net)

    def occ_captum():
        return cap_occ.attribute(x, sliding_window_shapes=(1, 4, 4), strides=(1, 2, 2), baselines=0.0, target=y)

    t_ours, t_cap = timeit([lambda: ours(net, x, y), occ_captum], repeats)  # warm-up included
    diff = float((ours(net, x, y) - occ_captum()).abs().max())
    rows = [
        ["Occlusion 4x4/2 (ours)", 226, t_ours / x.shape[0] * 1e3, float(deletion(net, x, ours(net, x, y), y).mean())],
        [f"Occlusion 4x4/2 (Captum; max |diff| {diff:.1e})", 226, t_cap / x.shape[0] * 1e3, None],
    ]
    for name, cls in [("KernelShap", ca.KernelShap), ("Lime", ca.Lime)]:
        explainer = cls(net)

        def run(explainer=explainer):
            return torch.cat([
                explainer.attribute(x[i : i + 1], target=int(y[i]), feature_mask=fmask, n_samples=n_samples,
                                    perturbations_per_eval=256, baselines=0.0)
                for i in range(x.shape[0])
            ])  # fmt: skip

        start = CLOCK()
        maps = run()
        t = CLOCK() - start
        rows.append(
            [f"{name} 8x8 grid (Captum)", n_samples, t / x.shape[0] * 1e3, float(deletion(net, x, maps, y).mean())]
        )
    rows[1][3] = rows[0][3]
    for name, m in [
        ("RISE (ours, same images)", RISE(n_masks=n_samples)),
        ("HSIC (ours, same images)", HSIC(n_designs=n_samples)),
    ]:
        start = CLOCK()
        maps = m(net, x, y)
        t = CLOCK() - start
        rows.append([name, n_samples, t / x.shape[0] * 1e3, float(deletion(net, x, maps, y).mean())])
    return rows


def quality_per_cost(net, x, y, budgets: list[int], methods: list[str], store: dict) -> None:
    """Deletion AUC per image for each method and budget, stored as ``store[f"{method}@{budget}"]``
    = {"auc": [...], "ms_per_image": t}; :func:`quality_report` makes the tables."""
    deletion, _ = metrics_fns()
    for budget in budgets:
        n_sobol = max(2, budget // 66)  # grid 8: 66 passes per design
        make = {
            "rise": lambda b=budget: RISE(n_masks=b),
            "sobol": lambda n=n_sobol: Sobol(n_designs=n),
            "hsic": lambda b=budget: HSIC(n_designs=b),
        }
        for name in methods:
            m = make[name]()
            start = CLOCK()
            a = m(net, x, y)
            sec = CLOCK() - start
            d = deletion(net, x, a, y).double()
            store[f"{name}@{budget}"] = {"auc": d.tolist(), "ms_per_image": sec / x.shape[0] * 1e3}
            mu, se = mean_sem(d)
            print(f"  {name}@{budget}: deletion AUC {mu:.4f} ± {se:.4f} ({sec / x.shape[0] * 1e3:.0f} ms/image)")


def quality_report(store: dict) -> tuple[list[int], list[list], dict[str, list[float]], list[list]]:
    """Table rows (budget, mean ± s.e. and ms per method), curves, and paired differences against Sobol
    at its largest budget (same images)."""
    names = ["rise", "sobol", "hsic"]
    budgets = sorted({int(k.split("@")[1]) for k in store})
    curves: dict[str, list[float]] = {n: [] for n in names}
    rows = []
    for b in budgets:
        row: list = [b]
        for n in names:
            e = store.get(f"{n}@{b}")
            if e is None:
                row += ["–", "–"]
                curves[n].append(float("nan"))
                continue
            mu, se = mean_sem(torch.tensor(e["auc"]))
            curves[n].append(mu)
            row += [f"{mu:.4f} ± {se:.4f}", e["ms_per_image"]]
        rows.append(row)
    sobol_budgets = [b for b in budgets if f"sobol@{b}" in store]
    prow: list[list] = []
    if sobol_budgets:
        ref_key = f"sobol@{max(sobol_budgets)}"
        ref = torch.tensor(store[ref_key]["auc"])
        for k, e in store.items():
            if k == ref_key:
                continue
            mu, se = mean_sem(torch.tensor(e["auc"]) - ref)
            prow.append([k, f"{mu:+.4f} ± {se:.4f}", f"{mu / se:+.1f}" if se > 0 else "–", ref_key])
    return budgets, rows, curves, prow


def neflag_vs_gradients(net, x, y) -> list[list]:
    """Insertion − deletion of NeFLAG against IG and SmoothGrad, scored twice: with ties in raster order
    (``ties="index"``, how the metrics sorted before) and at random (``ties="random"``, seeded, the
    metrics' default). The difference matters for uniform sampling: a digit whose flux is positive over
    the whole sphere gets an all-zero map (the estimand), which raster order credits."""
    _, insertion_deletion = metrics_fns()
    rows, scores, rscores = [], {}, {}
    for name, m, passes in [
        ("IG (32 steps)", IntegratedGradients(n_steps=32, completeness=False), 32),
        ("SmoothGrad (25)", SmoothGrad(n_samples=25), 25),
        ("NeFLAG-1", NeFLAG(n_points=1), NeFLAG(n_points=1).n_forwards(())),
        ("NeFLAG-10", NeFLAG(n_points=10), NeFLAG(n_points=10).n_forwards(())),
        ("NeFLAG-20", NeFLAG(n_points=20), NeFLAG(n_points=20).n_forwards(())),
        ("NeFLAG-20, input coordinates (previous)", NeFLAG(n_points=20, coordinates="input"), 120),
        (
            "NeFLAG-20, input coord., uniform antithetic pairs",
            NeFLAG(n_points=20, n_iter=0, oversample=3, antithetic=True, coordinates="input"),
            60,
        ),
        (
            "NeFLAG-20, input coord., uniform independent points",
            NeFLAG(n_points=20, n_iter=0, oversample=3, coordinates="input"),
            60,
        ),
        ("abs(gradient × input) (diagnostic)", "abs_grad_x_input", 1),
        ("all-zero map (reference)", None, 0),
    ]:
        start = CLOCK()
        if m is None:
            a = torch.zeros_like(x)
        elif m == "abs_grad_x_input":
            a = (Saliency()(net, x, y) * x).abs()
        else:
            a = m(net, x, y)
        sec = CLOCK() - start
        zero = int((m.last_info["n_negative"] == 0).sum()) if isinstance(m, NeFLAG) else "–"
        scores[name] = insertion_deletion(net, x, a, y, ties="index").double()
        rscores[name] = insertion_deletion(net, x, a, y).double()
        row = [name, passes]
        for s in (scores, rscores):
            mu, se = mean_sem(s[name])
            dmu, dse = mean_sem(s[name] - s["IG (32 steps)"])
            row += [f"{mu:.4f} ± {se:.4f}", f"{dmu:+.4f} ± {dse:.4f}", f"{dmu / dse:+.1f}" if dse > 0 else "–"]
        rows.append([*row, zero, sec / x.shape[0] * 1e3])
    return rows


NEFLAG_HEADERS = ["method", "grad passes/sample", "raster ties", "paired − IG", "z",
                  "ties random", "paired − IG (ties random)", "z (ties random)", "zero maps", "ms/image"]  # fmt: skip


def masker_section(net, dm, x, y, steps: int) -> list[list]:
    deletion, _ = metrics_fns()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        masker = MaskingNetwork(1, 10, width=16)
    opt = torch.optim.Adam(masker.parameters(), lr=3e-3)
    # Digits are ink on a black background: the zeros alternative (keep / remove the ink) trains far
    # better here than the paper's blur (deletion AUC about 0.16 against 0.26-0.32 after 300-400 steps).
    obj = MaskerObjective(alt="zeros")
    gen = torch.Generator().manual_seed(0)
    loader = dm.train_dataloader()
    done, start = 0, CLOCK()
    while done < steps:
        for xb, yb in loader:
            train_masker_step(net, masker, opt, obj, xb, yb, gen, 10)
            done += 1
            if done >= steps:
                break
    train_s = CLOCK() - start
    rt = RealTimeSaliency(masker)
    (t_map,) = timeit([lambda: rt(net, x, y)], 3)
    a = rt(net, x, y)
    mu, se = mean_sem(deletion(net, x, a, y))
    return [["real-time masker", steps, train_s, t_map / x.shape[0] * 1e3, f"{mu:.4f} ± {se:.4f}", float(a.mean())]]


# ------------------------------------------------------------------------------------------ main


SECTIONS = ("overhead", "cheap", "captum", "quality", "neflag", "masker", "report")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer samples, budgets and repeats")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--images", type=int, default=270, help="test images for sections 3-5 (270: all of them)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="cpu: process CPU time (1 thread)")
    ap.add_argument("--sections", default="overhead,captum,quality,neflag,masker,report",
                    help=f"comma-separated subset of {','.join(SECTIONS)}")  # fmt: skip
    ap.add_argument("--only", default="", help="section 1: comma-separated method-name prefixes")
    ap.add_argument("--repeats", type=int, default=3, help="section 1: interleaved repeats (fastest kept)")
    ap.add_argument("--budgets", default="264,528,1056,2112", help="section 3: forward passes per image")
    ap.add_argument("--methods", default="rise,sobol,hsic", help="section 3: methods")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    quick = args.quick
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("bench_blackbox_quick.json" if quick else "bench_blackbox.json")
    results: dict = json.loads(out.read_text()) if out.exists() else {}
    info = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                       f"{args.threads} thread(s), {args.clock} clock", "quick": quick}  # fmt: skip
    print(f"# bench_blackbox ({info['machine']}{', quick' if quick else ''})\n")

    if "cheap" in sections:
        print("## 1b. Sampling methods at their defaults against their bare forwards, cheap models\n")
        rows = cheap_models(args.repeats if args.repeats > 3 else 7, quick)
        results["cheap"] = rows
        print(table(["model", "method", "passes/sample", "calls", "bare ms", "method ms", "median ratio",
                     "min-max"], rows), "\n")  # fmt: skip

    xs = ys = net = dm = None
    if set(sections) - {"report", "cheap"}:
        net, dm, acc, train_s = train_cnn(3 if quick else 10)
        print(f"SmallCNN on digits 32x32: test accuracy {acc:.3f} after {train_s:.0f} s of training.\n")
        if results.get("accuracy") is not None and abs(results["accuracy"] - acc) > 1e-6:
            print(f"(stored results came from a network with accuracy {results['accuracy']:.4f}: starting afresh)\n")
            results = {}
        results["info"], results["accuracy"] = info, acc
        xs, ys = dm.test_set.tensors
    n_img = 4 if quick else min(args.images, 270)
    if "overhead" in sections:
        with model_guard(net):
            x16, y16 = xs[:16].clone(), ys[:16].clone()
            n = 4 if quick else 16
            print(f"## 1. Cost against the bare model calls ({n} images, {args.repeats} interleaved rounds)\n")
            only = [o for o in args.only.split(",") if o]
            xb, yb = (xs[:16], ys[:16]) if quick else (xs[:128].clone(), ys[:128].clone())
            rows = overhead(net, x16[:n], y16[:n], 1 if quick else args.repeats, quick, only, xb, yb)
            if only and "overhead" in results:  # replace the re-measured rows only
                keep = [r for r in results["overhead"] if not any(r[0].startswith(o) for o in only)]
                rows = keep + rows
            results["overhead"] = rows
            print(
                table(["method", "passes/sample", "passes", "rows", "bare ms", "method ms", "median ratio"], rows), "\n"
            )

    if "captum" in sections:
        with model_guard(net):
            x8, y8 = xs[:8].clone(), ys[:8].clone()
            print("## 2. Captum references (per image, 4 images)\n")
            rows = captum_refs(net, x8[:4], y8[:4], 1 if quick else 3, quick)
            results["captum"] = rows
            print(table(["method", "passes/sample", "ms/image", "deletion AUC"], rows), "\n")

    if "quality" in sections:
        with model_guard(net):
            x, y = xs[:n_img].clone(), ys[:n_img].clone()
            budgets = [264, 528] if quick else [int(b) for b in args.budgets.split(",")]
            methods = [m for m in args.methods.split(",") if m]
            print(f"## 3. Deletion AUC against forward passes per image ({n_img} images): {methods} at {budgets}\n")
            q = results.setdefault("quality_per_image", {})
            if q.get("n_images") != n_img:
                q.clear()
                q["n_images"] = n_img
            quality_per_cost(net, x, y, budgets, methods, q.setdefault("scores", {}))
            print()

    if "neflag" in sections:
        with model_guard(net):
            x, y = xs[:n_img].clone(), ys[:n_img].clone()
            print(f"## 4. Insertion − deletion (higher is better), {n_img} images\n")
            rows = neflag_vs_gradients(net, x, y)
            results["neflag"] = {"n_images": n_img, "rows": rows}
            print(table(NEFLAG_HEADERS, rows), "\n")

    if "masker" in sections:
        with model_guard(net):
            x, y = xs[:n_img].clone(), ys[:n_img].clone()
            print(f"## 5. Real-time masker trained against the frozen CNN ({n_img} images)\n")
            rows = masker_section(net, dm, x, y, 30 if quick else 300)
            results["masker"] = {"n_images": n_img, "rows": rows}
            print(table(["method", "train steps", "train s", "ms/map", "deletion AUC", "mean mask"], rows), "\n")

    if "report" in sections and results.get("quality_per_image", {}).get("scores"):
        q = results["quality_per_image"]
        budgets, rows, curves, prow = quality_report(q["scores"])
        print(f"## 3. Deletion AUC (lower is better) against forward passes per image ({q['n_images']} images)\n")
        print(table(["passes", "RISE", "ms", "Sobol (g=8)", "ms", "HSIC (g=7, median width)", "ms"], rows), "\n")
        print("Paired differences of deletion AUC (same images; negative = better than the reference):\n")
        print(table(["method@passes", "AUC − AUC(ref)", "z", "ref"], prow), "\n")
        results["quality_per_cost"] = {"rows": rows, "curves": curves, "budgets": budgets, "paired": prow}
        _plot(
            budgets,
            curves,
            RESULTS / ("blackbox_deletion_vs_passes_quick.png" if quick else "blackbox_deletion_vs_passes.png"),
            q["n_images"],
        )
        print(f"Plot: {(RESULTS / 'blackbox_deletion_vs_passes.png').relative_to(ROOT)}\n")

    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"Results: {out.relative_to(ROOT)}")


def _plot(budgets: list[int], curves: dict[str, list[float]], path: Path, n_images: int | None = None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print(f"matplotlib is not installed: {path} not drawn (pip install matplotlib).")
        return
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    for name, ys in curves.items():
        ax.plot(budgets, ys, marker="o", label=name.upper() if name != "sobol" else "Sobol")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("forward passes per image")
    ax.set_ylabel("deletion AUC (lower is better)")
    ax.set_title("Digits CNN: deletion AUC vs cost" + (f" ({n_images} test images)" if n_images else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
