"""The callbacks under Lightning setups the other tests do not use, each with what broke before.

Broke before: a validation batch the Distiller cannot read stopped training (strict=False); two callbacks of one
type with different settings (InteractionMonitor grids, Distiller buffers, SaliencyMasker widths, IG step
counts) could not be given to one Trainer ("Found more than one stateful callback"); a method, metric or
Distiller step that fails on every epoch warned on every epoch (or batch); the regularizer's warm-up by epochs
stalled for a ``training_step(self, batch)`` and ended after ``warmup_epochs`` batches on a loader without
length; the RegularizerMixin's random penalties drew the same points for the batches of one accumulated step;
``every_n_epochs`` with ``check_val_every_n_epoch`` could never be due; fast_dev_run skipped due-later
explanations and wrote the Distiller's export; ``trainer.fit(torch.compile(module))`` broke Grad-CAM and the
penalties; ACD ran without a TensorBoard logger to take it; SpRAy with too few maps per class and a masker
without training said nothing. Checked without a fix needed (regression guards, bit-identical weights with
and without the callbacks): bf16 mixed precision, several validation loaders, two optimisers, EarlyStopping
with ModelCheckpoint, TensorBoard with CSV, validation by steps across epochs, no validation_step,
validate/test/predict without fit and fit twice, and the scores after a resume equal to those of the run
without interruption.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from explain_callbacks.callbacks import (
    AttributionMonitor,
    AttributionRegularizer,
    Distiller,
    InteractionMonitor,
    SaliencyMasker,
    SpRAyMonitor,
)
from explain_callbacks.regularize import RegularizerMixin
from explain_callbacks.regularize.penalties import Penalty


class CNN(nn.Module):
    def __init__(self, k: int = 3, dropout: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(dropout), nn.Linear(16, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Lit(pl.LightningModule):
    """``two_optimizers`` trains a second head with its own optimiser (manual optimisation)."""

    def __init__(self, dropout: float = 0.3, two_optimizers: bool = False) -> None:
        super().__init__()
        self.net = CNN(dropout=dropout)
        self.aux = nn.Linear(3, 3) if two_optimizers else None
        self.automatic_optimization = not two_optimizers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
        loss = F.cross_entropy(self(x), y)
        if self.aux is None:
            return loss
        opts = self.optimizers()
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(loss + self.aux(self(x)).pow(2).mean())
        for opt in opts:
            opt.step()
        return None

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        if self.aux is not None:
            return [torch.optim.SGD(self.net.parameters(), lr=0.05), torch.optim.SGD(self.aux.parameters(), lr=0.05)]
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class NoValidationStep(Lit):
    validation_step = None  # type: ignore[assignment]


def _data(n: int = 64):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    x[torch.arange(n), 0, y * 2, y * 2] += 2.0
    return x, y


def _loaders(shuffle: bool = True):
    x, y = _data()
    train = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8, shuffle=shuffle,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    return train, DataLoader(TensorDataset(x[32:], y[32:]), batch_size=8)


def _trainer(tmp_path, callbacks=(), **kw) -> pl.Trainer:
    kw.setdefault("max_epochs", 2)
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    return pl.Trainer(accelerator="cpu", devices=1, callbacks=list(callbacks), enable_progress_bar=False,
                      enable_model_summary=False, deterministic=True, default_root_dir=str(tmp_path), **kw)  # fmt: skip


def _fit(tmp_path, callbacks=(), make=Lit, loaders=_loaders, fit_kw=None, **kw):
    torch.manual_seed(0)
    module = make()
    tr = _trainer(tmp_path, callbacks, **kw)
    tr.fit(module, *loaders(), **(fit_kw or {}))
    return module, tr


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    wa, wb = a.state_dict(), b.state_dict()
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def _monitors(strict: bool = True) -> list:
    return [
        AttributionMonitor(budget=None,
            methods=["saliency", {"name": "ig", "n_steps": 4}],
            metrics=[{"name": "deletion", "n_steps": 4}],
            num_samples=4,
            strict=strict,
        ),
        InteractionMonitor(budget=None, num_samples=4, strict=strict),
        Distiller(budget=None, students=["tree", "online"], buffer_size=64, export=False, strict=strict),
    ]


def _explain_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "explain_callbacks" in w.filename]


# --------------------------------------------------------------------------- bugs found
def test_distiller_skips_validation_batches_it_cannot_read(tmp_path):
    """Training batches are dicts, validation batches tuples, and ``input_key`` reads the dicts only: the
    Distiller's validation hook raised (TypeError/KeyError) and stopped training although strict=False."""
    x, y = _data()

    def loaders():
        rows = [{"image": x[i], "label": y[i]} for i in range(32)]
        train = DataLoader(rows, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
        return train, DataLoader(TensorDataset(x[32:], y[32:]), batch_size=8)

    base, _ = _fit(tmp_path / "a", loaders=loaders, max_epochs=3)
    dist = Distiller(
        budget=None, students=["tree"], input_key=lambda b: b["image"], label_key=lambda b: b["label"], export=False
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        module, tr = _fit(tmp_path / "b", [dist], loaders=loaders, max_epochs=3)
    _same_weights(base, module)
    messages = _explain_warnings(record)
    assert sum("taking validation rows from a batch" in m for m in messages) == 1, messages  # once, not per batch
    assert [h["epoch"] for h in dist.history] == [0, 1, 2]  # fitted on the training rows, in-sample fidelity
    assert "distillation/train_fidelity/tree" in tr.callback_metrics
    with pytest.raises(TypeError):
        strict = Distiller(students=["tree"], input_key=lambda b: b["image"], export=False, strict=True)
        _fit(tmp_path / "c", [strict], loaders=loaders, max_epochs=1)


def _pairs() -> list:
    """Two callbacks of each type that differ only in settings outside the former state keys."""
    return [
        InteractionMonitor(budget=None, num_samples=4, groups=2, strict=True),
        InteractionMonitor(budget=None, num_samples=4, groups=4, strict=True),
        AttributionMonitor(budget=None, methods=[{"name": "ig", "n_steps": 4}], num_samples=4, strict=True),
        AttributionMonitor(budget=None, methods=[{"name": "ig", "n_steps": 8}], num_samples=4, strict=True),
        # rows in the checkpoint (checkpoint_buffer=True; left out by default): each buffer restores its own
        Distiller(budget=None, students=["tree"], buffer_size=16, export=False, strict=True, checkpoint_buffer=True),
        Distiller(
            budget=None,
            students=["tree"], buffer_size=64, every_n_epochs=2, export=False, strict=True, checkpoint_buffer=True
        ),
        SaliencyMasker(budget=None, num_samples=4, width=4, strict=True),
        SaliencyMasker(budget=None, num_samples=4, width=8, strict=True),
    ]


def test_two_callbacks_of_one_type_with_different_settings_checkpoint_and_resume(tmp_path):
    """Was: RuntimeError "Found more than one stateful callback of type `InteractionMonitor`" at
    ``Trainer(...)``; the settings now take part in the state keys, so each restores its own state, in any
    order (the maskers of width 4 and 8 would not even load each other's weights)."""
    first = _pairs()
    keys = [c.state_key for c in first]
    assert len(set(keys)) == len(keys)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path / "a", [*first, ckpt], max_epochs=1)
    resumed = _pairs()[::-1]
    _fit(tmp_path / "b", resumed, max_epochs=2, fit_kw={"ckpt_path": str(tmp_path / "ckpt" / "last.ckpt")})
    resumed = resumed[::-1]
    assert torch.equal(resumed[0].probe_x, first[0].probe_x) and resumed[0].last_scores["cd"]["matrix"].shape == (4, 4)
    assert resumed[1].last_scores["cd"]["matrix"].shape == (16, 16)
    assert set(resumed[2].previous) == set(resumed[3].previous) == {"ig"}
    assert [h["epoch"] for h in resumed[4].history] == [0, 1] and len(resumed[4].buffer) == 16
    assert [h["epoch"] for h in resumed[5].history] == [1] and len(resumed[5].buffer) == 64
    assert resumed[6]._steps == resumed[7]._steps == 8
    for before, after in zip(first[6:], resumed[6:]):  # each masker got its own weights back (widths 4 and 8)
        assert [p.shape for p in after.masker.parameters()] == [p.shape for p in before.masker.parameters()]


def test_a_checkpoint_with_the_former_state_keys_still_restores(tmp_path):
    """Checkpoints written before the settings joined the keys hold the states under the former keys
    (``_legacy_state_key``): Lightning looks them up there. The configs' defaults (IG as a mapping, a Distiller
    every 5 epochs) have new keys, so their earlier checkpoints take this path."""

    def callbacks():
        return [
            InteractionMonitor(budget=None, num_samples=4, groups=2, strict=True),
            AttributionMonitor(
                budget=None, methods=["saliency", {"name": "ig", "n_steps": 4}], num_samples=4, strict=True),
            Distiller(
                budget=None, students=["tree"], every_n_epochs=5, export=False, strict=True, checkpoint_buffer=True
            ),
            SaliencyMasker(budget=None, num_samples=4, width=4, strict=True),
        ]

    first = callbacks()
    assert all(cb.state_key != cb._legacy_state_key for cb in first)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path / "a", [*first, ckpt], max_epochs=1)
    path = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(path, weights_only=False)
    legacy = {cb.state_key: cb._legacy_state_key for cb in first}
    state["callbacks"] = {legacy.get(k, k): v for k, v in state["callbacks"].items()}  # as an older version wrote it
    torch.save(state, path)
    again = callbacks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning notes the keys it found no callback for (the former ones too)
        _fit(tmp_path / "b", again, max_epochs=2, fit_kw={"ckpt_path": str(path)})
    assert torch.equal(again[0].probe_x, first[0].probe_x) and torch.equal(again[1].probe_x, first[1].probe_x)
    assert len(again[2].buffer) == 64 and again[3]._steps == 8  # 32 rows and 4 steps restored, as many added


class Boom:
    name = "boom"

    def __call__(self, model, x, target, create_graph=False):
        raise RuntimeError("kaput")


def test_a_method_failing_every_epoch_warns_once(tmp_path):
    """Was: one warning per method and metric at every epoch ("... at epoch 0/1/2 ..."), and the Distiller's per
    batch and per epoch: a screenful per run."""
    bad_metric = {"name": "deletion", "n_steps": 4, "substrate": "no_such_substrate"}
    mon = AttributionMonitor(budget=None, methods=[Boom(), "saliency"], num_samples=4, metrics=[bad_metric])
    # tuple batches: nothing to buffer
    dist = Distiller(budget=None, students=["tree"], input_key="image", export=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, [mon, dist], max_epochs=3)
    messages = _explain_warnings(record)
    assert sum("method 'boom' failed: RuntimeError: kaput" in m for m in messages) == 1, messages
    assert sum("metric 'deletion' on 'saliency' failed" in m for m in messages) == 1, messages
    assert sum("Distiller failed while collecting a training batch" in m for m in messages) == 1, messages
    assert sum("fewer than 2 buffered training rows" in m for m in messages) == 1, messages
    assert all("not reported again" in m for m in messages if "failed" in m)
    assert "saliency" in mon.last_scores  # the working method goes on every epoch


class BatchOnly(Lit):
    """Lightning passes no batch index to a ``training_step(self, batch)``."""

    def training_step(self, batch):  # type: ignore[override]
        x, y = batch
        return F.cross_entropy(self(x), y)


class Recording(AttributionRegularizer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[float] = []

    def current_weight(self, trainer, batch_idx):
        self.seen.append(super().current_weight(trainer, batch_idx))
        return self.seen[-1]


def test_regularizer_warmup_by_epochs_without_batch_idx(tmp_path):
    """Was: λ stayed at its value for the first batch of each epoch (0.125 ×4, then 0.625 ×4): the missing
    batch index was read as 0."""
    weights = {}
    for make in (Lit, BatchOnly):
        reg = Recording("eg_mask", weight=1.0, warmup_epochs=2, mask=lambda b: torch.ones_like(b[0]))
        _fit(tmp_path / make.__name__, [reg], make=make, max_epochs=2)
        weights[make] = reg.seen
    assert weights[BatchOnly] == weights[Lit] == pytest.approx([i / 8 for i in range(1, 9)])


def test_regularizer_warmup_by_epochs_on_a_stream_names_warmup_steps(tmp_path):
    """An IterableDataset without length: was a warm-up "over 2 epochs" finished after 2 batches
    (num_training_batches is inf, read as 1 batch per epoch). Now a clear error; warmup_steps works."""
    x, y = _data()

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(x[:32], y[:32]))

    def loaders():
        return DataLoader(Stream(), batch_size=8), _loaders()[1]

    reg = AttributionRegularizer("eg_mask", warmup_epochs=2, mask=lambda b: torch.ones_like(b[0]))
    with pytest.raises(MisconfigurationException, match=r"warmup_epochs=2\.0 needs the number of training batches"):
        _fit(tmp_path / "a", [reg], loaders=loaders)
    reg = Recording("eg_mask", warmup_steps=8, mask=lambda b: torch.ones_like(b[0]))
    _fit(tmp_path / "b", [reg], loaders=loaders)
    assert reg.seen == pytest.approx([i / 8 for i in range(1, 9)])


class StepRecorder(Penalty):
    name = "steps"
    needs_mask = False

    def __init__(self) -> None:
        super().__init__()
        self.seeds: list[int] = []

    def compute(self, model, inputs, targets, mask, *, seed):
        self.seeds.append(seed)
        return model(inputs).sum() * 0.0


class MixinModule(RegularizerMixin, Lit):
    def __init__(self) -> None:
        super().__init__()
        self.add_penalty(StepRecorder(), weight=1.0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.penalized_loss(F.cross_entropy(self(x), y), x, y)


def test_mixin_draws_per_batch_under_gradient_accumulation(tmp_path):
    """Was: ``step=trainer.global_step``, so the two batches of an accumulated step drew the same random points
    (seeds 0, 0, 1, 1, ...); now one per batch, as the callback's (and resumable: the batch count is restored)."""
    module, _ = _fit(tmp_path, make=MixinModule, max_epochs=2, accumulate_grad_batches=2, logger=False)
    assert module.penalties["steps"][0].seeds == list(range(8))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path / "a", [ckpt], make=MixinModule, max_epochs=1, accumulate_grad_batches=2)
    resumed, _ = _fit(tmp_path / "b", make=MixinModule, max_epochs=2, accumulate_grad_batches=2,
                      fit_kw={"ckpt_path": str(tmp_path / "ckpt" / "last.ckpt")})  # fmt: skip
    assert resumed.penalties["steps"][0].seeds == list(range(4, 8))  # the draws of the uninterrupted run


class Counting(AttributionMonitor):
    def __init__(self, **kw) -> None:
        super().__init__(methods=["saliency"], num_samples=4, budget=None, **kw)  # the fixed schedule
        self.calls: list[int] = []

    def explain(self, trainer, pl_module, x, y, target):
        self.calls.append(trainer.current_epoch)


def test_every_n_epochs_with_check_val_every_n_epoch(tmp_path):
    """Validation every 3 epochs and explanations due every 5: was (epoch + 1) % 5 == 0 on validation epochs,
    which 2, 5, 8 never meet (nothing explained in 9 epochs, silently). Now the first validation at or after
    each multiple of 5; with validation every epoch the schedule is unchanged."""
    every5 = Counting(every_n_epochs=5)
    _fit(tmp_path / "a", [every5], max_epochs=9, check_val_every_n_epoch=3, num_sanity_val_steps=0)
    assert every5.calls == [5]
    every2 = Counting(every_n_epochs=2)
    _fit(tmp_path / "b", [every2], max_epochs=6, check_val_every_n_epoch=1)
    assert every2.calls == [1, 3, 5]
    smoke = Counting(every_n_epochs=5)  # fast_dev_run tries every code path: it explains (was skipped)
    _fit(tmp_path / "d", [smoke], fast_dev_run=True)
    assert smoke.calls == [0]
    never = Counting(every_n_epochs=5)  # 3 epochs never reach epoch 5: now said at the end of fit
    with pytest.warns(UserWarning, match="explained nothing during fit: every_n_epochs=5 was not reached in 3 epochs"):
        _fit(tmp_path / "c", [never], max_epochs=3)
    assert never.calls == [] and never.probe_size == 4


def test_fast_dev_run_writes_no_distiller_files(tmp_path, monkeypatch):
    """Was: the students exported to ``<cwd>/distill`` by a debugging run (Lightning writes nothing then)."""
    monkeypatch.chdir(tmp_path)
    dist = Distiller(
        budget=None, students=["tree"], every_n_epochs=5, strict=True
    )  # export=True, dir from the disabled logger
    _, tr = _fit(tmp_path, [dist], fast_dev_run=True)
    assert dist.exported == {} and [h["epoch"] for h in dist.history] == [0]
    assert "distillation/fidelity/tree" in tr.callback_metrics  # logged although every_n_epochs=5 (smoke test)
    assert list(tmp_path.rglob("*")) == []


def test_spray_with_too_few_maps_per_class_says_so(tmp_path):
    """Many classes or a small probe (here 12 maps over 3 classes, min_per_class=12): every class was skipped
    and nothing logged, silently. Now one warning names the counts and the fix."""
    spray = SpRAyMonitor(budget=None, num_samples=12, per_class=None, min_per_class=12, every_n_epochs=1, strict=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, [spray], max_epochs=2)
    messages = [m for m in _explain_warnings(record) if "SpRAyMonitor analysed no class" in m]
    assert len(messages) == 1 and "fewer than min_per_class=12" in messages[0] and "Raise num_samples" in messages[0]
    assert spray.last_result == {}


def test_lightning_module_compiled_whole(tmp_path):
    """``trainer.fit(torch.compile(module))``: Lightning keeps the module and swaps in a compiled ``forward``. Was:
    Grad-CAM "Layer Conv2d was not called by the model's forward pass" (hooks do not fire in compiled graphs),
    gradient methods failing, and the regularizer stopping training ("compiled with non-empty donated buffers
    which requires create_graph=False"). The callbacks now run the original forward; ``aot_eager`` compiles
    through AOTAutograd as the default backend does, without generating code."""

    def fit(folder, callbacks):
        torch.manual_seed(0)
        module = Lit()
        _trainer(folder, callbacks).fit(torch.compile(module, backend="aot_eager"), *_loaders())
        return module

    base = fit(tmp_path / "a", [])
    mon = AttributionMonitor(budget=None, methods=["gradcam", "saliency"], num_samples=4, strict=True)
    module = fit(tmp_path / "b", [mon, SaliencyMasker(budget=None, num_samples=4, strict=True)])
    _same_weights(base, module)
    assert set(mon.last_scores) == {"gradcam", "saliency"}
    assert module.forward is not module._compiler_ctx["original_forward"]  # the compiled forward is back
    reg = AttributionRegularizer("rrr", weight=0.1, mask=lambda b: torch.ones_like(b[0]))
    fit(tmp_path / "c", [reg])


def test_interaction_pictures_and_acd_only_where_a_logger_takes_them(tmp_path, monkeypatch):
    """Was: ACD hierarchies (and the matrix pictures) computed at every epoch under logger=False, where nothing
    takes them. CSVLogger takes them now (PNG files beside metrics.csv)."""
    from explain_callbacks.callbacks import interaction_monitor

    calls, original = [], interaction_monitor.ACD.__call__
    monkeypatch.setattr(
        interaction_monitor.ACD, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    for logger in (False, CSVLogger(str(tmp_path / "csv")), TensorBoardLogger(str(tmp_path / "tb"))):
        calls.clear()
        mon = InteractionMonitor(budget=None, num_samples=4, acd=True, strict=True)
        _, tr = _fit(tmp_path, [mon], max_epochs=2, logger=logger)
        assert "interactions/top_pair/cd" in tr.callback_metrics
        assert len(calls) == (0 if logger is False else 2)


# --------------------------------------------------------------------------- regression guards (no fix needed)
SETTINGS = {
    "bf16_mixed": {"precision": "bf16-mixed"},
    "two_val_loaders": {"loaders": lambda: (_loaders()[0], [_loaders()[1], _loaders()[1]])},
    "two_optimizers": {"make": lambda: Lit(two_optimizers=True)},
    "early_stopping_checkpoint": {"extra": lambda tmp: [EarlyStopping("val_loss", patience=1),
                                                        ModelCheckpoint(dirpath=tmp / "ck", monitor="val_loss")]},
    "tensorboard_and_csv": {"logger": lambda tmp: [TensorBoardLogger(str(tmp)), CSVLogger(str(tmp))]},
    "val_every_3_steps_across_epochs": {"val_check_interval": 3, "check_val_every_n_epoch": None},
}  # fmt: skip


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_lightning_settings_bit_identical(tmp_path, setting):
    def run(folder, callbacks):
        kw = dict(SETTINGS[setting])
        make, loaders = kw.pop("make", Lit), kw.pop("loaders", _loaders)
        extra = kw.pop("extra", lambda tmp: [])(folder)
        if "logger" in kw:
            kw["logger"] = kw["logger"](folder)
        return _fit(folder, [*callbacks, *extra], make=make, loaders=loaders, max_epochs=3, **kw)

    base, _ = run(tmp_path / "a", [])
    cbs = _monitors()
    module, tr = run(tmp_path / "b", cbs)
    _same_weights(base, module)
    tags = ("faithfulness/deletion/ig", "maps/drift/ig", "interactions/top_pair/cd", "distillation/fidelity/online")
    for tag in tags:
        assert tag in tr.callback_metrics, tag


def test_without_validation_step_monitors_say_so_and_distiller_fits(tmp_path):
    cbs = _monitors(strict=False)
    with pytest.warns(UserWarning, match="explained nothing.*no val_dataloader or validation_step"):
        _fit(tmp_path, cbs, make=NoValidationStep, max_epochs=2)
    assert [h["epoch"] for h in cbs[2].history] == [0, 1]


def test_validate_test_predict_without_fit_and_fit_twice(tmp_path):
    cbs = [*_monitors(), SaliencyMasker(budget=None, num_samples=4, strict=True),
           SpRAyMonitor(
               budget=None, num_samples=12, per_class=None, min_per_class=4, every_n_epochs=1, strict=True
           )]  # fmt: skip
    torch.manual_seed(0)
    module = Lit()
    train, val = _loaders()
    tr = _trainer(tmp_path, cbs)
    with pytest.warns(UserWarning, match="SaliencyMasker has no trained masker"):  # was silent
        (out,) = tr.validate(module, val)
    assert "faithfulness/deletion/ig" in out and "interactions/top_pair/cd" in out
    (out,) = tr.test(module, val)
    # under test/, never in the validation curves; no drift (it compared the same weights: always 1.0)
    assert "test/faithfulness/deletion/ig" in out and "test/interactions/top_pair/cd" in out
    assert not any("drift" in k for k in out)
    assert len(tr.predict(module, val)) == 4
    tr.fit(module, train, val)
    tr.fit(module, *_loaders())  # max_epochs reached: nothing to do, nothing breaks
    _trainer(tmp_path / "2", cbs, max_epochs=1).fit(module, *_loaders())  # the same callbacks on a new trainer
    assert cbs[3]._steps == 12 and [h["epoch"] for h in cbs[2].history] == [0, 1, 0]


def test_drift_after_resume_equals_the_uninterrupted_run(tmp_path):
    """No dropout and no shuffling, so training after a resume is exactly the uninterrupted one: every logged
    score (drift against the previous epoch's maps kept in the checkpoint included) must be the same."""

    def callbacks():
        return [*_monitors(), SaliencyMasker(budget=None, num_samples=4, strict=True)]

    make, loaders = (lambda: Lit(dropout=0.0)), (lambda: _loaders(shuffle=False))
    full = callbacks()
    m_full, _ = _fit(tmp_path / "f", full, make=make, loaders=loaders, max_epochs=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path / "a", [*callbacks(), ckpt], make=make, loaders=loaders, max_epochs=1)
    res = callbacks()
    m_res, _ = _fit(tmp_path / "r", res, make=make, loaders=loaders, max_epochs=3,
                        fit_kw={"ckpt_path": str(tmp_path / "ckpt" / "last.ckpt")})  # fmt: skip
    _same_weights(m_full, m_res)

    def scores(mon):
        return {m: {k: v for k, v in s.items() if k != "seconds"} for m, s in mon.last_scores.items()}

    assert scores(res[0]) == scores(full[0]) and "drift" in scores(res[0])["ig"]
    for key in ("mean_abs", "top_pair", "consistency", "pairs"):
        assert res[1].last_scores["cd"][key] == full[1].last_scores["cd"][key], key
    assert [h["tree"]["fidelity"] for h in res[2].history] == [h["tree"]["fidelity"] for h in full[2].history]
    _same_weights(full[3].masker, res[3].masker)
