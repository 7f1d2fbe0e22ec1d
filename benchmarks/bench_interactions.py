"""NID benchmark of pairwise interaction methods, and the cost of batched contextual decomposition.

1. For each of the ten synthetic functions of Tsang et al. 2018 (explain_callbacks.datasets.nid), an
   MLP (10-140-100-60-20-1, ReLU, as in the NID paper) is trained through Lightning (MSE, Adam with
   a one-cycle schedule; the ten independent MLPs are trained in one Lightning loop as batched
   matmuls, which gives each exactly the updates it would get alone, ten times faster on a CPU).
   Every interaction method scores the 45 variable pairs of ``--n-explain`` test samples; the
   per-sample matrices are aggregated as the mean absolute value over samples and the
   pairs are ranked against the ground truth (a pair is true when both variables share an
   interacting set): ROC AUC per function, its mean, and the time each method spent.
2. The cost of CD over 64 feature groups of one input against one forward pass of 64 inputs, on the
   NID MLP (64 random feature subsets) and on SmallCNN (digits-sized 32x32 input, an 8x8 grid of
   4x4 patches), median of repeated runs, measured side by side.

Run: ``.venv/bin/python benchmarks/bench_interactions.py`` (about 5 minutes on 2 CPU cores);
``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from explain_callbacks.datasets.nid import NIDDataModule, nid_function
from explain_callbacks.interaction import (
    CDInteraction,
    HSICInteraction,
    IntegratedHessians,
    SobolInteraction,
    cd_batched,
    make_groups,
    pair_auc,
)
from explain_callbacks.models import MLP, SmallCNN


class TrueFunction(nn.Module):
    """F_k itself as a model (float64 inside), to measure the methods without model error."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        return nid_function(self.k, x.double()).to(x.dtype).unsqueeze(1)


class StackedMLP(nn.Module):
    """F independent ReLU MLPs evaluated together (batched matmuls): input (F, B, d) -> (F, B, 1)."""

    def __init__(self, n_models: int, sizes: Sequence[int], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in itertools.pairwise(sizes):
            bound = 1 / math.sqrt(d_in)  # nn.Linear's default initialisation
            self.weights.append(nn.Parameter((torch.rand(n_models, d_in, d_out, generator=g) * 2 - 1) * bound))
            self.biases.append(nn.Parameter((torch.rand(n_models, 1, d_out, generator=g) * 2 - 1) * bound))

    def forward(self, x: Tensor) -> Tensor:
        n = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < n - 1:
                x = torch.relu(x)
        return x

    def extract(self, f: int) -> MLP:
        """Model f as a standard :class:`MLP` (same weights)."""
        sizes = [w.shape[1] for w in self.weights] + [self.weights[-1].shape[2]]
        mlp = MLP(sizes[0], sizes[-1], hidden=tuple(sizes[1:-1]))
        linears = [m for m in mlp.net if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for lin, w, b in zip(linears, self.weights, self.biases):
                lin.weight.copy_(w[f].t())
                lin.bias.copy_(b[f, 0])
        return mlp.eval()


class NIDStack(pl.LightningModule):
    """One independent regression MLP per NID function, trained in one Lightning loop: the loss is
    the sum of the per-function MSEs and Adam is elementwise, so each MLP follows exactly the
    updates it would get alone (same batches, same learning-rate schedule)."""

    def __init__(self, n_models: int, sizes: Sequence[int], lr: float, seed: int) -> None:
        super().__init__()
        self.net = StackedMLP(n_models, sizes, seed)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch  # (B, F, 10), (B, F)
        pred = self.net(x.transpose(0, 1)).squeeze(-1)  # (F, B)
        loss = F.mse_loss(pred, y.t(), reduction="none").mean(1).sum()
        self.log("train/loss", loss / y.shape[1], prog_bar=False)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return [opt], [{"scheduler": sched, "interval": "step"}]


def train_nid(
    functions: list[int], args: argparse.Namespace
) -> tuple[list[list[MLP]], list[NIDDataModule], list[float]]:
    """Train ``args.ensemble`` MLPs per function (10-140-100-60-20-1, ReLU, different initialisations)
    through Lightning; returns the MLPs per function, the data modules and the mean test R²."""
    pl.seed_everything(args.seed, verbose=False)
    dms = []
    for k in functions:
        dm = NIDDataModule(function=k, n_samples=args.n_samples, seed=k)
        dm.setup()
        dms.append(dm)
    m = args.ensemble
    x = torch.stack([dm.train_set.tensors[0] for dm in dms for _ in range(m)], 1)
    y = torch.stack([dm.train_set.tensors[1] for dm in dms for _ in range(m)], 1)
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    lit = NIDStack(len(functions) * m, (10, 140, 100, 60, 20, 1), args.lr, seed=args.seed)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(lit, train_dataloaders=loader)
    nets, r2s = [], []
    for f, dm in enumerate(dms):
        members = [lit.net.extract(f * m + j) for j in range(m)]
        xt, yt = dm.test_set.tensors
        with torch.no_grad():
            r2 = [1 - float(((net(xt).squeeze(-1) - yt) ** 2).mean() / yt.var()) for net in members]
        r2s.append(sum(r2) / m)
        nets.append(members)
    return nets, dms, r2s


def explain_all(nets: list[MLP], dm: NIDDataModule, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    x = dm.test_set.tensors[0][: args.n_explain]
    mean = dm.train_set.tensors[0].mean(0, keepdim=True)  # the data mean as baseline / substrate
    methods = {
        "cd": CDInteraction(batch_size=4096),
        "integrated_hessians": IntegratedHessians(n_steps=args.ih_steps, baseline=mean, batch_size=8192),
        "sobol": SobolInteraction(n_designs=args.sobol_designs, substrate=mean, batch_size=8192),
        "hsic": HSICInteraction(n_designs=args.hsic_designs, batch_size=8192, substrate=mean),
    }
    truth = dm.truth
    out = {}
    # reference: the same integrated Hessians on the true function (no model error)
    t0 = time.perf_counter()
    g_true = IntegratedHessians(n_steps=args.ih_steps, baseline=mean, softplus_beta=None)(TrueFunction(dm.function), x)
    out["ih_true_f"] = (pair_auc(g_true.abs().mean(0), truth), time.perf_counter() - t0)
    for name, method in methods.items():
        t0 = time.perf_counter()
        scores = torch.stack([method(net, x, None) for net in nets]).mean(0)  # ensemble mean per sample
        dt = time.perf_counter() - t0
        agg = scores.detach().abs().mean(0)
        out[name] = (pair_auc(agg, truth), dt)
    return out


def median_time(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def cd_cost_table() -> list[tuple[str, float, float]]:
    rows = []
    torch.manual_seed(0)
    mlp = MLP(10, 1, hidden=(140, 100, 60, 20)).eval()
    cnn = SmallCNN(1, 10).eval()
    cases = [
        ("NID MLP 10-140-100-60-20-1, 64 random feature subsets", mlp, (10,), (torch.rand(64, 10) > 0.5).float()),
        ("SmallCNN 1x32x32, 64 patches (8x8 grid of 4x4)", cnn, (1, 32, 32), None),
    ]
    for label, net, shape, masks in cases:
        x1 = torch.randn(1, *shape)
        x64 = torch.randn(64, *shape)
        if masks is None:
            masks = make_groups(x1, 8).masks
        with torch.no_grad():
            tf = median_time(lambda net=net, x64=x64: net(x64))
            tc = median_time(lambda net=net, x1=x1, masks=masks: cd_batched(net, x1, masks))
        rows.append((label, tf * 1e3, tc * 1e3))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--functions", type=int, nargs="*", default=list(range(1, 11)))
    p.add_argument("--n-samples", type=int, default=40000, help="per function, split 70/15/15")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch order of the MLPs")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-2, help="peak of the one-cycle schedule")
    p.add_argument("--ensemble", type=int, default=1, help="MLPs per function (scores averaged per sample)")
    p.add_argument("--n-explain", type=int, default=100)
    p.add_argument("--ih-steps", type=int, default=6)
    p.add_argument("--sobol-designs", type=int, default=32)
    p.add_argument("--hsic-designs", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    p.add_argument("--quick", action="store_true", help="3 functions, 5 epochs")
    args = p.parse_args()
    if args.quick:
        args.functions, args.epochs, args.n_samples = [1, 5, 10], 5, 3000
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    names = ["cd", "integrated_hessians", "sobol", "hsic", "ih_true_f"]
    aucs: dict[str, list[float]] = {n: [] for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    rows = []
    t_start = time.perf_counter()
    nets, dms, r2s = train_nid(args.functions, args)
    t_train = time.perf_counter() - t_start
    print(f"trained {len(nets)} MLPs in {t_train:.0f}s")
    for k, net, dm, r2 in zip(args.functions, nets, dms, r2s):
        res = explain_all(net, dm, args)
        for n in names:
            aucs[n].append(res[n][0])
            times[n].append(res[n][1])
        rows.append((k, r2, t_train, [res[n][0] for n in names]))
        print(f"F{k}: test R2 {r2:.4f}, " + ", ".join(f"{n} {res[n][0]:.3f} ({res[n][1]:.1f}s)" for n in names))

    print(f"\n## NID pair-ranking AUC ({args.n_explain} test samples per function, mean |score| over samples)\n")
    print("(last column: integrated Hessians on the true function F_k instead of the trained MLP)\n")
    print("| function | test R² | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for k, r2, _, vals in rows:
        print(f"| F{k} | {r2:.3f} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    print("| **mean** | | " + " | ".join(f"**{sum(aucs[n]) / len(aucs[n]):.3f}**" for n in names) + " |")
    print("| time per function (s) | | " + " | ".join(f"{sum(times[n]) / len(times[n]):.2f}" for n in names) + " |")

    print("\n## Cost of CD over 64 feature groups vs one forward pass of 64 inputs\n")
    print("| model | forward of 64 inputs (ms) | CD of 64 groups (ms) | ratio |")
    print("|---|---|---|---|")
    for label, tf, tc in cd_cost_table():
        print(f"| {label} | {tf:.2f} | {tc:.2f} | {tc / tf:.2f}x |")
    print(
        f"\n(torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"total {time.perf_counter() - t_start:.0f}s)"
    )


if __name__ == "__main__":
    main()
