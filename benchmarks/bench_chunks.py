"""Rows per model call: cost per row of bare forward and input-gradient passes at fixed chunk sizes and
at what ``batch_size="auto"`` picks (``explain_callbacks._internal.batching``), and (``--resnet``) methods
and metrics on a small ResNet against Captum, Quantus and their bare passes.

    .venv/bin/python benchmarks/bench_chunks.py [--threads 2] [--repeats 7]
    .venv/bin/python benchmarks/bench_chunks.py --resnet [--threads 1] [--rounds 3] [--images 32]

Chunk table: ms per row (best of ``--repeats`` passes over 512 rows after a warm-up), the fastest fixed
size in bold, the auto choice and its cost relative to the fastest fixed size. Models are untrained (the
cost does not depend on the weights): the SmallCNN of the examples at several widths and input sizes, a
residual block, an MLP.

ResNet section: a ResNet of 3 stages x 2 residual blocks (16/32/64 wide) on 3x32x32 images, untrained,
eval mode. Each round runs ours and every contender once, back to back in a rotating order; the table
gives the median over rounds of the per-round ratio ours / contender and its min-max (a shared machine's
load drifts between minutes; neighbours in time share it). Ours runs with ``batch_size="auto"``, measured
before the rounds (the one-time measurement is reported on its own line). Contenders: IG 50 steps against
Captum's ``internal_batch_size`` in {16, 64, 256, all} and a bare loop of 50 forward+backward calls of the
batch; occlusion against bare forwards of the same rows in calls of the batch size and of ours' chunk;
deletion (pixel flipping) and faithfulness correlation against Quantus at equal values (the subsets fed
to Quantus) and against their bare forwards.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import bare_pass, quiet, sync, timed  # a sibling module: the benchmarks run as scripts

from explain_callbacks._internal.batching import activation_elements, choose_rows, resolve_batch_size
from explain_callbacks.models.nets import MLP, SmallCNN
from tests.references import import_quantus

SIZES = (8, 16, 32, 64, 128, 256)


class ResBlockNet(nn.Module):
    """Stem convolution, one residual block of two convolutions with BatchNorm, pooled linear head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w),
        )  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(torch.relu(h + self.block(h)))


class _Basic(nn.Module):
    """A residual block of two 3x3 convolutions with BatchNorm (a 1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class SmallResNet(nn.Module):
    """3 stages x 2 residual blocks, 16/32/64 wide (strides 1, 2, 2), pooled linear head: a model the
    project was not tuned on (issue 22)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        blocks, cin = [], 16
        for w, stride in ((16, 1), (32, 2), (64, 2)):
            blocks += [_Basic(cin, w, stride), _Basic(w, w, 1)]
            cin = w
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def rounds(ours: Callable[[], object], others: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    """Per contender, the ratios ours / contender over ``n`` rounds; each round runs ours and every
    contender once, back to back, the order rotating from round to round. Key ``""``: ours' times."""
    fns = [("", ours), *others.items()]
    times: dict[str, list[float]] = {k: [] for k, _ in fns}
    for r in range(n):
        order = fns[r % len(fns) :] + fns[: r % len(fns)]
        for k, fn in order:
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return {"": times[""], **{k: [a / b for a, b in zip(times[""], times[k])] for k in others}}


def ratio_cells(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"




def resnet_section(n_images: int, n_rounds: int) -> None:
    """IG, occlusion and two metrics on :class:`SmallResNet` against Captum, Quantus and bare passes."""
    import numpy as np
    from captum.attr import IntegratedGradients as CaptumIG

    from explain_callbacks.attribution import IntegratedGradients, Occlusion, Saliency
    from explain_callbacks.metrics import functional as MF

    quantus = import_quantus()
    if quantus is None:
        raise ModuleNotFoundError("the ResNet section compares with Quantus: pip install -e '.[dev]'")
    torch.manual_seed(0)
    model = SmallResNet().eval()
    x = torch.rand(n_images, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    b, n_el = x.shape[0], x[0].numel()
    lines: list[str] = []

    def row(what: str, ratios: dict[str, list[float]], value: str = "") -> None:
        t = statistics.median(ratios[""])
        cells = "; ".join(f"{k}: {ratio_cells(v)}" for k, v in ratios.items() if k)
        lines.append(f"| {what} | {t:.2f} | {cells} | {value} |")
        print(lines[-1], file=sys.stderr, flush=True)

    def measured(kind: str) -> str:
        t = time.perf_counter()
        choice = choose_rows("auto", model, x, kind=kind)
        spent = time.perf_counter() - t
        return f"{choice.describe()}; measuring took {spent:.1f} s once"

    # ------------------------------------------------------------------ IG, 50 steps
    notes = [f"IG: {measured('grad')}"]
    ig = IntegratedGradients(n_steps=50, completeness=False)
    cap = CaptumIG(model)

    def captum(ibs: int | None) -> Callable[[], object]:
        return lambda: cap.attribute(x, target=y, n_steps=50, method="gausslegendre", internal_batch_size=ibs)

    alphas = torch.linspace(0, 1, 50)
    pts = [a * x for a in alphas]  # ready-made path points: the bare loop pays the model calls only

    def bare_ig() -> None:
        for p in pts:
            bare_pass(model, p, True)

    a_ours = ig(model, x, y)
    a_cap = captum(256)()
    diff = float((a_ours - a_cap).abs().max() / a_cap.abs().max())
    others = {f"Captum ibs={k or 'all'}": captum(k) for k in (16, 64, 256, None)}
    others["bare loop (50 x fwd+bwd of the batch)"] = bare_ig
    row("IG 50 steps", rounds(lambda: ig(model, x, y), others, n_rounds), f"max rel. diff to Captum {diff:.1e}")

    # ------------------------------------------------------------------ occlusion
    notes.append(f"occlusion, metrics: {measured('forward')}")
    occ = Occlusion(window=4, stride=4)
    occ(model, x, y)
    n_rows = int(occ.last_info["forwards"].sum())
    chunk = resolve_batch_size("auto", model, x)

    def bare_fwd(per_call: int, n: int) -> Callable[[], None]:
        src = x.repeat(-(-n // b), 1, 1, 1)[:n].clone()

        def run() -> None:
            with torch.no_grad():
                for s in range(0, n, per_call):
                    model(src[s : s + per_call])

        return run

    row(
        f"occlusion 4x4 ({n_rows} rows)",
        rounds(
            lambda: occ(model, x, y),
            {f"bare fwd x{b}": bare_fwd(b, n_rows), f"bare fwd x{chunk}": bare_fwd(chunk, n_rows)},
            n_rounds,
        ),
    )

    # ------------------------------------------------------------------ deletion (pixel flipping) vs Quantus
    a = Saliency()(model, x, y).detach()
    xn, yn, an = x.numpy(), y.numpy(), a.numpy()
    step = 64
    n_steps = n_el // step
    kw = dict(substrate="min", step=step, features="element", output="probability", return_curve=True)
    curve = MF.deletion(model, x, a, y, **kw)[1]
    qm = quantus.PixelFlipping(features_in_step=step, perturb_baseline="black", disable_warnings=True)

    def q_del() -> object:
        return quiet(lambda: qm(model=model, x_batch=xn, y_batch=yn, a_batch=an.copy(), device="cpu"))

    qv = np.asarray(q_del())
    diff = float(np.abs(qv - curve[:, 1:].numpy()).max())
    n_rows = (n_steps + 1) * b
    row(
        f"deletion / pixel flipping ({n_steps} steps of {step})",
        rounds(
            lambda: MF.deletion(model, x, a, y, **kw),
            {"Quantus": q_del, f"bare fwd x{chunk}": bare_fwd(chunk, n_rows), f"bare fwd x{b}": bare_fwd(b, n_rows)},
            n_rounds,
        ),
        f"curves max abs diff to Quantus {diff:.1e}",
    )

    # ------------------------------------------------------------------ faithfulness correlation vs Quantus
    runs, k = 100, 224
    g = torch.Generator().manual_seed(0)
    subsets = torch.stack([torch.stack([torch.randperm(n_el, generator=g)[:k] for _ in range(runs)]) for _ in range(b)])
    kw_mu = dict(correlation="pearson", baseline="min", features="element", output="logit")
    v = MF.mufidelity(model, x, a, y, subsets=subsets, **kw_mu)
    qf = quantus.FaithfulnessCorrelation(nr_runs=runs, subset_size=k, perturb_baseline="black", abs=False,
                                         normalise=False, return_aggregate=False, disable_warnings=True)  # fmt: skip

    def q_mu() -> object:
        seq = iter([subsets[i, r].numpy() for r in range(runs) for i in range(b)])
        orig = np.random.choice
        np.random.choice = lambda *a_, **k_: next(seq)  # Quantus draws its subsets here: ours, in its order
        try:
            return quiet(lambda: qf(model=model, x_batch=xn, y_batch=yn, a_batch=an.copy(), device="cpu"))
        finally:
            np.random.choice = orig

    diff = float(np.nanmax(np.abs(np.asarray(q_mu()) - v.numpy())))
    n_rows = (runs + 1) * b
    row(
        f"faithfulness correlation ({runs} subsets of {k})",
        rounds(
            lambda: MF.mufidelity(model, x, a, y, subsets=subsets, **kw_mu),
            {"Quantus": q_mu, f"bare fwd x{chunk}": bare_fwd(chunk, n_rows), f"bare fwd x{b}": bare_fwd(b, n_rows)},
            n_rounds,
        ),
        f"max abs diff to Quantus {diff:.1e}",
    )

    print(f"\nSmall ResNet (3 stages x 2 blocks, 16/32/64), {b} images 3x32x32, {torch.get_num_threads()} torch "
          f"thread(s), {platform.machine()}, torch {torch.__version__}, quantus {quantus.__version__}; "
          f"{n_rounds} rounds.\n")  # fmt: skip
    for n in notes:
        print(f"- {n}")
    print("\n| method / metric | ours (s, median) | ours / contender: median (min-max) over rounds | values |")
    print("|---|---|---|---|")
    print("\n".join(lines))


def per_row_ms(net: nn.Module, x: torch.Tensor, rows: int, grad: bool, repeats: int) -> float:
    """Best time per row (ms) of passing all of ``x`` through ``net`` in calls of ``rows`` rows."""

    def run() -> None:
        for s in range(0, x.shape[0], rows):
            bare_pass(net, x[s : s + rows], grad)

    return timed(run, repeats)[0] / x.shape[0] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--resnet", action="store_true", help="the small-ResNet section instead of the chunk table")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.resnet:
        resnet_section(args.images, args.rounds)
        return
    torch.manual_seed(0)
    configs = [
        ("digits CNN w16, 1×8×8", SmallCNN(1, 10, 16), (1, 8, 8)),
        ("SmallCNN w16, 3×32×32", SmallCNN(3, 10, 16), (3, 32, 32)),
        ("SmallCNN w32, 3×32×32", SmallCNN(3, 10, 32), (3, 32, 32)),
        ("SmallCNN w16, 3×64×64", SmallCNN(3, 10, 16), (3, 64, 64)),
        ("SmallCNN w64, 3×64×64", SmallCNN(3, 10, 64), (3, 64, 64)),
        ("residual w32, 3×32×32", ResBlockNet(32), (3, 32, 32)),
        ("residual w32, 3×96×96", ResBlockNet(32), (3, 96, 96)),
        ("MLP 784-512-512", MLP(784, 10, (512, 512)), (784,)),
    ]
    print(f"{platform.machine()}, {args.threads} torch threads, torch {torch.__version__}; ms per row, 512 rows\n")
    sizes = " | ".join(map(str, SIZES))
    print(f"| model, input | activations / row | pass | {sizes} | auto (rows) | auto / best |")
    print("|---" * (len(SIZES) + 5) + "|")
    for name, net, shape in configs:
        net.eval()
        x = torch.randn(512, *shape)
        acts = activation_elements(net, x[:1])
        for grad in (False, True):
            fixed = [per_row_ms(net, x, r, grad, args.repeats) for r in SIZES]
            auto = resolve_batch_size("auto", net, x, kind="grad" if grad else "forward")  # measured per kind
            t_auto = per_row_ms(net, x, auto, grad, args.repeats)
            best = min(fixed)
            cells = " | ".join(f"**{t:.3f}**" if t == best else f"{t:.3f}" for t in fixed)
            print(
                f"| {name} | {acts:,} | {'fwd+bwd' if grad else 'fwd'} | {cells} | {t_auto:.3f} ({auto}) "
                f"| {t_auto / best:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
