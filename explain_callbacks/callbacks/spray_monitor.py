"""SpRAyMonitor: how many prediction strategies each class's attribution maps show, while training.

Spectral relevance analysis (Lapuschkin et al. 2019, Nature Communications 10:1096) needs many maps
per class, so this callback keeps a larger probe than the attribution monitor (``num_samples``, at
most ``per_class`` per label), explains it with one method on due validation epochs, and per class
logs the number of strategies the eigengap suggests, the cluster sizes and each cluster's mean map.
A class whose maps split into an object-shaped cluster and a small corner-shaped one has learnt a
shortcut (a watermark) for part of its samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from .. import viz
from ..analysis.spray import SpectralClusters, spray
from ..attribution import build_attributor
from ..attribution.base import Attributor
from ._logging import class_name, find_class_names, media_loggers, output_class_names
from .base import ProbeCallback, class_indices

__all__ = ["SpRAyMonitor"]


class SpRAyMonitor(ProbeCallback):
    """Spectral relevance analysis of the probe's maps, class by class, on due validation epochs.

    Args:
        method: the attribution method (short name, ``{"name": ..., **kwargs}`` or an instance).
        num_samples: probe size (default 256); ``per_class`` bounds each label's share (default 64).
        min_per_class: classes with fewer probe samples are skipped (SpRAy compares maps).
        group_by: ``"label"`` or ``"prediction"``: which class a sample's map belongs to.
        n_clusters: fixed number of clusters, or None for the eigengap's choice.
        size, k, n_eigen, max_clusters: passed to :func:`~explain_callbacks.analysis.spray`.
        every_n_epochs: analyse every n-th epoch (5).
        budget: the share of the training time the monitor may spend during ``fit`` (:class:`ProbeCallback`; 2 % by
            default): a due epoch that does not fit is skipped (the clusters need the whole probe);
            ``budget=None`` analyses every due epoch.
        **kwargs: :class:`ProbeCallback` arguments.

    Logs ``concepts/strategies/class_<c>`` (eigengap's count) and ``concepts/largest_share/class_<c>``
    (share of the class in its largest cluster), a figure of the cluster means per class
    (``concepts/cluster_means/class_<c>``) and the table ``concepts/spray/<method>``.
    Under DDP the maps of all ranks are gathered and every rank computes the same clusters.
    """

    budget_scales_probes = False  # clusters need the whole probe: a budget skips epochs only

    def __init__(
        self,
        method: str | Mapping[str, Any] | Attributor = "saliency",
        num_samples: int = 256,
        per_class: int | None = 64,
        min_per_class: int = 12,
        group_by: str = "label",
        n_clusters: int | None = None,
        size: int | None = 16,
        k: int = 10,
        n_eigen: int = 32,
        max_clusters: int = 6,
        every_n_epochs: int = 5,
        budget: float | None = 0.02,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_samples=num_samples, per_class=per_class, every_n_epochs=every_n_epochs, budget=budget,
                         **kwargs)  # fmt: skip
        if group_by not in ("label", "prediction"):
            raise ValueError(f"group_by must be 'label' or 'prediction', got {group_by!r}.")
        if isinstance(method, str):
            self.method = build_attributor(method, batch_size=self.batch_size)
        elif isinstance(method, Mapping):
            self.method = build_attributor({"batch_size": self.batch_size, **dict(method)})
        else:
            self.method = method
        self.method_name = str(getattr(self.method, "name", type(self.method).__name__.lower()))
        self.min_per_class = min_per_class
        self.group_by = group_by
        self.spray_kwargs = {"n_clusters": n_clusters, "size": size, "k": k, "n_eigen": n_eigen,
                             "max_clusters": max_clusters}  # fmt: skip
        self.last_result: dict[int, SpectralClusters] = {}

    def key_fields(self) -> dict[str, Any]:
        return {**super().key_fields(), "method": self.method_name, "group_by": self.group_by}

    def explain(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Tensor, y: Tensor | None, target: Tensor | None
    ) -> None:
        model = self.model(pl_module)
        labels = None if self.group_by == "prediction" or y is None else class_indices(y)
        if labels is None and self.group_by == "label" and y is not None:  # every rank has such labels: no hang
            raise ValueError(
                f"SpRAyMonitor groups maps by label, but the labels have shape {tuple(y.shape)}, not one class index "
                "per sample (multi-hot?); pass group_by='prediction', or label_key= a function of the batch that "
                "gives class indices."
            )
        done = self.run_agreed(  # the gathers below are collectives: every rank has maps, or none goes on
            trainer, f"method {self.method_name!r}", lambda: self.method(model, x, target),
            "produced NaN/Inf attributions (check the model for non-finite gradients)",
        )  # fmt: skip
        if done is None:
            return
        maps = done[0]
        if labels is None:
            with torch.no_grad():
                groups = torch.cat([model(x[s : s + 256]).argmax(1) for s in range(0, x.shape[0], 256)])
        else:
            groups = labels  # (B,): (B, 1) labels would select along two dimensions of the maps
        maps, groups = self.gather_rows(trainer, maps.float()), self.gather_rows(trainer, groups.long())
        self.last_result = {}
        rows = []
        classes, counts = torch.unique(groups, return_counts=True)
        if int(counts.max()) < self.min_per_class:  # was silent: nothing logged, no word why
            shown = ", ".join(f"{int(c)}: {int(n)}" for c, n in zip(classes[:10], counts[:10]))
            self.warn_failure(
                ("too few", str(int(counts.max()))),
                f"SpRAyMonitor analysed no class: the probe holds at most {int(counts.max())} maps of a class "
                f"({shown}{', ...' if classes.numel() > 10 else ''}), fewer than min_per_class={self.min_per_class}. "
                "Raise num_samples (and per_class) or the validation batches it is taken from, or lower "
                "min_per_class.",
            )
            return
        skipped: list[tuple[int, Exception]] = []
        for c in classes.tolist():
            sel = groups == c
            if int(sel.sum()) < self.min_per_class:
                continue
            try:
                res = spray(maps[sel], **self.spray_kwargs)
            except Exception as err:  # one class's degenerate maps must not hide the others
                if self.strict:
                    raise
                skipped.append((int(c), err))
                continue
            self.last_result[int(c)] = res
            share = float(res.sizes[0]) / float(res.sizes.sum())
            self.log_scalar(pl_module, f"concepts/strategies/class_{c}", res.eigengap_clusters, sync=False)
            self.log_scalar(pl_module, f"concepts/largest_share/class_{c}", share, sync=False)
            gaps = ", ".join(f"{v:.3f}" for v in res.eigenvalues[: res.n_clusters + 2].tolist())
            rows.append((c, res.eigengap_clusters, " / ".join(str(int(s)) for s in res.sizes), gaps))
        if skipped:  # one warning for all skipped classes (was one per class: ten on digits)
            kinds = sorted({f"{type(e).__name__}: {str(e).rstrip('.')}" for _, e in skipped})
            self.warn_failure(
                ("classes", *kinds),
                f"SpRAyMonitor: classes {[c for c, _ in skipped]} skipped: " + "; ".join(kinds) + ".",
            )
        if not trainer.is_global_zero or not self.last_result:
            return
        # the groups are labels (named by the data) or predicted output classes (named by the model, else the data)
        names = find_class_names(trainer)
        if labels is None:
            names = output_class_names(model, pl_module, default=names)
        rows = [(class_name(names, c), *rest) for c, *rest in rows]
        self.log_table(
            trainer, f"concepts/spray/{self.method_name}",
            ["class", "strategies (eigengap)", "cluster sizes", "smallest eigenvalues"], rows,
        )  # fmt: skip
        if media_loggers(trainer) and next(iter(self.last_result.values())).means.ndim == 3:
            for c, res in self.last_result.items():
                total = int(res.sizes.sum())
                titles = [f"cluster {i}: {int(n)} of {total}" for i, n in enumerate(res.sizes)]
                fig = viz.tiles_figure(
                    list(res.means), titles,
                    title=f"SpRAy ({self.method_name}): mean map per cluster, class {class_name(names, c)}",
                    colorbar_label="mean attribution",
                )  # fmt: skip
                self.log_image(trainer, f"concepts/cluster_means/class_{c}", fig)
