"""Where a data set's explanations live on disk: safetensors shards, per-rank indexes, one merged index.

Layout of an output directory::

    shards/r<rank>-<seq>.safetensors   one shard: the rows of consecutive batches of one process
    index.rank<rank>.json              the shards that process finished (written after each shard)
    index.json                         every shard and every sample: id -> [shard, row] (written at the end)
    summary.json                       metric means per method and per class (written at the end)

A shard holds flat tensors: ``ids`` (global sample ids: the data set's indices, so one process and several
give the same ids), ``label`` / ``target`` / ``pred`` when known, ``output`` (the model's scores),
``maps.<method>`` (N, *map shape), ``scores.<metric>.<method>`` (N,) float64. safetensors stores raw tensors
and a JSON header, nothing that executes code when read (no pickle).

Every file is written atomically (a temporary file in the same folder, then ``os.replace``): a process killed
mid-write leaves the previous index and no half shard under a final name. A shard counts as finished once its
process's index lists it, so a restart skips exactly the samples of listed shards; a shard file that no index
lists (killed between the rename and the index update) is ignored and its samples computed again.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FORMAT",
    "ExplainReader",
    "ShardWriter",
    "atomic_write_bytes",
    "atomic_write_json",
    "finished_ids",
    "id_runs",
    "load_rank_indexes",
    "merge_indexes",
    "read_maps",
    "run_ids",
]

#: version of the on-disk layout, stored in every index
FORMAT = 1
SHARDS = "shards"
INDEX = "index.json"
SUMMARY = "summary.json"
_RANK_INDEX = re.compile(r"^index\.rank(\d+)\.json$")
_SHARD = re.compile(r"^r(\d+)-(\d+)\.safetensors$")


def _safetensors() -> Any:
    try:
        import safetensors.torch as st
    except ImportError as err:  # pragma: no cover - a runtime dependency
        raise ImportError(
            "Writing and reading explanation shards needs the safetensors package: pip install safetensors."
        ) from err
    return st


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``: readers and a
    restarted job see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=False).encode())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); it was not written by ExplainWriter (whose writes are atomic). "
            "Remove it, or choose another output directory."
        ) from err


class ShardWriter:
    """One process's shards and index in ``root``: :meth:`write` stores a shard atomically and then lists it in
    ``index.rank<rank>.json``. Resumes where an earlier run of the same rank stopped (its index is read and
    extended; new shards get the next free sequence number)."""

    def __init__(self, root: str | os.PathLike, rank: int, settings: Mapping[str, Any]) -> None:
        self.root = Path(root)
        self.rank = int(rank)
        self.settings = dict(settings)
        self.index_path = self.root / f"index.rank{self.rank}.json"
        self.shards: list[dict[str, Any]] = []
        if self.index_path.is_file():
            self.shards = list(_read_json(self.index_path).get("shards", []))
        # orphans too (a shard renamed into place whose index update was lost): never overwritten
        names = [f.name for f in self._shard_files()] + [Path(s["file"]).name for s in self.shards]
        taken = [int(m.group(2)) for n in names if (m := _SHARD.match(n)) and int(m.group(1)) == self.rank]
        self._next = max(taken, default=-1) + 1

    def _shard_files(self) -> list[Path]:
        folder = self.root / SHARDS
        return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []

    def write(self, tensors: Mapping[str, Tensor], info: Mapping[str, Any]) -> str:
        """Store one shard (``tensors``, each with the same first dimension) and list it with ``info`` (plain
        values: seconds per method, ...) in this rank's index. Returns the shard's path relative to the root."""
        st = _safetensors()
        name = f"r{self.rank}-{self._next:06d}.safetensors"
        self._next += 1
        rel = f"{SHARDS}/{name}"
        data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write_bytes(self.root / rel, st.save(data, metadata={"format": str(FORMAT)}))
        ids = data["ids"].tolist()
        self.shards.append({"file": rel, "rows": len(ids), "ids": id_runs(ids), **dict(info)})
        atomic_write_json(self.index_path, {"format": FORMAT, "rank": self.rank, "settings": self.settings,
                                            "shards": self.shards})  # fmt: skip
        return rel


def load_rank_indexes(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every ``index.rank<r>.json`` in ``root`` (the shards each process finished), in rank order."""
    root = Path(root)
    found = []
    for f in sorted(root.glob("index.rank*.json")):
        m = _RANK_INDEX.match(f.name)
        if m:
            found.append((int(m.group(1)), _read_json(f)))
    return [idx for _, idx in sorted(found, key=lambda t: t[0])]


def id_runs(ids: Sequence[int]) -> list[list[int]]:
    """``ids`` in row order as runs ``[first, count]`` of consecutive ids: a shard's ids in a few numbers (batches
    dealt whole hold consecutive ids), so a process's index, rewritten after each shard, stays small."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and runs[-1][0] + runs[-1][1] == int(i):
            runs[-1][1] += 1
        else:
            runs.append([int(i), 1])
    return runs


def run_ids(runs: Sequence[Sequence[int]]) -> list[int]:
    """The ids in row order of :func:`id_runs`'s runs."""
    return [first + k for first, count in runs for k in range(count)]


def finished_ids(indexes: Iterable[Mapping[str, Any]]) -> set[int]:
    """The sample ids of every finished shard."""
    return {i for idx in indexes for s in idx.get("shards", []) for i in run_ids(s["ids"])}


def merge_indexes(root: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge the per-rank indexes into ``index.json``: ``shards`` (file, rows, first and last id) and ``samples``
    (id -> [shard number, row]); a sample written twice (a restart under another world size) keeps its first
    shard. Returns the merged index."""
    root = Path(root)
    indexes = load_rank_indexes(root)
    shards: list[dict[str, Any]] = []
    samples: dict[int, list[int]] = {}
    settings: dict[str, Any] = {}
    for idx in indexes:
        settings = settings or dict(idx.get("settings", {}))
        for s in idx.get("shards", []):
            k = len(shards)
            ids = run_ids(s["ids"])
            shards.append({key: v for key, v in s.items() if key != "ids"} | {
                "first_id": min(ids, default=None), "last_id": max(ids, default=None)})  # fmt: skip
            for row, i in enumerate(ids):
                samples.setdefault(i, [k, row])
    merged = {
        "format": FORMAT,
        "complete": True,
        "settings": settings,
        "n_samples": len(samples),
        **dict(extra or {}),
        "shards": shards,
        "samples": {str(i): samples[i] for i in sorted(samples)},
    }
    atomic_write_json(root / INDEX, merged)
    return merged


class ExplainReader:
    """Read what :class:`~explain_callbacks.predict.ExplainWriter` wrote to ``root``.

    Uses ``index.json`` when the run finished, else the per-rank indexes (the shards finished so far). Nothing
    is loaded before it is asked for; maps are read shard by shard, only the rows asked for.

    Example::

        reader = ExplainReader("logs/explain/run")
        maps = reader.maps([0, 17, 42], "ig")          # (3, *map shape), in the order asked
        ids, scores = reader.scores("deletion", "ig")   # every sample's score
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} does not exist: pass the output directory of an explain run.")
        index = self.root / INDEX
        if index.is_file():
            merged = _read_json(index)
        else:
            rank_indexes = load_rank_indexes(self.root)
            if not rank_indexes:
                raise FileNotFoundError(
                    f"{self.root} holds no index.json and no index.rank*.json: it is not the output directory of "
                    "an explain run, or the run finished no shard yet."
                )
            merged = self._merge_in_memory(rank_indexes)
        self.index = merged
        self.complete = bool(merged.get("complete", False))
        self.settings: dict[str, Any] = dict(merged.get("settings", {}))
        self._shards = [s["file"] for s in merged["shards"]]
        self._where = {int(k): (int(v[0]), int(v[1])) for k, v in merged["samples"].items()}

    @staticmethod
    def _merge_in_memory(indexes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        shards, samples = [], {}
        for idx in indexes:
            for s in idx.get("shards", []):
                k = len(shards)
                shards.append({"file": s["file"], "rows": s["rows"]})
                for row, i in enumerate(run_ids(s["ids"])):
                    samples.setdefault(str(int(i)), [k, row])
        settings = dict(indexes[0].get("settings", {})) if indexes else {}
        return {"complete": False, "settings": settings, "shards": shards, "samples": samples}

    # ------------------------------------------------------------------ what is there
    @property
    def ids(self) -> list[int]:
        """Every sample id written, ascending."""
        return sorted(self._where)

    def __len__(self) -> int:
        return len(self._where)

    @property
    def methods(self) -> list[str]:
        return list(self.settings.get("methods", {}))

    @property
    def metrics(self) -> list[str]:
        return list(self.settings.get("metrics", {}))

    def where(self, sample_id: int) -> tuple[str, int]:
        """(shard file relative to the root, row) of ``sample_id``."""
        k, row = self._locate(sample_id)
        return self._shards[k], row

    def _locate(self, sample_id: int) -> tuple[int, int]:
        try:
            return self._where[int(sample_id)]
        except KeyError:
            state = "" if self.complete else " (the run has not finished: only finished shards are readable)"
            raise KeyError(
                f"sample id {sample_id} is not in {self.root}{state}; ids run from {min(self._where, default=None)} "
                f"to {max(self._where, default=None)} ({len(self._where)} samples)."
            ) from None

    # ------------------------------------------------------------------ reading
    def _read(self, name: str, ids: Sequence[int]) -> Tensor:
        from safetensors import safe_open

        _safetensors()
        located = [self._locate(i) for i in ids]
        by_shard: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for pos, (k, row) in enumerate(located):
            by_shard[k].append((pos, row))
        out: Tensor | None = None
        for k, wanted in by_shard.items():
            with safe_open(str(self.root / self._shards[k]), framework="pt") as f:
                if name not in f.keys():  # noqa: SIM118 - safe_open has keys(), no __contains__
                    raise KeyError(
                        f"{name!r} is not in the shards of {self.root}; written: {sorted(f.keys())}. Methods: "
                        f"{self.methods}, metrics: {self.metrics}."
                    )
                rows = [r for _, r in wanted]
                lo, hi = min(rows), max(rows) + 1
                part = f.get_slice(name)[lo:hi][torch.tensor(rows) - lo]
            if out is None:
                out = part.new_empty((len(ids), *part.shape[1:]))
            out[torch.tensor([p for p, _ in wanted])] = part
        if out is None:
            raise ValueError("no sample ids given")
        return out

    def maps(self, ids: Sequence[int] | Tensor, method: str) -> Tensor:
        """The maps of ``method`` for the samples ``ids`` (N, *map shape), in the order given."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, Tensor) else ids)]
        if self.methods and method not in self.methods:
            raise KeyError(f"method {method!r} was not computed in {self.root}; methods: {self.methods}.")
        return self._read(f"maps.{method}", ids)

    def column(self, name: str, ids: Sequence[int] | Tensor | None = None) -> Tensor:
        """A per-sample column (``label``, ``target``, ``pred``, ``output``, ``scores.<metric>.<method>``) for
        ``ids`` (default: every sample, ascending)."""
        ids = self.ids if ids is None else [int(i) for i in (ids.tolist() if isinstance(ids, Tensor) else ids)]
        return self._read(name, ids)

    def scores(self, metric: str, method: str, ids: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """(ids, per-sample scores of ``metric`` on ``method``'s maps)."""
        ids = self.ids if ids is None else [int(i) for i in ids]
        return torch.tensor(ids), self._read(f"scores.{metric}.{method}", ids)

    def summary(self) -> dict[str, Any]:
        """The run's ``summary.json`` (metric means per method and per class)."""
        path = self.root / SUMMARY
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: the run has not finished.")
        return _read_json(path)


def read_maps(root: str | os.PathLike, ids: Sequence[int] | Tensor, method: str) -> Tensor:
    """The maps of ``method`` for the samples ``ids`` written by an explain run to ``root`` (see
    :class:`ExplainReader`)."""
    return ExplainReader(root).maps(ids, method)
