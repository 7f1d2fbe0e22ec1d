"""Robustness of explanations: what the fragility metric costs, and what the map-stability penalty buys.

1. Cost: ``Fragility`` (top-k attack, 10 steps, as conf/metric/fragility.yaml) on 32 images 1x28x28 of a small
   ReLU CNN against a bare replay of its model work (per step one double-backward saliency under softplus(10),
   one saliency and one forward on the candidate, plus the initial prediction).
2. Cost per training step (batch 64) of the 16x16 digits CNN without and with the penalty (random δ, one ascent
   step).
3. Defence (slow: 2-7 minutes per run on a shared 2-core CPU): a small CNN trained on scikit-learn's digits (16x16,
   70 % train / 30 % held-out test, Adam, 25 epochs, seeds 0 and 1) with and without ``map_stability_penalty``
   (saliency, radius 8/255), then attacked on 100 held-out images (top-k objective, ε = 8/255, 20 steps,
   k = 10 %): the test accuracy and the top-k intersection under the attack and under random noise of the same
   ε. Settings: random δ at λ = 3 from the start and from epoch 12, and the config's default (one ascent step,
   λ = 2, from epoch 12: conf/callbacks/robust_maps.yaml, whose start_epochs is set for the main job's 10 epochs).

Medians of interleaved repeats; one torch thread by default. Run:
``.venv/bin/python benchmarks/bench_robustness.py [--skip-train] [--default-only] [--seeds 0 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling _timing, also when loaded by path
from _timing import median_time

from explain_callbacks._internal.guard import model_guard
from explain_callbacks._internal.softplus import relu_as_softplus
from explain_callbacks.analysis import fragility_attack
from explain_callbacks.attribution import Saliency
from explain_callbacks.datasets import load_digits_tensors
from explain_callbacks.datasets.tabular_images import split_indices
from explain_callbacks.metrics import Fragility
from explain_callbacks.regularize import map_stability_penalty


def digits_cnn(size: int, width: int = 32, hidden: int = 128, seed: int = 0) -> nn.Module:
    """Two conv/ReLU/max-pool blocks and a ReLU MLP head (the held-out model of the defence check)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(width, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * (size // 4) ** 2, hidden), nn.ReLU(), nn.Linear(hidden, 10),
    )  # fmt: skip


def train_digits(
    weight: float, *, size: int = 16, epochs: int = 25, radius: float = 8 / 255, width: int = 32, hidden: int = 128,
    seed: int = 0, start_epochs: int = 0, attack_steps: int = 0,
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Train :func:`digits_cnn` with cross-entropy + ``weight`` × map-stability penalty, the penalty on from the
    first batch of epoch ``start_epochs`` (as ``AttributionRegularizer(start_epochs=...)``); returns the model
    (eval mode) and the held-out test images and labels."""
    x, y = load_digits_tensors(size)
    tr, _, te = split_indices(len(x), (0.7, 0.0, 0.3), seed)
    model = digits_cnn(size, width, hidden, seed)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    g = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        perm = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(perm), 64):
            xb, yb = x[perm[i : i + 64]], y[perm[i : i + 64]]
            loss = F.cross_entropy(model(xb), yb)
            if weight and epoch >= start_epochs:
                loss = loss + weight * map_stability_penalty(
                    model, xb, yb, radius=radius, attack_steps=attack_steps, seed=step
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return model.eval(), x[te], y[te]


def defence_row(weight: float, **kw) -> dict[str, float]:
    t0 = time.perf_counter()
    model, xt, yt = train_digits(weight, **kw)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    xa = xt[:100]
    att = fragility_attack(model, xa, objective="topk", epsilon=8 / 255, steps=20, top_k=0.1)
    rnd = fragility_attack(model, xa, objective="random", epsilon=8 / 255, top_k=0.1)
    return {"weight": weight, "accuracy": acc, "topk_attack": float(att.topk_intersection.mean()),
            "topk_random": float(rnd.topk_intersection.mean()), "spearman_attack": float(att.spearman.mean()),
            "train_s": seconds}  # fmt: skip


def step_costs(repeats: int, size: int = 16, attack_steps: int = 1) -> dict[str, float]:
    """Median seconds of one training step (batch 64, forward, backward, Adam) of the digits CNN without and
    with the penalty (random perturbations / ``attack_steps`` adversarial ones)."""
    x, y = load_digits_tensors(size)
    xb, yb = x[:64], y[:64]
    model = digits_cnn(size)
    opt = torch.optim.Adam(model.parameters(), 2e-3)

    def step(**pen) -> Callable[[], None]:
        def run() -> None:
            loss = F.cross_entropy(model(xb), yb)
            if pen:
                loss = loss + map_stability_penalty(model, xb, yb, **pen)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return run

    return median_time(
        {"vanilla": step(), "random": step(attack_steps=0), "adversarial": step(attack_steps=attack_steps)}, repeats
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--default-only", action="store_true", help="vanilla and the config's default only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 5),
    ).eval()  # fmt: skip
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    sal, steps = Saliency(), 10
    maps = sal(model, x, model(x).argmax(1))

    def bare() -> None:
        with model_guard(model):
            label = model(x).argmax(1)
            for _ in range(steps):
                xg = x.detach().requires_grad_(True)
                with relu_as_softplus(10.0):
                    imp = sal(model, xg, label, create_graph=True).abs().sum(1)
                torch.autograd.grad(imp.sum(), xg)
                sal(model, x, label)
                with torch.no_grad():
                    model(x)

    def metric() -> None:
        m = Fragility(steps=steps)
        m.update(model, x, None, sal, attributions=maps)
        m.compute()

    r = median_time({"bare": bare, "metric": metric, "maps": lambda: sal(model, x, model(x).argmax(1))}, args.repeats)
    print("| what | seconds | / bare passes |")
    print("|---|---|---|")
    print(f"| saliency maps, 32 images 1x28x28 | {r['maps']:.4f} | {r['maps'] / r['bare']:.2f} |")
    print(f"| bare passes of a {steps}-step attack | {r['bare']:.4f} | 1.00 |")
    print(f"| Fragility metric ({steps} steps) | {r['metric']:.4f} | {r['metric'] / r['bare']:.2f} |")

    c = step_costs(args.repeats)
    print("\n| training step (batch 64, 16x16 digits CNN) | seconds | / vanilla |")
    print("|---|---|---|")
    names = {"vanilla": "vanilla", "random": "+ penalty, random δ", "adversarial": "+ penalty, 1 ascent step"}
    for k, what in names.items():
        print(f"| {what} | {c[k]:.4f} | {c[k] / c['vanilla']:.2f} |")
    if args.skip_train:
        return

    settings = [s for s in SETTINGS if s[0] in ("vanilla", "default")] if args.default_only else SETTINGS
    print("\n| setting | seed | test accuracy | top-k ∩ under attack | top-k ∩ under random noise "
          "| Spearman under attack | training (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for key, weight, kw in settings:
        rows = []
        for seed in args.seeds:
            row = defence_row(weight, seed=seed, **kw)
            rows.append(row)
            print(f"| {key} | {seed} | {row['accuracy']:.4f} | {row['topk_attack']:.3f} | {row['topk_random']:.3f} | "
                  f"{row['spearman_attack']:.3f} | {row['train_s']:.1f} |", flush=True)  # fmt: skip
        mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
        print(f"| **{key}** | mean | **{mean['accuracy']:.4f}** | **{mean['topk_attack']:.3f}** | "
              f"{mean['topk_random']:.3f} | {mean['spearman_attack']:.3f} | {mean['train_s']:.1f} |")  # fmt: skip


#: (name, λ, train_digits arguments); "default" is conf/callbacks/robust_maps.yaml (λ, start_epochs, the penalty's
#: own defaults: one ascent step on the map distance, radius 8/255)
SETTINGS: list[tuple[str, float, dict]] = [
    ("vanilla", 0.0, {}),
    ("random δ, λ=3", 3.0, {}),
    ("random δ, λ=3, from epoch 12", 3.0, {"start_epochs": 12}),
    ("default", 2.0, {"attack_steps": 1, "start_epochs": 12}),
]


if __name__ == "__main__":
    main()
