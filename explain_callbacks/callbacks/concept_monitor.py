"""ConceptMonitor: which concepts (channels of a layer) carry the predictions, tracked while the model trains.

Concept Relevance Propagation (Achtibat et al. 2023, "From attribution maps to human-understandable
explanations through Concept Relevance Propagation", Nature Machine Intelligence) splits an LRP explanation
at a chosen layer by channel: the relevance a channel (a "concept") receives is how much that concept
carries the prediction, the input map conditioned on it shows *where* the concept is, and relevance
maximisation over reference samples shows *what* it is (the input regions where it was most relevant).
This callback runs the functions of :mod:`explain_callbacks.attribution.lrp.crp` on the live model at
due validation epochs:

- per probe sample its top concepts, with their conditional maps and reference crops;
- per class the dominant concepts (the concept atlas), from a bounded reference set of validation samples;
- per class each concept's share of the relevance over epochs, so a concept appearing (a shortcut being
  learnt) or vanishing is visible as a curve.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from .. import viz
from .._internal.checks import finite_rows
from .._internal.guard import detach_clone
from .._internal.outputs import read_scores
from .._internal.targets import resolve_target
from ..attribution.layers import find_layer, last_conv_layer
from ..attribution.lrp import (
    COMPOSITES,
    LRP,
    ConceptAtlas,
    RelevanceMaximization,
    conditional_relevance,
    layer_relevance,
    relevance_maximization,
)
from ._logging import class_name, find_class_names, media_loggers, output_class_names
from .base import ProbeCallback, float_dtype, non_default_settings

__all__ = ["ConceptMonitor"]


class ConceptMonitor(ProbeCallback):
    """Concept relevance (CRP, Achtibat et al. 2023) of the probe set and a reference set, on due epochs.

    Layer: ``layer`` (a module name), default the last convolution of the model (as Grad-CAM). Its
    channels are the concepts. Relevance is LRP with ``composite`` (see
    :class:`~explain_callbacks.attribution.lrp.LRP`), explained for the ``target`` class of each sample.

    Reference set: the first ``num_reference`` finite validation samples (per rank), captured like the
    probe set during the first validation epoch and kept in this callback's state (checkpointed), so the
    references of a concept are comparable across epochs. Relevance maximisation ranks them per concept
    by the concept's largest relevance at one position of the layer (the paper's ``max`` rule); the crop
    is the input region that position depends on (its receptive field).

    Concept shares: a sample's concept relevance (relevance of one channel, summed over positions) over
    the sum of all channels' (the explained logit, by LRP's conservation, up to bias terms). Per class
    they are averaged over the reference samples of that class (the concept atlas); under DDP the class
    sums are added over ranks (after the ranks agreed that all of them computed them), so every rank
    logs the same global shares.

    Args:
        layer: module name of the layer whose channels are the concepts (None: the last convolution).
        composite: LRP composite (``"epsilon_plus_flat"``, ``"epsilon_gamma_box"``, ``"epsilon_alpha2_beta1"``,
            ``"epsilon"``), or a mapping/Composite as :class:`LRP` takes.
        top_k: concepts shown per probe sample.
        num_reference: reference samples per rank (bounded: one LRP pass over them per due epoch).
        num_crops: reference crops shown per concept.
        atlas_top: dominant concepts per class (the atlas table, the atlas figure and the tracked curves).
        log_probes: probe samples (of rank zero) drawn in the figure.
        num_samples: probe size per rank.
        batch_size: rows per LRP call (``"auto"``: sized to memory).
        budget: the share of the training time the monitor may spend during ``fit`` (:class:`ProbeCallback`; 2 %
            by default: fewer epochs and probes, the reference set whole); ``budget=None`` explains every due epoch.
        **kwargs: :class:`ProbeCallback` arguments (``every_n_epochs``, ``target``, ``input_key``,
            ``label_key``, ``model_attr``, ``output_key``, ``strict``, ...).

    Logs (the ``concepts`` section): ``concepts/probes`` (figure: per probe row the input with its class and
    prediction, then per top concept its conditional map titled ``channel c: share %`` and its reference
    crops), ``concepts/atlas`` (figure: per class its dominant concepts with crops; and a table of them),
    the scalars ``concepts/class_<k>/channel_<c>`` (share of concept c in class k; one chart per class, one
    line per concept that was ever among the class's ``atlas_top``) and ``cost/seconds/concepts``. The
    latest shares are in :attr:`shares` ``(n_classes, channels)``, their history in :attr:`history` (epoch, shares),
    the latest atlas in :attr:`atlas` and the latest relevance maximisation (indices into :attr:`ref_x`, crop boxes)
    in :attr:`references` (the history follows ``trainer.fit``; ``validate``/``test`` refresh the rest); this
    rank's probe concepts in :attr:`probe_concepts` / :attr:`probe_shares` (B, top_k) and
    the conditional maps of the drawn rows in :attr:`probe_maps` (one (top_k, *input shape) per row).
    """

    probe_bound_state = ("ref_x", "ref_y")

    def __init__(
        self,
        layer: str | None = None,
        composite: Any = "epsilon_plus_flat",
        top_k: int = 3,
        num_reference: int = 64,
        num_crops: int = 3,
        atlas_top: int = 3,
        log_probes: int = 4,
        num_samples: int = 8,
        batch_size: Any = "auto",
        budget: float | None = 0.02,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_samples=num_samples, batch_size=batch_size, budget=budget, **kwargs)
        for name, value in (("top_k", top_k), ("num_reference", num_reference), ("num_crops", num_crops),
                            ("atlas_top", atlas_top)):  # fmt: skip
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if self.target is None:
            raise ValueError(
                "ConceptMonitor explains class scores (concept shares per class); target=None (single-output "
                "regression) has no classes. Pass target='label', 'prediction' or an int class."
            )
        if isinstance(composite, str) and composite not in COMPOSITES:
            raise ValueError(f"composite must be one of {sorted(COMPOSITES)} (or a mapping), got {composite!r}.")
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"layer must be a module name (str) or None (the last convolution), got {layer!r}.")
        self.layer = layer
        self.composite = composite
        self.top_k = top_k
        self.num_reference = num_reference
        self.num_crops = num_crops
        self.atlas_top = atlas_top
        self.log_probes = log_probes
        self.ref_x: Tensor | None = None
        self.ref_y: Tensor | None = None
        self._ref_frozen = False
        self.tracked: dict[int, list[int]] = {}  # per class, the channels ever among its atlas_top (curves kept)
        self.history: list[tuple[int, Tensor]] = []  # (epoch, shares (n_classes, channels))
        self.shares: Tensor | None = None
        self.atlas: ConceptAtlas | None = None
        self.references: RelevanceMaximization | None = None
        self.layer_name: str | None = None
        self.probe_concepts: Tensor | None = None
        self.probe_shares: Tensor | None = None
        self.probe_maps: list[Tensor] = []

    def key_fields(self) -> dict[str, Any]:
        return {**super().key_fields(), "layer": str(self.layer), "num_reference": self.num_reference}

    def setting_fields(self) -> dict[str, Any]:
        return non_default_settings(self, composite=self.composite, top_k=self.top_k, atlas_top=self.atlas_top)

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        epochs = [e for e, _ in self.history]
        stacked = torch.stack([s for _, s in self.history]) if self.history else None
        tracked = {str(k): list(v) for k, v in self.tracked.items()}
        return {"ref_x": self.ref_x, "ref_y": self.ref_y, "concept_epochs": epochs, "concept_shares": stacked,
                "concept_tracked": tracked}  # fmt: skip

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.ref_x, self.ref_y = state.get("ref_x"), state.get("ref_y")
        self._ref_frozen = self.ref_x is not None
        epochs, stacked = list(state.get("concept_epochs") or []), state.get("concept_shares")
        self.history = [] if stacked is None else [(int(e), stacked[i]) for i, e in enumerate(epochs)]
        self.shares = self.history[-1][1] if self.history else None
        self.tracked = {int(k): [int(c) for c in v] for k, v in (state.get("concept_tracked") or {}).items()}

    def reshard_note(self, saved_world: int, world: int) -> str:
        return super().reshard_note(saved_world, world) + " and its reference set"

    # ------------------------------------------------------------------ the reference set
    def add_to_reference(self, batch: Any) -> None:
        """The first ``num_reference`` finite samples of the validation data (a bad batch: warned once, skipped;
        the explain step then says, on every rank, that no reference set was taken)."""
        if self._ref_frozen or (self.ref_x is not None and self.ref_x.shape[0] >= self.num_reference):
            return
        try:
            with torch.inference_mode(False):  # validation runs under inference mode: keep normal tensors
                x, y = self.adapter(batch)
                x = x.detach().cpu().clone()
                y = None if y is None else y.detach().cpu().clone()
                keep = finite_rows(x) if x.is_floating_point() else torch.ones(x.shape[0], dtype=torch.bool)
                have = 0 if self.ref_x is None else self.ref_x.shape[0]
                idx = keep.nonzero().flatten()[: self.num_reference - have]
                if idx.numel() == 0:
                    return
                self.ref_x = x[idx] if self.ref_x is None else torch.cat([self.ref_x, x[idx]])
                if y is not None:
                    self.ref_y = y[idx] if self.ref_y is None else torch.cat([self.ref_y, y[idx]])
        except Exception as err:
            if self.strict:
                raise
            self.warn_failure(
                ("reference", type(err).__name__, str(err)),
                f"ConceptMonitor could not take reference samples from a batch ({type(err).__name__}: {err}).",
            )

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if not trainer.sanity_checking and dataloader_idx == 0:
            self.add_to_reference(batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._ref_frozen = self.ref_x is not None
        super().on_validation_epoch_end(trainer, pl_module)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if dataloader_idx == 0:
            self.add_to_reference(batch)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ref_frozen = self.ref_x is not None
        super().on_test_epoch_end(trainer, pl_module)

    # ------------------------------------------------------------------ explaining
    def _layer(self, model: nn.Module) -> tuple[nn.Module, str]:
        module = last_conv_layer(model) if self.layer is None else find_layer(model, self.layer)
        name = next((n for n, m in model.named_modules() if m is module), str(self.layer))
        return module, name

    def explain(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Tensor, y: Tensor | None, target: Tensor | None
    ) -> None:
        agreement = self.agree(trainer, self.ref_x is not None, None if self.ref_x is not None else "no reference set")
        if not agreement.ok:
            self.report_failure(agreement, ("reference",), lambda why: f"ConceptMonitor skipped: {why}.")
            return
        assert self.ref_x is not None and target is not None
        model = self.model(pl_module)
        device = pl_module.device
        found: dict[str, Any] = {}

        def compute() -> Tensor:
            # everything local (may fail on one rank): inside run_agreed, before the class sums are added over ranks
            layer, name = self._layer(model)
            self.layer_name = name
            lrp = LRP(self.composite, batch_size=self.batch_size)
            dtype = float_dtype(model) if self.ref_x.is_floating_point() else None
            ref = detach_clone(self.ref_x, dtype).to(device)
            ref_y = None if self.ref_y is None else self.ref_y.to(device)
            ref_t = resolve_target(self.target, model, ref, ref_y, None)
            assert ref_t is not None
            with torch.no_grad():
                n_classes = int(read_scores(model(ref[:1])).shape[-1])
                pred = read_scores(model(x)).argmax(-1)
            # concept relevance of the references (for the atlas) and of the probe (its top concepts)
            rel_ref = layer_relevance(lrp, model, ref, ref_t, layer)
            if rel_ref.ndim < 2:
                raise ValueError(f"layer {name!r} gives shape {tuple(rel_ref.shape)}: no channels (concepts).")
            per_ref = rel_ref.flatten(2).sum(2) if rel_ref.ndim > 2 else rel_ref  # (N, C)
            sums = torch.zeros(n_classes, per_ref.shape[1], dtype=torch.float64, device=device)
            sums.index_add_(0, ref_t.long(), per_ref.double())
            counts = torch.bincount(ref_t.long(), minlength=n_classes).double().to(device)
            rel_probe = layer_relevance(lrp, model, x, target, layer)
            per_probe = rel_probe.flatten(2).sum(2) if rel_probe.ndim > 2 else rel_probe
            share_probe = per_probe / per_probe.sum(1, keepdim=True).abs().clamp_min(1e-12)
            k = min(self.top_k, share_probe.shape[1])
            top_share, top_idx = share_probe.topk(k, dim=1)
            found.update(layer=layer, lrp=lrp, ref=ref, ref_t=ref_t, rel_ref=rel_ref, pred=pred)
            found.update(top_share=top_share, top_idx=top_idx)
            # conditional maps of the drawn probe rows (their own top concepts: k rows of LRP each)
            n_draw = min(self.log_probes, x.shape[0]) if media_loggers(trainer) else 0
            found["maps"] = [
                conditional_relevance(lrp, model, x[i : i + 1], target[i : i + 1], layer, top_idx[i].tolist())[0][0]
                for i in range(n_draw)
            ]
            # one packed tensor: its finiteness is agreed, then the class sums are added over ranks
            return torch.cat([sums, counts[:, None]], 1)

        done = self.run_agreed(trainer, "concept relevance (CRP)", compute, "is NaN/Inf (check the model)")
        if done is None:
            return
        packed, seconds = done
        start = time.perf_counter()
        if trainer.world_size > 1:
            packed = trainer.strategy.reduce(packed, reduce_op="sum")
        sums, counts = packed[:, :-1], packed[:, -1]
        mean = sums / counts.clamp_min(1)[:, None]
        shares = (mean / mean.sum(1, keepdim=True).abs().clamp_min(1e-12)).float().cpu()  # as concept_atlas
        present = [int(c) for c in (counts > 0).nonzero().flatten()]
        self.shares = shares
        if trainer.state.fn == TrainerFn.FITTING:  # the curves follow training: validate()/test() add no point
            self.history.append((int(trainer.current_epoch), shares))
        k = min(self.atlas_top, shares.shape[1])
        vals, idx = shares[present].topk(k, dim=1)
        atlas = ConceptAtlas(present, idx, vals)
        self.atlas = atlas
        for row, c in enumerate(present):
            tracked = self.tracked.setdefault(c, [])
            tracked += [int(ch) for ch in idx[row] if int(ch) not in tracked]
        # the same global values on every rank: no further reduction
        for c in sorted(self.tracked):
            for ch in self.tracked[c]:
                self.log_scalar(pl_module, f"concepts/class_{c}/channel_{ch}", float(shares[c, ch]), sync=False)
        # this rank's probe: its top concepts (B, top_k), their shares and the drawn rows' maps (top_k, *input)
        self.probe_concepts, self.probe_shares = found["top_idx"].cpu(), found["top_share"].cpu()
        self.probe_maps = [m.cpu() for m in found["maps"]]
        ref = found["ref"]
        self.references = None
        if ref.ndim > 2 and ref.is_floating_point():
            # what each concept is: relevance maximisation over this rank's references, for the concepts shown
            # (local, no collective follows: a failure here is this rank's, under the error policy)
            n_draw = len(found["maps"])
            shown = {int(c) for c in found["top_idx"][:n_draw].flatten()} | {int(c) for c in idx.flatten()}
            self.references = relevance_maximization(
                found["lrp"], model, ref, found["ref_t"], found["layer"], sorted(shown),
                top_k=min(self.num_crops, ref.shape[0]), relevance=found["rel_ref"],
            )  # fmt: skip
        if media_loggers(trainer):
            self._log(trainer, x, y, target, found, atlas)
        self.log_scalar(pl_module, "cost/seconds/concepts", seconds + time.perf_counter() - start, sync=False)

    # ------------------------------------------------------------------ logging (rank zero)
    def _changes(self, names: list[str] | None = None) -> str:
        """Concepts that entered or left a class's top since the previous due epoch (Markdown); ``names``: the
        output classes' names."""
        if len(self.history) < 2:
            return ""
        (e0, s0), (_, s1) = self.history[-2], self.history[-1]
        k = min(self.atlas_top, s1.shape[1])
        notes = []
        for c in range(s1.shape[0]):
            before, now = set(s0[c].topk(k).indices.tolist()), set(s1[c].topk(k).indices.tolist())
            if before != now:
                notes.append(f"class {class_name(names, c)}: new {sorted(now - before)}, gone {sorted(before - now)}")
        if not notes:
            return f"Top concepts per class unchanged since epoch {e0}."
        return f"Changes since epoch {e0}: " + "; ".join(notes) + "."

    def _log(
        self, trainer: pl.Trainer, x: Tensor, y: Tensor | None, target: Tensor, found: dict[str, Any],
        atlas: ConceptAtlas,
    ) -> None:  # fmt: skip
        name = self.layer_name
        # labels named by the data, the explained output classes by the model when it names them (else the same)
        labels = find_class_names(trainer)
        outputs = output_class_names(self.model(trainer.lightning_module), trainer.lightning_module, default=labels)
        headers = ["class", *[f"concept {r + 1} (share)" for r in range(atlas.concepts.shape[1])]]
        rows = [[class_name(outputs, c), *[f"channel {int(ch)} ({float(s):.0%})"
                                           for ch, s in zip(atlas.concepts[i], atlas.relevance[i])]]
                for i, c in enumerate(atlas.classes)]  # fmt: skip
        note = (f"Layer `{name}`, LRP composite `{found['lrp'].composite}`; share = mean concept relevance over "
                f"the class's reference samples / the class's total relevance at the layer. " + self._changes(outputs))
        self.log_table(trainer, "concepts/atlas", headers, rows, note)
        ref, rm = found["ref"], self.references
        if rm is None or ref.ndim != 4:
            return  # crops and maps are pictures of images; other inputs get the table and the curves
        top_idx, top_share = found["top_idx"], found["top_share"]
        n_draw = len(found["maps"])
        ref_rgb = viz.to_rgb(ref.float().cpu())

        def crops(ch: int) -> list[Tensor]:
            return rm.crops(ref_rgb, ch)

        if n_draw:
            leads = list(viz.to_rgb(x[:n_draw].float().cpu()))
            pred = found["pred"]
            captions = []
            for i in range(n_draw):
                truth = "" if y is None else f"true {class_name(labels, int(y[i]))} · "
                same = y is not None and int(y[i]) == int(target[i]) and outputs == labels
                explains = "" if same else f" · explains {class_name(outputs, int(target[i]))}"
                captions.append(f"{truth}pred {class_name(outputs, int(pred[i]))}{explains}")
            groups = []
            for i in range(n_draw):
                m = found["maps"][i].float().cpu().sum(1)  # (k, H, W): channels of the input summed
                groups.append([(m[j], f"channel {int(c)}: {float(top_share[i, j]):.0%}", crops(int(c)))
                               for j, c in enumerate(top_idx[i])])  # fmt: skip
            wrong = None if y is None else [int(pred[i]) != int(y[i]) for i in range(n_draw)]
            fig = viz.concept_figure(leads, captions, groups, self.num_crops, wrong=wrong,
                                     title=f"CRP top concepts of layer {name} (epoch {trainer.current_epoch})")
            self.log_image(trainer, "concepts/probes", fig)
        groups = [[(None, f"channel {int(ch)}: {float(s):.0%}", crops(int(ch)))
                   for ch, s in zip(atlas.concepts[i], atlas.relevance[i])] for i in range(len(atlas.classes))]
        heads = [f"class {class_name(outputs, c)}" for c in atlas.classes]
        fig = viz.concept_figure([None] * len(atlas.classes), heads, groups,
                                 self.num_crops, title=f"Concept atlas of layer {name}: dominant concepts per class "
                                 f"(epoch {trainer.current_epoch})")  # fmt: skip
        self.log_image(trainer, "concepts/atlas", fig)
