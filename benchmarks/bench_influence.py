"""Cost of TracIn (``analysis.tracin_scores`` / ``InfluenceMonitor``) per monitored epoch.

The work of one InfluenceMonitor epoch is one checkpoint of TracIn: per-sample gradients of the probe set
and of the training subset, their inner products and the self-influence. It is timed

1. against one training epoch of the same model on the full training set (forward, backward, Adam step,
   batches of 64): what the monitor adds to an epoch ("monitor epoch": each gradient computed once, as the
   callback does);
2. against Captum's ``TracInCP`` doing the same work as ``tracin_scores`` + ``self_influence`` ("ours": the
   functional twins; each, like Captum's ``influence`` and ``self_influence``, computes the training
   gradients), with one checkpoint file, the same layers, loss, training subset and probe.

Model: ``SmallCNN`` (width 16) on scikit-learn's digits upsampled to 1x32x32 (1797 training rows).
Settings: training subset ``--num-train`` (256), probe ``--num-probe`` (8), rows per call 64; layers "last"
(the head's Linear), all parameters, and all parameters projected to 128 dimensions.
Medians of ``--repeats`` interleaved runs, one torch thread. Run:
``.venv/bin/python benchmarks/bench_influence.py`` (under a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling _timing, also when loaded by path
from _timing import median_time

from explain_callbacks._internal.guard import model_guard
from explain_callbacks.analysis import (
    RandomProjection,
    layer_parameters,
    per_sample_gradients,
    self_influence,
    tracin_scores,
)
from explain_callbacks.models import SmallCNN


def digits_32() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return F.interpolate(x, size=32, mode="bilinear", align_corners=False), torch.tensor(d.target)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-train", type=int, default=256)
    ap.add_argument("--num-probe", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-captum", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = digits_32()
    model = SmallCNN(1, 10).eval()
    gen = torch.Generator().manual_seed(0)
    sub = torch.randperm(len(y), generator=gen)[: args.num_train]
    tx, ty = x[sub], y[sub]
    px, py = x[: args.num_probe], y[: args.num_probe]

    train_model = SmallCNN(1, 10)
    opt = torch.optim.Adam(train_model.parameters(), lr=1e-3)

    def train_epoch() -> None:
        train_model.train()
        for s in range(0, len(y), 64):
            opt.zero_grad()
            F.cross_entropy(train_model(x[s : s + 64]), y[s : s + 64]).backward()
            opt.step()

    configs: dict[str, dict] = {
        "last layer (650 params)": {"layers": ["head.3"]},
        "all params (24k)": {"layers": None},
        "all params, proj 128": {"layers": None, "projection_dim": 128},
    }

    def ours(kw: dict) -> Callable[[], object]:
        def run() -> None:
            tracin_scores(model, tx, ty, px, py, layers=kw["layers"], projection_dim=kw.get("projection_dim"),
                          batch_size=64)  # fmt: skip
            self_influence(model, tx, ty, layers=kw["layers"], projection_dim=kw.get("projection_dim"), batch_size=64)

        return run

    def monitor(kw: dict) -> Callable[[], object]:
        """What InfluenceMonitor does per due epoch: each gradient once, scores and self-influence from them."""
        names = layer_parameters(model, kw["layers"])
        dim = sum(dict(model.named_parameters())[n].numel() for n in names)
        proj = RandomProjection(dim, kw["projection_dim"]) if kw.get("projection_dim") else None

        def run() -> None:
            with model_guard(model):
                g_p = per_sample_gradients(model, px, py, names=names, projection=proj, batch_size=64)
                g_t = per_sample_gradients(model, tx, ty, names=names, projection=proj, batch_size=64)
                (g_p @ g_t.T).double(), g_t.double().pow(2).sum(1)

        return run

    fns: dict[str, Callable[[], object]] = {"train epoch": train_epoch}
    fns.update({f"monitor epoch: {k}": monitor(kw) for k, kw in configs.items()})
    fns.update({f"ours: {k}": ours(kw) for k, kw in configs.items()})
    tmp = tempfile.TemporaryDirectory()
    if not args.no_captum:
        from captum.influence import TracInCP

        path = Path(tmp.name) / "ckpt.pt"
        torch.save(model.state_dict(), path)

        def load(m: nn.Module, p: str) -> float:
            m.load_state_dict(torch.load(p, weights_only=True))
            return 1.0

        def captum(kw: dict) -> Callable[[], object]:
            layers = None if kw["layers"] is None else list(kw["layers"])

            def run() -> None:
                ref = SmallCNN(1, 10).eval()
                t = TracInCP(ref, torch.utils.data.TensorDataset(tx, ty), [str(path)], checkpoints_load_func=load,
                             layers=layers, loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=64)  # fmt: skip
                t.influence((px, py))
                t.self_influence(outer_loop_by_checkpoints=True)

            return run

        for k, kw in configs.items():
            if "proj" not in k:  # TracInCP has no projection (TracInCPFastRandProj is last-layer only)
                fns[f"captum: {k}"] = captum(kw)
        # same numbers, checked before timing
        a = tracin_scores(model, tx, ty, px, py, layers=["head.3"])
        r = SmallCNN(1, 10).eval()
        t = TracInCP(r, torch.utils.data.TensorDataset(tx, ty), [str(path)], checkpoints_load_func=load,
                     layers=["head.3"], loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=64)  # fmt: skip
        b = t.influence((px, py))
        err = float((a.float() - b).abs().max() / b.abs().max())
        print(f"max |ours - captum| / max |captum| (last layer): {err:.2e}")
    times = median_time(fns, args.repeats)
    epoch = times["train epoch"]
    print(f"\nTracIn, one checkpoint: {args.num_train} training rows x {args.num_probe} probe rows, SmallCNN on "
          f"1x32x32, {args.threads} thread(s); training epoch = {len(y)} rows\n")  # fmt: skip
    print(f"| {'work':40s} | seconds | x train epoch | x ours |")
    print("|---|---|---|---|")
    for k, v in times.items():
        mine = times.get("ours: " + k.split(": ", 1)[-1]) if k.startswith("captum") else None
        rel = f"{v / mine:.2f}" if mine else ""
        print(f"| {k:40s} | {v:7.3f} | {v / epoch:13.2f} | {rel:6s} |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
