"""Rows per model call on the CPU: cost per row of bare forward and input-gradient passes at fixed
chunk sizes and at what ``batch_size="auto"`` picks (``explain_callbacks._internal.batching``).

    .venv/bin/python benchmarks/bench_chunks.py [--threads 2] [--repeats 7]

Prints a Markdown table: ms per row (best of ``--repeats`` passes over 512 rows after a warm-up), the
fastest fixed size in bold, the auto choice and its cost relative to the fastest fixed size. Models are
untrained (the cost does not depend on the weights): the SmallCNN of the examples at several widths and
input sizes, a residual block, an MLP.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import bare_pass, timed  # a sibling module: the benchmarks run as scripts

from explain_callbacks._internal.batching import activation_elements, resolve_batch_size
from explain_callbacks.models.nets import MLP, SmallCNN

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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
        auto = resolve_batch_size("auto", net, x)
        acts = activation_elements(net, x[:1])
        for grad in (False, True):
            fixed = [per_row_ms(net, x, r, grad, args.repeats) for r in SIZES]
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
