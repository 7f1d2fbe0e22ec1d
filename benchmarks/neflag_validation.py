"""NeFLAG variants against IG on the 270 *validation* digits (for choosing settings; never the test digits).

The network is bench_blackbox's: ``train_cnn(10)`` (SmallCNN, 10 epochs, seed 0, the same weights as
the benchmark's); the digits are ``dm.val_set``, disjoint from its training and test digits.
Score: insertion − deletion AUC (``metrics.functional.insertion_deletion``, its defaults: ties broken
in a seeded random order), per image, paired against IG (32 steps, ``completeness=False``). Each
variant runs with NeFLAG seeds 0, 1, 2; "pooled" averages the three seeds' paired differences per
image, then takes the mean and its standard error over the 270 images.

    python benchmarks/neflag_validation.py                      # the built-in list (about 12 minutes: run it in parts)
    python benchmarks/neflag_validation.py --only scale,diag    # names starting with these

Scores are cached in ``--cache`` (a JSON file keyed by variant and seed) so a long list can be run in
several short calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_blackbox as bb

from explain_callbacks._internal import model_guard
from explain_callbacks.attribution import IntegratedGradients, NeFLAG, Saliency
from explain_callbacks.metrics.functional import insertion_deletion

SEEDS = (0, 1, 2)


def variants() -> dict[str, object]:
    """name → a callable (seed) -> NeFLAG, or a diagnostic map function (net, x, y, seed) -> map."""

    def neflag(**kw):
        return lambda seed: NeFLAG(n_points=20, seed=seed, **kw)

    def descent_times_input(net, x, y, seed):  # diagnostic only, not a method
        return NeFLAG(n_points=20, seed=seed)(net, x, y) * x

    def saliency_times_input(net, x, y, seed):  # gradient × input, 1 pass (deterministic)
        return Saliency()(net, x, y) * x

    def abs_saliency_times_input(net, x, y, seed):  # |gradient × input|: the sign-less limit of "scale"
        return (Saliency()(net, x, y) * x).abs()

    out: dict[str, object] = {"input (default)": neflag()}
    for r in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3):
        out[f"scale r={r}"] = neflag(coordinates="scale", radius=r)
    out["diag: descent map × input"] = descent_times_input
    out["diag: gradient × input"] = saliency_times_input
    out["diag: |gradient × input|"] = abs_saliency_times_input
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated name prefixes")
    ap.add_argument("--cache", default="/tmp/neflag_validation_scores.json")
    ap.add_argument("--extra", default="", help="'name:kwargs;…' extra NeFLAG(n_points=20, **kwargs) variants")
    args = ap.parse_args()
    torch.set_num_threads(1)
    net, dm, acc, _ = bb.train_cnn(10)
    x, y = dm.val_set.tensors
    print(f"SmallCNN test accuracy {acc:.4f}; {x.shape[0]} validation digits\n", flush=True)
    cache_path = Path(args.cache)
    cache: dict = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if cache.get("accuracy") != acc:
        cache = {"accuracy": acc, "scores": {}}
    scores: dict[str, list[float]] = cache["scores"]

    def score(a: torch.Tensor) -> list[float]:
        return insertion_deletion(net, x, a, y).double().tolist()

    only = [o for o in args.only.split(",") if o]
    vs = {k: v for k, v in variants().items() if not only or any(k.startswith(o) for o in only)}
    for spec in filter(None, args.extra.split(";")):
        name, kw_text = spec.split(":", 1)
        vs[name] = (lambda kw: lambda seed: NeFLAG(n_points=20, seed=seed, **kw))(eval(f"dict({kw_text})"))
    with model_guard(net):
        if "IG" not in scores:
            scores["IG"] = score(IntegratedGradients(n_steps=32, completeness=False)(net, x, y))
        ig = torch.tensor(scores["IG"], dtype=torch.float64)
        print(f"IG (32 steps): {ig.mean():.4f} ± {ig.std() / ig.numel() ** 0.5:.4f}\n", flush=True)
        for name, v in vs.items():
            diffs, line = [], []
            for seed in SEEDS:
                key = f"{name}|s{seed}"
                if key not in scores:
                    t = time.process_time()
                    if callable(v) and v.__code__.co_argcount == 4:
                        a = v(net, x, y, seed)
                        passes = "–"
                    else:
                        m = v(seed)
                        a = m(net, x, y)
                        passes = m.n_forwards(())
                    scores[key] = score(a)
                    cache_path.write_text(json.dumps(cache))
                    print(f"  {key}: passes {passes}, {time.process_time() - t:.0f} s", flush=True)
                d = torch.tensor(scores[key], dtype=torch.float64) - ig
                diffs.append(d)
                line.append(f"{float(d.mean()):+.4f} ± {float(d.std() / d.numel() ** 0.5):.4f}")
            pooled = torch.stack(diffs).mean(0)
            mu, se = float(pooled.mean()), float(pooled.std() / pooled.numel() ** 0.5)
            s_mean = float(torch.tensor(scores[f"{name}|s0"]).mean())
            print(f"{name:30s} score(s0) {s_mean:.4f}  − IG per seed {' / '.join(line)}  "
                  f"pooled {mu:+.4f} ± {se:.4f} (z = {mu / se:+.1f})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
