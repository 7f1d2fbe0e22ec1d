"""Attribution regularizers on DecoyDigits and ColorDigits: accuracy, step time and memory versus vanilla.

    .venv/bin/python benchmarks/bench_regularizers.py            # full: 2 data sets x 6 rows x 3 seeds (~15 min)
    .venv/bin/python benchmarks/bench_regularizers.py --quick    # DecoyDigits, 1 seed, 8 epochs (under a minute)
    .venv/bin/python benchmarks/bench_regularizers.py --tune     # the λ sweep (seed 100, validation split)

Every run composes the Hydra experiment config of its row (``conf/experiment/<data>_<row>.yaml``, the
same one ``python examples/train.py experiment=<data>_<row> seed=<s>`` trains) and instantiates data,
model, regularizer callbacks and trainer from it; the benchmark adds only its probes and turns off
logging, checkpointing and validation. Rows:

- clean: the spurious feature present but uninformative (random patch intensities / colours);
- vanilla: trained on the spurious correlation;
- CDEP (authors' softmax form and the paper's L1 form), RRR, EG region prior (k = 1 per step).

Reported per row: test accuracy (mean ± sd over seeds, test rule: DecoyDigits patch 25y, ColorDigits
colour of 9 − y), the median wall time of a training step (forward, penalty, backward, optimizer step:
``on_train_batch_start`` to ``on_train_batch_end``) and of a training epoch, each divided by the
vanilla run of the same seed and data set (runs interleaved: seed-major, so slow periods of a shared
machine hit every row alike), and the memory of the tensors the autograd graph holds for backward
in one step (unique storages, parameters excluded: the activation memory a penalty adds; CPU
PyTorch has no allocator statistics), also relative to vanilla.

λ tuning (``--tune``): each penalty over a grid on a separate seed (100), scored by accuracy on the
validation split built with the *test* rule (a held-out set that reveals the shortcut, disjoint from
the test split); the best λ per penalty and data set is what the experiment configs hold.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import Tensor, nn

from explain_callbacks.callbacks._logging import markdown_table

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

ROWS = ["clean", "vanilla", "cdep", "cdep_l1", "rrr", "eg"]
LABELS = {
    "clean": "clean (uninformative feature)",
    "vanilla": "vanilla",
    "cdep": "CDEP (softmax, authors' code)",
    "cdep_l1": "CDEP (‖β‖₁, paper)",
    "rrr": "RRR",
    "eg": "EG region prior (k=1)",
}
DATASETS = {"decoy": "DecoyDigits", "color": "ColorDigits"}
# Reported by the CDEP paper (Rieger et al. 2020, Table): test accuracy on DecoyMNIST / ColorMNIST.
PAPER = {
    "decoy": {"vanilla": "60.1", "cdep": "97.2", "rrr": "99.0", "eg": "97.8"},
    "color": {"vanilla": "~0", "cdep": "31"},
}
GRID = {
    "cdep": [100.0, 300.0, 1000.0, 3000.0],
    "cdep_l1": [0.3, 1.0, 3.0, 10.0, 30.0],
    "rrr": [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0],
    "eg": [0.03, 0.1, 1.0, 10.0, 30.0, 100.0],
}
VAL_RULE = {"decoy": "data.val_decoy=inverse", "color": "data.val_color=inverse"}
WEIGHT_KEY = {"cdep": "cdep", "cdep_l1": "cdep", "rrr": "rrr", "eg": "eg_prior"}


# ---------------------------------------------------------------------- probes
class StepTimer(pl.Callback):
    """Wall time of every training step and epoch."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []
        self.epochs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((trainer.current_epoch, time.perf_counter() - self._t))

    def on_train_epoch_start(self, trainer, pl_module):
        self._e = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append(time.perf_counter() - self._e)

    def median_step(self) -> float:
        later = [t for e, t in self.steps if e > 0] or [t for _, t in self.steps]
        return statistics.median(later)

    def median_epoch(self) -> float:
        return statistics.median(self.epochs[1:] or self.epochs)


class SavedTensorBytes(pl.Callback):
    """Bytes of the tensors saved for backward during one training step (batch ``at`` of epoch 0):
    unique storages, parameters excluded."""

    def __init__(self, at: int = 1) -> None:
        self.at = at
        self.bytes = 0
        self._ctx: Any = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch != 0 or batch_idx != self.at:
            return
        params = {p.untyped_storage().data_ptr() for p in pl_module.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s.nbytes()
            return t

        self._seen = seen
        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None
            self.bytes = sum(self._seen.values())


# ---------------------------------------------------------------------- one run
def compose_row(ds: str, row: str, seed: int, epochs: int, extra: list[str]) -> Any:
    overrides = [
        f"experiment={ds}_{row}",
        f"seed={seed}",
        f"trainer.max_epochs={epochs}",
        f"paths.output_dir={tempfile.gettempdir()}/bench_regularizers",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def run(ds: str, row: str, seed: int, epochs: int, extra: list[str] | None = None, validate: bool = False) -> dict:
    cfg = compose_row(ds, row, seed, epochs, extra or [])
    pl.seed_everything(seed, verbose=False)
    dm = instantiate(cfg.data)
    model = instantiate(cfg.model)
    regs = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    timer, mem = StepTimer(), SavedTensorBytes()
    trainer = instantiate(
        cfg.trainer,
        callbacks=[*regs, timer, mem],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    out = {
        "data": ds,
        "row": row,
        "seed": seed,
        "weight": regs[0].weight if regs else None,
        "step_s": timer.median_step(),
        "epoch_s": timer.median_epoch(),
        "saved_bytes": mem.bytes,
    }
    ev = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    if validate:
        out["val_acc"] = float(ev.validate(model, dataloaders=dm.val_dataloader(), verbose=False)[0]["val/acc"])
    else:
        out["test_acc"] = float(ev.test(model, datamodule=dm, verbose=False)[0]["test/acc"])
    return out


# ---------------------------------------------------------------------- interleaved step cost
def step_costs(rounds: int, archs: list[str], compiled: bool = False) -> str:
    """Median CPU time of the process for one training step (forward, penalty, backward, Adam step) per penalty, the
    steps of all rows interleaved round by round on the same DecoyDigits batches (rotating order),
    so that a busy machine slows every row alike; Lightning's own per-step overhead is left out
    (the ratio is the stricter for it). CDEP three ways: the (β, γ) form of the reference (``streams="pair"``),
    the default (z, β) form beside the task's own forward, and the task's logits served by the CD pass
    (``return_logits=True``, what ``AttributionRegularizer(serve_forward=True)`` does). Reported: the median
    step with its min–max, and the median and min–max over rounds of the step / the same round's vanilla step.
    ``compiled``: also the served CDEP step with the decomposition's rules compiled (``compiled=True``), compiled
    before the timed rounds (the one-off compilation time is printed, not timed)."""
    import copy

    import torch.nn.functional as F

    from explain_callbacks.models import MLP, DecoyCNN, SmallCNN
    from explain_callbacks.regularize.functional import cdep_penalty

    cfg = compose_row("decoy", "vanilla", 0, 1, [])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batches = [b for _, b in zip(range(8), dm.train_dataloader())]
    pens = {"vanilla": (None, 0.0)}
    for row in ("cdep", "cdep_l1", "rrr", "eg"):
        (entry,) = compose_row("decoy", row, 0, 1, []).callbacks.values()
        cb = instantiate(entry)
        pens[row] = (cb.penalty, cb.weight)
    rows = ["vanilla", "cdep_pair", "cdep", "cdep_served", "cdep_l1", "cdep_l1_served", "rrr", "eg"]
    if compiled:
        rows.insert(4, "cdep_served_compiled")
    labels = {
        "cdep_served_compiled": "CDEP (softmax), served, rules compiled (`compiled=True`)",
        **LABELS,
        "cdep_pair": "CDEP (softmax), (β, γ) streams: the previous form",
        "cdep": "CDEP (softmax), (z, β) streams, task forward separate",
        "cdep_served": "CDEP (softmax), task forward served by the CD pass",
        "cdep_l1": "CDEP (‖β‖₁), task forward separate",
        "cdep_l1_served": "CDEP (‖β‖₁), task forward served by the CD pass",
    }

    def step(
        row: str, net: nn.Module, opt: torch.optim.Optimizer | None, x: Tensor, y: Tensor, m: Tensor, i: int
    ) -> None:
        base = row.removesuffix("_compiled").removesuffix("_served").removesuffix("_pair")
        pen, lam = pens[base]
        if row.endswith(("_served", "_compiled")):
            logits, r = cdep_penalty(
                net, x, m, form=pen.form, bias_at_zero=pen.bias_at_zero, return_logits=True,
                compiled=row.endswith("_compiled"),
            )  # fmt: skip
            loss = F.cross_entropy(logits, y) + lam * r
        else:
            loss = F.cross_entropy(net(x), y)
            if row == "cdep_pair":
                r = cdep_penalty(net, x, m, form=pen.form, bias_at_zero=pen.bias_at_zero, streams="pair")
                loss = loss + lam * r
            elif pen is not None:
                loss = loss + lam * pen(net, x, y, m, step=i)
        if opt is None:  # compilation warm-up
            loss.backward()
            return
        opt.zero_grad()
        loss.backward()
        opt.step()

    out = []
    for arch in archs:
        torch.manual_seed(0)
        makers = {"MLP": lambda: MLP(1024, 10, hidden=(256, 256)), "SmallCNN": lambda: SmallCNN(in_channels=1)}
        base = makers.get(arch, lambda: DecoyCNN(1, size=32))()  # DecoyCNN: the CDEP paper's network
        nets = {row: copy.deepcopy(base) for row in rows}
        opts = {row: torch.optim.Adam(n.parameters(), lr=1e-3) for row, n in nets.items()}
        times: dict[str, list[float]] = {row: [] for row in rows}
        if compiled:  # compile on the first two batches (shapes, then dynamic shapes), outside the timed rounds
            t0 = time.perf_counter()
            for i in range(2):
                step("cdep_served_compiled", copy.deepcopy(base), None, *batches[i], i)
            print(f"{arch}: compiling the CD rules took {time.perf_counter() - t0:.0f} s (wall)", flush=True)
        for i in range(rounds + 2):
            x, y, m = batches[i % len(batches)]
            for row in rows[i % len(rows) :] + rows[: i % len(rows)]:
                t0 = time.process_time()  # CPU time: other jobs on a shared machine do not count
                step(row, nets[row], opts[row], x, y, m, i)
                if i >= 2:  # the first rounds trace and warm up
                    times[row].append(time.process_time() - t0)
        van = times["vanilla"]
        for row in rows:
            ts = times[row]
            ratios = [a / b for a, b in zip(ts, van)]
            out.append([
                arch, labels[row], f"{1000 * statistics.median(ts):.1f} ({1000 * min(ts):.0f}–{1000 * max(ts):.0f})",
                f"{statistics.median(ts) / statistics.median(van):.2f}×",
                f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})",
            ])  # fmt: skip
    return markdown_table(
        ["network", "row", "median step ms (min–max)", "vs vanilla (medians)", "per round vs vanilla (min–max)"], out
    )


# ---------------------------------------------------------------------- the paper's experiment
PAPER_ROWS = ["clean", "vanilla", "cdep", "cdep_l1", "cdep_ref", "rrr", "eg"]
PAPER_LABELS = {
    **LABELS,
    "cdep": "CDEP (softmax, ours)",
    "cdep_l1": "CDEP (‖β‖₁, ours)",
    "cdep_ref": "CDEP (authors' code)",
}
PAPER_GRID = {
    "cdep": [100.0, 1000.0],
    "cdep_l1": [0.3, 3.0],
    "cdep_ref": [100.0, 1000.0],
    "rrr": [1.0, 30.0],
    "eg": [1.0, 30.0],
}


def paper_run(
    row: str, seed: int, lam: float, epochs: int, patch: int, validate: bool = False, ref_dir: str | None = None
) -> dict:
    """One run of the CDEP paper's DecoyMNIST protocol on DecoyDigits (28×28, the decoy a ``patch``×``patch``
    corner patch; :class:`~explain_callbacks.models.DecoyCNN`; Adam, lr 1e-3, weight decay 1e-4, batch 64, as
    ``train_mnist_decoy.py``), a plain PyTorch loop like the authors' script. ``cdep_ref`` uses the authors'
    own CD and penalty expression (``benchmarks/cdep_reference.py``, needs ``ref_dir``). Scored on the
    test split (inverse intensities) or, with ``validate``, on the validation split built with the test
    rule (for λ)."""
    import torch.nn.functional as F

    from explain_callbacks.datasets.decoy import DecoyDigitsDataModule
    from explain_callbacks.models import DecoyCNN
    from explain_callbacks.regularize.penalties import build_penalty

    dm = DecoyDigitsDataModule(
        size=28, patch_size=patch, batch_size=64, seed=seed, decoy="random" if row == "clean" else "label",
        val_decoy="inverse",
    )  # fmt: skip
    dm.setup("fit")
    pen: Any = None
    if row in ("cdep", "cdep_l1"):
        pen = build_penalty({"name": "cdep", "form": "l1" if row == "cdep_l1" else "softmax"})
    elif row == "cdep_ref":
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        import cdep_reference

        ref = cdep_reference.load_reference(ref_dir)
        if ref is None:
            raise SystemExit("the cdep_ref row needs --ref-dir")
        pen = cdep_reference.reference_penalty(ref)
    elif row == "rrr":
        pen = build_penalty("rrr")
    elif row == "eg":
        pen = build_penalty("eg_mask")
    torch.manual_seed(seed)
    net = DecoyCNN(size=28)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    steps: list[float] = []
    for _ in range(epochs):
        net.train()
        for x, y, m in dm.train_dataloader():
            t0 = time.perf_counter()
            loss = F.cross_entropy(net(x), y)
            if pen is not None:
                loss = loss + lam * pen(net, x, y, m)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps.append(time.perf_counter() - t0)
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y, *_ in dm.val_dataloader() if validate else dm.test_dataloader():
            correct += int((net(x).argmax(1) == y).sum())
            total += len(y)
    key = "val_acc" if validate else "test_acc"
    return {"data": "paper", "row": row, "seed": seed, "weight": lam if pen else None, key: correct / total,
            "step_s": statistics.median(steps), "epochs": epochs, "patch": patch}  # fmt: skip


def paper_table(results: list[dict]) -> str:
    rows = []
    for row in PAPER_ROWS:
        rs = [r for r in results if r["row"] == row and "test_acc" in r]
        if not rs:
            continue
        lam = "—" if rs[0]["weight"] is None else f"{rs[0]['weight']:g}"
        paper = {"clean": "—", "cdep_ref": PAPER["decoy"]["cdep"], "cdep_l1": PAPER["decoy"]["cdep"]}
        rows.append([PAPER_LABELS[row], lam, mean_sd([100 * r["test_acc"] for r in rs]), str(len(rs)),
                     paper.get(row, PAPER["decoy"].get(row, "—"))])  # fmt: skip
    return markdown_table(["row", "λ (validation)", "test acc % (mean ± sd)", "seeds", "paper, DecoyMNIST %"], rows)


# ---------------------------------------------------------------------- reports
def mean_sd(v: list[float]) -> str:
    if len(v) == 1:
        return f"{v[0]:.1f}"
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}"


def table(results: list[dict], datasets: list[str], rows: list[str]) -> str:
    out_rows = []
    for ds in datasets:
        base = {r["seed"]: r for r in results if r["data"] == ds and r["row"] == "vanilla"}
        for row in rows:
            rs = [r for r in results if r["data"] == ds and r["row"] == row]
            if not rs:
                continue
            acc = mean_sd([100 * r["test_acc"] for r in rs])

            def rel(key: str, rs: list[dict] = rs, base: dict = base) -> float:
                return statistics.mean(r[key] / base[r["seed"]][key] for r in rs if r["seed"] in base)

            have = base and all(r["seed"] in base for r in rs)
            mib = statistics.mean(r["saved_bytes"] for r in rs) / 2**20
            out_rows.append(
                [
                    DATASETS[ds],
                    LABELS[row],
                    "—" if rs[0]["weight"] is None else f"{rs[0]['weight']:g}",
                    acc,
                    f"{rel('step_s'):.2f}×" if have else "—",
                    f"{1000 * statistics.mean(r['step_s'] for r in rs):.1f}",
                    f"{rel('epoch_s'):.2f}×" if have else "—",
                    f"{mib:.1f} ({rel('saved_bytes'):.1f}×)" if have and base[rs[0]["seed"]]["saved_bytes"] else "—",
                    PAPER.get(ds, {}).get(row, "—"),
                ]
            )
    headers = [
        "data",
        "model",
        "λ",
        "test acc % (mean ± sd)",
        "step time vs vanilla",
        "step ms",
        "epoch time vs vanilla",
        "saved activations MiB (vs vanilla)",
        "paper (MNIST) %",
    ]
    return markdown_table(headers, out_rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="DecoyDigits, 1 seed, 8 epochs")
    ap.add_argument("--tune", action="store_true", help="sweep λ per penalty on seed 100 (validation split)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--data", nargs="+", default=None, choices=list(DATASETS))
    ap.add_argument("--rows", nargs="+", default=None, choices=[*ROWS, "cdep_ref"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=str, default=None, help="write the raw results as JSON here")
    ap.add_argument("--step-rounds", type=int, default=None, help="rounds of the interleaved step timing")
    ap.add_argument("--skip-training", action="store_true", help="only the interleaved step timing")
    ap.add_argument("--compiled", action="store_true", help="step timing: also CDEP with torch.compile'd rules")
    ap.add_argument("--step-archs", nargs="+", default=None, choices=["MLP", "SmallCNN", "DecoyCNN"],
                    help="networks of the step timing (default: MLP and SmallCNN; MLP with --quick)")
    ap.add_argument("--paper", action="store_true", help="the CDEP paper's protocol: DecoyCNN on 28x28 DecoyDigits")
    ap.add_argument("--paper-tune", action="store_true", help="with --paper: the λ search (seed 100, validation)")
    ap.add_argument("--patch", type=int, default=10, help="with --paper: side of the decoy patch on 28x28")
    ap.add_argument("--lam", type=float, nargs="+", default=None, help="with --paper: λ per row (as --rows)")
    ap.add_argument("--ref-dir", default=None, help="with --paper: the authors' code, for the cdep_ref row")
    args = ap.parse_args()
    if args.paper:
        return paper_main(args)

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets = args.data or (["decoy"] if args.quick else list(DATASETS))
    epochs = args.epochs or (8 if args.quick else 30)
    print(
        f"# bench_regularizers on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {epochs} epochs\n"
    )
    results: list[dict] = []
    t0 = time.perf_counter()
    if args.tune:
        rows = args.rows or list(GRID)
        for ds in datasets:
            for row in rows:
                for lam in GRID[row]:
                    extra = [VAL_RULE[ds], f"callbacks.{WEIGHT_KEY[row]}.weight={lam}"]
                    r = run(ds, row, 100, epochs, extra, validate=True)
                    results.append(r)
                    print(f"  tune {ds:5s} {row:8s} λ={lam:<8g} val acc {100 * r['val_acc']:.1f}", flush=True)
        tab = []
        for ds in datasets:
            for row in rows:
                rs = [r for r in results if r["data"] == ds and r["row"] == row]
                best = max(rs, key=lambda r: r["val_acc"])
                sweep = ", ".join(f"{r['weight']:g}: {100 * r['val_acc']:.1f}" for r in rs)
                tab.append([DATASETS[ds], LABELS[row], sweep, f"{best['weight']:g}"])
        print(markdown_table(["data", "penalty", "λ: val acc % (test rule, seed 100)", "best λ"], tab))
    elif not args.skip_training:
        seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
        rows = args.rows or ROWS
        for seed in seeds:
            for ds in datasets:
                for row in rows:
                    r = run(ds, row, seed, epochs)
                    results.append(r)
                    print(
                        f"  {ds:5s} {row:8s} seed {seed}: test acc {100 * r['test_acc']:.1f}, "
                        f"step {1000 * r['step_s']:.1f} ms, saved {r['saved_bytes'] / 2**20:.1f} MiB",
                        flush=True,
                    )
        print()
        print(table(results, datasets, rows))
    if not args.tune:
        rounds = args.step_rounds or (10 if args.quick else 60)
        archs = args.step_archs or (["MLP"] if args.quick else ["MLP", "SmallCNN"])
        print(f"\nTraining-step cost, interleaved ({rounds} rounds, batch 64, DecoyDigits):\n")
        print(step_costs(rounds, archs, compiled=args.compiled))
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def paper_main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs = args.epochs or 10
    rows = args.rows or [r for r in PAPER_ROWS if r != "cdep_ref" or args.ref_dir]
    results: list[dict] = []
    if args.paper_tune:
        for row in rows:
            for lam in PAPER_GRID.get(row, []):
                r = paper_run(row, 100, lam, epochs, args.patch, validate=True, ref_dir=args.ref_dir)
                results.append(r)
                print(f"  tune {row:8s} λ={lam:<8g} val acc {100 * r['val_acc']:.1f}", flush=True)
    else:
        lams = dict(zip(rows, args.lam or []))
        for seed in args.seeds or [0, 1, 2]:
            for row in rows:
                r = paper_run(row, seed, lams.get(row, 0.0), epochs, args.patch, ref_dir=args.ref_dir)
                results.append(r)
                print(f"  {row:8s} seed {seed}: test acc {100 * r['test_acc']:.1f}, step {1000 * r['step_s']:.1f} ms",
                      flush=True)  # fmt: skip
        print(paper_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
