"""A new user's models, data and Lightning settings: what broke or went silent before, each with the run
that showed it. Multi-label, float64 and dict-output classifiers under the SaliencyMasker; float and
column labels and multi-hot labels under the Distiller; probe sets that cannot be taken (no validation
data, a wrong key, multi-hot labels with ``per_class``); dataclass batches; ``torch.compile``'d networks;
and the Lightning settings the other tests do not use (fast_dev_run, several validations per epoch,
manual optimisation, gradient accumulation and clipping, resuming), each with bit-identical weights."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from explain_callbacks.callbacks import (
    AttributionMonitor,
    AttributionRegularizer,
    ConceptMonitor,
    Distiller,
    InteractionMonitor,
    SaliencyMasker,
    SpRAyMonitor,
)

from .helpers_lightning import trainer


class CNN(nn.Module):
    """Conv + BatchNorm + Dropout on 1x8x8 images; ``as_dict`` returns ``{"logits": ..., "aux": ...}``."""

    def __init__(self, k: int = 3, as_dict: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(16, k))
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor):
        out = self.head(self.features(x))
        return {"logits": out, "aux": x.mean()} if self.as_dict else out


class Lit(pl.LightningModule):
    """The network under ``backbone`` (not ``net``); batches ``(x, y)`` or objects with ``.image``/``.label``;
    ``loss="bce"`` for multi-hot labels; ``manual=True`` for manual optimisation."""

    def __init__(self, net: nn.Module, loss: str = "ce", manual: bool = False) -> None:
        super().__init__()
        self.backbone = net
        self.loss = loss
        self.automatic_optimization = not manual

    def forward(self, x: torch.Tensor):
        return self.backbone(x)

    def _loss(self, batch) -> torch.Tensor:
        x, y = (batch.image, batch.label) if isinstance(batch, Batch) else batch
        out = self(x)
        out = out["logits"] if isinstance(out, dict) else out
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(out, y.to(out.dtype))
        return F.cross_entropy(out, y.long().view(-1))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


@dataclass
class Batch:
    image: torch.Tensor
    label: torch.Tensor


def _collate(items) -> Batch:
    return Batch(torch.stack([a for a, _ in items]), torch.stack([b for _, b in items]))


def _data(n: int = 64, k: int = 3, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, k, (n,), generator=g)
    x[torch.arange(n), 0, y * 2, y * 2] += 2.0
    return x, y


def _loaders(x: torch.Tensor, y: torch.Tensor, batch_size: int = 8, collate=None):
    n = x.shape[0] // 2

    def make():  # fresh loaders per run: the shuffling generator is consumed by a run
        train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch_size, shuffle=True, collate_fn=collate,
                           generator=torch.Generator().manual_seed(1))  # fmt: skip
        return train, DataLoader(TensorDataset(x[n:], y[n:]), batch_size=batch_size, collate_fn=collate)

    return make


def _fit(tmp_path, make, loaders, callbacks=(), **kw) -> tuple[pl.LightningModule, pl.Trainer]:
    torch.manual_seed(0)
    module = make()
    kw.setdefault("max_epochs", 2)
    kw.setdefault("logger", False)
    tr = trainer(tmp_path, callbacks=callbacks, **kw)
    tr.fit(module, *loaders())
    return module, tr


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    wa, wb = a.state_dict(), b.state_dict()
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def _multi_hot(n: int = 64, k: int = 3) -> torch.Tensor:
    return (torch.rand(n, k, generator=torch.Generator().manual_seed(3)) > 0.5).float()


# --------------------------------------------------------------------------- SaliencyMasker
def test_masker_on_multilabel_data_trains_on_the_predictions(tmp_path):
    """Was: RuntimeError "size of tensor a (8) must match ... (24)" (multi-hot labels flattened to
    classes), the masker stopped; now the target policy picks the classes it trains on."""
    x, _ = _data()
    loaders = _loaders(x, _multi_hot())
    base, _ = _fit(tmp_path / "a", lambda: Lit(CNN(), "bce"), loaders)
    masker = SaliencyMasker(budget=None, num_samples=4, target="prediction", strict=True)
    module, tr = _fit(tmp_path / "b", lambda: Lit(CNN(), "bce"), loaders, [masker])
    _assert_same_weights(base, module)
    assert masker._steps == 8 and "faithfulness/saliency_metric/masker" in tr.callback_metrics
    masker = SaliencyMasker(budget=None, num_samples=4, strict=True)  # the default target="label" names the fix
    with pytest.raises(ValueError, match="target='prediction'"):
        _fit(tmp_path / "c", lambda: Lit(CNN(), "bce"), loaders, [masker])
    with pytest.raises(ValueError, match="not None"):
        SaliencyMasker(target=None)


@pytest.mark.parametrize("kind", ["float64", "dict_logits"])
def test_masker_on_float64_and_dict_output_networks(tmp_path, kind):
    """Was: "Input type (float) and bias type (double)" (inputs cast to float32 for a float64 network) and
    "'dict' object has no attribute 'ndim'" (output_key / ``["logits"]`` ignored while training)."""
    x, y = _data(dtype=torch.float64 if kind == "float64" else torch.float32)
    make = (lambda: Lit(CNN()).double()) if kind == "float64" else (lambda: Lit(CNN(as_dict=True)))
    base, _ = _fit(tmp_path / "a", make, _loaders(x, y))
    masker = SaliencyMasker(budget=None, num_samples=4, strict=True)
    module, tr = _fit(tmp_path / "b", make, _loaders(x, y), [masker])
    _assert_same_weights(base, module)
    assert masker._steps == 8 and torch.isfinite(tr.callback_metrics["faithfulness/saliency_metric/masker"])
    assert next(masker.masker.parameters()).dtype == (torch.float64 if kind == "float64" else torch.float32)


# --------------------------------------------------------------------------- Distiller labels
@pytest.mark.parametrize("labels", ["float", "column", "multi_hot"])
def test_distiller_accuracy_with_float_column_and_multi_hot_labels(tmp_path, labels):
    """Float class labels (N,) and (N, 1) labels get an accuracy (was: ValueError "floating-point
    predictions of shape (N,)" for float labels); multi-hot labels get none (was: an accuracy
    against the arg-max of the multi-hot vector)."""
    x, y = _data()
    ys = {"float": y.float(), "column": y.view(-1, 1), "multi_hot": _multi_hot()}[labels]
    loss = "bce" if labels == "multi_hot" else "ce"
    dist = Distiller(budget=None, students=["tree"], export=False, strict=True)
    _, tr = _fit(tmp_path, lambda: Lit(CNN(), loss), _loaders(x, ys), [dist], max_epochs=1)
    assert "distillation/fidelity/tree" in tr.callback_metrics
    assert ("distillation/accuracy/tree" in tr.callback_metrics) == (labels != "multi_hot")


# --------------------------------------------------------------------------- SpRAy labels
def test_spray_groups_column_labels_like_flat_ones(tmp_path):
    """(B, 1) labels selected along two dimensions of the maps: clusters of (8,) rows instead of (8, 8)
    maps, silently; multi-hot labels with group_by="label" now name the fix."""
    x, y = _data()
    results = []
    for labels in (y, y.view(-1, 1)):
        spray = SpRAyMonitor(
            budget=None, num_samples=24, per_class=None, min_per_class=4, every_n_epochs=1, strict=True
        )
        _fit(tmp_path / str(labels.ndim), lambda: Lit(CNN()), _loaders(x, labels), [spray], max_epochs=1)
        results.append(spray.last_result)
    assert results[0].keys() == results[1].keys() == {0, 1, 2}
    for c, res in results[1].items():
        assert res.means.shape[1:] == (8, 8) and torch.equal(res.sizes, results[0][c].sizes)
        assert torch.allclose(res.means, results[0][c].means)
    spray = SpRAyMonitor(
        budget=None, num_samples=24, per_class=None, every_n_epochs=1, target="prediction", strict=True
    )
    with pytest.raises(ValueError, match="group_by='prediction'"):
        _fit(tmp_path / "m", lambda: Lit(CNN(), "bce"), _loaders(x, _multi_hot()), [spray], max_epochs=1)


# --------------------------------------------------------------------------- regularizer labels
def test_regularizer_takes_float_and_column_class_labels(tmp_path):
    """EG and attribution penalties with float (B,) or (B, 1) class labels: was "needs targets; set
    label_key" although the labels were there; now the same penalty and weights as integer labels, and
    multi-hot labels name the problem."""
    x, y = _data(n=32)
    runs = []
    for labels in (y, y.float(), y.view(-1, 1)):
        reg = AttributionRegularizer("eg_mask", mask=lambda b: torch.ones_like(b[0]))
        module, tr = _fit(tmp_path / str(len(runs)), lambda: Lit(CNN()), _loaders(x, labels), [reg], max_epochs=1)
        runs.append((module, float(tr.callback_metrics["regularizers/penalty/eg_mask"])))
    for module, penalty in runs[1:]:
        _assert_same_weights(runs[0][0], module)
        assert penalty == runs[0][1]
    reg = AttributionRegularizer("eg_mask", mask=lambda b: torch.ones_like(b[0]))
    with pytest.raises(ValueError, match=r"labels of shape \(8, 3\) are not one class index per sample"):
        _fit(tmp_path / "m", lambda: Lit(CNN(), "bce"), _loaders(x, _multi_hot(32)), [reg], max_epochs=1)


# --------------------------------------------------------------------------- probe sets that cannot be taken
def test_probe_that_cannot_be_taken_warns_and_training_goes_on(tmp_path):
    """SpRAyMonitor's default per_class on multi-hot labels, or a wrong input_key: was an exception from
    the validation hook that stopped training although strict=False."""
    x, _ = _data()
    loaders = _loaders(x, _multi_hot())
    base, _ = _fit(tmp_path / "a", lambda: Lit(CNN(), "bce"), loaders)
    spray = SpRAyMonitor(budget=None, num_samples=12, min_per_class=4, every_n_epochs=1, target="prediction")
    mon = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4, target="prediction", input_key="image")
    with pytest.warns(UserWarning, match="could not take its probe set") as record:
        module, _ = _fit(tmp_path / "b", lambda: Lit(CNN(), "bce"), loaders, [spray, mon])
    _assert_same_weights(base, module)
    messages = [str(w.message) for w in record]
    assert sum("per_class needs one class label" in m for m in messages) == 1  # once, not per batch
    assert sum("key 'image'" in m for m in messages) == 1
    assert sum("explained nothing" in m for m in messages) == 2
    with pytest.raises(ValueError, match="per_class needs one class label"):
        spray = SpRAyMonitor(num_samples=12, min_per_class=4, target="prediction", strict=True)
        _fit(tmp_path / "c", lambda: Lit(CNN(), "bce"), loaders, [spray])


@pytest.mark.parametrize("setting", ["limit_val_batches", "no_val_loader", "max_steps"])
def test_no_validation_says_that_nothing_was_explained(tmp_path, setting):
    """Was silent: a monitor that never saw a validation batch looked like a broken one."""
    x, y = _data()
    loaders = _loaders(x, y)
    kw = {"limit_val_batches": {"limit_val_batches": 0}, "max_steps": {"max_steps": 2}}.get(setting, {})
    if setting == "no_val_loader":
        loaders = lambda make=loaders: make()[:1]  # noqa: E731
    mon = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4)
    with pytest.warns(UserWarning, match="AttributionMonitor explained nothing.*trainer.validate"):
        _fit(tmp_path, lambda: Lit(CNN()), loaders, [mon], **kw)
    assert mon.probe_x is None


# --------------------------------------------------------------------------- batches as objects
def test_dataclass_batches_with_attribute_keys(tmp_path):
    """``input_key="image"`` on a dataclass batch was "Could not take input with key 'image'"."""
    x, y = _data()
    loaders = _loaders(x, y, collate=_collate)
    mon = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4, input_key="image", label_key="label",
                             strict=True)  # fmt: skip
    _, tr = _fit(tmp_path, lambda: Lit(CNN()), loaders, [mon], max_epochs=1)
    assert mon.probe_x.shape == (4, 1, 8, 8) and torch.equal(mon.probe_y, y[32:36])
    assert "maps/sparseness/saliency" in tr.callback_metrics


# --------------------------------------------------------------------------- forward(batch)
class BatchForward(Lit):
    """The Lightning habit: ``forward`` unpacks the whole batch."""

    def forward(self, batch):
        return self.backbone(batch[0])

    def _loss(self, batch) -> torch.Tensor:
        return F.cross_entropy(self(batch), batch[1])


class TensorNamedBatch(Lit):
    """A ``forward(batch)`` that takes a batch of inputs: it works, and must not be refused."""

    def forward(self, batch):
        return self.backbone(batch)


@pytest.mark.parametrize("callback", ["monitor", "distiller", "masker"])
def test_forward_taking_the_batch_names_model_attr(tmp_path, callback):
    """Was: "expected 4D input (got 3D input)" once per method (forward took x[0] of the input tensor)."""
    x, y = _data(n=32)
    make = {
        "monitor": lambda **kw: AttributionMonitor(budget=None, methods=["saliency", "occlusion"], num_samples=4, **kw),
        "distiller": lambda **kw: Distiller(budget=None, students=["tree"], export=False, **kw),
        "masker": lambda **kw: SaliencyMasker(budget=None, num_samples=4, **kw),
    }[callback]
    # the fix named for both shapes: one network (model_attr) or several in turn (forward takes the input tensor)
    fixes = r"model_attr=.*\['backbone'\].*let forward take the input tensor"
    with pytest.raises(TypeError, match=r"forward\(batch\) failed on the input tensor.*" + fixes):
        _fit(tmp_path / "a", lambda: BatchForward(CNN()), _loaders(x, y), [make(strict=True)], max_epochs=1)
    _, tr = _fit(
        tmp_path / "b", lambda: BatchForward(CNN()), _loaders(x, y), [make(strict=True, model_attr="backbone")]
    )
    _, tr2 = _fit(tmp_path / "c", lambda: TensorNamedBatch(CNN()), _loaders(x, y), [make(strict=True)])
    tag = {"monitor": "maps/sparseness/occlusion", "distiller": "distillation/fidelity/tree"}.get(
        callback, "maps/area/masker"
    )
    assert tag in tr.callback_metrics and tag in tr2.callback_metrics


class TupleOut(nn.Module):
    """A network returning ``(logits, features)``, as a new user's often does."""

    def __init__(self) -> None:
        super().__init__()
        self.net = CNN()

    def forward(self, x: torch.Tensor):
        return self.net(x), x.mean((1, 2, 3))


def test_tuple_output_failure_reads_epoch_first_and_names_output_key(tmp_path):
    """Was: "method 'saliency' failed: TypeError: ... returns the scores. at epoch 0. Skipped." (the epoch after the
    error's full stop); the warning names the epoch first and the fix (output_key=0) stays in it."""
    x, y = _data(n=32)

    class Lit2(Lit):
        def _loss(self, batch) -> torch.Tensor:
            return F.cross_entropy(self(batch[0])[0], batch[1])

    mon = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4)
    with pytest.warns(UserWarning) as record:
        _fit(tmp_path, lambda: Lit2(TupleOut()), _loaders(x, y), [mon], max_epochs=1)
    text = [str(w.message) for w in record if "failed" in str(w.message)]
    assert any(
        t.startswith("AttributionMonitor, epoch 0: method 'saliency' failed: TypeError: ") and "output_key=0" in t
        and t.endswith("scores. Skipped. Later epochs with the same failure are not reported again.")
        for t in text
    ), text


# --------------------------------------------------------------------------- torch.compile
def test_compiled_network_is_explained_through_its_original(tmp_path):
    """A ``torch.compile``'d network: forward hooks (Grad-CAM) do not fire in its graphs, CD cannot trace
    it, double backward fails. ``model_attr`` naming it now explains the original module (was: the
    compiled wrapper), and without ``model_attr`` a warning names the fix."""
    x, y = _data()

    def make() -> Lit:
        module = Lit(CNN())
        module.backbone = torch.compile(module.backbone, backend="eager")  # no code generation: fast
        return module

    mon = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4, model_attr="backbone", strict=True)
    plain = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4)
    with pytest.warns(UserWarning, match="torch.compile'd modules \\['backbone'\\].*model_attr='backbone'"):
        module, tr = _fit(tmp_path, make, _loaders(x, y), [mon, plain], max_epochs=1)
    assert mon.model(module) is module.backbone._orig_mod
    assert "maps/sparseness/saliency" in tr.callback_metrics


# --------------------------------------------------------------------------- Lightning settings
def _all_callbacks(strict: bool = True) -> list:
    return [
        AttributionMonitor(budget=None,
            methods=["saliency", {"name": "ig", "n_steps": 4}],
            metrics=[{"name": "deletion", "n_steps": 4}],
            num_samples=4,
            strict=strict,
        ),
        InteractionMonitor(budget=None, num_samples=4, strict=strict),
        SpRAyMonitor(budget=None, num_samples=12, per_class=None, min_per_class=4, every_n_epochs=1, strict=strict),
        SaliencyMasker(budget=None, num_samples=4, strict=strict),
        Distiller(budget=None, students=["tree", "online"], buffer_size=64, export=False, strict=strict),
        ConceptMonitor(budget=None, num_samples=4, num_reference=8, strict=strict),
    ]


@pytest.mark.parametrize(
    "kw",
    [
        {"fast_dev_run": True},
        {"val_check_interval": 0.5, "accumulate_grad_batches": 2, "gradient_clip_val": 0.5},
        {"manual": True, "check_val_every_n_epoch": 2, "num_sanity_val_steps": 0},
    ],
    ids=["fast_dev_run", "val_twice_per_epoch_accumulate_clip", "manual_optimisation_val_every_2"],
)
def test_lightning_settings_leave_training_bit_identical(tmp_path, kw):
    x, y = _data()
    kw = dict(kw)
    manual = kw.pop("manual", False)
    base, _ = _fit(tmp_path / "a", lambda: Lit(CNN(), manual=manual), _loaders(x, y), **kw)
    cbs = _all_callbacks()
    module, tr = _fit(tmp_path / "b", lambda: Lit(CNN(), manual=manual), _loaders(x, y), cbs, **kw)
    _assert_same_weights(base, module)
    tags = ("faithfulness/deletion/ig", "interactions/top_pair/cd", "maps/area/masker", "distillation/fidelity/tree",
            "cost/seconds/concepts")  # fmt: skip
    for tag in tags:
        assert tag in tr.callback_metrics, tag


def test_resume_with_every_callback_is_bit_identical_and_keeps_state(tmp_path):
    x, y = _data()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = _all_callbacks()
    _fit(tmp_path / "a", lambda: Lit(CNN()), _loaders(x, y), [*first, ckpt], max_epochs=1)
    path = str(tmp_path / "ckpt" / "last.ckpt")
    resumed = []
    for cbs in ([], _all_callbacks()):
        torch.manual_seed(0)
        module = Lit(CNN())
        tr = trainer(tmp_path / f"r{len(cbs)}", callbacks=cbs, max_epochs=2, logger=False)
        tr.fit(module, *_loaders(x, y)(), ckpt_path=path)
        resumed.append(module)
    _assert_same_weights(*resumed)
    mon, _, _, masker, dist, concepts = cbs
    assert torch.equal(mon.probe_x, first[0].probe_x) and set(mon.previous) == {"saliency", "ig"}
    assert torch.equal(concepts.ref_x, first[-1].ref_x) and [e for e, _ in concepts.history] == [0, 1]
    assert masker._steps == 8 and [h["epoch"] for h in dist.history] == [0, 1]
    shutil.rmtree(tmp_path / "ckpt")


def test_missing_input_key_error_lists_the_dict_keys() -> None:
    from explain_callbacks._internal.batch import BatchAdapter

    batch = {"pixels": torch.zeros(2, 3), "cls": torch.zeros(2)}
    with pytest.raises(KeyError, match=r"keys \['cls', 'pixels'\].*input_key="):
        BatchAdapter().inputs(batch)
