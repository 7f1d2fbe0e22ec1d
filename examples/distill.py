"""Distillation during training: a breast-cancer MLP into a depth-3 tree and a sparse logistic model, and a
1-D signal regressor (or a digits CNN) into an adaptive wavelet model.

    python examples/distill.py                    # breast cancer + 1-D signals (AWD), about a minute on 2 CPUs
    python examples/distill.py --part digits      # AWD on 2-D digits (SmallCNN teacher), a few minutes
    tensorboard --logdir logs/distill             # fidelity curves, the students as text, AWD filters

The same runs through Hydra: ``python examples/train.py experiment=distill_breast_cancer`` or
``experiment=distill_signals_awd``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from explain_callbacks.callbacks._logging import markdown_table
from explain_callbacks.callbacks.distiller import Distiller
from explain_callbacks.datasets import BreastCancerDataModule, DigitsDataModule
from explain_callbacks.datasets.signals import SignalDataModule
from explain_callbacks.distill import fidelity, load_student, student_score
from explain_callbacks.models import MLP, LitClassifier, SmallCNN


def _trainer(out: Path, name: str, epochs: int, distiller: Distiller) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=[distiller], deterministic=True,
        logger=TensorBoardLogger(str(out), name=name), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip


def _report(dist: Distiller, model: pl.LightningModule, x: torch.Tensor, y: torch.Tensor, task: str) -> None:
    model.eval()
    with torch.no_grad():
        teacher = model(x)
    rows = []
    for key, path in dist.exported.items():
        s = load_student(path)  # what a user would do with the exported file
        pred = s.predict(x)
        size = ", ".join(f"{k} {v}" for k, v in s.complexity().items())
        own = "accuracy" if task == "classification" else "R²"
        score = float(student_score(pred, y, task))
        rows.append([key, size, float(fidelity(pred, teacher, task)), f"{own} {score:.3f}"])
    print(markdown_table(["student", "complexity", "fidelity to teacher (test)", "own score (test)"], rows))
    teacher_score = float(student_score(teacher if task == "regression" else teacher.argmax(1), y, task))
    print(f"teacher {'accuracy' if task == 'classification' else 'R²'} on the test set: {teacher_score:.3f}\n")


def breast_cancer(out: Path, epochs: int) -> None:
    print("== Breast cancer: MLP -> depth-3 tree and sparse logistic model (at most 10 non-zeros) ==")
    pl.seed_everything(0)
    dm = BreastCancerDataModule(batch_size=32, seed=0)
    model = LitClassifier(MLP(30, 2, hidden=(64, 64), dropout=0.1), lr=3e-3)
    dist = Distiller(
        students={"tree": {"name": "tree", "max_depth": 3},
                  "sparse_logistic": {"name": "sparse_logistic", "max_nonzeros": 10}},
        buffer_size=512, every_n_epochs=15, budget=None,  # every buffered row: the students are the point
    )  # fmt: skip
    _trainer(out, "breast_cancer", epochs, dist).fit(model, dm)
    x, y = dm.test_set.tensors
    _report(dist, model, x, y, "classification")
    print(dist.students["tree"].describe(), "\n")
    print(dist.students["sparse_logistic"].describe(), "\n")
    print("fidelity on validation data over training:")
    for h in dist.history:
        print(f"  epoch {h['epoch']:3d}: " + ", ".join(f"{k} {h[k]['fidelity']:.3f}" for k in dist.students if k in h))
    print()


def signals_awd(out: Path, epochs: int) -> None:
    print("== 1-D signals: MLP regressor -> adaptive wavelet distillation (and a lasso, a tree) ==")
    pl.seed_everything(0)
    dm = SignalDataModule(n_samples=2000, length=64, task="regression", batch_size=64, seed=0)
    model = LitClassifier(MLP(64, 1, hidden=(64, 64)), lr=3e-3, task="regression")
    dist = Distiller(
        students={
            "awd": {"name": "awd", "wavelet": "db3", "levels": 3, "n_coefficients": 2, "epochs": 10, "lr": 1e-2},
            "sparse_linear": {"name": "sparse_linear", "max_nonzeros": 10},
            "tree": {"name": "tree", "max_depth": 3},
        },
        buffer_size=1024, every_n_epochs=max(1, epochs // 2), budget=None,  # every buffered row
    )  # fmt: skip
    _trainer(out, "signals_awd", epochs, dist).fit(model, dm)
    x, y, _ = dm.test_set.tensors
    _report(dist, model, x, y, "regression")
    awd = dist.students["awd"]
    print(awd.describe(), "\n")


def digits_awd(out: Path, epochs: int) -> None:
    print("== Digits: SmallCNN -> 2-D adaptive wavelet distillation ==")
    pl.seed_everything(0)
    dm = DigitsDataModule(size=32, batch_size=64, seed=0)
    model = LitClassifier(SmallCNN(1, 10, width=16), lr=3e-3)
    dist = Distiller(
        students={"awd": {"name": "awd", "wavelet": "db2", "levels": 3, "n_coefficients": 4, "epochs": 3,
                          "lr": 1e-2, "lam_l1attr": 0.001}, "tree": {"name": "tree", "max_depth": 6}},
        buffer_size=1024, every_n_epochs=epochs, budget=None,  # every buffered row: the students are the point
    )  # fmt: skip
    _trainer(out, "digits_awd", epochs, dist).fit(model, dm)
    x, y = dm.test_set.tensors
    _report(dist, model, x, y, "classification")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="breast_cancer,signals", help="comma list of breast_cancer, signals, digits")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--out", default="logs/distill")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 is fastest for tiny nets)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Lightning's own LeafSpec deprecation (a Lightning/torch version mismatch) and its advice on the logging
    # interval of short epochs: nothing a user of the example acts on
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    parts = {"breast_cancer": breast_cancer, "signals": signals_awd, "digits": digits_awd}
    for name in args.part.split(","):
        if name not in parts:
            raise SystemExit(f"Unknown part {name!r}; choose from {sorted(parts)}.")
        parts[name](out, args.epochs if name != "digits" else min(args.epochs, 10))
    print(f"TensorBoard logs: tensorboard --logdir {out}")


if __name__ == "__main__":
    main()
