"""Cost of the data-set-level analyses, measured side by side with the model work they need.

1. SpRAy (``analysis.spray``): clustering N saliency maps of a 3x32x32 CNN against computing those N
   maps (the Saliency call that SpRAyMonitor makes anyway), N = 64, 256, 1024.
2. Fragility attack (``analysis.fragility_attack``, top-k objective, 30 steps) against a bare replay of
   its model work: per step one double-backward saliency under softplus, one saliency and one forward
   on the candidate, plus the initial map.

Medians of interleaved repeats; one torch thread by default. Run:
``.venv/bin/python benchmarks/bench_analysis.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling _timing, also when loaded by path
from _timing import median_time

from explain_callbacks._internal.guard import model_guard
from explain_callbacks.analysis import fragility_attack, spray
from explain_callbacks.attribution import Saliency
from explain_callbacks.interaction.integrated_hessians import relu_as_softplus
from explain_callbacks.models import SmallCNN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SmallCNN(3, 4, width=16).eval()
    sal = Saliency()

    print("| N maps | saliency maps (s) | SpRAy (s) | SpRAy / maps |")
    print("|---|---|---|---|")
    for n in (64, 256, 1024):
        x = torch.rand(n, 3, 32, 32)
        t = torch.randint(0, 4, (n,))
        maps = sal(model, x, t)
        r = median_time({"maps": lambda x=x, t=t: sal(model, x, t), "spray": lambda m=maps: spray(m)}, args.repeats)
        print(f"| {n} | {r['maps']:.4f} | {r['spray']:.4f} | {r['spray'] / r['maps']:.2f} |")

    b, steps = 32, 30
    x = torch.rand(b, 3, 32, 32)

    def bare() -> None:
        with model_guard(model):
            label = model(x).argmax(1)
            sal(model, x, label)
            for _ in range(steps):
                xg = x.detach().requires_grad_(True)
                with relu_as_softplus(10.0):
                    imp = sal(model, xg, label, create_graph=True).abs().sum(1)
                torch.autograd.grad(imp.sum(), xg)
                sal(model, x, label)
                with torch.no_grad():
                    model(x)

    r = median_time(
        {"bare": bare, "attack": lambda: fragility_attack(model, x, objective="topk", steps=steps)}, args.repeats
    )
    print(f"\nFragility attack (top-k, {steps} steps, {b} images 3x32x32, SmallCNN): "
          f"{r['attack']:.3f} s, bare model work {r['bare']:.3f} s, ratio {r['attack'] / r['bare']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
