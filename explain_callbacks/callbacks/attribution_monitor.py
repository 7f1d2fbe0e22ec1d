"""AttributionMonitor: attribution maps of a fixed probe set, every validation epoch, in TensorBoard."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .. import viz
from .._internal.config import spec_list, to_plain
from .._internal.layout import reads_channels_first
from .._internal.registry import METRICS
from ..attribution import Attributor, build_attributor
from ..metrics.base import update_metric
from ..metrics.functional import explanation_drift, sparseness
from ..metrics.functional._utils import broadcast_map
from ._logging import global_step, markdown_table, media_loggers, metric_section, phase_prefix
from .base import ProbeCallback, class_indices, non_default_settings

__all__ = ["AttributionMonitor", "class_labels", "find_class_names"]

MethodSpec = str | Mapping[str, Any] | Attributor


def find_class_names(trainer: pl.Trainer) -> list[str] | None:
    """Class names for captions: ``class_names`` or ``classes`` of the data module, else of the first
    validation dataset (or the dataset a ``Subset`` wraps), when it is a sequence of names."""
    candidates: list[Any] = [getattr(trainer, "datamodule", None)]
    try:
        loaders = trainer.val_dataloaders
    except Exception:  # not available at setup in every Lightning version
        loaders = None
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    ds = getattr(loader, "dataset", None)
    candidates += [ds, getattr(ds, "dataset", None)]
    for obj in candidates:
        for attr in ("class_names", "classes"):
            names = getattr(obj, attr, None) if obj is not None else None
            if isinstance(names, (list, tuple)) and names and all(isinstance(c, (str, int)) for c in names):
                return [str(c) for c in names]
    return None


def class_labels(y: Tensor) -> Tensor | None:
    """Labels as class indices (N,) (integer or integral labels, or one-hot rows), None otherwise."""
    if y.ndim == 2 and y.shape[1] > 1 and bool(((y == 0) | (y == 1)).all()) and bool((y.sum(1) == 1).all()):
        return y.argmax(1)
    return class_indices(y)


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
        **kwargs: Any,
    ) -> None:
        super().__init__(num_samples=num_samples, **kwargs)
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
        if isinstance(spec, str):
            return build_attributor(spec, batch_size=self.batch_size)
        if isinstance(spec, Mapping):
            spec = dict(spec)
            spec.setdefault("batch_size", self.batch_size)
        return build_attributor(spec)

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

    # ------------------------------------------------------------------ state
    probe_bound_state = ("previous",)  # maps of the probe set: dropped when it is re-captured

    def extra_state(self) -> dict[str, Any]:
        return {"previous": {k: v.cpu() for k, v in self.previous.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.previous = dict(state.get("previous", {}))

    def key_fields(self) -> dict[str, Any]:
        # names or plain specs, never an object's repr (it may hold a memory address)
        metrics = [m if isinstance(m, (str, Mapping)) else self._metric_name(m) for m in self.metric_specs]
        return {**super().key_fields(), "methods": sorted(self.methods), "metrics": metrics}

    def setting_fields(self) -> dict[str, Any]:
        # two monitors of {"name": "ig", "n_steps": 8} and {"name": "ig", "n_steps": 64} are two states
        settings = non_default_settings(self, method_settings=dict(sorted(self._method_settings.items())) or None)
        return {**super().setting_fields(), **settings}

    # ------------------------------------------------------------------ the work
    def explain(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Tensor, y: Tensor | None, target: Tensor | None
    ) -> None:
        model = self.model(pl_module)
        masks = None if self.probe_mask is None else self.probe_mask.to(x.device)
        curves: dict[str, dict[str, Tensor]] = {}
        curve_x: dict[str, Tensor] = {}
        self.last_scores = {}
        draw = bool(media_loggers(trainer))  # pictures only where a logger takes them (rank zero)
        drawn: dict[str, Tensor] = {}
        for name, method in self.methods.items():
            done = self.run_agreed(
                trainer, f"method {name!r}", lambda method=method: method(model, x, target),
                "produced NaN/Inf attributions (check the model for non-finite gradients)",
            )  # fmt: skip
            if done is None:
                continue
            maps, seconds = done
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
                        updated = self._update_metric(metric, model, x, maps, target, method, masks)
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
                    self.log_histogram(trainer, f"maps/values/{name}", maps)
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
        masks: Tensor | None,
    ) -> bool:  # fmt: skip
        """Reset and update ``metric`` on this epoch's maps; False when it does not apply (no masks)."""
        return update_metric(metric, model, x, maps, target, method, masks)

    def _log_scalars(
        self, pl_module: pl.LightningModule, name: str, method: Attributor, maps: Tensor, seconds: float
    ) -> dict[str, float]:
        scores: dict[str, float] = {"seconds": seconds}
        self.log_scalar(pl_module, f"cost/seconds/{name}", seconds)
        sp = float(sparseness(maps).mean())
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
            drift = float(explanation_drift(prev[:k].to(maps.device), maps[:k]).mean())
            scores["drift"] = drift
            self.log_scalar(pl_module, f"maps/drift/{name}", drift)
        return scores

    def _log_pictures(
        self, trainer: pl.Trainer, model: torch.nn.Module, x: Tensor, y: Tensor | None, target: Tensor | None,
        drawn: dict[str, Tensor],
    ) -> None:  # fmt: skip
        """One figure of every method's maps (see the class docstring); a feature table for tabular maps."""
        n = min(self.max_images, x.shape[0])
        captions, wrong = self._captions(model, x[:n], y, target)
        signed = {k: bool((m < 0).any()) for k, m in drawn.items()}
        when = "test" if phase_prefix(trainer) else f"epoch {trainer.current_epoch}"
        title = f"attributions · {when} · step {global_step(trainer)}"
        xs = x[:n].detach().float().cpu()
        if x.ndim == 4 and all(m.ndim == 4 for m in drawn.values()):
            maps = {k: viz.map_to_2d(m) for k, m in drawn.items()}
            fig = viz.attribution_figure(xs, maps, signed, captions, wrong, title=title)
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
        self, model: torch.nn.Module, x: Tensor, y: Tensor | None, target: Tensor | None
    ) -> tuple[list[str], list[bool]]:
        """Per sample "true <label> · pred <class> (p)" from one no-grad forward pass, and whether it is wrong.

        Classifiers (K > 1 outputs): softmax probability of the predicted class; one output with class
        targets: sigmoid; regression (no target): the output value."""
        with torch.no_grad():
            out = model(x)
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
            captions.append(f"{truth}pred {self._class_name(pred)} ({prob:.2f})")
            wrong.append(labels is not None and int(labels[i]) != pred)
        return captions, wrong

    def _class_name(self, k: int) -> str:
        names = self.class_names
        return str(names[k]) if names is not None and 0 <= k < len(names) else str(k)

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
            vals = {m: s[c] for m, s in self.last_scores.items() if c in s}
            if len(vals) < 2 or c == "seconds":
                continue
            hib = self._higher_is_better(c)
            if hib is None:
                continue
            pick = max(vals, key=vals.get) if hib else min(vals, key=vals.get)
            best.append(f"- best on **{c}** ({'higher' if hib else 'lower'} is better): `{pick}`")
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
