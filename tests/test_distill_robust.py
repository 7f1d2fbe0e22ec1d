"""The Distiller's failure modes (issue 16): a NaN teacher, students failing independently, unsafe keys, exports
without a log directory, and the buffer kept out of checkpoints and bounded in bytes.

Broke before: a NaN teacher logged and exported fidelity 1.0; one student's exception ended the fit of every
student and the failed one (marked fitted) was exported; keys such as ``'../../x'`` wrote outside the export
folder; ``logger=False`` exported into the working directory; checkpoints carried every buffered input row
(~38 MB at 3x32x32) and the buffer was bounded in rows only.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from explain_callbacks.callbacks.distiller import Distiller
from explain_callbacks.distill import load_student
from explain_callbacks.distill.buffer import RingBuffer
from explain_callbacks.distill.trees import TreeStudent
from explain_callbacks.models import MLP, LitClassifier


class NanInEval(nn.Module):
    """Trains normally; outputs NaN in eval mode (where the Distiller queries its teacher): a diverged network."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP(6, 2, hidden=(8,))

    def forward(self, x):
        out = self.net(x)
        return out if self.training else out * float("nan")


ATTEMPTS: dict[str, int] = {}  # fit attempts per student tag (outside the student: a failed fit restores it)


class FailsOnFit(TreeStudent):
    """A tree whose fits fail from the ``fail_from``-th attempt on (a solver that breaks on later data)."""

    name = "tree"

    def __init__(self, tag: str, fail_from: int, **kw) -> None:
        super().__init__(**kw)
        self.tag, self.fail_from = tag, fail_from
        ATTEMPTS[tag] = 0

    def _fit(self, x, teacher_out, teacher):
        ATTEMPTS[self.tag] += 1
        if ATTEMPTS[self.tag] >= self.fail_from:
            raise RuntimeError(f"solver of {self.tag} broke")
        super()._fit(x, teacher_out, teacher)


def _loaders(n: int = 128, shape: tuple[int, ...] = (6,), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = (x.flatten(1)[:, 0] > 0).long()
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
    val = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)
    return train, val


def _fit(tmp_path, callbacks, net=None, epochs: int = 2, logger: bool = True, loaders=None, **kw):
    pl.seed_everything(0)
    model = LitClassifier(net if net is not None else MLP(6, 2, hidden=(8,)), lr=1e-2)
    tr = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=list(callbacks),
        logger=TensorBoardLogger(str(tmp_path), name="tb") if logger else False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), **kw,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tr.fit(model, *(loaders or _loaders()))
    return tr, [str(w.message) for w in record]


def test_a_nan_teacher_skips_the_fit_with_one_warning_and_logs_no_fidelity(tmp_path):
    dist = Distiller(budget=None, students=["tree", {"name": "sparse_logistic", "max_nonzeros": 3}], buffer_size=128)
    tr, messages = _fit(tmp_path, [dist], net=NanInEval(), epochs=3)
    nan = [m for m in messages if "NaN/Inf" in m and "teacher" in m]
    assert len(nan) == 1, messages  # once, not per epoch
    assert "skipped the fit" in nan[0] and "no fidelity logged" in nan[0]
    assert not [k for k in tr.callback_metrics if k.startswith("distillation/")]  # was fidelity 1.0
    assert dist.history == [] and dist.exported == {}
    assert not (Path(tr.log_dir) / "distill").exists()
    with pytest.raises(FloatingPointError, match="NaN/Inf on 192 of 192 rows"):  # 128 buffered + 64 validation
        strict = Distiller(students=["tree"], buffer_size=128, strict=True, budget=None)
        _fit(tmp_path / "strict", [strict], net=NanInEval())


def test_students_fail_independently_and_a_failed_one_is_restored_not_exported(tmp_path):
    later = FailsOnFit("later", fail_from=2, max_depth=2)  # fits at epoch 0, fails from epoch 1 on
    never = FailsOnFit("never", fail_from=1, max_depth=2)  # fails at once
    dist = Distiller(budget=None, students={"later": later, "never": never, "tree": "tree"}, buffer_size=128)
    x0 = _loaders()[1].dataset.tensors[0]
    first: dict[str, torch.Tensor] = {}

    class Record(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0 and later.fitted:
                first["later"] = later.predict(x0)

    tr, messages = _fit(tmp_path, [dist, Record()], epochs=3)
    # the tree after the failing students was fitted, logged and exported every time (was: the loop ended)
    assert [set(h) - {"epoch", "step", "final"} for h in dist.history] == [{"later", "tree"}, {"tree"}, {"tree"}]
    assert "distillation/fidelity/tree" in tr.callback_metrics
    assert not [k for k in tr.callback_metrics if k.endswith("/never")]
    assert set(dist.exported) == {"tree"}
    assert sorted(p.stem for p in Path(dist.exported["tree"]).parent.iterdir()) == ["tree"]
    # the failed students: the one never fitted is not taken for fitted; the other keeps its first fit
    assert not never.fitted
    assert later.fitted and torch.equal(later.predict(x0), first["later"])
    failed = [m for m in messages if "failed at epoch" in m]
    assert sum("student 'never'" in m for m in failed) == 1 and sum("student 'later'" in m for m in failed) == 1
    assert ATTEMPTS == {"later": 3, "never": 3}  # every epoch tried again
    assert any("RuntimeError: solver of later broke" in m for m in failed)
    assert any("'later' is not exported: its latest fit failed" in m for m in messages)
    # strict raises the student's own error
    with pytest.raises(RuntimeError, match="solver of strict broke"):
        _fit(tmp_path / "s", [Distiller(students={"x": FailsOnFit("strict", fail_from=1)}, strict=True)], epochs=1)


@pytest.mark.parametrize("key", ["../../x", "/tmp/evil", "a/b", "a\\b", "a.b", "..", "a b"])
def test_student_keys_that_cannot_name_a_file_are_refused(key):
    with pytest.raises(ValueError, match="cannot name an export file"):
        Distiller(students={key: "tree"})


def test_exports_stay_in_the_export_folder_and_never_in_the_working_directory(tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    # no logger, no export_dir: nothing written (was <cwd>/distill), one warning naming export_dir
    dist = Distiller(budget=None, students=["tree"], buffer_size=64)
    _, messages = _fit(tmp_path / "a", [dist], logger=False, epochs=1)
    assert list(work.iterdir()) == [] and dist.exported == {} and dist.students["tree"].fitted
    assert sum("no log directory" in m and "export_dir" in m for m in messages) == 1
    # an explicit export_dir; a key slipped in after __init__ cannot leave it
    out = tmp_path / "exports"
    dist = Distiller(budget=None, students=["tree"], buffer_size=64, export_dir=str(out))
    dist.students["../escaped"] = TreeStudent()
    _, messages = _fit(tmp_path / "b", [dist], logger=False, epochs=1)
    assert set(dist.exported) == {"tree"} and Path(dist.exported["tree"]).parent == out
    assert load_student(dist.exported["tree"]).fitted
    assert not list(tmp_path.glob("escaped*")) and list(work.iterdir()) == []
    assert any("'../escaped'" in m and "cannot name an export file" in m for m in messages)


def test_buffer_bounded_in_bytes():
    buf = RingBuffer(100, max_bytes=10 * 48 + 5)  # room for 10 rows of 3x4 float32 (48 bytes)
    buf.add({"x": torch.randn(7, 3, 4)})
    assert buf.limit == 10 and buf.nbytes <= 10 * 48 + 5
    buf.add({"x": torch.arange(12 * 9, dtype=torch.float32).view(9, 3, 4)})
    assert len(buf) == 10 and buf.nbytes == 10 * 48
    assert torch.equal(buf.get()["x"][-9:], torch.arange(12 * 9, dtype=torch.float32).view(9, 3, 4))
    assert RingBuffer(100, max_bytes=1).rows_for({"x": torch.zeros(1, 3)}) == 1  # one row at least
    with pytest.raises(ValueError, match="max_bytes"):
        RingBuffer(10, max_bytes=0)
    # the Distiller's two buffers share max_buffer_mb in proportion to their rows: 3 MB, 3:1 -> 2.25 and 0.75 MB
    dist = Distiller(budget=None, students=["tree"], buffer_size=3000, val_size=1000, max_buffer_mb=3)
    row = 3 * 32 * 32 * 4  # 12 KB
    assert dist.buffer.rows_for({"x": torch.zeros(1, 3, 32, 32)}) == int(2.25 * 2**20) // row == 192
    assert dist.val.rows_for({"x": torch.zeros(1, 3, 32, 32)}) == int(0.75 * 2**20) // row == 64


def _checkpoint_bytes(tmp_path, **kw) -> tuple[int, Distiller]:
    """One epoch on 3x32x32 inputs with a Distiller (256 training, 128 validation rows) and a checkpoint."""
    dist = Distiller(budget=None, students=["tree"], buffer_size=256, val_size=128, export=False, **kw)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
    _fit(tmp_path, [dist, ckpt], net=net, epochs=1, logger=False, loaders=_loaders(256, (3, 32, 32)))
    return (tmp_path / "ckpt" / "last.ckpt").stat().st_size, dist


def test_the_buffer_is_kept_out_of_checkpoints_unless_asked(tmp_path):
    small, _ = _checkpoint_bytes(tmp_path / "a")
    large, dist = _checkpoint_bytes(tmp_path / "b", checkpoint_buffer=True)
    rows = (256 + 64) * 3 * 32 * 32 * 4  # 256 training rows, the 64 validation rows of the loader
    assert large - small >= rows and small < 200_000, (small, large)
    # a resume without the rows starts with empty buffers and refills them from the next batches
    state = torch.load(tmp_path / "a" / "ckpt" / "last.ckpt", weights_only=True)["callbacks"][dist.state_key]
    assert "buffer" not in state["per_rank"][0] and state["world_size"] == 1
    fresh = Distiller(budget=None, students=["tree"], buffer_size=256, val_size=128, export=False)
    fresh.load_state_dict(state)
    assert len(fresh.buffer) == 0 and len(fresh.val) == 0 and not fresh._val_frozen
    kept = Distiller(budget=None, students=["tree"], buffer_size=256, val_size=128, export=False)
    saved = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)["callbacks"][dist.state_key]
    kept.load_state_dict(saved)
    assert torch.equal(kept.buffer.get()["x"], dist.buffer.get()["x"]) and kept._val_frozen
