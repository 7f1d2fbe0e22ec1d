"""AttributionMonitor: attribution maps of a fixed probe set, every validation epoch, in TensorBoard."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .. import viz
from .._internal.batch import InputSpec, take
from .._internal.config import spec_list, to_plain
from .._internal.layout import reads_channels_first
from .._internal.registry import ATTRIBUTIONS, METRICS
from .._internal.target_ops import TargetOperator
from ..attribution import TOKEN_REDUCTIONS, Attributor, TokenProbe, build_attributor
from ..metrics.base import update_metric
from ..metrics.functional import explanation_drift, sparseness
from ..metrics.functional._utils import broadcast_map
from ._logging import (
    class_name,
    find_class_names,
    global_step,
    markdown_table,
    media_loggers,
    metric_section,
    output_class_names,
    phase_prefix,
)
from .base import ProbeCallback, class_indices, non_default_settings

__all__ = [
    "AttributionMonitor",
    "best_methods",
    "class_labels",
    "find_class_names",
    "find_vocab",
    "token_method_settings",
    "token_metric_settings",
]

MethodSpec = str | Mapping[str, Any] | Attributor


def find_vocab(trainer: pl.Trainer) -> list[str] | None:
    """The words of the token ids (id -> word) for the token heatmaps: ``vocab``, ``itos`` or ``id_to_token`` of the
    data module (a sequence, or a mapping from id to word), else None (ids are written as numbers)."""
    dm = getattr(trainer, "datamodule", None)
    for attr in ("vocab", "itos", "id_to_token"):
        words = getattr(dm, attr, None) if dm is not None else None
        if isinstance(words, Mapping) and words and all(isinstance(k, int) for k in words):
            out = [""] * (max(words) + 1)
            for k, v in words.items():
                out[k] = str(v)
            return out
        if isinstance(words, (list, tuple)) and words:
            return [str(w) for w in words]
    return None


#: metric settings that name a replacement for removed features ("zeros", "blur", ...)
_SUBSTRATE_SETTINGS = ("substrate", "deletion_substrate", "insertion_substrate", "baseline")


@contextlib.contextmanager
def token_metric_settings(metric: Any, substrate: Tensor, valid: Tensor | None = None) -> Iterator[Any]:
    """The settings of ``metric`` for a token probe, inside the block (restored after it).

    On token probes the features of a metric are the tokens, and a removed token is replaced by the substrate
    token: a substrate or baseline given by name (``"zeros"``, ``"auto"``, ``"blur"``, ``"mean"``, ...: notions of
    pixels) becomes the substrate token's embedding ``substrate`` (D,) at every removed position (a float or
    tensor given by the user is kept); ``features="auto"`` becomes ``"pixel"``, a position of the sequence = a
    token (``"element"``, when set, keeps single embedding dims); ``channels_first=None`` becomes False (the view
    reads (B, T, D)); ``valid`` (B, T), the real tokens, becomes the ``keep`` of a curve metric that ranks tokens:
    the padding is never removed nor revealed and each sample's curve runs over its own tokens.
    """
    changes: dict[str, Any] = {}
    for attr in _SUBSTRATE_SETTINGS:
        if isinstance(getattr(metric, attr, None), str):
            changes[attr] = substrate
    if getattr(metric, "features", None) == "auto":
        changes["features"] = "pixel"
    if hasattr(metric, "channels_first") and metric.channels_first is None:
        changes["channels_first"] = False
    features = changes.get("features", getattr(metric, "features", None))
    if valid is not None and hasattr(metric, "keep") and features == "pixel":
        changes["keep"] = valid
    with _attributes_set(metric, changes):
        yield metric


@contextlib.contextmanager
def _attributes_set(obj: Any, changes: dict[str, Any]) -> Iterator[None]:
    """Set the attributes ``changes`` of ``obj`` inside the block and put the previous values back after it."""
    saved = {k: getattr(obj, k) for k in changes}
    for k, v in changes.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


@contextlib.contextmanager
def token_method_settings(method: Any, dim: int) -> Iterator[Any]:
    """The settings of ``method`` for a token probe of embedding size ``dim``, inside the block (restored after it).

    Occlusion with its default window (4 steps x 1 embedding dim on a (B, T, D) input: a window that no token fills;
    its top token was the planted keyword of the text data set for 41% of the sentences, one-token windows for 96%,
    ``benchmarks/bench_text.py``) occludes one whole token per window instead: ``window = stride = (1, dim)``,
    filled with its baseline (zeros: the padding's embedding). A window or stride the user set is kept.
    """
    from ..attribution.blackbox.occlusion import Occlusion

    changes: dict[str, Any] = {}
    if isinstance(method, Occlusion) and method.window is None and method.stride is None:
        changes = {"window": (1, dim), "stride": (1, dim)}
        if method.channels_first is None:
            changes["channels_first"] = False
    with _attributes_set(method, changes):
        yield method


def class_labels(y: Tensor) -> Tensor | None:
    """Labels as class indices (N,) (integer or integral labels, or one-hot rows), None otherwise."""
    if y.ndim == 2 and y.shape[1] > 1 and bool(((y == 0) | (y == 1)).all()) and bool((y.sum(1) == 1).all()):
        return y.argmax(1)
    return class_indices(y)


def best_methods(scores: Mapping[str, float], higher_is_better: bool) -> list[str]:
    """The methods with the best score, all of them when several tie (equal to 6 significant digits: means over a
    handful of probes, e.g. a pointing game of 1.0 for every method, tie exactly)."""
    top = max(scores.values()) if higher_is_better else min(scores.values())
    return [m for m, v in scores.items() if math.isclose(v, top, rel_tol=1e-6, abs_tol=1e-12)]


def _short(v: float) -> str:
    return f"{v:.4g}"


class AttributionMonitor(ProbeCallback):
    """Watch how attribution maps of a fixed probe set evolve while the model trains.

    On every due validation epoch, for each method: scalars ``<section>/<score>/<method>`` (one chart per
    score with a line per method in TensorBoard's custom-scalars tab): ``cost/seconds``,
    ``maps/sparseness`` (Gini), ``maps/drift`` (mean per-sample Spearman correlation with the previous
    map), ``sanity/completeness_error`` (path methods), and every selected metric under its family
    (``faithfulness/deletion/<method>``, ``sanity/randomisation/<method>``, ``robustness/...``,
    ``localisation/...``); a histogram ``maps/values/<method>``. Pictures: ``maps/attributions``, one row
    per probe sample (input, then one map per method with one colour bar per method; true class,
    prediction and probability above the input), a feature × sample heatmap per method for tabular data,
    time on the x-axis for sequences; ``<section>/<metric>_curve`` for curve metrics (deletion,
    insertion: one line per method); the table ``faithfulness/ranking`` of the methods on every score.
    Inside ``trainer.test`` every tag starts with ``test/``.

    Args:
        methods: short names (``"saliency"``, ``"ig"``, ...), ``{"name": ..., **kwargs}`` mappings,
            :class:`~explain_callbacks.attribution.Attributor` instances or Captum methods.
        metrics: metric short names / mappings / instances from ``explain_callbacks.metrics``; each is
            computed on the same maps (nothing is computed twice).
        max_images: samples drawn in the overlay grid.
        feature_names: names of tabular features (figure axes and the top-feature table); taken from the
            data module's ``feature_names`` when not given.
        class_names: names of the classes for the captions; taken from the data module's (or the
            validation dataset's) ``class_names`` / ``classes`` when not given.
        log_images / log_histograms: turn image and histogram logging off (scalars stay).
        embedding: token models (integer-id probes, explained in the space of their token embeddings through
            :class:`~explain_callbacks.attribution.EmbeddingView`): the name of the embedding layer; None takes the
            model's only ``nn.Embedding`` (an error names the candidates when there are several).
        pad_id: the padding id of token probes: padding gets zero attribution and no metric counts it; None
            takes the embedding's ``padding_idx`` (no padding when it has none).
        attention_mask_key: where the attention mask (B, T), nonzero at real tokens, is in a batch (dict key,
            tuple index or a function of the batch): it marks the padding instead of ``pad_id``, for tokenizers
            whose padding id is also a real token. Captured with the probe set.
        substrate_token: the id that perturbation metrics put in place of a removed token (e.g. a ``[MASK]``
            id); None: the padding id, else the zero vector (see ``docs/text.md``).
        token_reduce: one score per token from a (B, T, D) map: ``"sum"`` over the embedding dims (signed) or
            ``"norm"`` (L2 norm, unsigned); heatmaps and metrics use these token scores.
        vocab: the words of the token ids (id -> word) for the token heatmaps; taken from the data module's
            ``vocab`` / ``itos`` / ``id_to_token`` when not given.
        method_forwards: forward passes per explanation (all probes together) of each sampling method
            (RISE, Sobol, HSIC) named without its sample count or ``budget``: ``method_forwards / num_samples``
            per probe (2048 / 8: 256 RISE masks, 256 HSIC designs, 2 Sobol designs on an 8×8 grid), where the
            papers' settings (4000 masks, 1500 designs, 32 designs) cost 8-30× a ResNet's training epoch.
            ``None``: the methods' own defaults; one method's paper setting: ``{"name": "rise", "n_masks": 4000}``.
        budget: the share of the training time the monitor may spend during ``fit`` (:class:`ProbeCallback`);
            0.02 by default, so ``AttributionMonitor()`` stays near 2 % of training whatever the model: it
            explains fewer probes, or skips epochs, where a map grid and the methods cost more (on a small ResNet,
            2,000 images, 3 epochs: one probe once instead of 8 probes every epoch, which cost 19 %).
            ``None``: the fixed schedule (every due epoch, every probe), for comparing runs.
        **kwargs: :class:`ProbeCallback` arguments (num_samples, per_class, every_n_epochs, target,
            input_key, label_key, mask_key, batch_size, model_attr, strict).
    """

    #: scores the monitor computes itself for every method (metrics of the same name would log twice)
    BUILTIN_SCORES = ("seconds", "sparseness", "drift", "completeness_error")

    def __init__(
        self,
        methods: Sequence[MethodSpec] = ("saliency", "ig"),
        metrics: Sequence[Any] = (),
        num_samples: int = 8,
        max_images: int = 16,
        feature_names: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        log_images: bool = True,
        log_histograms: bool = True,
        embedding: str | None = None,
        pad_id: int | None = None,
        attention_mask_key: InputSpec = None,
        substrate_token: int | None = None,
        token_reduce: str = "sum",
        vocab: Sequence[str] | None = None,
        method_forwards: int | None = 2048,
        budget: float | None = 0.02,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_samples=num_samples, budget=budget, **kwargs)
        if method_forwards is not None and method_forwards < 1:
            raise ValueError(
                f"method_forwards must be a positive number of forward passes or None, got {method_forwards}."
            )
        self.method_forwards = method_forwards
        if token_reduce not in TOKEN_REDUCTIONS:
            raise ValueError(f"token_reduce must be one of {TOKEN_REDUCTIONS}, got {token_reduce!r}.")
        self.embedding, self.pad_id, self.substrate_token = embedding, pad_id, substrate_token
        self.token_reduce = token_reduce
        self.attention_mask_key = attention_mask_key
        self.probe_attention: Tensor | None = None  # the probes' attention masks (with attention_mask_key)
        self.vocab = [str(w) for w in vocab] if vocab is not None else None
        self._tokens: TokenProbe | None = None  # the token probe of the epoch being explained
        methods = to_plain(methods)
        if isinstance(methods, (str, Mapping)) or not isinstance(methods, Sequence):
            methods = [methods]
        if not methods:
            raise ValueError("AttributionMonitor needs at least one method, e.g. methods=['saliency', 'ig'].")
        self.methods: dict[str, Attributor] = {}
        self._method_settings: dict[str, Any] = {}  # {name: kwargs} of methods given as mappings (state key)
        for spec in methods:
            method = self._build_method(spec)
            name = str(getattr(method, "name", type(method).__name__.lower()))
            base, i = name, 2
            while name in self.methods:
                name, i = f"{base}_{i}", i + 1
            self.methods[name] = method
            if isinstance(spec, Mapping):
                self._method_settings[name] = {k: v for k, v in spec.items() if k != "name"}
        self.metric_specs = []
        self.metric_names: list[str] = []  # the tag of each selected metric, unique: 'randomisation', 'randomisation_2'
        for spec in spec_list(metrics):
            name = self._metric_name(self._build_metric(spec))  # fails fast on unknown names
            if name in self.BUILTIN_SCORES:
                rank_zero_warn(f"AttributionMonitor logs '{name}' for every method already; metric {name!r} dropped.")
                continue
            base, i = name, 2
            while name in self.metric_names:  # same metric twice with other settings: both kept, both logged
                name, i = f"{base}_{i}", i + 1
            self.metric_specs.append(spec)
            self.metric_names.append(name)
        self._higher: dict[str, bool | None] = {}
        self._sections: dict[str, str] = {}  # metric tag -> its section
        self._metrics: dict[tuple[str, str], Any] = {}
        self.max_images = max_images
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        self.log_images = log_images
        self.log_histograms = log_histograms
        self.previous: dict[str, Tensor] = {}
        self._warned_unscored: set[str] = set()
        self.last_scores: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------ building
    def _build_method(self, spec: MethodSpec) -> Attributor:
        if isinstance(spec, str) and spec in ATTRIBUTIONS:
            spec = {"name": spec}
        if isinstance(spec, str):
            return build_attributor(spec, batch_size=self.batch_size)
        if isinstance(spec, Mapping):
            spec = {**self._monitor_sized(spec), **spec}
            spec.setdefault("batch_size", self.batch_size)
        return build_attributor(spec)

    def _monitor_sized(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Sample counts of a sampling method (RISE, Sobol, HSIC) sized to ``method_forwards`` when the spec sets
        neither its count nor a ``budget``: ``method_forwards / num_samples`` forward passes per probe."""
        name = spec.get("name")
        if self.method_forwards is None or not isinstance(name, str) or name not in ATTRIBUTIONS:
            return {}
        sized = getattr(ATTRIBUTIONS.get(name), "monitor_settings", None)
        if sized is None:
            return {}
        settings = sized(max(1, self.method_forwards // self.num_samples))
        return {} if "budget" in spec or any(k in spec for k in settings) else settings

    def _build_metric(self, spec: Any) -> Any:
        if isinstance(spec, str):
            return METRICS.build(spec)
        if isinstance(spec, Mapping):
            return METRICS.build(dict(spec))
        return spec

    @staticmethod
    def _metric_name(metric: Any) -> str:
        return str(
            getattr(metric, "short_name", None) or getattr(metric, "name", None) or type(metric).__name__.lower()
        )

    def _metric_for(self, method_name: str, spec: Any, device: torch.device, metric_name: str) -> Any:
        """One metric object per (method, metric): states are never shared between methods."""
        key = (method_name, metric_name)
        if key not in self._metrics:
            self._metrics[key] = self._build_metric(spec) if isinstance(spec, (str, Mapping)) else spec.clone()
        metric = self._metrics[key]
        if hasattr(metric, "warn_dropped"):
            metric.warn_dropped = False  # the monitor reports dropped samples itself, naming the method
        if hasattr(metric, "to"):
            metric = metric.to(device)
            self._metrics[key] = metric
        return metric

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.feature_names is None:  # pick up the data module's feature names (tabular data)
            names = getattr(getattr(trainer, "datamodule", None), "feature_names", None)
            if names:
                self.feature_names = list(names)
        if self.class_names is None:
            self.class_names = find_class_names(trainer)
        if self.vocab is None:
            self.vocab = find_vocab(trainer)

    # ------------------------------------------------------------------ state
    # maps of the probe set and its attention masks: dropped when it is re-captured
    probe_bound_state = ("previous", "probe_attention")

    def extra_state(self) -> dict[str, Any]:
        return {"previous": {k: v.cpu() for k, v in self.previous.items()}, "probe_attention": self.probe_attention}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.previous = dict(state.get("previous", {}))
        self.probe_attention = state.get("probe_attention")

    def _add(self, batch: Any) -> None:
        """Capture probes as the base does, and with ``attention_mask_key`` the attention masks of the rows taken
        (found by their ids: the base picks rows by label with ``per_class``)."""
        before = self.probe_size
        super()._add(batch)
        if self.attention_mask_key is None or self.probe_size == before:
            return
        key = self.attention_mask_key
        att = key(batch) if callable(key) else take(batch, key)
        ids = self.adapter.inputs(batch).detach().cpu()
        if not isinstance(att, Tensor) or tuple(att.shape) != tuple(ids.shape):
            raise ValueError(
                f"attention_mask_key={key!r} gave {type(att).__name__} {tuple(getattr(att, 'shape', ()))}, not a "
                f"(B, T) mask like the token ids {tuple(ids.shape)}; fix attention_mask_key."
            )
        att = att.detach().cpu()
        used: set[int] = set()
        rows = []
        for row in self.probe_x[before:]:
            match = next(i for i in (row == ids).all(1).nonzero().flatten().tolist() if i not in used)
            used.add(match)
            rows.append(att[match])
        new = torch.stack(rows)
        self.probe_attention = new if self.probe_attention is None else torch.cat([self.probe_attention, new])

    def key_fields(self) -> dict[str, Any]:
        # names or plain specs, never an object's repr (it may hold a memory address)
        metrics = [m if isinstance(m, (str, Mapping)) else self._metric_name(m) for m in self.metric_specs]
        return {**super().key_fields(), "methods": sorted(self.methods), "metrics": metrics}

    def setting_fields(self) -> dict[str, Any]:
        # two monitors of {"name": "ig", "n_steps": 8} and {"name": "ig", "n_steps": 64} are two states
        settings = non_default_settings(
            self, method_settings=dict(sorted(self._method_settings.items())) or None, embedding=self.embedding,
            pad_id=self.pad_id, substrate_token=self.substrate_token, token_reduce=self.token_reduce,
            attention_mask_key=self.attention_mask_key if isinstance(self.attention_mask_key, (int, str)) else None,
        )  # fmt: skip
        return {**super().setting_fields(), **settings}

    # ------------------------------------------------------------------ the work
    def explain(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Tensor, y: Tensor | None, target: Tensor | None
    ) -> None:
        try:
            self._explain(trainer, pl_module, x, y, target)
        finally:
            self._tokens = None  # holds the view of the model and the probe's embeddings: not kept between epochs

    def _explain(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Tensor, y: Tensor | None, target: Tensor | None
    ) -> None:
        model = self.model(pl_module)
        masks = None if self.probe_mask is None else self.probe_mask.to(x.device)
        problem: Exception | None = None
        try:
            model, x = self._token_inputs(model, x)
        except Exception as err:
            problem = err
        # agreed before the methods' collectives: a rank that cannot read its probe as tokens skips on every rank
        agreement = self.agree(trainer, problem is None, problem)
        if not agreement.ok:
            if self.strict:
                raise problem if problem is not None else RuntimeError(agreement.why)
            self.report_failure(
                agreement, ("tokens",),
                lambda why: f"AttributionMonitor skipped epoch {trainer.current_epoch}: its token ids could not be "
                f"explained ({why}). Training continues.",
            )  # fmt: skip
            return
        tokens = self._tokens
        curves: dict[str, dict[str, Tensor]] = {}
        curve_x: dict[str, Tensor] = {}
        self.last_scores = {}
        draw = bool(media_loggers(trainer))  # pictures only where a logger takes them (rank zero)
        drawn: dict[str, Tensor] = {}
        for name, method in self.methods.items():
            done = self.run_agreed(
                trainer, f"method {name!r}", lambda method=method: self._call_method(method, model, x, target),
                "produced NaN/Inf attributions (check the model for non-finite gradients)",
            )  # fmt: skip
            if done is None:
                continue
            maps, seconds = done
            raw = maps
            per_token = tokens is not None and maps.ndim == 3 and maps.shape[:2] == tokens.ids.shape
            if per_token:  # one score per token, padding zeroed: what metrics, figures and scalars use
                raw = maps * tokens.valid[..., None].to(maps.dtype)
                maps = tokens.scores(maps, self.token_reduce).unsqueeze(-1)
            scores = self._log_scalars(pl_module, name, method, maps, seconds)
            if self.metric_specs and not self._scorable(maps, x):
                if name not in self._warned_unscored:
                    self._warned_unscored.add(name)
                    rank_zero_warn(
                        f"AttributionMonitor: the maps of {name!r} have shape {tuple(maps.shape)}, not the input's "
                        f"{tuple(x.shape)} (or one channel of it), so no metric scores them."
                    )
            elif self.metric_specs:
                for spec, mname in zip(self.metric_specs, self.metric_names):
                    metric = self._metric_for(name, spec, x.device, mname)
                    self._higher[mname] = getattr(metric, "higher_is_better", None)
                    updated, problem = False, "did not apply"
                    try:
                        updated = self._update_metric(metric, model, x, maps, target, method, masks, raw)
                    except Exception as err:
                        if self.strict:
                            raise
                        problem = f"failed: {type(err).__name__}: {err}"
                    # compute() is a collective under DDP: every rank enters it or none does (agreed, with the
                    # failing rank's error in the warning); silent when the metric applies on no rank
                    agreement = self.agree(trainer, updated, problem)
                    if not agreement.ok:
                        if len(agreement.failures) < agreement.world or problem != "did not apply":
                            self.report_failure(
                                agreement, ("metric", mname, name),
                                lambda why, mname=mname, name=name: f"AttributionMonitor: metric {mname!r} on {name!r} "
                                f"{why}. Skipped.",
                            )  # fmt: skip
                        continue
                    value = float(metric.compute())
                    if not self._report_dropped(metric, mname, name, value):
                        continue  # no sample scored: nothing to log (the same on every rank: states are synced)
                    scores[mname] = value
                    self.log_scalar(pl_module, f"{metric_section(mname, metric)}/{mname}/{name}", value, sync=False)
                    self._sections[mname] = metric_section(mname, metric)
                    # side results of one computation (fragility's Spearman and centre shift besides the
                    # top-k intersection), already synchronised by compute: one series each, same section
                    for part, extra in (getattr(metric, "extra_values", None) or {}).items():
                        if math.isfinite(extra):
                            scores[f"{mname}_{part}"] = extra
                            directions = getattr(metric, "extra_higher_is_better", None) or {}
                            self._higher[f"{mname}_{part}"] = directions.get(part)
                            tag = f"{metric_section(mname, metric)}/{mname}_{part}/{name}"
                            self.log_scalar(pl_module, tag, extra, sync=False)
                    curve = getattr(metric, "curve", None)
                    if isinstance(curve, Tensor) and curve.numel() > 1:
                        curves.setdefault(mname, {})[name] = curve.detach().cpu()
                        cx = getattr(metric, "curve_x", None)
                        if isinstance(cx, Tensor):
                            curve_x[mname] = cx.detach().cpu()
            self.last_scores[name] = scores
            if draw:
                if self.log_histograms:
                    values = maps[..., 0][tokens.valid] if tokens is not None and per_token else maps
                    self.log_histogram(trainer, f"maps/values/{name}", values)
                if tokens is None or per_token:  # maps of another shape (a layer's) have no token picture
                    drawn[name] = maps[: self.max_images].detach().cpu()
            if not phase_prefix(trainer):  # test maps do not become the reference of the next validation
                self.previous[name] = maps.cpu()
        if not draw:
            return
        if drawn and self.log_images:
            self._log_pictures(trainer, model, x, y, target, drawn)
        for mname, by_method in curves.items():
            self._log_curves(trainer, mname, by_method, curve_x.get(mname))
        if self.last_scores:
            table, note = self.ranking_rows()
            self.log_table(trainer, "faithfulness/ranking", table[0], table[1], note)

    def _report_dropped(self, metric: Any, mname: str, method: str, value: float) -> bool:
        """Warn once per (metric, method) when samples of the probe set got a NaN/Inf score and were left
        out of the mean (how many, over every rank), and whether ``value`` is finite (to be logged)."""
        scored, dropped = getattr(metric, "last_counts", (0, 0))
        finite = bool(torch.isfinite(torch.tensor(value)))
        if dropped or not finite:
            total = scored + dropped
            what = (
                f"all {total} samples of the probe set got" if not finite or not scored
                else f"{dropped} of {total} samples of the probe set got"
            )  # fmt: skip
            self.warn_failure(
                ("dropped", mname, method),
                f"AttributionMonitor: metric {mname!r} on {method!r}: {what} a NaN/Inf score and "
                + ("nothing is logged" if not finite else f"are left out of the logged mean (of {scored})")
                + " (non-finite maps or model outputs there, or a score undefined for them, such as an empty "
                "mask).",
            )
        return finite

    @staticmethod
    def _scorable(maps: Tensor, x: Tensor) -> bool:
        """Whether metrics apply: maps the metrics broadcast to the input (input-shaped; one channel
        (B,1,*S) of Grad-CAM, RISE and CD on images or signals; (B,T,1) of mask methods on sequences)."""
        try:
            broadcast_map(maps, x)
        except ValueError:
            return False
        return True

    def _update_metric(
        self, metric: Any, model: Any, x: Tensor, maps: Tensor, target: Tensor | None, method: Attributor,
        masks: Tensor | None, raw: Tensor | None = None,
    ) -> bool:  # fmt: skip
        """Reset and update ``metric`` on this epoch's maps (:func:`update_metric`); False when it does not apply.

        Token probes: explanation metrics score the token map (B, T, 1), explainer metrics (which re-run the method
        and compare) the method's own map ``raw`` with the padding zeroed, both under
        :func:`token_metric_settings`."""
        tokens = self._tokens
        settings: Any = contextlib.nullcontext()
        if tokens is not None:
            settings = token_metric_settings(metric, tokens.substrate, tokens.valid)
            if masks is not None and masks.shape == tokens.valid.shape:
                masks = masks & tokens.valid  # a ground-truth mask never points at padding
        explainer = getattr(metric, "kind", "explanation") == "explainer"
        scored = raw if explainer and raw is not None else maps
        with settings, self._token_method_context(method):  # explainer metrics re-run the method as the monitor did
            return update_metric(metric, model, x, scored, target, method, masks)

    def _token_method_context(self, method: Attributor) -> Any:
        """:func:`token_method_settings` on token probes, nothing otherwise."""
        tokens = self._tokens
        return contextlib.nullcontext() if tokens is None else token_method_settings(method, tokens.embedded.shape[-1])

    def _call_method(self, method: Attributor, model: torch.nn.Module, x: Tensor, target: Tensor | None) -> Tensor:
        with self._token_method_context(method):
            return method(model, x, target)

    def _token_inputs(self, model: torch.nn.Module, x: Tensor) -> tuple[torch.nn.Module, Tensor]:
        """The model and inputs the methods explain: for integer probes (token ids) the model seen as a function
        of its token embeddings (:class:`~explain_callbacks.attribution.EmbeddingView`) and the embeddings of the
        probe (kept in ``self._tokens`` with the padding and the substrate token); float inputs as they are."""
        self._tokens = None
        if x.is_floating_point() or x.is_complex():
            return model, x
        if x.ndim != 2:
            raise TypeError(
                f"integer probes are read as token ids (B, T), got shape {tuple(x.shape)}; give (B, T) ids, or float "
                "inputs."
            )
        att = self.probe_attention
        if self.attention_mask_key is not None and att is None:
            raise ValueError("attention_mask_key is set but no attention mask was captured with the probe set.")
        att = None if att is None else att[: x.shape[0]].to(x.device)  # under a budget: the first probes
        tokens = TokenProbe.of(model, x, self.embedding, self.pad_id, self.substrate_token, att)
        # the view must be the model: one reading its ids beyond the embedding (a padding mask built from them) would
        # be explained wrongly without a word; two forward passes of the probe say so, with the fix
        tokens.view.check(x)
        self._tokens = tokens
        return tokens.view, tokens.embedded

    def _log_scalars(
        self, pl_module: pl.LightningModule, name: str, method: Attributor, maps: Tensor, seconds: float
    ) -> dict[str, float]:
        scores: dict[str, float] = {"seconds": seconds}
        self.log_scalar(pl_module, f"cost/seconds/{name}", seconds)
        tokens = self._tokens
        if tokens is None or maps.shape != (*tokens.ids.shape, 1):
            sp = float(sparseness(maps).mean())
        else:  # over each sample's real tokens: zeros at the padding would read as sparsity
            sp = float(torch.stack([sparseness(m[v][None])[0] for m, v in zip(maps[..., 0], tokens.valid)]).mean())
        scores["sparseness"] = sp
        self.log_scalar(pl_module, f"maps/sparseness/{name}", sp)
        info = getattr(method, "last_info", {}) or {}
        if "completeness_error" in info:
            ce = info["completeness_error"].detach()
            ce = ce[torch.isfinite(ce)]
            if ce.numel():
                scores["completeness_error"] = float(ce.mean())
                self.log_scalar(pl_module, f"sanity/completeness_error/{name}", scores["completeness_error"])
        prev = self.previous.get(name)
        # drift compares successive validation maps: inside trainer.test it would compare the same model
        # (1.0) or other samples, so it is not logged there; under a time budget an epoch may explain fewer
        # probes: drift over the probes both epochs explained
        k = min(0 if prev is None else prev.shape[0], maps.shape[0])
        if prev is not None and k > 0 and prev.shape[1:] == maps.shape[1:] and not phase_prefix(pl_module.trainer):
            if tokens is None or maps.shape != (*tokens.ids.shape, 1):
                drift = float(explanation_drift(prev[:k].to(maps.device), maps[:k]).mean())
            else:  # over each sample's real tokens (ties at the padding would read as agreement)
                pairs = zip(prev[:k, :, 0].to(maps.device), maps[:k, :, 0], tokens.valid[:k])
                drift = float(torch.stack([explanation_drift(p[v][None], m[v][None])[0] for p, m, v in pairs]).mean())
            scores["drift"] = drift
            self.log_scalar(pl_module, f"maps/drift/{name}", drift)
        return scores

    def _log_pictures(
        self, trainer: pl.Trainer, model: torch.nn.Module, x: Tensor, y: Tensor | None, target: Tensor | None,
        drawn: dict[str, Tensor],
    ) -> None:  # fmt: skip
        """One figure of every method's maps (see the class docstring); a feature table for tabular maps."""
        n = min(self.max_images, x.shape[0])
        # the model's output classes may not be its labels (a segmentation's channel 0 is the background)
        outputs = output_class_names(model, trainer.lightning_module, default=self.class_names)
        captions, wrong = self._captions(model, x[:n], y, target, outputs)
        signed = {k: bool((m < 0).any()) for k, m in drawn.items()}
        when = "test" if phase_prefix(trainer) else f"epoch {trainer.current_epoch}"
        title = f"attributions · {when} · step {global_step(trainer)}"
        if self._tokens is not None:  # token heatmaps: the words on coloured backgrounds, and as Markdown
            ids, valid = self._tokens.ids[:n].cpu(), self._tokens.valid[:n].cpu()
            words = [[self._word(int(t)) for t in row[keep]] for row, keep in zip(ids, valid)]
            scores = {}
            for k, m in drawn.items():  # each sample's real tokens first, in order (padding may sit anywhere)
                s = torch.zeros(n, ids.shape[1])
                for i in range(n):
                    real = m[i, :, 0][valid[i]]
                    s[i, : real.numel()] = real
                scores[k] = s
            fig = viz.token_figure(words, scores, signed, captions, wrong, title=title)
            self.log_image(trainer, "maps/attributions", fig)
            self.log_text(trainer, "maps/tokens", viz.token_markdown(words, scores, captions))
            return
        xs = x[:n].detach().float().cpu()
        if x.ndim == 4 and all(m.ndim == 4 for m in drawn.values()):
            maps = {k: viz.map_to_2d(m) for k, m in drawn.items()}
            # the explained output region (a target operator's mask), outlined over input and maps
            regions = target[:n].region(x.shape[-2:]) if isinstance(target, TargetOperator) else None
            fig = viz.attribution_figure(xs, maps, signed, captions, wrong, title=title, regions=regions)
        elif all(m.ndim == 2 for m in drawn.values()) and x.ndim == 2:
            labels = [f"{i}: {c}" for i, c in enumerate(captions)] if captions else None
            fig = viz.tabular_figure(drawn, self.feature_names, labels, signed, title=title)
            for k, m in drawn.items():
                self.log_table(trainer, f"maps/top_features/{k}", *self._top_features(m))
        elif x.ndim == 3 and all(m.ndim == 3 for m in drawn.values()):
            steps_last = reads_channels_first(model, x)  # (B, C, L): time last; (B, T, D): time second
            seq = xs if steps_last else xs.transpose(1, 2)
            maps = {k: (m if steps_last else m.transpose(1, 2)) for k, m in drawn.items()}
            fig = viz.sequence_figure(seq, maps, signed, captions, wrong, self.feature_names, title=title)
        else:  # maps of another shape than the input (e.g. a layer's): no common picture
            return
        self.log_image(trainer, "maps/attributions", fig)

    def _captions(
        self, model: torch.nn.Module, x: Tensor, y: Tensor | None, target: Tensor | None,
        outputs: Sequence[str] | None = None,
    ) -> tuple[list[str], list[bool]]:  # fmt: skip
        """Per sample "true <label> · pred <class> (p)" from one no-grad forward pass, and whether it is wrong;
        " · explains <class>" when the maps explain another class than the predicted one.

        Labels are named by ``class_names``, the model's output classes by ``outputs`` (defaults to the same
        names). Classifiers (K > 1 outputs): softmax probability of the predicted class; one output with class
        targets: sigmoid; regression (no target): the output value. Target operators (dense outputs): what they
        explain, their classes named by ``outputs``."""
        if outputs is None:
            outputs = self.class_names
        with torch.no_grad():
            out = model(x)
        if isinstance(target, TargetOperator):  # a dense / multi-output model: say what is explained
            labels = None if y is None else class_labels(y[: x.shape[0]].cpu())
            explained = target[: x.shape[0]].describe(outputs)
            captions = [
                ("" if labels is None else f"true {self._class_name(int(labels[i]))} · ") + explained[i]
                for i in range(x.shape[0])
            ]
            return captions, [False] * x.shape[0]
        if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != x.shape[0]:
            return [f"sample {i}" for i in range(x.shape[0])], [False] * x.shape[0]
        out = out.detach().float().reshape(x.shape[0], -1).cpu()
        labels = None if y is None else class_labels(y[: x.shape[0]].cpu())
        captions, wrong = [], []
        for i in range(x.shape[0]):
            if out.shape[1] > 1:
                p = torch.softmax(out[i], 0)
                k = int(p.argmax())
                pred, prob = k, float(p[k])
            elif target is not None:
                p1 = float(torch.sigmoid(out[i, 0]))
                pred, prob = int(p1 > 0.5), max(p1, 1 - p1)
            else:
                truth = "" if y is None or y[i].numel() != 1 else f"y {float(y[i]):.3g} · "
                captions.append(f"{truth}ŷ {float(out[i, 0]):.3g}")
                wrong.append(False)
                continue
            truth = "" if labels is None else f"true {self._class_name(int(labels[i]))} · "
            explains = ""
            if isinstance(target, Tensor) and target.ndim == 1 and out.shape[1] > 1 and int(target[i]) != pred:
                explains = f" · explains {class_name(outputs, int(target[i]))}"  # target= another class than the pred
            captions.append(f"{truth}pred {class_name(outputs, pred)} ({prob:.2f}){explains}")
            wrong.append(labels is not None and int(labels[i]) != pred)
        return captions, wrong

    def _word(self, token_id: int) -> str:
        vocab = self.vocab
        return vocab[token_id] if vocab is not None and 0 <= token_id < len(vocab) else str(token_id)

    def _class_name(self, k: int) -> str:
        """The name of label ``k``."""
        return class_name(self.class_names, k)

    def _log_curves(self, trainer: pl.Trainer, mname: str, by_method: dict[str, Tensor], cx: Tensor | None) -> None:
        """One line per method on shared axes (deletion / insertion curves), with each method's score."""
        scores = {m: s[mname] for m, s in self.last_scores.items() if mname in s}
        metric = next((v for (m, k), v in self._metrics.items() if k == mname), None)
        output = getattr(metric, "output", "probability")
        verb = "inserted" if "insertion" in mname else "deleted"
        when = "test" if phase_prefix(trainer) else f"epoch {trainer.current_epoch}"
        hib = getattr(metric, "higher_is_better", None)
        better = "" if hib is None else f" · {'higher' if hib else 'lower'} is better"
        fig = viz.curves_figure(
            by_method, x=cx, title=f"{mname} curve · {when}{better}",
            xlabel=f"fraction of features {verb} (most relevant first)",
            ylabel=f"target-class {output}" if isinstance(output, str) else "model output",
            scores=scores, score_name="AUC" if mname in ("deletion", "insertion") else mname,
        )  # fmt: skip
        section = self._sections.get(mname, metric_section(mname))
        if fig is not None:
            self.log_image(trainer, f"{section}/{mname}_curve", fig)
        else:  # no matplotlib: the curve's values as a table
            length = min(c.numel() for c in by_method.values())
            xs = cx.flatten().tolist() if cx is not None else [i / max(length - 1, 1) for i in range(length)]
            rows = [[xs[i], *[float(c.flatten()[i]) for c in by_method.values()]] for i in range(length)]
            self.log_table(trainer, f"{section}/{mname}_curve", ["fraction", *by_method], rows)

    def _top_features(self, maps: Tensor, k: int = 10) -> tuple[list[str], list[list[Any]]]:
        mean_abs = maps.abs().mean(0)
        mean_signed = maps.mean(0)
        order = mean_abs.argsort(descending=True)[:k].tolist()
        names = self.feature_names or [f"x{i}" for i in range(maps.shape[1])]
        rows = [[i + 1, names[j] if j < len(names) else f"x{j}", float(mean_abs[j]), float(mean_signed[j])]
                for i, j in enumerate(order)]  # fmt: skip
        return ["rank", "feature", "mean abs", "mean"], rows

    def ranking_table(self) -> str:
        """Methods ranked by each score: a Markdown table (higher-is-better taken from the metric)."""
        (headers, rows), note = self.ranking_rows()
        return markdown_table(headers, rows) + ("\n\n" + note if note else "")

    def ranking_rows(self) -> tuple[tuple[list[str], list[list[Any]]], str]:
        """The ranking as (headers, rows) and a Markdown note naming the best method on each score."""
        columns = sorted({k for s in self.last_scores.values() for k in s})
        rows = []
        for name, s in self.last_scores.items():
            rows.append([name, *[s.get(c, float("nan")) for c in columns]])
        best = []
        for c in columns:
            vals = {m: s[c] for m, s in self.last_scores.items() if c in s and math.isfinite(s[c])}
            if len(vals) < 2 or c == "seconds":
                continue
            hib = self._higher_is_better(c)
            if hib is None:
                continue
            picks = best_methods(vals, hib)
            side = "higher" if hib else "lower"
            if len(picks) == len(vals):  # was "best: saliency" where every method scored 1.0
                best.append(f"- **{c}** ({side} is better): every method scores {_short(vals[picks[0]])}, a tie")
                continue
            tie = " (tie)" if len(picks) > 1 else ""
            best.append(f"- best on **{c}** ({side} is better): " + ", ".join(f"`{m}`" for m in picks) + tie)
        return (["method", *columns], rows), "\n".join(best)

    def _higher_is_better(self, score: str) -> bool | None:
        fixed = {"completeness_error": False, "drift": None, "sparseness": None}
        if score in fixed:
            return fixed[score]
        if score in self._higher:
            return self._higher[score]
        for metric in self._metrics.values():
            if self._metric_name(metric) == score:
                return getattr(metric, "higher_is_better", None)
        return None
