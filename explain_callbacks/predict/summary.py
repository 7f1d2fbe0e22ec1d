"""The summary of an explain run: metric means per method and per class, read back shard by shard."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .store import SUMMARY, atomic_write_json

__all__ = ["summarize"]


def summarize(
    root: str | Path, index: dict[str, Any], class_names: list[str] | None = None
) -> dict[str, Any]:
    """Metric means over every sample, per method and per class, and the seconds each method took, from the
    shards listed in ``index`` (the merged index); written to ``summary.json`` and returned.

    Shards are read one at a time, only their ids, labels, predictions and score columns (never the maps):
    memory stays that of one shard's scores, whatever the data set's size. The class of a sample is its label
    when the shards hold labels, else the model's prediction (``class_key`` says which). Non-finite scores are
    left out of the means and counted as ``dropped``. Samples written twice (a restart under another world
    size) count once (the shard the index names for them)."""
    from safetensors import safe_open

    root = Path(root)
    settings = index.get("settings", {})
    methods = list(settings.get("methods", {}))
    metrics = list(settings.get("metrics", {}))
    where = index.get("samples", {})
    # sums[metric][method] = [sum, count, dropped]; per class: sums_c[metric][method][class]
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0, 0]))
    sums_c: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    )
    seconds: dict[str, float] = defaultdict(float)
    class_key = None
    for k, shard in enumerate(index.get("shards", [])):
        for m, s in (shard.get("seconds") or {}).items():
            seconds[m] += float(s)
        with safe_open(str(root / shard["file"]), framework="pt") as f:
            keys = set(f.keys())
            ids = f.get_tensor("ids")
            # rows of this shard that the index attributes to it (a duplicate elsewhere is counted there)
            own = torch.tensor([where.get(str(int(i)), [k])[0] == k for i in ids], dtype=torch.bool)
            key = "label" if "label" in keys else ("pred" if "pred" in keys else None)
            class_key = class_key or key
            classes = f.get_tensor(key).long() if key is not None else None
            for metric in metrics:
                for method in methods:
                    name = f"scores.{metric}.{method}"
                    if name not in keys:
                        continue
                    v = f.get_tensor(name).double()[own]
                    ok = torch.isfinite(v)
                    acc = sums[metric][method]
                    acc[0] += float(v[ok].sum())
                    acc[1] += int(ok.sum())
                    acc[2] += int((~ok).sum())
                    if classes is None:
                        continue
                    c = classes[own]
                    for cls in torch.unique(c[ok]).tolist():
                        sel = ok & (c == cls)
                        acc_c = sums_c[metric][method][int(cls)]
                        acc_c[0] += float(v[sel].sum())
                        acc_c[1] += int(sel.sum())

    def mean(s: float, n: float) -> float | None:
        return s / n if n else None

    def cname(c: int) -> str:
        return class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)

    n = int(index.get("n_samples", len(where)))
    out: dict[str, Any] = {
        "n_samples": n,
        "methods": methods,
        "metrics": metrics,
        "class_key": class_key,
        "means": {mt: {md: mean(a[0], a[1]) for md, a in by.items()} for mt, by in sums.items()},
        "counts": {mt: {md: {"scored": a[1], "dropped": a[2]} for md, a in by.items()} for mt, by in sums.items()},
        "per_class": {
            mt: {md: {cname(c): mean(a[0], a[1]) for c, a in sorted(byc.items())} for md, byc in by.items()}
            for mt, by in sums_c.items()
        },
        "seconds": dict(seconds),
        # per process: the seconds are each process's own, summed over the processes
        "samples_per_second": {m: (n / s if s > 0 and math.isfinite(s) else None) for m, s in seconds.items()},
    }
    atomic_write_json(root / SUMMARY, out)
    return out
