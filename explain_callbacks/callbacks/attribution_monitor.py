"""AttributionMonitor: attribution maps of a fixed probe set, every validation epoch, in TensorBoard."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .. import viz
from .._internal.config import spec_list, to_plain
from .._internal.registry import METRICS
from ..attribution import Attributor, build_attributor
from ..metrics.functional import explanation_drift, sparseness
from ..metrics.functional._utils import broadcast_map
from ._logging import markdown_table, tensorboard_writers
from .base import ProbeCallback, non_default_settings

__all__ = ["AttributionMonitor"]

MethodSpec = str | Mapping[str, Any] | Attributor


class AttributionMonitor(ProbeCallback):
    """Watch how attribution maps of a fixed probe set evolve while the model trains.

    On every due validation epoch, for each method: the maps of the probe set, logged as a grid of
    heatmap overlays (images), a feature-by-sample heatmap (tabular) or per-sample time-by-feature
    heatmaps (sequences); a histogram of values; scalars ``explain/<method>/<what>``: ``seconds``,
    ``sparseness`` (Gini), ``drift`` (mean per-sample Spearman correlation with the previous map),
    ``completeness_error`` (path methods), and every selected metric; curves of curve metrics
    (deletion, insertion) as images; a ranking table of the methods as text.

    Args:
        methods: short names (``"saliency"``, ``"ig"``, ...), ``{"name": ..., **kwargs}`` mappings,
            :class:`~explain_callbacks.attribution.Attributor` instances or Captum methods.
        metrics: metric short names / mappings / instances from ``explain_callbacks.metrics``; each is
            computed on the same maps (nothing is computed twice).
        max_images: samples drawn in the overlay grid.
        feature_names: names of tabular features (for the top-feature table).
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
        self._metrics: dict[tuple[str, str], Any] = {}
        self.max_images = max_images
        self.feature_names = list(feature_names) if feature_names is not None else None
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
        if hasattr(metric, "to"):
            metric = metric.to(device)
            self._metrics[key] = metric
        return metric

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.feature_names is None:  # pick up the data module's feature names (tabular data)
            names = getattr(getattr(trainer, "datamodule", None), "feature_names", None)
            if names:
                self.feature_names = list(names)

    # ------------------------------------------------------------------ state
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
        draw = bool(tensorboard_writers(trainer))  # pictures only where a TensorBoard writer takes them
        if draw and self.log_images and x.ndim == 4 and not self.previous:
            self.log_image(
                trainer, "explain/probe/inputs", viz.make_grid(viz.upscale(viz.to_rgb(x[: self.max_images])))
            )
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
                    updated, problem = False, "another rank failed"
                    try:
                        updated = self._update_metric(metric, model, x, maps, target, method, masks)
                    except Exception as err:
                        if self.strict:
                            raise
                        problem = f"failed: {type(err).__name__}: {err}"
                    # compute() is a collective under DDP: every rank enters it or none does
                    if not self._all_ranks_ok(trainer, updated):
                        if problem != "another rank failed" or updated:
                            self.warn_failure(
                                ("metric", mname, name, problem),
                                f"AttributionMonitor: metric {mname!r} on {name!r} {problem}. Skipped.",
                            )
                        continue
                    value = float(metric.compute())
                    scores[mname] = value
                    self.log_scalar(pl_module, f"explain/{name}/{mname}", value, sync=False)
                    curve = getattr(metric, "curve", None)
                    if isinstance(curve, Tensor) and curve.numel() > 1:
                        curves.setdefault(mname, {})[name] = curve.detach().cpu()
                        cx = getattr(metric, "curve_x", None)
                        if isinstance(cx, Tensor):
                            curve_x[mname] = cx.detach().cpu()
            self.last_scores[name] = scores
            if draw:
                self._log_pictures(trainer, name, x, maps)
            self.previous[name] = maps.cpu()
        if draw:
            for mname, by_method in curves.items():
                img = viz.plot_curves(by_method, x=curve_x.get(mname), title=f"{mname} epoch {trainer.current_epoch}")
                self.log_image(trainer, f"explain/curves/{mname}", img)
            if self.last_scores:
                self.log_text(trainer, "explain/ranking", self.ranking_table())

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
        if getattr(metric, "needs_masks", False) and masks is None:
            return False
        metric.reset()
        kw = {"masks": masks} if masks is not None else {}
        if getattr(metric, "kind", "explanation") == "explainer":
            metric.update(model, x, target, method, attributions=maps, **kw)
        else:
            metric.update(model, x, maps, target, **kw)
        return True

    def _log_scalars(
        self, pl_module: pl.LightningModule, name: str, method: Attributor, maps: Tensor, seconds: float
    ) -> dict[str, float]:
        scores: dict[str, float] = {"seconds": seconds}
        self.log_scalar(pl_module, f"explain/{name}/seconds", seconds)
        sp = float(sparseness(maps).mean())
        scores["sparseness"] = sp
        self.log_scalar(pl_module, f"explain/{name}/sparseness", sp)
        info = getattr(method, "last_info", {}) or {}
        if "completeness_error" in info:
            ce = info["completeness_error"].detach()
            ce = ce[torch.isfinite(ce)]
            if ce.numel():
                scores["completeness_error"] = float(ce.mean())
                self.log_scalar(pl_module, f"explain/{name}/completeness_error", scores["completeness_error"])
        prev = self.previous.get(name)
        # under a time budget an epoch may explain fewer probes: drift over the probes both epochs explained
        k = min(0 if prev is None else prev.shape[0], maps.shape[0])
        if prev is not None and k > 0 and prev.shape[1:] == maps.shape[1:]:
            drift = float(explanation_drift(prev[:k].to(maps.device), maps[:k]).mean())
            scores["drift"] = drift
            self.log_scalar(pl_module, f"explain/{name}/drift", drift)
        return scores

    def _log_pictures(self, trainer: pl.Trainer, name: str, x: Tensor, maps: Tensor) -> None:
        if self.log_histograms:
            self.log_histogram(trainer, f"explain/{name}/values", maps)
        if not self.log_images:
            return
        n = min(self.max_images, maps.shape[0])
        signed = bool((maps < 0).any())
        cmap = "diverging" if signed else "heat"
        if maps.ndim == 4 and x.ndim == 4:
            pic = viz.overlay(x[:n], viz.map_to_2d(maps[:n]), signed=signed)
            self.log_image(trainer, f"explain/{name}/overlay", viz.make_grid(viz.upscale(pic)))
        elif maps.ndim == 2:
            cell = max(2, min(12, 480 // max(maps.shape[1], 1)))
            self.log_image(trainer, f"explain/{name}/features", viz.matrix_image(maps[:n], cmap, cell=cell))
            self.log_text(trainer, f"explain/{name}/top_features", self._top_features(maps))
        elif maps.ndim == 3:
            # (B,T,D) sequences or (B,C,L) signals: one time-by-feature heatmap per sample.
            per = viz.colorize(maps[:n].transpose(1, 2), cmap, symmetric=signed)
            self.log_image(trainer, f"explain/{name}/sequence", viz.make_grid(viz.upscale(per, 48), nrow=4))

    def _top_features(self, maps: Tensor, k: int = 10) -> str:
        mean_abs = maps.abs().mean(0)
        mean_signed = maps.mean(0)
        order = mean_abs.argsort(descending=True)[:k].tolist()
        names = self.feature_names or [f"x{i}" for i in range(maps.shape[1])]
        rows = [[i + 1, names[j] if j < len(names) else f"x{j}", float(mean_abs[j]), float(mean_signed[j])]
                for i, j in enumerate(order)]  # fmt: skip
        return markdown_table(["rank", "feature", "mean abs", "mean"], rows)

    def ranking_table(self) -> str:
        """Methods ranked by each score: a Markdown table (higher-is-better taken from the metric)."""
        columns = sorted({k for s in self.last_scores.values() for k in s})
        rows = []
        for name, s in self.last_scores.items():
            rows.append([name, *[s.get(c, float("nan")) for c in columns]])
        table = markdown_table(["method", *columns], rows)
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
        return table + ("\n\n" + "\n".join(best) if best else "")

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
