"""The Distiller inside Lightning: no side effects on training, fidelity on breast cancer, export, Hydra."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from explain_callbacks.callbacks.distiller import Distiller
from explain_callbacks.datasets import BreastCancerDataModule
from explain_callbacks.distill import Student, agreement, load_student
from explain_callbacks.models import MLP, LitClassifier

from .helpers_lightning import event_tags

CONF = Path(__file__).resolve().parents[1] / "conf"


class LitNoForward(LitClassifier):
    """training_step calls the net directly: a forward hook on the LightningModule never fires."""

    def training_step(self, batch, batch_idx):
        x, y = self.unpack(batch)
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return loss


def _fit(tmp_path, callbacks=(), epochs=3, cls=LitClassifier, logger=False):
    pl.seed_everything(0)
    dm = BreastCancerDataModule(batch_size=32, seed=0)
    model = cls(MLP(30, 2, hidden=(32, 32), dropout=0.2), lr=3e-3)  # dropout: the RNG matters
    from lightning.pytorch.loggers import TensorBoardLogger

    tr = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=list(callbacks), deterministic=True,
        logger=TensorBoardLogger(str(tmp_path), name="tb") if logger else False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    tr.fit(model, dm)
    return model, tr, dm


def _state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        torch.get_rng_state(),
        {n: m.training for n, m in model.named_modules()},
    )


def test_distiller_does_not_change_training(tmp_path):
    base, _, _ = _fit(tmp_path / "base")
    w0, rng0, modes0 = _state(base)
    variants = [
        (  # captured outputs and layer features, an online student trained every step
            LitClassifier,
            Distiller(
                budget=None,
                students=["tree", "online", {"name": "sparse_logistic", "max_nonzeros": 4}],
                teacher_outputs="captured", layer="net.net.4", every_n_epochs=1, buffer_size=64, strict=True,
            ),
        ),
        (  # refreshed outputs, attributions of the teacher, a per-batch subsample (own generator)
            LitClassifier,
            Distiller(
                budget=None,
                students=[{"name": "attribution_linear", "k": 3, "max_samples": 32}, "rules"],
                per_batch=8, every_n_epochs=2, buffer_size=64, strict=True,
            ),
        ),
        (  # the forward hook cannot fire: a guarded no-grad forward on the buffered rows instead
            LitNoForward,
            Distiller(budget=None, students=["online", "tree"], teacher_outputs="captured", per_batch=4, strict=True),
        ),
    ]  # fmt: skip
    for i, (cls, dist) in enumerate(variants):
        model, tr, _ = _fit(tmp_path / f"v{i}", [dist], cls=cls)
        w, rng, modes = _state(model)
        assert w.keys() == w0.keys()
        for k in w0:
            assert torch.equal(w[k], w0[k]), (i, k)
        assert torch.equal(rng, rng0), i
        assert modes == modes0, i
        assert all(s.fitted for s in dist.students.values()), i
        assert dist.history, i
    d0 = variants[0][1]
    assert d0.buffer.get()["feat"].shape[1] == 32 and "out" in d0.buffer.names
    assert d0.students["tree"].input_shape_ == (32,)
    assert len(d0.buffer) == 64  # bounded
    d2 = variants[2][1]
    assert d2.students["online"].steps_ == tr.global_step  # every batch, through the fallback forward


def test_breast_cancer_students_agree_with_the_teacher_and_are_exported(tmp_path):
    dist = Distiller(
        budget=None,
        students={"tree": {"name": "tree", "max_depth": 3},
                  "logistic": {"name": "sparse_logistic", "max_nonzeros": 10}},
        every_n_epochs=4, buffer_size=512, strict=True,
    )  # fmt: skip
    model, tr, dm = _fit(tmp_path, [dist], epochs=10, logger=True)
    assert [h["epoch"] for h in dist.history] == [3, 7, 9]  # the last epoch is refitted for the export
    assert [h["final"] for h in dist.history] == [False, False, True]
    # rows are only buffered in epochs that can still be in the buffer at the next fit (2-3, 6-9), plus the
    # first batch of epoch 0, which sizes an epoch (batch size 32 x 13 batches: 2 epochs fill the 512 rows)
    assert dist.buffer.seen == 6 * len(dm.train_set) + 32
    # exported, loadable, and at least one student with <= 10 non-zeros/leaves agrees on >= 95% of the test set
    xt, _ = dm.test_set.tensors
    model.eval()
    with torch.no_grad():
        teacher = model(xt)
    best = 0.0
    for key in ("tree", "logistic"):
        s = load_student(dist.exported[key])
        assert isinstance(s, Student) and s.metadata_["epochs_trained"] == 10
        size = s.complexity().get("nonzeros", s.complexity().get("leaves"))
        assert size <= 10
        best = max(best, float(agreement(s.predict(xt), teacher)))
        assert torch.equal(s.predict(xt), dist.students[key].predict(xt))
    assert best >= 0.95, best
    assert dist.students["tree"].feature_names_[0] == "mean radius"  # taken from the data module
    metrics = tr.callback_metrics
    for key in ("tree", "logistic"):
        assert 0.5 <= float(metrics[f"distillation/fidelity/{key}"]) <= 1.0
        assert f"distillation/accuracy/{key}" in metrics
    assert float(metrics["distillation/leaves/tree"]) <= 8
    tags = event_tags(tmp_path)
    assert "distillation/nonzeros/logistic" in tags["scalars"]
    assert any("distillation/student/tree" in t for t in tags["text"])
    # checkpoint state round trip: the rows are left out by default, kept with checkpoint_buffer=True
    state = dist.state_dict()
    assert "buffer" not in state and "val" not in state
    other = Distiller(budget=None, students="tree")
    other.load_state_dict(state)
    assert len(other.buffer) == 0 and other.history == dist.history
    dist.checkpoint_buffer = True
    other.load_state_dict(dist.state_dict())
    assert torch.equal(other.buffer.get()["x"], dist.buffer.get()["x"])
    assert torch.equal(other.val.get()["x"], dist.val.get()["x"]) and other._val_frozen


def test_bad_arguments_fail_early_with_clear_messages():
    with pytest.raises(ValueError, match="teacher_outputs"):
        Distiller(teacher_outputs="nope")
    with pytest.raises(ValueError, match="layer"):
        Distiller(students=["attribution_linear"], layer="net.0")
    with pytest.raises(KeyError, match="Unknown student"):
        Distiller(students=["nope"])
    d = Distiller(budget=None, students={"a": "tree", "b": None, "c": {"name": "tree", "max_depth": 1}})
    assert list(d.students) == ["a", "c"]
    d = Distiller(budget=None, students=["tree", "tree"])
    assert list(d.students) == ["tree", "tree_2"]


@pytest.mark.parametrize("path", sorted((CONF / "student").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_student_config_instantiates(path):
    with initialize_config_dir(config_dir=str(CONF / "student"), version_base="1.3"):
        cfg = compose(path.stem)
    assert isinstance(instantiate(cfg), Student)


@pytest.mark.parametrize("experiment", ["distill_breast_cancer", "distill_signals_awd"])
def test_distill_experiments_compose_and_instantiate(experiment):
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    cb = instantiate(cfg.callbacks.distiller)
    assert isinstance(cb, Distiller)
    assert list(cfg.callbacks) == ["distiller"]
    instantiate(cfg.data)
    instantiate(cfg.model)
    if experiment == "distill_signals_awd":
        assert set(cb.students) == {"tree", "awd", "sparse_linear"}


def test_distiller_config_with_a_student_group_option():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["callbacks=[default,distiller]", "+student@callbacks.distiller.students.rules=rules", "seed=0"],
        )
    cb = instantiate(cfg.callbacks.distiller)
    assert set(cb.students) == {"tree", "sparse_logistic", "rules"}


class _NanRowsBreastCancer(BreastCancerDataModule):
    """Breast cancer with NaN in one feature of 40 training rows."""

    def transform(self, tensors, train_idx):
        x, y = super().transform(tensors, train_idx)
        x = x.clone()
        x[train_idx[::10], 3] = float("nan")
        return x, y


class _NanToZero(torch.nn.Module):
    def forward(self, x):
        return torch.nan_to_num(x)


def test_rows_with_non_finite_inputs_are_dropped_at_fit_time(tmp_path):
    """Training batches are buffered as they come (no per-step check); rows with NaN inputs never reach a student."""
    pl.seed_everything(0)
    dm = _NanRowsBreastCancer(batch_size=32, seed=0)
    model = LitClassifier(torch.nn.Sequential(_NanToZero(), MLP(30, 2, hidden=(16,))), lr=3e-3)
    dist = Distiller(students={"logistic": {"name": "sparse_logistic", "max_nonzeros": 5}}, buffer_size=512,
                     strict=True, export=False, budget=None)  # fmt: skip
    seen: list[int] = []
    student = dist.students["logistic"]
    fit = student.fit

    def spy(x, out, **kw):
        assert bool(torch.isfinite(x).all())
        seen.append(x.shape[0])
        return fit(x, out, **kw)

    student.fit = spy  # type: ignore[method-assign]
    pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, callbacks=[dist], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    ).fit(model, dm)  # fmt: skip
    x = dist.buffer.get()["x"]
    n_bad = int((~torch.isfinite(x).all(1)).sum())
    assert n_bad > 0  # the buffer holds them ...
    assert seen[-1] == x.shape[0] - n_bad  # ... the student does not
    assert bool(torch.isfinite(student.coef_).all())
