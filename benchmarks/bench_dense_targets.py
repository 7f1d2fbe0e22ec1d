"""Cost of target operators on a segmentation model (SegNet, 3x32x32 shapes, 5 output channels).

1. Overhead of a region target over a plain class index: saliency and IG (16 steps) of the same model with
   ``target=1`` (the class summed over every pixel) and with ``RegionTarget(mask, 1)``: the selection is a
   masked sum, negligible next to the forward and backward passes.
2. ``MultiTarget`` of K regions in one batched call (K·B rows, chunked by ``batch_size``) against K separate
   calls, K = 2, 4, 8: the same model work in fewer, fuller calls. With ``batch_size="auto"`` a MultiTarget
   call sends more rows per call than a separate one does (all B rows); with ``batch_size=B`` both send the
   same calls, which isolates the cost of the joined selection.

Medians of interleaved repeats (one warm-up each); one torch thread by default. Run:
``.venv/bin/python benchmarks/bench_dense_targets.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling _timing, also when loaded by path
from _timing import median_time

from explain_callbacks import MultiTarget, RegionTarget
from explain_callbacks.attribution import build_attributor
from explain_callbacks.datasets.shapes import make_shapes
from explain_callbacks.models import SegNet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SegNet(3, 4, width=8).eval()
    data = make_shapes(args.batch, seed=0)
    x = data.x
    masks = data.mask[:, 0] > 0.5  # (B, H, W): each sample's object
    print(f"SegNet width 8, batch {args.batch} of 3x32x32, {args.threads} torch thread(s)\n")

    print("| method | target=1 (s) | RegionTarget (s) | ratio |")
    print("|---|---:|---:|---:|")
    for name, kw in (("saliency", {}), ("ig", {"n_steps": 16})):
        m = build_attributor(name, **kw)
        t = median_time(
            {"index": lambda m=m: m(model, x, 1), "region": lambda m=m: m(model, x, RegionTarget(masks, 1))},
            args.repeats,
        )
        print(f"| {name} | {t['index']:.3f} | {t['region']:.3f} | {t['region'] / t['index']:.2f} |")

    print("\n| method | batch_size | K | K separate calls (s) | one MultiTarget call (s) | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for name, kw in (("saliency", {}), ("ig", {"n_steps": 16})):
        for bs in ("auto", args.batch):
            m = build_attributor(name, batch_size=bs, **kw)
            for k in (2, 4, 8):
                targets = [RegionTarget(masks, c % 5) for c in range(k)]
                multi = MultiTarget(targets)
                t = median_time(
                    {
                        "separate": lambda m=m, targets=targets: [m(model, x, tg) for tg in targets],
                        "multi": lambda m=m, multi=multi: m(model, x, multi),
                    },
                    args.repeats,
                )
                speed = t["separate"] / t["multi"]
                print(f"| {name} | {bs} | {k} | {t['separate']:.3f} | {t['multi']:.3f} | {speed:.2f} |")


if __name__ == "__main__":
    main()
