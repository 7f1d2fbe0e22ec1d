"""LRP speed: one LRP call vs one forward+backward of the same batch (what a gradient map costs), and
vs Zennit (test-only reference, ``pip install --no-deps zennit``) with the same composite and
canonizer, side by side in one process: each ratio is the median over rounds of back-to-back pairs
(which goes first alternates), timed in process CPU time on 1 torch thread, so that the other jobs of
a shared machine do not count (``--threads`` / ``--wall`` to change either).

Networks (batch 32, 3x32x32): a VGG-like net with and without BatchNorm, the project's SmallCNN, and
the held-out small ResNet of ``heldout_models.py`` (residuals written ``a + b``; Zennit with its ResNet
canonizer written for that block, as in ``tests/test_lrp_zennit.py``).

    python benchmarks/bench_lrp.py                  # ~2 min on 2 CPU cores
    python benchmarks/bench_lrp.py --quick
    python benchmarks/bench_lrp.py --faithfulness   # deletion / insertion vs IG on the shapes data (~30 s)

Prints a Markdown table. Target: LRP at most 1.05x Zennit's time with the same rules (an LRP pass does more than a
forward+backward by definition; that ratio is reported).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.references: the reference imports

from _timing import paired_times  # sibling module: the benchmarks run as scripts

from explain_callbacks.attribution import LRP
from tests.references import import_zennit

CLOCK: Callable[[], float] = time.process_time


def vgg(width: int = 32, bn: bool = False) -> nn.Module:
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), *([nn.BatchNorm2d(o)] if bn else []), nn.ReLU()]

    w = width
    return nn.Sequential(
        *block(3, w), *block(w, w), nn.MaxPool2d(2), *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
        *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 64), nn.ReLU(), nn.Dropout(),
        nn.Linear(64, 10),
    ).eval()  # fmt: skip



def ratio(method: Callable[[], object], bare: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """(fastest method, fastest bare, median ratio of back-to-back pairs), after one warm-up call of each."""
    method()
    bare()
    return paired_times(method, bare, repeats, clock=CLOCK)


def zennit_composite(composite: str, resnet: bool = False):
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat, LayerMapComposite, layer_map_base
    from zennit.rules import Epsilon
    from zennit.types import Convolution

    if resnet:
        from tests.test_lrp_zennit import zennit_resnet_canonizers

        canon = zennit_resnet_canonizers()
    else:
        canon = [SequentialMergeBatchNorm()]
    if composite == "epsilon_plus_flat":
        return EpsilonPlusFlat(canonizers=canon)
    return LayerMapComposite([*layer_map_base(), ((Convolution, nn.Linear), Epsilon())], canonizers=canon)


def network(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "VGG-like":
        return vgg()
    if name == "VGG-like + BatchNorm":
        return vgg(bn=True)
    if name == "SmallCNN":
        from explain_callbacks.models import SmallCNN

        return SmallCNN(3, 10, width=32).eval()
    from heldout_models import make

    m = make("resnet")
    m.fc = nn.Linear(m.fc.in_features, 10)
    return m.eval()


def bench_net(name: str, composite: str, zennit, repeats: int) -> tuple:
    """(name, composite, fwd+bwd s, LRP s, LRP / fwd+bwd, Zennit s or None, LRP / Zennit or None), batch 32."""
    model = network(name)
    x = torch.rand(32, 3, 32, 32)
    target = torch.randint(0, 10, (32,))
    lrp = LRP(composite, batch_size=None)

    def fwd_bwd() -> None:
        xr = x.detach().requires_grad_(True)
        torch.autograd.grad(model(xr).gather(1, target[:, None]).sum(), xr)

    def ours() -> None:
        lrp(model, x, target)

    t_ours, t_fb, r_fb = ratio(ours, fwd_bwd, repeats)
    t_z = r_z = None
    if zennit is not None:
        from zennit.attribution import Gradient

        zmodel = copy.deepcopy(model)
        onehot = torch.eye(10)[target]
        zcomp = zennit_composite(composite, resnet=name.startswith("ResNet"))

        def zen() -> None:
            with Gradient(model=zmodel, composite=zcomp) as attributor:
                attributor(x, lambda out: out * onehot)

        _, t_z, r_z = ratio(ours, zen, repeats)
    return (name, composite, t_fb, t_ours, r_fb, t_z, r_z)


def bench_crp(repeats: int, k: int = 8) -> tuple[float, float, float]:
    """CRP over k concepts of 8 samples (8k rows in one pass) vs one forward+backward of the 8k rows."""
    from explain_callbacks.attribution.lrp import conditional_relevance

    model = vgg()
    x = torch.rand(8, 3, 32, 32)
    target = torch.randint(0, 10, (8,))
    lrp = LRP(batch_size=None)
    rows, trows = x.repeat_interleave(k, 0), target.repeat_interleave(k)

    def fwd_bwd() -> None:
        xr = rows.detach().requires_grad_(True)
        torch.autograd.grad(model(xr).gather(1, trows[:, None]).sum(), xr)

    return ratio(lambda: conditional_relevance(lrp, model, x, target, "5", range(k)), fwd_bwd, repeats)


def faithfulness(n: int = 64) -> None:
    """Deletion (lower is better) and insertion (higher is better) AUC of LRP vs IG and gradient maps, on
    a SmallCNN trained for 15 epochs on 1024 procedural shapes (32x32, 4 classes), n validation images."""
    from explain_callbacks.attribution import build_attributor
    from explain_callbacks.datasets.shapes import make_shapes
    from explain_callbacks.metrics.functional import deletion, insertion
    from explain_callbacks.models import SmallCNN

    d = make_shapes(1024 + n, size=32, seed=0)
    torch.manual_seed(0)
    model = SmallCNN(3, 4, width=16)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _epoch in range(15):
        for i in range(0, 1024, 64):
            loss = nn.functional.cross_entropy(model(d.x[i : i + 64]), d.y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    x, y = d.x[1024:], d.y[1024:]
    acc = float((model(x).argmax(1) == y).float().mean())
    print(f"\nfaithfulness on shapes ({n} validation images, accuracy {acc:.2f}), 32 steps, zeros / blur substrates\n")
    print("| method | deletion AUC (lower better) | insertion AUC (higher better) | insertion - deletion |")
    print("|---|---|---|---|")
    for spec in ("lrp", {"name": "lrp", "composite": "epsilon_alpha2_beta1"}, {"name": "lrp", "composite": "epsilon"},
                 {"name": "ig", "n_steps": 32}, "input_x_gradient", "saliency"):  # fmt: skip
        method = build_attributor(spec)
        a = method(model, x, y)
        de = float(deletion(model, x, a, y).mean())
        ins = float(insertion(model, x, a, y).mean())
        label = spec if isinstance(spec, str) else f"{spec['name']} {spec.get('composite', '')}".strip()
        print(f"| {label} | {de:.3f} | {ins:.3f} | {ins - de:.3f} |")


def main() -> None:
    global CLOCK
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--faithfulness", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wall", action="store_true", help="wall-clock time instead of process CPU time")
    ap.add_argument("--nets", default="VGG-like,VGG-like + BatchNorm,SmallCNN,ResNet (held-out)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    CLOCK = time.perf_counter if args.wall else time.process_time
    torch.manual_seed(0)
    if args.faithfulness:
        faithfulness()
        return
    repeats = 5 if args.quick else 15
    zennit = import_zennit()
    nets = args.nets.split(",")
    rows = [bench_net(n, c, zennit, repeats) for c in ("epsilon_plus_flat", "epsilon") for n in nets]
    clock = "wall-clock" if args.wall else "process CPU"
    print(f"\nbatch 32x3x32x32, float32, torch {torch.__version__}, {torch.get_num_threads()} threads, {clock} time; "
          f"ratios: median of {repeats} back-to-back pairs, times: the fastest\n")  # fmt: skip
    print("| network | composite | forward+backward (ms) | LRP (ms) | LRP / fwd+bwd | Zennit (ms) | LRP / Zennit |")
    print("|---|---|---|---|---|---|---|")
    for name, comp, fb, ours, r_fb, tz, rz in rows:
        zs = f"{1e3 * tz:.1f} | {rz:.2f}x" if tz is not None else "not installed | -"
        print(f"| {name} | {comp} | {1e3 * fb:.1f} | {1e3 * ours:.1f} | {r_fb:.2f}x | {zs} |")
    crp, fb, r = bench_crp(repeats)
    print(f"\nCRP, 8 concepts x 8 samples (64 rows, one pass): {1e3 * crp:.1f} ms vs forward+backward of the 64 rows "
          f"{1e3 * fb:.1f} ms: {r:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
