"""Cost of energy-landscape conserved weights (``analysis.landscape_analysis`` / ``LandscapeMonitor``).

The work is ``1 + n_hops (+ snapshots)`` L-BFGS minimisations of the full-batch loss on the training subset, in
float64, each to a gradient norm of ``gtol`` (1e-4), then alignment (one Hungarian matching per hidden layer and
minimum), deduplication and scoring. The table gives, per setting, the number of minimisations, loss-and-gradient
evaluations, seconds of the sampling and of the rest, seconds per minimisation, the unique minima, and whether
the three driving features of the synthetic task (3 of 20 drive the label) rank first; one training epoch of the
same model (Adam, batches of 64) is timed beside it for scale.

Models: tanh MLPs 20 -> H -> 2 (H = 16, 64) and 20 -> 32 -> 32 -> 2, trained 300 full-batch Adam steps on
``--num-train`` (512) rows. One torch thread. Run: ``.venv/bin/python benchmarks/bench_landscape.py`` (under a
minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from explain_callbacks.analysis import landscape_analysis

DRIVERS = {2, 7, 13}


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 20, generator=g)
    return x, ((x[:, 2] + x[:, 7] - x[:, 13]) > 0).long()


def trained(widths: list[int], x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    d = 20
    for w in widths:
        layers += [nn.Linear(d, w), nn.Tanh()]
        d = w
    model = nn.Sequential(*layers, nn.Linear(d, 2))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def epoch_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    import copy

    m = copy.deepcopy(model)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    start = time.perf_counter()
    for s in range(0, x.shape[0], 64):
        opt.zero_grad()
        F.cross_entropy(m(x[s : s + 64]), y[s : s + 64]).backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--hops", type=int, nargs="+", default=[5, 20])
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = data(args.num_train)
    print("| model | hops | minimisations | evaluations | sampling s | s / minimisation | rest s | unique "
          "| drivers first | epoch s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for widths in ([16], [64], [32, 32]):
        model = trained(widths, x, y)
        ep = epoch_seconds(model, x, y)
        for hops in args.hops:
            start = time.perf_counter()
            res = landscape_analysis(model, x, y, n_hops=hops, weight_decay=1e-3, seed=0)
            total = time.perf_counter() - start
            s = res.sample
            name = "20-" + "-".join(map(str, widths)) + "-2"
            first = set(res.ranking[:3].tolist()) == DRIVERS
            print(f"| {name} | {hops} | {s.n_minimisations} | {s.n_evaluations} | {s.seconds:.2f} | "
                  f"{s.seconds / s.n_minimisations:.3f} | {total - s.seconds:.3f} | {res.n_unique} | {first} | "
                  f"{ep:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
