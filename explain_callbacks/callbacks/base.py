"""Base of the explaining callbacks: a fixed probe set, scheduling, the model guard, error policy."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from .._internal.batch import BatchAdapter, InputSpec, masks_of
from .._internal.batching import BatchSize, measuring_seconds
from .._internal.checks import finite_rows
from .._internal.distributed import Agreement, RankStateCallback, agree, warn_rank
from .._internal.guard import detach_clone, model_guard
from .._internal.outputs import OutputSpec, output_adapter
from .._internal.targets import TargetPolicy, check_target_policy, resolve_target, target_key
from . import _logging

__all__ = [
    "ProbeCallback",
    "TimeBudget",
    "check_forward",
    "class_indices",
    "compiled_children",
    "eager_forward",
    "float_dtype",
    "non_default_settings",
    "resolve_model",
    "uncompiled",
]


def resolve_model(pl_module: pl.LightningModule, model_attr: str | None) -> nn.Module:
    """The network a callback explains: the LightningModule itself, or its attribute ``model_attr``
    (the original module when that attribute is ``torch.compile``'d: see :func:`uncompiled`)."""
    if model_attr is None:
        return pl_module
    model = getattr(pl_module, model_attr, None)
    if not isinstance(model, nn.Module):
        raise AttributeError(f"pl_module has no nn.Module attribute {model_attr!r}; fix model_attr.")
    return uncompiled(model)


def uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped, for a compiled module (the same parameters and buffers): the
    methods' forward hooks (Grad-CAM, layer methods) do not fire inside compiled graphs, contextual
    decomposition cannot trace them, double backward is not supported and every new probe shape
    would recompile. Any other module is returned as is."""
    orig = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(orig, nn.Module):
        return orig
    return model


@contextlib.contextmanager
def eager_forward(module: nn.Module) -> Iterator[nn.Module]:
    """Run a LightningModule that Lightning compiled (``trainer.fit(torch.compile(module))``) through its original
    ``forward`` inside the block, and restore the compiled one after it.

    Lightning's ``from_compiled`` keeps the module and replaces its ``forward`` (and steps) by compiled ones: the
    methods' forward hooks did not fire inside them (Grad-CAM: "Layer Conv2d was not called by the model's
    forward pass"), and penalties need double backward. Other modules are left alone.
    """
    ctx = getattr(module, "_compiler_ctx", None)
    original = ctx.get("original_forward") if isinstance(ctx, dict) else None
    if original is None:
        yield module
        return
    missing = object()
    saved = module.__dict__.get("forward", missing)
    module.__dict__["forward"] = original
    try:
        yield module
    finally:
        if saved is missing:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = saved


def compiled_children(model: nn.Module) -> list[str]:
    """Names of the ``torch.compile``'d submodules of ``model``."""
    return [name for name, m in model.named_modules() if name and type(m).__name__ == "OptimizedModule"]


def check_forward(model: nn.Module, inputs: Tensor | None = None) -> None:
    """Refuse, with the fix, a LightningModule without ``forward`` (its network lives in an attribute) and a
    network whose ``forward`` needs more than one input: the callbacks feed it one tensor (``input_key``),
    which would fail with "missing the required forward function" or "forward() missing 1 required
    positional argument". Given ``inputs``, a ``forward(batch)`` (the Lightning habit of a forward that
    unpacks the whole batch) is tried on one row of them, no grad: when it fails, the error names
    ``model_attr`` instead of the network's "expected 4D input (got 3D input)" once per method."""
    if isinstance(model, pl.LightningModule) and type(model).forward is pl.LightningModule.forward:
        nets = [name for name, _ in model.named_children()]
        raise NotImplementedError(
            f"{type(model).__name__} does not define forward, which the callbacks call to explain it; define "
            f"forward, or pass model_attr= the attribute holding the network (submodules here: {nets[:10]})."
        )
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read (builtins, some wrappers)
        return
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
    if len(required) > 1:
        raise TypeError(
            f"{type(model).__name__}.forward takes {len(required)} inputs {required}, but the callbacks explain "
            "one input tensor. Give the other inputs defaults, or add a module whose forward takes the tensor "
            "to explain (the others fixed or derived from it) and point the callback at it with model_attr=... "
            "(input_key= says where that tensor is in the batch)."
        )
    if inputs is not None and required == ["batch"]:
        try:
            with torch.no_grad():
                model(inputs[:1])
        except Exception as err:
            nets = [name for name, _ in model.named_children()]
            raise TypeError(
                f"{type(model).__name__}.forward(batch) failed on the input tensor ({type(err).__name__}: {err}). The "
                "callbacks call forward with the input tensor alone (input_key= says where it is in the batch); if "
                f"forward unpacks the whole batch, pass model_attr= the network it calls (submodules: {nets[:10]}), "
                "or, when it calls several of them in turn, let forward take the input tensor and unpack the batch "
                "in the steps (self(batch['x']))."
            ) from err


def class_indices(y: Tensor) -> Tensor | None:
    """Labels as class indices (N,): integer, boolean or integral float labels of shape (N,) or (N, 1);
    None for labels that are not one class per sample (multi-hot, one-hot, real-valued)."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        return None
    if y.dtype == torch.bool:
        return y.long()
    if y.is_floating_point():
        if not bool((y == y.round()).all()):
            return None
        return y.long()
    return y


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the network computes in: that of its first floating parameter (``precision="64-true"``
    or ``"bf16-true"`` store the weights so), float32 when it has none."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def non_default_settings(callback: Callback, **values: Any) -> dict[str, Any]:
    """Those of ``values`` that differ from the defaults of the callback's ``__init__`` (or a base's), as plain
    values for a checkpoint state key: numbers, strings, None and lists/dicts of them, a tensor by shape and
    checksum; anything else (functions, modules) is left out."""
    defaults: dict[str, Any] = {}
    for cls in reversed(type(callback).__mro__):  # a subclass's default wins; **kwargs reach the base's
        try:
            params = inspect.signature(cls.__init__).parameters.values()
        except (TypeError, ValueError):
            continue
        defaults.update({p.name: p.default for p in params if p.default is not inspect.Parameter.empty})
    out = {}
    for name, value in values.items():
        default = defaults.get(name, inspect.Parameter.empty)
        plain = _plain(value)
        if default is inspect.Parameter.empty:
            default = None  # a setting without a default in the signature: None stands for "not set"
        if plain is _NOT_PLAIN or _plain(default) == plain:
            continue
        out[name] = plain
    return out


_NOT_PLAIN = object()


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor):
        data = value.detach().cpu().contiguous()
        return f"tensor{tuple(data.shape)}:{zlib.crc32(data.numpy().tobytes()) if data.numel() else 0}"
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    if isinstance(value, Mapping):
        pairs = {str(k): _plain(v) for k, v in value.items()}
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in pairs.values()) else pairs
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    return _NOT_PLAIN


def first_of(k: int, n: int, what: str) -> str:
    """``"probe 0 of 8"``, ``"probes 0–3 of 8"``: the first ``k`` of ``n`` (for the budget's notes)."""
    return f"{what} 0 of {n}" if k == 1 else f"{what}s 0–{k - 1} of {n}"


class TimeBudget:
    """A share of ``fit``'s wall time that a callback may spend on its own work (explanations, student fits, a
    masker's steps): mixed into :class:`ProbeCallback`, the :class:`~explain_callbacks.callbacks.Distiller` and
    the :class:`~explain_callbacks.callbacks.SaliencyMasker`, so all of them decide by one rule.

    The rule (:meth:`budget_units`): with ``E`` the seconds since the fit started and ``S`` the seconds this callback
    spent, the work allowed now is ``A = budget × (E − S) − S`` (the training time is the fit's time less the
    callback's); a piece of work of ``u`` seconds per unit (a probe, a buffered row, a step) takes
    ``floor(A / u)`` units, none when ``A <= 0``. Before any measurement a first piece of the smallest unit of work
    the callback has (one probe, a few student-fit rows, one masker step; ``first``) measures ``u``, whatever the
    budget, so that piece must be small: on a short run a whole probe of contextual decomposition was 8 % of the
    training. From there the piece grows geometrically while the budget allows: a piece that scales takes at most
    ``growth`` × the largest piece measured so far (:attr:`budget_growth`), so a cost per unit measured on a small
    piece (where fixed costs weigh and caches are warm) is extrapolated at most that far.
    Under DDP the times and piece sizes are agreed across ranks (their maximum) first, so every rank decides the
    same. The spent time, the training time so far, the cost per unit and the largest piece are kept in
    checkpoints: a resumed fit goes on with the budget where it stopped instead of granting a fresh one.
    """

    budget: float | None
    #: the clock the budget reads (seconds); tests replace it to make the decisions reproducible
    clock: Callable[[], float] = staticmethod(time.perf_counter)
    #: how much larger than the largest measured piece of its kind the next scaling piece may be (geometric growth
    #: from the first, smallest piece; the budget's ``floor(A / u)`` caps it too)
    budget_growth: float = 2.0

    @staticmethod
    def _check_budget(budget: float | None) -> float | None:
        if budget is not None and not 0.0 < float(budget) <= 1.0:
            raise ValueError(f"budget is a fraction of the training time in (0, 1], e.g. 0.05; got {budget}.")
        return None if budget is None else float(budget)

    def _budget_reset(self) -> None:
        self._fit_started: float | None = None
        self._spent = 0.0  # seconds spent in this fit (this rank)
        # seconds per unit of the last measured piece of work of each kind ("probe", "row", "step"; this rank)
        self._per_units: dict[str, float] = {}
        # units of the largest measured piece of each kind (this rank): the next piece grows from it
        self._piece_units: dict[str, int] = {}
        # seconds of the last piece of each kind that did not scale with its units (its figures and tables), where
        # the callback measured them apart: a piece of k units is then expected to cost fixed + k × per unit
        self._fixed: dict[str, float] = {}
        self._budget_skipped = 0  # pieces of work the budget skipped
        self.budget_log: list[tuple[int, int]] = []  # (epoch, units done) of this fit

    def _budget_start(self) -> None:
        """At ``on_fit_start``: a fresh budget, or the one restored from a checkpoint (its training time so far,
        spent time and cost per unit), so a resumed run stays within the budget of the whole training."""
        resume = self.__dict__.pop("_budget_resume", None)
        self._budget_reset()
        now = self.clock()
        self._fit_started = now
        if resume is not None:
            elapsed, self._spent, per_units, pieces, fixed = resume
            self._per_units = dict(per_units)
            self._piece_units = dict(pieces)
            self._fixed = dict(fixed)
            self._fit_started = now - elapsed

    def budget_state(self) -> dict[str, Any]:
        """The budget's state for a checkpoint (empty outside a fit)."""
        if self._fit_started is None:
            return {}
        return {"budget_elapsed": self.clock() - self._fit_started, "budget_spent": self._spent,
                "budget_per_unit": dict(self._per_units), "budget_piece_units": dict(self._piece_units),
                "budget_fixed": dict(self._fixed)}  # fmt: skip

    def load_budget_state(self, state: Mapping[str, Any]) -> None:
        """Keep a checkpoint's budget state for the next ``on_fit_start`` (Lightning restores callbacks first)."""
        if state.get("budget_elapsed") is None:
            return
        per = state.get("budget_per_unit") or {}
        # checkpoints written before the growth rule have no piece sizes: the measured cost alone then decides
        pieces = state.get("budget_piece_units")
        if pieces is None:
            pieces = {str(k): 2**30 for k in per}
        self._budget_resume = (float(state["budget_elapsed"]), float(state.get("budget_spent") or 0.0),
                               {str(k): float(v) for k, v in per.items()},
                               {str(k): int(v) for k, v in pieces.items()},
                               {str(k): float(v) for k, v in (state.get("budget_fixed") or {}).items()})  # fmt: skip

    @property
    def _per_probe(self) -> float | None:  # seconds per probe of the last explanation
        return self._per_units.get("probe")

    @_per_probe.setter
    def _per_probe(self, value: float | None) -> None:
        if value is None:
            self._per_units.pop("probe", None)
        else:
            self._per_units["probe"] = float(value)

    def budget_units(self, trainer: pl.Trainer, n: int, first: int = 1, scales: bool = True,
                     agreed: bool = True, kind: str = "probe") -> int:  # fmt: skip
        """How many of ``n`` units (of ``kind``) the work due now may take under the budget: 0 skips it, ``first``
        (the smallest piece) before any measurement of that kind; then ``floor(A / u)``, at most
        :attr:`budget_growth` × the largest piece measured so far (at least ``first``); with ``scales=False`` all
        ``n`` or none. ``agreed``: the times are the ranks' maximum (a collective: every rank calls this at the same
        point); False decides on this rank's times, for local work that no collective depends on."""
        measured = self._budget_times(trainer, agreed, kind)
        if measured is None:
            return n
        allowed, per_unit, fixed = measured
        if allowed <= 0:
            return 0
        if per_unit < 0:  # nothing measured yet: a first, smallest piece measures the cost
            return min(first, n)
        allowed -= fixed  # what a piece costs whatever its size (measured apart by the callback, else 0)
        k = n if per_unit == 0 else int(min(n, max(allowed, 0.0) // per_unit))
        if not scales:
            return n if k >= n else 0
        # geometric growth from the largest measured piece (the same on every rank: the pieces were agreed)
        grown = max(first, int(self.budget_growth * self._piece_units.get(kind, 2**30)))
        return max(min(k, grown), 0)

    def budget_allowed(
        self, trainer: pl.Trainer, agreed: bool = True, kind: str = "probe"
    ) -> tuple[float, float] | None:
        """``(A, u)``: the seconds the budget allows now and the measured seconds per unit of ``kind`` (−1: none
        yet); None when no budget applies (``budget=None``, outside ``fit``, ``fast_dev_run``). ``agreed``: as in
        :meth:`budget_units`."""
        times = self._budget_times(trainer, agreed, kind)
        return None if times is None else times[:2]

    def _budget_times(self, trainer: pl.Trainer, agreed: bool, kind: str) -> tuple[float, float, float] | None:
        """``(A, u, F)``: :meth:`budget_allowed` and the fixed seconds of a piece of ``kind`` (0 when not measured
        apart), agreed across ranks in one gather."""
        if self.budget is None or trainer.state.fn != TrainerFn.FITTING or trainer.fast_dev_run:
            return None
        now = self.clock()
        started = now if self._fit_started is None else self._fit_started
        per_unit = self._per_units.get(kind, -1.0)
        times = [now - started, self._spent, per_unit, self._fixed.get(kind, 0.0)]
        elapsed, spent, per_unit, fixed = self._agreed_max(trainer, times) if agreed else times
        return self.budget * max(elapsed - spent, 0.0) - spent, per_unit, fixed

    def one_off_mark(self) -> float:
        """A mark for :meth:`one_off_since`: the seconds this process has spent measuring rows per call
        (``batch_size="auto"``, once per model and row shape), on the real clock; 0 under a test's clock."""
        return measuring_seconds() if self.clock is time.perf_counter else 0.0

    def one_off_since(self, mark: float) -> float:
        """Seconds of one-off measurement since ``mark`` (:meth:`one_off_mark`)."""
        return max(self.one_off_mark() - mark, 0.0)

    def budget_spend(
        self, seconds: float, units: int, epoch: int | None, kind: str = "probe", fixed: float | None = None,
        one_off: float = 0.0,
    ) -> None:  # fmt: skip
        """Record ``seconds`` spent on ``units`` units of ``kind`` (the next decisions read it), and ``(epoch,
        units)`` in :attr:`budget_log` unless ``epoch`` is None (work done at every step). ``fixed``: the part of
        ``seconds`` that does not scale with the units (figures, tables), where the callback measured it apart:
        the cost per unit is then the rest over ``units``, so a small first piece is not charged its figures per
        unit (which would keep the next pieces small for no reason). ``one_off``: seconds of ``seconds`` that will
        not recur (the first call's measurement of rows per call: on the held-out ResNet 0.9 s of a 1 s first piece
        of CD); spent, but neither per unit nor fixed."""
        self._spent += seconds
        if units > 0:
            f = 0.0 if fixed is None else min(max(fixed, 0.0), seconds)
            once = min(max(one_off, 0.0), seconds - f)
            self._per_units[kind] = (seconds - f - once) / units
            self._piece_units[kind] = max(units, self._piece_units.get(kind, 0))
            if fixed is not None:
                self._fixed[kind] = f
        if epoch is not None:
            self.budget_log.append((epoch, units))

    @staticmethod
    def _agreed_max(trainer: pl.Trainer, values: list[float]) -> list[float]:
        """Each value's maximum over the ranks (every rank calls this at the same point)."""
        if trainer.world_size <= 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
        return [float(v) for v in trainer.strategy.all_gather(t).reshape(-1, len(values)).max(0).values]


class ProbeCallback(TimeBudget, RankStateCallback, Callback):
    """Captures a fixed probe set from validation data and explains it on due validation epochs.

    The probe set is the first ``num_samples`` finite samples of the first validation dataloader
    (at most ``per_class`` per label if given), captured during the first validation epoch (the
    sanity check is skipped), moved to CPU and kept in this callback's ``state_dict`` so maps stay
    comparable across epochs and after resuming. Under DDP each rank explains its own shard.

    Distributed: every local outcome (has a probe set, prepared, each method's result) is agreed
    across ranks (:func:`~explain_callbacks._internal.distributed.agree`) before any collective, so
    a failure on one rank skips the step on every rank instead of hanging, and the warning names the
    failing rank's error. Each rank's probe set (and extra state) is gathered into the checkpoint and
    handed back to its rank on resume; under another world size the probe sets are re-captured from
    the validation data (each rank's shard changed), with a warning.

    Subclasses implement :meth:`explain`, which runs inside :func:`model_guard`: gradients enabled
    even under ``inference_mode``, every module in eval mode, autocast off, parameters frozen; modes,
    ``requires_grad``, ``.grad`` and the global RNG are restored afterwards.

    Args:
        num_samples: probe size (per rank).
        per_class: keep at most this many samples per label (needs labels).
        every_n_epochs: explain on validation epochs where ``(epoch + 1) % every_n_epochs == 0``;
            ``trainer.validate()``/``test`` always explain.
        input_key, label_key, mask_key: where inputs, labels and ground-truth masks are in a batch
            (tuple index, dict key or a function of the batch; defaults: index 0/1, keys x/y/mask; masks
            also from a third tuple item shaped like the inputs, as in ``(x, y, mask)`` batches).
        target: ``"label"``, ``"prediction"``, a class index, None (single-output regression), a target
            operator (``RegionTarget``, ``PositionTarget``, ``BoxTarget``: a region of a segmentation, a position
            of a sequence, a box of a detector output), or a factory ``(model, inputs, labels) -> target``
            called on the probe set each time it is explained (e.g. ``PredictedRegion()``: the predicted mask).
        batch_size: rows per model call.
        model_attr: explain ``getattr(pl_module, model_attr)`` instead of the LightningModule itself
            (for modules whose ``forward`` is not the network).
        output_key: where the scores are in the model's output when it is not a tensor (tuple index,
            dict key/attribute, or a function of the output); ``.logits``/``["logits"]`` are found
            without it.
        strict: re-raise exceptions raised while explaining (default: warn and continue training).
        budget: the fraction of the training time this callback may spend explaining during ``fit`` (e.g.
            0.05), or None (no limit: every due epoch, every probe). With a budget, a due epoch is explained
            only when the time already spent plus the expected cost stays within ``budget`` × the training
            time so far, on as many probes as that allows (the first ones, at least one; subclasses that need
            the whole probe set only skip epochs); the expected cost is the last explanation's seconds per
            probe. Under DDP the times are agreed across ranks (their maximum) before deciding, so every rank
            makes the same decision. ``trainer.validate``/``test`` ignore it.
    """

    #: whether a budget may explain fewer probes (False: the subclass needs the whole probe set)
    budget_scales_probes: bool = True

    def __init__(
        self,
        num_samples: int = 32,
        per_class: int | None = None,
        every_n_epochs: int = 1,
        input_key: InputSpec = None,
        label_key: InputSpec = None,
        mask_key: InputSpec = None,
        target: TargetPolicy = "label",
        batch_size: BatchSize = "auto",
        model_attr: str | None = None,
        output_key: OutputSpec = None,
        strict: bool = False,
        budget: float | None = None,
    ) -> None:
        budget = self._check_budget(budget)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        check_target_policy(target)
        self.num_samples = num_samples
        self.per_class = per_class
        self.every_n_epochs = every_n_epochs
        self.adapter = BatchAdapter(input_key, label_key)
        self.mask_key = mask_key
        self.target = target
        self.batch_size = batch_size
        self.model_attr = model_attr
        self.output_key = output_key
        self.strict = strict
        self.budget = budget
        self._budget_reset()
        self.probe_x: Tensor | None = None
        self.probe_y: Tensor | None = None
        self.probe_mask: Tensor | None = None
        self._frozen = False
        self._warned_nan = False
        self._warned_capture = False
        self._capture_error: str | None = None  # the last reason a batch gave no probe rows (for the agreement)
        self._warned_compiled = False
        self._warned_failures: set[Any] = set()
        self._fit_validations = 0  # validation epochs and explanations of the current fit
        self._fit_explanations = 0
        self._piece_compute: float | None = None  # see _timed_explain

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        # Lightning asks for it at every hook call; the settings it is made of do not change.
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self._state_key = self._generate_state_key(**self.key_fields(), **self.setting_fields())
        return key

    @property
    def _legacy_state_key(self) -> str:  # type: ignore[override]
        """The key before :meth:`setting_fields` took part: Lightning looks a state up under it when the
        checkpoint has none under :attr:`state_key`, so checkpoints written before still restore."""
        return self._generate_state_key(**self.key_fields())

    def key_fields(self) -> dict[str, Any]:
        """The settings that tell two instances apart in a checkpoint (extend in subclasses)."""
        fields = {
            "num_samples": self.num_samples,
            "every_n_epochs": self.every_n_epochs,
            "target": target_key(self.target),
        }
        optional = {"per_class": self.per_class, "model_attr": self.model_attr}
        fields.update({k: v for k, v in optional.items() if v is not None})
        return fields

    def setting_fields(self) -> dict[str, Any]:
        """Further settings in the state key, where they differ from their defaults (extend in subclasses;
        see :func:`non_default_settings`): two callbacks of one type that differ only there (the grids of two
        ``InteractionMonitor``s) had one key, and Lightning refused them together ("Found more than one
        stateful callback of type ...")."""
        return {}

    #: keys of :meth:`extra_state` that belong to the probe set (maps of it): dropped when the probe set is
    #: re-captured on a resume under another world size (override)
    probe_bound_state: tuple[str, ...] = ()

    def local_state_dict(self) -> dict[str, Any]:
        return {
            "probe_x": self.probe_x,
            "probe_y": self.probe_y,
            "probe_mask": self.probe_mask,
            "frozen": self._frozen,
            **self.budget_state(),
            **self.extra_state(),
        }

    def load_local_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe_x = state_dict.get("probe_x")
        self.probe_y = state_dict.get("probe_y")
        self.probe_mask = state_dict.get("probe_mask")
        self._frozen = bool(state_dict.get("frozen", self.probe_x is not None))
        self.load_budget_state(state_dict)
        self.load_extra_state(state_dict)

    def reshard_state(self, states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
        """Another world size shards the validation data differently: the probe set is re-captured from this
        rank's shard at the next validation (deterministic for an unshuffled validation loader); the rest of
        the state (e.g. a trained masker, the same on every rank) is taken from rank ``rank % saved ranks``."""
        state = {k: v for k, v in states[rank % len(states)].items() if k not in self.probe_bound_state}
        state.update(probe_x=None, probe_y=None, probe_mask=None, frozen=False)
        return state

    def reshard_note(self, saved_world: int, world: int) -> str:
        return "each rank re-captures its probe set from its validation shard at the next validation"

    def extra_state(self) -> dict[str, Any]:
        """Subclass state to checkpoint besides the probe (override)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved (override)."""

    # ------------------------------------------------------------------ probe capture
    @property
    def probe_size(self) -> int:
        return 0 if self.probe_x is None else int(self.probe_x.shape[0])

    def _masks_of(self, batch: Any) -> Tensor | None:
        return masks_of(batch, self.mask_key)

    def add_to_probe(self, batch: Any) -> None:
        """Add samples of a batch to the probe set (until it is full).

        A batch the probe cannot be taken from (a wrong ``input_key``, multi-hot labels with ``per_class``)
        is skipped with a warning, given once (``strict=True`` raises instead): like a failing method,
        it must not stop training.
        """
        if self._frozen or self.probe_size >= self.num_samples:
            return
        try:
            # Validation runs under inference mode: every tensor kept must be a normal tensor.
            with torch.inference_mode(False):
                self._add(batch)
        except Exception as err:
            if self.strict:
                raise
            self._capture_error = f"{type(err).__name__}: {err}"
            if not self._warned_capture:
                self._warned_capture = True
                # on this rank, whichever it is: a rank that alone cannot take its probe must say so
                warn_rank(
                    f"{type(self).__name__} could not take its probe set from a batch: {type(err).__name__}: {err} "
                    "Such batches are skipped and training continues; pass strict=True to raise instead."
                )

    def _add(self, batch: Any) -> None:
        x, y = self.adapter(batch)
        masks = self._masks_of(batch)
        x = x.detach().cpu().clone()
        y = None if y is None else y.detach().cpu().clone()
        masks = None if masks is None else masks.detach().cpu().clone()
        keep = finite_rows(x) if x.is_floating_point() else torch.ones(x.shape[0], dtype=torch.bool)
        if not bool(keep.all()) and not self._warned_nan:
            warn_rank(
                f"{type(self).__name__}: {int((~keep).sum())} validation samples contain NaN/Inf and are "
                "skipped from the probe set; clean the data to explain them."
            )
            self._warned_nan = True
        if self.per_class is not None:
            if y is None:
                raise ValueError("per_class needs labels in the validation batches; set label_key or per_class=None.")
            if y.ndim > 1 and y[0].numel() > 1:
                raise ValueError(
                    f"per_class needs one class label per sample, but the labels have shape {tuple(y.shape)} "
                    "(multi-label or one-hot?); set per_class=None, or label_key= a function of the batch that "
                    "gives class indices."
                )
            counts = (
                torch.bincount(self.probe_y.reshape(-1).long(), minlength=int(y.max()) + 1)
                if self.probe_y is not None
                else None
            )
            sel = []
            for i in keep.nonzero().flatten().tolist():
                c = int(y[i])
                have = 0 if counts is None or c >= counts.numel() else int(counts[c])
                have += sum(1 for j in sel if int(y[j]) == c)
                if have < self.per_class:
                    sel.append(i)
            keep = torch.zeros_like(keep)
            keep[sel] = True
        idx = keep.nonzero().flatten()[: self.num_samples - self.probe_size]
        if idx.numel() == 0:
            return

        def cat(old: Tensor | None, new: Tensor | None) -> Tensor | None:
            if new is None:
                return old
            new = new[idx]
            return new if old is None else torch.cat([old, new])

        self.probe_x = cat(self.probe_x, x)
        self.probe_y = cat(self.probe_y, y)
        self.probe_mask = cat(self.probe_mask, masks)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if trainer.sanity_checking or dataloader_idx != 0:
            return
        self.add_to_probe(batch)

    # ------------------------------------------------------------------ scheduling
    def is_due(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING or trainer.fast_dev_run:
            # trainer.validate()/test() always explain; so does fast_dev_run, a smoke test of every code path
            # (was: every_n_epochs=5, the configs' default, skipped the explanation it should try)
            return True
        # The first validation at or after each multiple of every_n_epochs: a multiple of n among the epochs
        # since the previous validation, c = check_val_every_n_epoch epochs ago ((epoch + 1) % n == 0 for c = 1).
        # Was (epoch + 1) % n == 0 alone, which validation epochs may never meet: n = 5 with c = 3 explained at
        # epoch 14 only, and never in 10 epochs.
        n, done = self.every_n_epochs, trainer.current_epoch + 1
        c = trainer.check_val_every_n_epoch or 1
        return done // n > max(done - c, 0) // n

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_validations = self._fit_explanations = 0
        self._budget_start()

    # ------------------------------------------------------------------ time budget
    def budget_probes(self, trainer: pl.Trainer) -> int:
        """How many probes a due epoch of ``fit`` explains under the budget (:meth:`TimeBudget.budget_units`, a probe
        as the unit): 0 skips the epoch; at most ``num_samples``, at least one (or all, when
        ``budget_scales_probes`` is False) or the epoch is skipped. Before any measurement one probe (all, without
        scaling) is explained. The times are agreed across ranks first, so the decision is the same on every rank.
        """
        n = self.num_samples if self.probe_x is None else self.probe_size
        return self.budget_units(trainer, n, first=1 if self.budget_scales_probes else n,
                                 scales=self.budget_scales_probes)  # fmt: skip

    def _explain_within_budget(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``run_explain`` on the probes the budget allows, timing it for the next decision."""
        k = self.budget_probes(trainer)
        if k <= 0:
            self._budget_skipped += 1
            return
        if self.probe_x is None:
            return
        full = (self.probe_x, self.probe_y, self.probe_mask)
        k = min(k, self.probe_size)
        if k < self.probe_size:  # the first k probes: the same samples every epoch, so maps stay comparable
            self.probe_x, self.probe_y, self.probe_mask = (None if t is None else t[:k] for t in full)
        seconds, compute, once = self._timed_explain(trainer, pl_module)
        self.probe_x, self.probe_y, self.probe_mask = full
        self.budget_spend(seconds, k, trainer.current_epoch, fixed=None if compute is None else seconds - compute,
                          one_off=once)  # fmt: skip
        self._fit_explanations += 1
        if k < self.probe_size:
            self.log_budget_note(trainer, first_of(k, self.probe_size, "probe"))

    def _timed_explain(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[float, float | None, float]:
        """``run_explain`` on the budget's clock: its seconds; the seconds of the work that scales with the piece
        where the subclass measured them apart (adding to ``self._piece_compute`` in :meth:`explain`; None
        otherwise: the whole explanation then counts per unit, figures included); and the seconds of one-off
        measurements inside it (:meth:`one_off_mark`), which the next pieces will not pay."""
        self._piece_compute = None
        start, mark = self.clock(), self.one_off_mark()
        try:
            self.run_explain(trainer, pl_module)
        finally:
            seconds = self.clock() - start
        return seconds, self._piece_compute, min(self.one_off_since(mark), seconds)

    def log_budget_note(self, trainer: pl.Trainer, what: str) -> None:
        """Say, as text beside the figures (``cost/budget/<callback>``), what a piece of work under the budget covered
        when it was not everything (``what``: e.g. "probes 0–1 of 8"): the figures and scalars of that epoch are of
        those probes only (a figure draws the probes explained, never empty panels)."""
        share = f"{100 * self.budget:g} %" if self.budget is not None else "none"
        self.log_text(
            trainer,
            f"cost/budget/{type(self).__name__}",
            f"Epoch {trainer.current_epoch}: explained {what}, as the time budget ({share} of the training time) "
            "allowed; the figures and scalars of this epoch are of these only. The piece grows (at most "
            f"{self.budget_growth:g}× the largest so far) while the budget allows.",
        )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._frozen = self.probe_x is not None
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self._fit_validations += 1
        due = self.is_due(trainer)
        if fitting and due and self.budget is not None:
            # every rank reaches the budget's agreement (a collective) on a due epoch, with or without a probe set
            if self._agree_on_probe(trainer, due):
                self._explain_within_budget(trainer, pl_module)
            return
        if fitting and due:  # due epochs (explained, or skipped with a warning saying why)
            self._fit_explanations += 1
        # Agreed before run_explain's collectives: a rank without a probe set (its shard all NaN, a batch it
        # could not read) skips the epoch on every rank. Was: it returned here while the others waited in
        # run_explain's all-gather forever.
        if not self._agree_on_probe(trainer, due):
            return
        self.run_explain(trainer, pl_module)

    def _agree_on_probe(self, trainer: pl.Trainer, due: bool = True) -> bool:
        """Whether every rank is due and holds a probe set (one agreement; a rank without one is named with
        its reason; "not due" on every rank is the schedule, not a failure, and is not reported)."""
        has = self.probe_x is not None
        reason = "not due" if not due else (None if has else self._no_probe_reason())
        agreement = self.agree(trainer, due and has, reason)
        if agreement.ok:
            return True
        # said when some ranks have a probe set and others not; a probe set missing everywhere is said at the end
        # of fit ("explained nothing"), as in one process
        if len(agreement.failures) < agreement.world:
            self.report_failure(
                agreement,
                ("probe",),
                lambda why: f"{type(self).__name__} skipped epoch {trainer.current_epoch}: not every rank has a "
                f"probe set ({why}). Training continues.",
            )
        return False

    def _no_probe_reason(self) -> str:
        if self._capture_error is not None:
            return f"no probe set: its batches could not be read ({self._capture_error})"
        if self._warned_nan:
            return "no probe set: every validation sample it saw holds NaN/Inf"
        return "no probe set: it saw no validation batch"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe_x is not None:
            if self._fit_validations and not self._fit_explanations:
                rank_zero_warn(
                    f"{type(self).__name__} explained nothing during fit: every_n_epochs={self.every_n_epochs} was "
                    f"not reached in {trainer.current_epoch} epochs. Lower every_n_epochs, or explain the trained "
                    "model with trainer.validate(model, loader) and this callback attached."
                )
            return
        # a monitor that silently did nothing would look like a broken one
        name = type(self).__name__
        if self._warned_capture or self._warned_nan:  # a local cause: said on the rank where it happened
            warn_rank(f"{name} explained nothing: no validation batch gave it a probe set (warned above).")
        else:
            rank_zero_warn(
                f"{name} explained nothing: it takes its probe set from validation batches and saw none (no "
                "val_dataloader or validation_step, limit_val_batches=0, or training stopped before the first "
                "validation, e.g. by max_steps). Add validation data, or explain the trained model with "
                "trainer.validate(model, loader) / trainer.test(model, loader) and this callback attached."
            )

    # trainer.test(): explain the probe kept from validation, or one taken from the test data
    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if dataloader_idx == 0:
            self.add_to_probe(batch)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._frozen = self.probe_x is not None
        if self._agree_on_probe(trainer):
            self.run_explain(trainer, pl_module)

    def model(self, pl_module: pl.LightningModule) -> nn.Module:
        return resolve_model(pl_module, self.model_attr)

    def run_explain(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Explain the probe set inside the guard, with the error policy applied."""
        assert self.probe_x is not None
        try:
            with model_guard(pl_module), eager_forward(pl_module):
                prepared: tuple[nn.Module, Tensor, Tensor | None, Tensor | None] | None = None
                problem: Exception | None = None
                try:
                    model = self.model(pl_module)
                    check_forward(model)
                    self._warn_compiled(model)
                    with output_adapter(model, self.output_key):
                        dtype = float_dtype(model) if self.probe_x.is_floating_point() else None
                        x = detach_clone(self.probe_x, dtype).to(pl_module.device)
                        check_forward(model, x)
                        y = None if self.probe_y is None else self.probe_y.to(pl_module.device)
                        prepared = (model, x, y, resolve_target(self.target, model, x, y, self.batch_size))
                except Exception as err:
                    problem = err  # raised below under strict, after the agreement: no rank is left waiting
                # explain() runs collectives under DDP: every rank enters it, or none does
                agreement = self.agree(trainer, prepared is not None, problem)
                if not agreement.ok:
                    if self.strict:
                        raise problem if problem is not None else RuntimeError(agreement.why)
                    self.report_failure(
                        agreement,
                        ("prepare",),
                        lambda why: f"{type(self).__name__} skipped epoch {trainer.current_epoch} ({why}). "
                        "Training continues.",
                    )
                    return
                assert prepared is not None
                model, x, y, target = prepared
                with output_adapter(model, self.output_key):
                    self.explain(trainer, pl_module, x, y, target)
        except Exception as err:
            if self.strict:
                raise
            self.warn_failure(
                ("explain", type(err).__name__, str(err)),
                f"{type(self).__name__} failed at epoch {trainer.current_epoch}: {type(err).__name__}: {err}. "
                "Training continues; pass strict=True to raise instead.",
            )

    def _warn_compiled(self, model: nn.Module) -> None:
        if self._warned_compiled:
            return
        self._warned_compiled = True
        names = compiled_children(model)
        if names:
            rank_zero_warn(
                f"{type(self).__name__}: the explained network holds torch.compile'd modules {names[:3]}: forward "
                "hooks (Grad-CAM, layer methods) do not fire inside them, CD cannot trace them and every new input "
                f"shape recompiles. Pass model_attr={names[0]!r}: the callbacks explain the uncompiled original "
                "(same weights)."
            )

    def warn_failure(self, key: tuple[str, ...], message: str) -> None:
        """Warn about a failure once: the same failure (``key``: what failed and the error) in later epochs
        is skipped silently, so a method that cannot explain this model does not warn at every epoch."""
        warned: set[Any] = self.__dict__.setdefault("_warned_failures", set())
        if key in warned:
            return
        warned.add(key)
        # on this rank (named under DDP): a failure on rank 1 alone was hidden by rank_zero_warn
        warn_rank(message + " Later epochs with the same failure are not reported again.")

    def report_failure(self, agreement: Agreement, key: tuple[str, ...], message: Callable[[str], str]) -> None:
        """Warn about an agreed failure, once per ``key`` and failure text: rank zero names every failing rank
        with its error (``rank 1 failed: ...``), each failing rank warns too, the other ranks stay quiet."""
        agreement.warn(
            lambda why: message(why) + " Later epochs with the same failure are not reported again.",
            self.__dict__.setdefault("_warned_failures", set()),
            key,
        )

    def run_agreed(
        self, trainer: pl.Trainer, what: str, fn: Callable[[], Tensor], nonfinite: str
    ) -> tuple[Tensor, float] | None:
        """``fn()`` (detached) and its seconds, under the error policy, or None on every rank when it
        failed or gave NaN/Inf on any rank (warned once as ``"<what> <problem>"``): the collectives that
        follow its logging are then entered by all ranks or by none."""
        out, seconds, problem, error = None, 0.0, None, None
        try:
            start, measuring = time.perf_counter(), measuring_seconds()
            out = fn().detach()
            # the one-off timing of batch_size="auto" is not the method's cost (it made the first epoch's
            # cheapest method look the slowest in the ranking)
            seconds = time.perf_counter() - start - (measuring_seconds() - measuring)
            if not torch.isfinite(out).all():
                out, problem = None, nonfinite
                if self.strict:  # the README's promise: strict raises on NaN/Inf maps, not only on errors
                    raise FloatingPointError(
                        f"{type(self).__name__}: {what} {problem} at epoch {trainer.current_epoch} (strict=True)."
                    )
        except Exception as err:
            error, problem = err, f"failed: {type(err).__name__}: {err}"
        agreement = self.agree(trainer, out is not None, problem)
        # strict: an exception on any rank raises on every rank (after the agreement: no rank left waiting)
        if self.strict and any(t.startswith("failed: ") for t in agreement.failures.values()):
            raise error if error is not None else RuntimeError(f"{what} {agreement.why}")
        if not agreement.ok:
            self.report_failure(
                agreement,
                ("run", what),
                # the epoch before the error's own text (was "... the scores. at epoch 0. Skipped.")
                lambda why: f"{type(self).__name__}, epoch {trainer.current_epoch}: {what} {why.rstrip('.')}. Skipped.",
            )
            return None
        assert out is not None
        return out, seconds

    @staticmethod
    def gather_rows(trainer: pl.Trainer, t: Tensor) -> Tensor:
        """Every rank's rows of ``t`` concatenated in rank order, on every rank (ranks may hold different row
        counts: padded for ``all_gather``, trimmed after). A collective: call it on every rank, after agreeing."""
        if trainer.world_size <= 1:
            return t
        n = torch.tensor([t.shape[0]], device=t.device)
        sizes = trainer.strategy.all_gather(n).flatten().tolist()
        pad = t.new_zeros((max(sizes) - t.shape[0], *t.shape[1:]))
        gathered = trainer.strategy.all_gather(torch.cat([t, pad]))
        return torch.cat([gathered[r, : sizes[r]] for r in range(len(sizes))])

    @staticmethod
    def agree(trainer: pl.Trainer, ok: bool, error: str | BaseException | None = None) -> Agreement:
        """Agree on a local outcome across ranks before the collectives that follow it (``sync_dist`` logging,
        torchmetrics' ``compute``, gathers): every rank takes the same branch, and the :class:`Agreement` names
        each failing rank's ``error`` (see :func:`~explain_callbacks._internal.distributed.agree`)."""
        return agree(ok, error, trainer)

    @staticmethod
    def _all_ranks_ok(trainer: pl.Trainer, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (:meth:`agree` without an error text)."""
        return agree(ok, None, trainer).ok

    def explain(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Tensor, y: Tensor | None, target: Tensor | None
    ) -> None:
        """Explain the probe set (override). Runs inside the model guard."""
        raise NotImplementedError

    # ------------------------------------------------------------------ logging helpers
    @staticmethod
    def log_scalar(pl_module: pl.LightningModule, tag: str, value: float | Tensor, sync: bool = True) -> None:
        _logging.log_scalar(pl_module, tag, value, sync)

    @staticmethod
    def log_image(trainer: pl.Trainer, tag: str, image: Any) -> None:
        """A matplotlib Figure or a (3,H,W) image, to every logger that takes pictures (see ``_logging``)."""
        _logging.log_figure(trainer, tag, image)

    @staticmethod
    def log_table(trainer: pl.Trainer, tag: str, headers: Any, rows: Any, note: str = "") -> None:
        _logging.log_table(trainer, tag, headers, rows, note)

    @staticmethod
    def log_text(trainer: pl.Trainer, tag: str, text: str) -> None:
        _logging.log_text(trainer, tag, text)

    @staticmethod
    def log_histogram(trainer: pl.Trainer, tag: str, values: Tensor) -> None:
        _logging.log_histogram(trainer, tag, values)
