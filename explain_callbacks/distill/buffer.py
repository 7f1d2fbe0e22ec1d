"""A bounded ring buffer of rows (inputs, teacher outputs, labels, ...) and its gather across ranks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["RingBuffer", "gather_rows"]


class RingBuffer:
    """Keeps the most recent rows of named tensors, at most ``capacity`` rows and ``max_bytes`` bytes
    (preallocated on first use, on CPU).

    Every :meth:`add` must give the same names with the same row count; rows are copied (detached,
    moved to CPU, cast to the dtype of the first batch seen for that name) straight into storage
    allocated once. :meth:`get` returns the rows oldest first. Memory is :attr:`limit` rows per name
    whatever the number of additions: ``capacity`` rows, fewer when a row is so large that ``capacity``
    of them would exceed ``max_bytes`` (at 3×224×224 float32 a row is 602 KB: 2,048 rows were 1.2 GB).
    """

    def __init__(self, capacity: int, max_bytes: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"The buffer capacity must be >= 1, got {capacity}.")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"The buffer's max_bytes must be >= 1 or None, got {max_bytes}.")
        self.capacity = int(capacity)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self._data: dict[str, Tensor] = {}
        self._limit = self.capacity  # rows held at most, set from the row size at the first add
        self._next = 0  # write position
        self._size = 0
        self.seen = 0  # rows ever added

    @staticmethod
    def row_bytes(rows: Mapping[str, Tensor]) -> int:
        """Bytes of one row of ``rows`` (every name together)."""
        return sum(int(v.shape[1:].numel()) * v.element_size() for v in rows.values())

    def rows_for(self, rows: Mapping[str, Tensor]) -> int:
        """The rows this buffer holds at most for rows shaped like ``rows``: ``capacity``, bounded by
        ``max_bytes`` (at least one row)."""
        if self.max_bytes is None:
            return self.capacity
        return max(1, min(self.capacity, self.max_bytes // max(self.row_bytes(rows), 1)))

    @property
    def limit(self) -> int:
        """The rows held at most (``capacity`` until the first add has set the row size)."""
        return self._limit

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated storage."""
        return sum(v.numel() * v.element_size() for v in self._data.values())

    def __len__(self) -> int:
        return self._size

    @property
    def names(self) -> list[str]:
        return list(self._data)

    def add(self, rows: Mapping[str, Tensor | None]) -> None:
        """Copy the rows in (from any device; one copy straight into the preallocated storage)."""
        rows = {k: v for k, v in rows.items() if v is not None}
        if not rows:
            return
        it = iter(rows.values())
        n = int(next(it).shape[0])
        if any(int(v.shape[0]) != n for v in it):
            ns = sorted({int(v.shape[0]) for v in rows.values()})
            raise ValueError(f"All tensors added to the buffer need the same number of rows, got {ns}.")
        data = self._data
        if data:
            if rows.keys() != data.keys():
                raise ValueError(f"Buffer holds {sorted(data)}, got {sorted(rows)}; add the same fields each time.")
            for k, v in rows.items():
                if v.shape[1:] != data[k].shape[1:]:
                    raise ValueError(
                        f"Buffer field {k!r} holds rows of shape {tuple(data[k].shape[1:])}, got "
                        f"{tuple(v.shape[1:])}; inputs must keep one shape across batches."
                    )
        if n == 0:
            return
        if not data:
            self._limit = self.rows_for(rows)
            for k, v in rows.items():
                data[k] = torch.empty((self._limit, *v.shape[1:]), dtype=v.dtype)
        cap = self._limit
        if n >= cap:  # only the last `cap` rows survive
            for k, v in rows.items():
                data[k].copy_(v[n - cap :].detach())
            self._next, self._size = 0, cap
        else:
            start = self._next
            first = min(n, cap - start)
            for k, v in rows.items():
                v = v.detach()
                buf = data[k]
                buf[start : start + first].copy_(v[:first])
                if first < n:
                    buf[: n - first].copy_(v[first:])
            self._next = (start + n) % cap
            self._size = min(cap, self._size + n)
        self.seen += n

    def get(self) -> dict[str, Tensor]:
        """The stored rows, oldest first (copies)."""
        if self._size < self._limit:
            return {k: v[: self._size].clone() for k, v in self._data.items()}
        order = torch.cat([torch.arange(self._next, self._limit), torch.arange(0, self._next)])
        return {k: v[order] for k, v in self._data.items()}

    def clear(self) -> None:
        self._data, self._next, self._size, self._limit = {}, 0, 0, self.capacity

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.get(), "seen": self.seen, "capacity": self.capacity, "max_bytes": self.max_bytes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.clear()
        rows = state.get("rows") or {}
        if rows:
            self.add(rows)
        self.seen = int(state.get("seen", len(self)))


def _gather_one(t: Tensor, world: int, device: torch.device) -> Tensor:
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    top = max(counts)
    pad = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=device)
    pad[: t.shape[0]] = t.to(device)
    out = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(out, pad)
    return torch.cat([o[:c] for o, c in zip(out, counts)]).cpu()


def gather_rows(rows: Mapping[str, Tensor], group_device: torch.device | None = None) -> dict[str, Tensor]:
    """Concatenate each rank's rows in rank order on every rank (identity without a process group).

    Ranks may hold different row counts (padded for ``all_gather``, trimmed afterwards). Every rank
    must call it (a rank may lack a name or hold no rows). Tensors travel on ``group_device`` (CPU
    for gloo; the current CUDA device for NCCL by default).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(rows)
    world = dist.get_world_size()
    if group_device is None:
        backend = dist.get_backend()
        group_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    # Agree on names, row shapes and dtypes first, so a rank with an empty buffer still takes part.
    meta = {k: (tuple(v.shape[1:]), str(v.dtype).replace("torch.", "")) for k, v in rows.items()}
    metas: list[Any] = [None] * world
    dist.all_gather_object(metas, meta)
    spec: dict[str, tuple[tuple[int, ...], str]] = {}
    for m in metas:
        for k, v in (m or {}).items():
            spec.setdefault(k, v)
    out = {}
    for k in sorted(spec):
        shape, dtype = spec[k]
        t = rows.get(k)
        if t is None:
            t = torch.empty((0, *shape), dtype=getattr(torch, dtype))
        out[k] = _gather_one(t, world, group_device)
    return out
