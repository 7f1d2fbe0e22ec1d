"""InteractionMonitor: which features (or patches) act together, on a fixed probe set, while training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from .. import viz
from .._internal.config import to_plain
from .._internal.layout import reads_channels_first
from ..interaction import ACD, Groups, InteractionMethod, build_interaction, top_pairs
from ..interaction.acd import hierarchy_levels
from ..interaction.base import GroupSpec, make_groups, pair_index
from ..interaction.contextual import CDInteraction
from ._logging import class_name, find_class_names, markdown_table, media_loggers, phase_prefix
from .base import ProbeCallback, class_indices, first_of, non_default_settings

__all__ = ["InteractionMonitor"]

MethodSpec = str | Mapping[str, Any] | InteractionMethod


def group_axis_label(groups: Groups, x: Tensor) -> str:
    """What a group of the interaction matrices is, for their axes: a patch (row, col) of a grid over an image, a
    window of a sequence, a feature of tabular data (was "feature group" everywhere, and "(1,2)" unexplained)."""
    if groups.grid is not None and len(groups.grid) == 2 and x.ndim == 4:
        return f"patch (row, col) of the {groups.grid[0]}×{groups.grid[1]} grid"
    if groups.grid is not None and len(groups.grid) == 1 and x.ndim == 3:
        return f"window of the sequence ({groups.grid[0]} windows)"
    if x.ndim == 2 and groups.n == x.shape[1]:  # one group per feature (x0, x1, ... or the data's names)
        return "feature"
    return "feature group"


class InteractionMonitor(ProbeCallback):
    """Pairwise interaction scores of a fixed probe set on every due validation epoch.

    For each method (``"cd"``, ``"integrated_hessians"``, ``"sobol"``, ``"hsic"`` or an
    :class:`~explain_callbacks.interaction.InteractionMethod`), the (B, P, P) matrices of the probe
    set over the feature groups (features for tabular data, patches for images) give:

    - scalars ``interactions/<score>/<method>`` (one chart per score, a line per method):
      ``mean_abs`` (mean |off-diagonal score|), ``top_pair`` (|score| of the strongest aggregated
      pair), ``consistency`` (fraction of samples whose own strongest pair is that pair); and
      ``cost/seconds/<method>``;
    - figures ``interactions/matrix/<method>`` (the probe-mean |score| matrix, then the signed
      matrices of the first samples on one shared scale centred at zero, groups named on the axes),
      and for image inputs ``interactions/top_pairs/<method>`` (each sample with its strongest pair
      of patches coloured);
    - tables ``interactions/pairs/<method>`` (the top-k pairs aggregated over the probe: mean |score|,
      mean signed score, share of samples ranking the pair in their own top-k) and
      ``interactions/pairs_per_sample/<method>``.

    With ``acd`` on, ACD hierarchies (Singh et al. 2019) of the first ``acd_samples`` probe samples
    are drawn as ``interactions/acd_hierarchy/sample_<i>`` (image and sequence inputs). Inside
    ``trainer.test`` every tag starts with ``test/``.

    Args:
        methods: interaction methods (names, ``{"name": ..., **kwargs}`` mappings or instances).
        groups: feature groups for every method (see :func:`explain_callbacks.interaction.make_groups`):
            None = one per feature (tabular) / a 4x4 patch grid (images), an int grid size, an id map...
        top_k: pairs listed per sample and in the aggregate.
        max_matrices: per-sample matrices drawn.
        acd: False, True, or ACD keyword arguments (``tile``, ``percentile``, ``num_iters``).
        acd_samples: probe samples given an ACD hierarchy.
        feature_names: names of tabular features (default: the data module's ``feature_names``).
        log_images: turn image logging off (scalars and text stay).
        num_samples: probe size (per rank).
        budget: the share of the training time the monitor may spend during ``fit`` (:class:`ProbeCallback`): by
            default 2 %, fewer epochs and fewer probes when CD costs more; ``budget=None`` explains every probe on
            every due epoch (the fixed schedule). With CD alone (the default) the unit of work is one decomposition
            rather than one probe, since one probe over a 4×4 grid is 136 of them (2 s on a small ResNet, more than
            2 % of a short run): the first piece is the pairs among the first two groups of the first probe (three
            decompositions), and the pieces grow while the budget allows, over the first groups (the pairs among
            them: exact, as CD's pair score depends on the pair alone), then over probes. The logged text
            ``cost/budget/InteractionMonitor`` says what a partial piece covered.
        **kwargs: :class:`ProbeCallback` arguments (num_samples, per_class, every_n_epochs, target,
            input_key, label_key, batch_size, model_attr, strict).
    """

    def __init__(
        self,
        methods: Sequence[MethodSpec] | MethodSpec = ("cd",),
        groups: GroupSpec = None,
        top_k: int = 5,
        max_matrices: int = 4,
        acd: bool | Mapping[str, Any] = False,
        acd_samples: int = 2,
        feature_names: Sequence[str] | None = None,
        log_images: bool = True,
        num_samples: int = 2,
        budget: float | None = 0.02,
        **kwargs: Any,
    ) -> None:
        # CD over a 4x4 patch grid is 136 decompositions per probe: on 2 probes every epoch it cost 8 % of the main
        # job's training and 36 % of a small ResNet's (benchmarks/bench_callback_costs.py), hence the budget.
        super().__init__(num_samples=num_samples, budget=budget, **kwargs)
        methods = to_plain(methods)
        if isinstance(methods, (str, Mapping, InteractionMethod)):
            methods = [methods]
        self.method_specs = list(methods)
        if not self.method_specs:
            raise ValueError("InteractionMonitor needs at least one method, e.g. methods=['cd'].")
        self.methods: dict[str, InteractionMethod] = {}
        for spec in self.method_specs:
            method = build_interaction(spec)
            name = getattr(method, "name", type(method).__name__)
            if name in self.methods:
                name = f"{name}_{len(self.methods)}"
            setting = getattr(method, "_batch_size", getattr(method, "batch_size", None))  # RowsPerCall or plain
            if isinstance(self.batch_size, int) and setting is not None:  # the callback's explicit rows per call
                method.batch_size = self.batch_size if setting == "auto" else max(setting, self.batch_size)
            self.methods[name] = method
        self.groups = to_plain(groups)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}.")
        self.top_k = top_k
        self.max_matrices = max_matrices
        acd = to_plain(acd)
        self.acd_kwargs: dict[str, Any] | None = dict(acd) if isinstance(acd, Mapping) else ({} if acd else None)
        self.acd_samples = acd_samples
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.log_images = log_images
        self.last_scores: dict[str, dict[str, Any]] = {}
        self._piece_groups: int | None = None  # under the budget: explain the pairs among the first groups only

    def key_fields(self) -> dict[str, Any]:
        return {**super().key_fields(), "methods": sorted(self.methods)}

    def setting_fields(self) -> dict[str, Any]:
        # two monitors over different grids (groups=2 and groups=4) are two states
        return {**super().setting_fields(), **non_default_settings(self, groups=self.groups)}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.feature_names is None and trainer.datamodule is not None:
            names = getattr(trainer.datamodule, "feature_names", None)
            if names:
                self.feature_names = list(names)

    # ------------------------------------------------------------------ the budget's pieces
    def _separable(self) -> bool:
        """Whether every method's pair score depends on the pair alone (CD: ``CD(S_p ∪ S_q) − CD(S_p) − CD(S_q)``),
        so the pairs among the first groups are the full matrix's block, exactly."""
        return all(type(m) is CDInteraction for m in self.methods.values())

    def _full_groups(self, model: torch.nn.Module, x: Tensor) -> Groups:
        """The groups every method explains ``x`` over, as the methods resolve them."""
        method = next(iter(self.methods.values()))
        cf = reads_channels_first(model, x, method.channels_first)
        return make_groups(x, self.groups, channels_first=cf)

    def first_groups(self, model: torch.nn.Module, x: Tensor, g: int) -> tuple[Groups, tuple[str, str]]:
        """The first ``g`` of the groups ``x`` is explained over (named as in the full matrix), and their matrices'
        axis label (the full grid's) and title note: a separable method over them gives the block of the full
        matrix."""
        full = self._full_groups(model, x)
        names = [self._label(full, i) for i in range(g)]
        ids = None if full.ids is None else full.ids.masked_fill(full.ids >= g, -1)
        return Groups(full.masks[:g], ids, None, names), (
            group_axis_label(full, x), f"the first {g} of {full.n} groups (the time budget's piece)"
        )

    def _explain_within_budget(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Under the budget with CD alone: pieces of decompositions (see ``budget``); otherwise probes."""
        p = None
        if self._separable() and self.probe_x is not None:
            try:
                p = self._full_groups(self.model(pl_module), self.probe_x).n
            except Exception:  # the explanation says what is wrong with the groups; here: probes as the unit
                p = None
        # every rank reaches the same decision: the probe set's shape (and so p) is the same on every rank
        if p is None or p < 2 or self.probe_x is None:
            super()._explain_within_budget(trainer, pl_module)
            return
        per_probe = p * (p + 1) // 2  # p main effects and p(p-1)/2 pairs
        units = self.budget_units(trainer, self.probe_size * per_probe, first=3, kind="decomposition")
        if units < 3:  # not even the pair of the first two groups
            self._budget_skipped += 1
            return
        if units >= per_probe:
            b, g = min(self.probe_size, units // per_probe), p
        else:  # one probe, the largest block of groups g(g+1)/2 <= units (at least two groups: one pair)
            b, g = 1, 2
            while (g + 1) * (g + 2) // 2 <= units and g + 1 <= p:
                g += 1
        full = (self.probe_x, self.probe_y, self.probe_mask)
        if b < self.probe_size:  # the first b probes: the same samples every epoch
            self.probe_x, self.probe_y, self.probe_mask = (None if t is None else t[:b] for t in full)
        self._piece_groups = g if g < p else None
        try:
            seconds, compute, once = self._timed_explain(trainer, pl_module)
        finally:
            self.probe_x, self.probe_y, self.probe_mask = full
            self._piece_groups = None
        self.budget_spend(seconds, b * g * (g + 1) // 2, trainer.current_epoch, kind="decomposition",
                          fixed=None if compute is None else seconds - compute, one_off=once)  # fmt: skip
        self._fit_explanations += 1
        if b < self.probe_size or g < p:
            groups = f"the pairs among groups 0–{g - 1} of {p}" if g < p else f"all {p} groups"
            self.log_budget_note(trainer, f"{first_of(b, self.probe_size, 'probe')}, {groups}")

    # ------------------------------------------------------------------ explaining
    def explain(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Tensor, y: Tensor | None, target: Tensor | None
    ) -> None:
        model = self.model(pl_module)
        self.last_scores = {}
        # text and pictures only where a TensorBoard writer takes them (rank zero): ACD hierarchies and the
        # pictures were computed for nothing under CSVLogger or logger=False
        draw = bool(media_loggers(trainer))
        spec: GroupSpec | Groups = self.groups
        piece = None
        if self._piece_groups is not None:  # a piece of the budget: the block of the first groups (see budget)
            spec, piece = self.first_groups(model, x, self._piece_groups)
        for name, method in self.methods.items():

            def run(method: InteractionMethod = method) -> Tensor:
                with torch.enable_grad() if method.needs_grad else torch.no_grad():
                    return method(model, x, target, groups=spec)

            start = self.clock()
            done = self.run_agreed(
                trainer, f"method {name!r}", run, "produced NaN/Inf scores (check the model for non-finite outputs)"
            )
            # the work that scales with the piece, on the budget's clock (the figures below are its fixed cost)
            self._piece_compute = (self._piece_compute or 0.0) + self.clock() - start
            if done is None:  # the scalars below are reduced across ranks: logged on every rank or on none
                continue
            scores, seconds = done
            groups: Groups = method.last_info["groups"]
            summary = self.summarise(scores, groups)
            summary["seconds"] = seconds
            self.last_scores[name] = summary
            self.log_scalar(pl_module, f"cost/seconds/{name}", seconds)
            for key in ("mean_abs", "top_pair", "consistency"):
                self.log_scalar(pl_module, f"interactions/{key}/{name}", summary[key])
            if draw:
                (h1, r1), (h2, r2) = self.pair_rows(summary, groups)
                self.log_table(trainer, f"interactions/pairs/{name}", h1, r1)
                self.log_table(trainer, f"interactions/pairs_per_sample/{name}", h2, r2)
                if self.log_images:
                    self._log_pictures(trainer, name, x, scores, summary, groups, y, piece)
        if self.acd_kwargs is not None and draw and self.log_images and x.ndim in (3, 4):
            self._log_acd(trainer, model, x, target)

    def summarise(self, scores: Tensor, groups: Groups) -> dict[str, Any]:
        """Aggregates of (B, P, P) scores: mean |score| matrix, top pairs, consistency."""
        b, p = scores.shape[0], scores.shape[-1]
        i, j = pair_index(p, scores.device)
        mean_abs = scores.abs().mean(0)
        mean_signed = scores.mean(0)
        k = min(self.top_k, i.numel())
        if k == 0:
            return {"mean_abs": 0.0, "top_pair": 0.0, "consistency": 0.0, "pairs": [], "per_sample": [],
                    "matrix": mean_abs.cpu()}  # fmt: skip
        ai, aj, av = top_pairs(mean_abs, k=k)
        si, sj, sv = top_pairs(scores, k=k)  # (B, k)
        pairs = []
        for r in range(k):
            pi, pj = int(ai[r]), int(aj[r])
            in_topk = ((si == pi) & (sj == pj)).any(1).float().mean()
            pairs.append((pi, pj, float(av[r]), float(mean_signed[pi, pj]), float(in_topk)))
        consistency = float(((si[:, 0] == ai[0]) & (sj[:, 0] == aj[0])).float().mean())
        per_sample = [[(int(si[s, r]), int(sj[s, r]), float(sv[s, r])) for r in range(k)] for s in range(b)]
        return {
            "mean_abs": float(scores[:, i, j].abs().mean()),
            "top_pair": float(av[0]),
            "consistency": consistency,
            "pairs": pairs,
            "per_sample": per_sample,
            "matrix": mean_abs.cpu(),
        }

    def _label(self, groups: Groups, p: int) -> str:
        if self.feature_names is not None and groups.names and groups.n == len(self.feature_names):
            return self.feature_names[p]
        return groups.label(p)

    def pair_table(self, summary: dict[str, Any], groups: Groups, max_samples: int = 8) -> str:
        """The aggregated and the per-sample top pairs as Markdown tables."""
        (h1, r1), (h2, r2) = self.pair_rows(summary, groups, max_samples)
        return markdown_table(h1, r1) + "\n\n" + markdown_table(h2, r2)

    def pair_rows(
        self, summary: dict[str, Any], groups: Groups, max_samples: int = 8
    ) -> tuple[tuple[list[str], list[Any]], tuple[list[str], list[Any]]]:
        """(headers, rows) of the aggregated top pairs and of each sample's top pairs."""
        rows = [
            (r + 1, f"{self._label(groups, pi)} × {self._label(groups, pj)}", a, s, share)
            for r, (pi, pj, a, s, share) in enumerate(summary["pairs"])
        ]
        per = [
            (s, ", ".join(f"{self._label(groups, a)}×{self._label(groups, c)} ({v:.3g})" for a, c, v in pairs))
            for s, pairs in enumerate(summary["per_sample"][:max_samples])
        ]
        return (["rank", "pair", "mean abs", "mean signed", "share in top-k"], rows), (
            ["sample", f"top {self.top_k} pairs"], per
        )

    def _sample_names(self, trainer: pl.Trainer, y: Tensor | None, n: int) -> list[str]:
        """``"sample <i> · <class>"`` per probe sample (the label's name where the data names its classes)."""
        labels = None if y is None else class_indices(y.cpu())
        names = find_class_names(trainer)
        return [f"sample {s}" + ("" if labels is None else f" · {class_name(names, int(labels[s]))}") for s in range(n)]

    def _log_pictures(
        self, trainer: pl.Trainer, name: str, x: Tensor, scores: Tensor, summary: dict[str, Any], groups: Groups,
        y: Tensor | None = None, piece: tuple[str, str] | None = None,
    ) -> None:  # fmt: skip
        p = scores.shape[-1]
        samples = self._sample_names(trainer, y, x.shape[0])
        mean = summary["matrix"].clone()
        mean.fill_diagonal_(0.0)  # as in the sample panels: the diagonal holds main effects, another quantity
        panels = [("mean |score| over the probe (pairs only)", mean, False)]
        for s in range(min(self.max_matrices, scores.shape[0])):
            m = scores[s].detach().cpu().clone()
            m.fill_diagonal_(0.0)  # the diagonal holds a different quantity (main effect / share)
            panels.append((f"{samples[s]} (signed)", m, True))
        labels = [self._label(groups, i) for i in range(p)]
        when = "test" if phase_prefix(trainer) else f"epoch {trainer.current_epoch}"
        axis, note = piece if piece is not None else (group_axis_label(groups, x), None)
        title = f"{name} interactions · {when}" + (f" · {note}" if note else "")
        fig = viz.matrix_figure(panels, labels, title=title, axis_label=axis)
        self.log_image(trainer, f"interactions/matrix/{name}", fig)
        if x.ndim == 4 and groups.masks.ndim == 4:
            n = min(self.max_matrices * 2, x.shape[0])
            onehot = torch.zeros(n, 2, p)
            for s in range(n):
                a, c, _ = summary["per_sample"][s][0]
                onehot[s, 0, a] = 1.0
                onehot[s, 1, c] = 1.0
            first = groups.paint(onehot[:, 0])[:, 0]  # (n, H, W)
            second = groups.paint(onehot[:, 1])[:, 0]
            base = viz.to_rgb(x[:n].detach().cpu()).mean(1, keepdim=True).expand(-1, 3, -1, -1)
            red = torch.tensor([0.85, 0.15, 0.1]).view(1, 3, 1, 1)
            blue = torch.tensor([0.1, 0.35, 0.9]).view(1, 3, 1, 1)
            pic = base * 0.5 + 0.5 * (first.unsqueeze(1) * red + second.unsqueeze(1) * blue)
            pic = torch.where((first + second).unsqueeze(1) > 0, pic, base * 0.6)
            firsts = [summary["per_sample"][s][0] for s in range(n)]
            titles = [
                f"{samples[s]}\n{self._label(groups, a)} × {self._label(groups, c)}: {v:+.3g}"
                for s, (a, c, v) in enumerate(firsts)
            ]
            fig = viz.tiles_figure(
                list(pic.clamp(0, 1)), titles,
                title=f"{name}: strongest pair per sample (red × blue patch, its signed score) · {when}",
            )  # fmt: skip
            self.log_image(trainer, f"interactions/top_pairs/{name}", fig)

    def _log_acd(self, trainer: pl.Trainer, model: torch.nn.Module, x: Tensor, target: Tensor | None) -> None:
        try:
            acd = ACD(batch_size=self.batch_size, **(self.acd_kwargs or {}))
            n = min(self.acd_samples, x.shape[0])
            with torch.no_grad():
                hierarchies = acd(model, x[:n], None if target is None else target[:n])
        except Exception as err:  # e.g. an architecture CD cannot decompose
            if self.strict:
                raise
            self.warn_failure(
                ("acd", type(err).__name__, str(err)), f"InteractionMonitor: ACD skipped: {type(err).__name__}: {err}."
            )
            return
        for s, h in enumerate(hierarchies):
            image = x[s].detach().cpu() if x.ndim == 4 else None
            fig = viz.hierarchy_figure(hierarchy_levels(h), image, title=f"ACD hierarchy, sample {s}")
            self.log_image(trainer, f"interactions/acd_hierarchy/sample_{s}", fig)
