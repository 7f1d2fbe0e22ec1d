"""Distillation benchmark: the Distiller's cost on the breast-cancer example, student quality, and AWD.

    .venv/bin/python benchmarks/bench_distill.py            # about 4 minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_distill.py --quick    # fewer repeats
    .venv/bin/python benchmarks/bench_distill.py --sections overhead --repeats 11

1. Overhead: the breast-cancer example (MLP 30-64-64-2, 30 epochs, batch 32, TensorBoard logger) trained
   with and without the Distiller, runs interleaved (base, distiller, base, ...), medians of trainer.fit
   wall time, measured side by side in one process; the time spent inside the Distiller's hooks is
   measured in the same runs, and an empty Lightning Callback shows what any callback costs here
   (the trainer dispatches ~2,700 hook calls per run to each callback).
2. Students on breast cancer: complexity and agreement with the teacher on the held-out test set.
3. AWD on the procedural 1-D signals: fidelity (R² to the teacher) of fixed Daubechies wavelets versus
   learned ones, next to a lasso and a tree on the raw signal.
4. Scaling of the students to a Distiller's buffer of images (``--sections scaling``, about 1 minute):
   2,048 buffered rows of digits at 12x12 (144 features) and 24x24 (576 features), 10 classes, the
   teacher a SmallCNN trained 3 epochs; fit time of the tree and of ``sparse_logistic`` (the Python
   default, alpha=0.05, and the configs' max_nonzeros=10), best of ``--repeats`` interleaved runs on one
   thread, the ratio to the tree, the agreement with the teacher on 1,024 other rows, and the refit
   after one more teacher epoch with half the buffer replaced (warm: the same student object, as the
   Distiller refits it; cold: a new one).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from explain_callbacks.callbacks._logging import markdown_table
from explain_callbacks.callbacks.distiller import Distiller
from explain_callbacks.datasets import BreastCancerDataModule
from explain_callbacks.datasets.signals import SignalDataModule
from explain_callbacks.distill import (
    AWDStudent,
    SparseLinearStudent,
    SparseLogisticStudent,
    TreeStudent,
    agreement,
    fidelity,
    load_student,
    r2_score,
    student_score,
)
from explain_callbacks.models import MLP, LitClassifier

EXAMPLE_EVERY = 15  # as examples/distill.py and conf/experiment/distill_breast_cancer.yaml
EXAMPLE_STUDENTS = {
    "tree": {"name": "tree", "max_depth": 3},
    "sparse_logistic": {"name": "sparse_logistic", "max_nonzeros": 10},
}


def _fit_bc(out: Path, epochs: int, distiller: Callback | None) -> tuple[float, pl.LightningModule, object]:
    pl.seed_everything(0, verbose=False)
    dm = BreastCancerDataModule(batch_size=32, seed=0)
    model = LitClassifier(MLP(30, 2, hidden=(64, 64), dropout=0.1), lr=3e-3)
    tr = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=[distiller] if distiller else [],
        deterministic=True, logger=TensorBoardLogger(str(out), name="bench"), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    tr.fit(model, dm)
    return time.perf_counter() - t0, model, dm


class EmptyCallback(Callback):
    """A callback with no hook bodies: the trainer's per-hook dispatch cost for one more callback."""

    inside = 0.0


class HookTimer(Distiller):
    """A Distiller that also adds up the wall time spent inside its own hooks."""

    HOOKS = (
        "setup", "on_train_epoch_start", "on_train_batch_start", "on_train_batch_end", "on_validation_batch_end",
        "on_validation_epoch_end", "on_train_epoch_end", "on_train_end", "teardown",
    )  # fmt: skip

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inside = 0.0
        for name in self.HOOKS:
            setattr(self, name, self._timed(getattr(self, name)))

    def _timed(self, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.inside += time.perf_counter() - t0

        return wrapper


def overhead(tmp: Path, epochs: int, repeats: int) -> None:
    configs = {
        f"example: tree + sparse_logistic, every {EXAMPLE_EVERY} epochs": lambda: HookTimer(
            students=EXAMPLE_STUDENTS, buffer_size=512, every_n_epochs=EXAMPLE_EVERY
        ),
        "empty Callback (reference)": EmptyCallback,
        "same, every 10 epochs": lambda: HookTimer(students=EXAMPLE_STUDENTS, buffer_size=512, every_n_epochs=10),
        "same, every epoch": lambda: HookTimer(students=EXAMPLE_STUDENTS, buffer_size=512, every_n_epochs=1),
        f"captured outputs + online student, every {EXAMPLE_EVERY}": lambda: HookTimer(
            students={**EXAMPLE_STUDENTS, "online": "online"}, teacher_outputs="captured", buffer_size=512,
            every_n_epochs=EXAMPLE_EVERY,
        ),
    }  # fmt: skip
    _fit_bc(tmp / "warmup", 2, configs["same, every epoch"]())  # imports, first-use costs
    times: dict[str, list[float]] = {"no Distiller": [], **{k: [] for k in configs}}
    inside: dict[str, list[float]] = {k: [] for k in configs}
    weights_equal = True
    for r in range(repeats):
        t, base_model, _ = _fit_bc(tmp / f"base{r}", epochs, None)
        times["no Distiller"].append(t)
        for i, (name, make) in enumerate(configs.items()):
            if i > 1 and r >= max(2, repeats // 2):
                continue  # the example and the reference get all repeats, the variants fewer
            cb = make()
            t, model, _ = _fit_bc(tmp / f"c{i}r{r}", epochs, cb)
            times[name].append(t)
            inside[name].append(cb.inside)
            weights_equal &= all(
                torch.equal(a, b) for a, b in zip(base_model.state_dict().values(), model.state_dict().values())
            )
    base = statistics.median(times["no Distiller"])
    rows = [["no Distiller", base, "", "", ""]]
    for name in configs:
        n = len(times[name])
        med = statistics.median(times[name])
        pairs = [d / b - 1 for d, b in zip(times[name], times["no Distiller"][:n])]
        hooks = statistics.median(inside[name])
        spread = ""
        if n >= 4:
            q1, _, q3 = statistics.quantiles(pairs, n=4)
            spread = f" [{100 * q1:+.1f}, {100 * q3:+.1f}]"
        rows.append([
            name, med, f"{100 * statistics.median(pairs):+.1f} %{spread}", hooks, f"{100 * hooks / base:.1f} %"
        ])  # fmt: skip
    print(f"\n### 1. Distiller overhead: breast-cancer example, {epochs} epochs, interleaved repeats "
          f"({repeats} for the example, fewer for the variants)\n")  # fmt: skip
    heads = ["run", "median fit time (s)", "wall-clock overhead (median of pairs [quartiles])", "time inside (s)",
             "inside / no-Distiller time"]  # fmt: skip
    print(markdown_table(heads, rows))
    print(f"\nWeights bit-identical with and without the Distiller in every run: {weights_equal}")
    first = next(iter(configs))
    print(f"Pairs of the example (distiller / no-Distiller − 1, %): "
          f"{[round(100 * (d / b - 1), 1) for d, b in zip(times[first], times['no Distiller'])]}")  # fmt: skip
    print("(Wall-clock differences carry the machine's noise; the time inside the Distiller's hooks is measured "
          "directly in the same runs.)")  # fmt: skip


def students_quality(tmp: Path, epochs: int) -> None:
    students = {
        **EXAMPLE_STUDENTS,
        "sparse_logistic_5": {"name": "sparse_logistic", "max_nonzeros": 5},
        "rules": {"name": "rules", "max_rules": 8},
        "attribution_linear_5": {"name": "attribution_linear", "k": 5},
        "online": {"name": "online"},
    }
    dist = Distiller(students=students, buffer_size=512, every_n_epochs=10, teacher_outputs="captured", budget=None)
    _, model, dm = _fit_bc(tmp / "quality", epochs, dist)
    x, y = dm.test_set.tensors
    model.eval()
    with torch.no_grad():
        teacher = model(x)
    last = dist.history[-1]
    rows = []
    for key, path in dist.exported.items():
        s = load_student(path)
        pred = s.predict(x)
        comp = ", ".join(f"{k} {v}" for k, v in s.complexity().items())
        fit_s = last.get(key, {}).get("fit_seconds", float("nan"))
        acc = float(student_score(pred, y, "classification"))
        rows.append([key, comp, float(agreement(pred, teacher)), acc, fit_s])
    print(f"\n### 2. Students of the breast-cancer MLP ({epochs} epochs; test set of {len(y)} samples)\n")
    print(markdown_table(["student", "complexity", "agreement with teacher", "accuracy", "fit time (s)"], rows))
    print(f"\nTeacher test accuracy: {float(student_score(teacher.argmax(1), y, 'classification')):.4f}")


def awd(tmp: Path, epochs: int, awd_epochs: int) -> None:
    pl.seed_everything(0, verbose=False)
    dm = SignalDataModule(n_samples=2000, length=64, task="regression", batch_size=64, seed=0)
    model = LitClassifier(MLP(64, 1, hidden=(64, 64)), lr=3e-3, task="regression")
    tr = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, deterministic=True, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    tr.fit(model, dm)
    model.eval()
    xtr, _, _ = dm.train_set.tensors
    xte, yte, _ = dm.test_set.tensors
    with torch.no_grad():
        otr, ote = model(xtr), model(xte)
    for p in model.parameters():
        p.requires_grad_(False)
    rows = []

    def add(name: str, student, teacher=None) -> None:
        t0 = time.perf_counter()
        student.fit(xtr, otr, teacher=teacher)
        dt = time.perf_counter() - t0
        pred = student.predict(xte)
        cons = f"{sum(student.wavelet_losses().values()):.1e}" if isinstance(student, AWDStudent) else ""
        rows.append([name, float(fidelity(pred, ote, "regression")), float(r2_score(pred, yte)), cons, dt])

    add("lasso on the raw signal (<= 10 non-zeros)", SparseLinearStudent(max_nonzeros=10))
    add("tree on the raw signal (depth 3)", TreeStudent(max_depth=3))
    for wave, m in (("db1", 2), ("db3", 1), ("db3", 2), ("db4", 2)):
        add(f"fixed {wave}, top-{m} per scale", AWDStudent(wavelet=wave, n_coefficients=m, epochs=0), model)
    for wave, m, lam in (("db3", 1, 0.0), ("db3", 1, 0.1), ("db3", 2, 0.01), ("db4", 2, 0.1)):
        s = AWDStudent(wavelet=wave, n_coefficients=m, epochs=awd_epochs, lr=1e-2, lam_l1attr=lam, init_noise=0.0)
        add(f"AWD from {wave}, top-{m}, λ_attr={lam}", s, model)
    print(f"\n### 3. AWD on 1-D signals (MLP teacher, {epochs} epochs; test R² of the teacher "
          f"{float(r2_score(ote, yte)):.3f}; AWD trained {awd_epochs} epochs on {len(xtr)} signals)\n")  # fmt: skip
    print(markdown_table(["student", "fidelity R² (test)", "own R² (test)", "constraint terms", "fit time (s)"], rows))


def _digits_buffers(size: int, n: int = 2048, n_test: int = 1024, seed: int = 0):
    """A SmallCNN trained 3 epochs on digits (size x size): ``n`` buffered rows (digits with noise) and their
    logits; the buffer after one more epoch with its first half replaced; ``n_test`` other rows and the
    logits of the teacher of that epoch."""
    from explain_callbacks.datasets.tabular_images import load_digits_tensors
    from explain_callbacks.models import SmallCNN

    x, y = load_digits_tensors(size)[:2]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = SmallCNN(1, 10)
    opt = torch.optim.Adam(net.parameters(), 3e-3)

    def epoch() -> None:
        net.train()
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
        net.eval()

    def rows(k: int) -> torch.Tensor:
        idx = torch.randint(0, x.shape[0], (k,), generator=g)
        return x[idx] + 0.05 * torch.randn(x[idx].shape, generator=g)

    for _ in range(3):
        epoch()
    xb, xt = rows(n), rows(n_test)
    with torch.no_grad():
        ob = net(xb)
    epoch()
    xb2 = torch.cat([rows(n // 2), xb[n // 2 :]])
    with torch.no_grad():
        ob2, ot = net(xb2), net(xt)
    return (xb, ob), (xb2, ob2), (xt, ot)


SCALING_STUDENTS = {
    "tree (max_depth=3)": lambda: TreeStudent(),
    "sparse_logistic (default: alpha=0.05)": lambda: SparseLogisticStudent(),
    "sparse_logistic (max_nonzeros=10, as conf/student)": lambda: SparseLogisticStudent(max_nonzeros=10),
}


# The same section run on the code before the solver rework (commit 5d0d380, best of 1, 2-core VM shared with
# other jobs, 2026-12-07): (features, student) -> fit (s), fit / tree, refit (s), refit / tree, non-zeros, agreement.
SCALING_BEFORE = {
    ("144", "tree (max_depth=3)"): (0.2588, 1.0, 0.103, 1.0, "leaves 8", 0.5049),
    ("144", "sparse_logistic (default: alpha=0.05)"): (2.468, 9.5, 2.989, 29.0, "nonzeros 180", 0.9072),
    ("144", "sparse_logistic (max_nonzeros=10, as conf/student)"): (0.1253, 0.5, 0.2013, 2.0, "nonzeros 0", 0.125),
    ("576", "tree (max_depth=3)"): (0.7007, 1.0, 0.6734, 1.0, "leaves 8", 0.5156),
    ("576", "sparse_logistic (default: alpha=0.05)"): (63.98, 91.3, 11.17, 16.6, "nonzeros 302", 0.8809),
    ("576", "sparse_logistic (max_nonzeros=10, as conf/student)"): (0.5676, 0.8, 0.4519, 0.7, "nonzeros 0", 0.1396),
}


def scaling(repeats: int) -> None:
    rows = []
    for size in (12, 24):
        (xb, ob), (xb2, ob2), (xt, ot) = _digits_buffers(size)
        cold: dict[str, list[float]] = {k: [] for k in SCALING_STUDENTS}
        warm: dict[str, list[float]] = {k: [] for k in SCALING_STUDENTS}
        fitted = {}
        for _ in range(repeats):  # interleaved: every student sees the same machine load
            for name, make in SCALING_STUDENTS.items():
                s = make()
                t0 = time.perf_counter()
                s.fit(xb, ob)
                cold[name].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                s.fit(xb2, ob2)  # the Distiller's next refit of the same student
                warm[name].append(time.perf_counter() - t0)
                fitted[name] = s
        tree_cold, tree_warm = min(cold["tree (max_depth=3)"]), min(warm["tree (max_depth=3)"])
        for name, s in fitted.items():
            comp = ", ".join(f"{k} {v}" for k, v in s.complexity().items())
            c, w = min(cold[name]), min(warm[name])
            agree = float(agreement(s.predict(xt), ot))
            b = SCALING_BEFORE.get((f"{size * size}", name))
            before = f"{b[0]:.3g} s ({b[1]:.1f}x), {b[4]}, {b[5]:.3f}" if b else ""
            rows.append([f"{size * size}", name, c, f"{c / tree_cold:.1f}x", w, f"{w / tree_warm:.1f}x", comp, agree,
                         before])  # fmt: skip
    print(f"\n### 4. Students on a 2,048-row buffer of digits images, 10 classes (SmallCNN teacher; "
          f"best of {repeats})\n")  # fmt: skip
    heads = ["features", "student", "fit (s)", "/ tree", "refit next epoch (s)", "/ tree", "complexity",
             "agreement with teacher (1,024 other rows)", "before (5d0d380): fit (/ tree), complexity, agreement"]
    print(markdown_table(heads, rows))
    print("\nBefore: recorded on the same machine with the code of commit 5d0d380 (SCALING_BEFORE in this file).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats and epochs")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: tiny nets)")
    p.add_argument("--sections", default="overhead,students,awd,scaling",
                   help="comma list of overhead, students, awd, scaling")  # fmt: skip
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats of the overhead runs (default 7)")
    args = p.parse_args()
    sections = set(args.sections.split(","))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
          f"torch {torch.__version__}, lightning {pl.__version__}")  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "overhead" in sections:
            overhead(tmp, epochs=30, repeats=args.repeats or (2 if args.quick else 7))
        if "students" in sections:
            students_quality(tmp, epochs=30)
        if "awd" in sections:
            awd(tmp, epochs=30, awd_epochs=5 if args.quick else 20)
        if "scaling" in sections:
            scaling(repeats=args.repeats or (1 if args.quick else 3))


if __name__ == "__main__":
    main()
