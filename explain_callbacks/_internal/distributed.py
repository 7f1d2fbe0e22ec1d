"""Rank agreement and per-rank checkpoint state, shared by every callback that runs collectives.

Two Lightning facts shape this module:

- **Collectives hang unless every rank reaches them.** A callback that logs with ``sync_dist=True``,
  computes a torchmetrics metric or gathers rows runs a collective; a rank that returned early (no
  probe set, a failed method, an epoch it judged "not due") leaves the others waiting forever. So
  every local outcome is *agreed* first, with :func:`agree`: one fixed-size all-gather that carries
  each rank's flag and its short error text, after which every rank takes the same branch, and the
  warning names the failing rank's own error ("rank 1 failed: ValueError: ...").
- **Lightning checkpoints callback state from rank zero only** (``Trainer.save_checkpoint`` runs
  ``state_dict`` and ``on_save_checkpoint`` on every rank, but only rank zero writes). A callback
  whose state differs per rank (probe sets of its own validation shard, buffers of its own
  training batches) lost every other rank's state, and after a resume each rank held rank zero's.
  :class:`RankStateCallback` gathers every rank's state into the checkpoint inside
  ``on_save_checkpoint`` (reached by every rank) and gives each rank its own back on resume; when the
  world size changed it asks the callback to re-derive the state (:meth:`RankStateCallback.reshard_state`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, MutableSet
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "PER_RANK",
    "Agreement",
    "RankStateCallback",
    "agree",
    "gather_objects",
    "rank_world",
    "warn_rank",
]

#: the checkpoint key under which :class:`RankStateCallback` stores one state per rank
PER_RANK = "per_rank"
#: bytes of an error text carried by :func:`agree` (a fixed size: one all-gather, no pickling)
_TEXT_BYTES = 480


def rank_world(trainer: Any = None) -> tuple[int, int]:
    """This process's rank and the world size: the trainer's when given, else torch.distributed's, else (0, 1)."""
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def warn_rank(message: str, trainer: Any = None, stacklevel: int = 2) -> None:
    """Warn on *this* rank, naming it under DDP (``[rank 1] ...``).

    ``rank_zero_warn`` hides what happened on other ranks: a probe set that rank 1 alone could not
    take was never reported. Warnings about a local failure go through here instead.
    """
    rank, world = rank_world(trainer)
    warnings.warn(f"[rank {rank}] {message}" if world > 1 else message, UserWarning, stacklevel=stacklevel + 1)


@dataclasses.dataclass(frozen=True)
class Agreement:
    """The outcome of :func:`agree`: whether every rank succeeded, and what failed where."""

    ok: bool
    """True when every rank succeeded: take the collective branch."""
    local_ok: bool
    failures: dict[int, str]
    """Failing rank -> its error text (empty when ``ok``)."""
    rank: int
    world: int

    def __bool__(self) -> bool:
        return self.ok

    @property
    def why(self) -> str:
        """What failed, in words: the error itself in one process; ``rank k failed: <text>`` for each
        failing rank under DDP (the same text on every rank)."""
        if self.world == 1:
            return next(iter(self.failures.values()), "")
        return "; ".join(f"rank {r} failed: {t}" for r, t in sorted(self.failures.items()))

    @property
    def reports(self) -> bool:
        """Whether this rank warns about the failure: rank zero (which names every failing rank) and each
        failing rank (its own warning, visible where it happened); the other ranks stay quiet."""
        return not self.ok and (self.rank == 0 or not self.local_ok)

    def warn(self, message: Callable[[str], str], seen: MutableSet[Any] | None = None, key: Any = None) -> None:
        """Warn ``message(self.why)`` on the ranks that report (see :attr:`reports`), once per ``key`` in
        ``seen`` when given (a method failing at every epoch warns once)."""
        if not self.reports:
            return
        if seen is not None:
            k = (key, self.why)
            if k in seen:
                return
            seen.add(k)
        warn_rank(message(self.why), _Rank(self.rank, self.world), stacklevel=3)


@dataclasses.dataclass(frozen=True)
class _Rank:
    global_rank: int
    world_size: int


def _encode(ok: bool, text: str) -> torch.Tensor:
    data = text.encode("utf-8", "replace")
    if len(data) > _TEXT_BYTES:  # cut on a character boundary, and say so
        data = data[: _TEXT_BYTES - 3].decode("utf-8", "ignore").encode("utf-8") + "…".encode()
    out = torch.zeros(2 + _TEXT_BYTES, dtype=torch.int32)
    out[0] = int(ok)
    out[1] = len(data)
    if data:
        out[2 : 2 + len(data)] = torch.tensor(list(data), dtype=torch.int32)
    return out


def _decode(row: torch.Tensor) -> tuple[bool, str]:
    n = int(row[1])
    return bool(row[0]), bytes(row[2 : 2 + n].tolist()).decode("utf-8", "replace")


def agree(ok: bool, error: str | BaseException | None = None, trainer: Any = None) -> Agreement:
    """Agree across ranks on a local outcome before any collective that depends on it.

    Every rank must call it at the same point (it is itself one collective: an all-gather of a
    fixed-size tensor holding the flag and the first ~480 bytes of the error text, through the
    trainer's strategy when given, so it works under gloo, NCCL and the other strategies). A single
    process returns at once. ``error`` is an exception or a short text saying why ``ok`` is False.
    """
    if isinstance(error, BaseException):
        error = f"{type(error).__name__}: {error}"
    text = "" if ok else (error or "failed")
    rank, world = rank_world(trainer)
    if world <= 1:
        return Agreement(ok, ok, {} if ok else {rank: text}, rank, world)
    local = _encode(ok, text)
    if trainer is not None:
        rows = trainer.strategy.all_gather(local.to(trainer.strategy.root_device)).reshape(world, -1).cpu()
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        local = local.to(device) if device is not None else local
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        rows = torch.stack(parts).cpu()
    failures = {}
    for r in range(world):
        r_ok, r_text = _decode(rows[r])
        if not r_ok:
            failures[r] = r_text or "failed"
    return Agreement(not failures, ok, failures, rank, world)


def gather_objects(obj: Any, trainer: Any = None) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank (``[obj]`` in one process).

    A collective: every rank calls it. The objects travel pickled between the processes of this one job
    (``all_gather_object``); nothing read from a file is unpickled.
    """
    _, world = rank_world(trainer)
    if world <= 1:
        return [obj]
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"world size {world} without a torch.distributed process group: per-rank callback state cannot be "
            "gathered into the checkpoint on this strategy."
        )
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


class RankStateCallback:
    """Mixin for a Lightning ``Callback`` whose state differs per rank.

    ``state_dict()`` is this rank's state (:meth:`local_state_dict`). Inside ``Trainer.save_checkpoint``
    (called on every rank, as Lightning requires), :meth:`on_save_checkpoint` gathers every rank's state
    and stores ``{"per_rank": [state of rank 0, rank 1, ...], "world_size": W}`` in the checkpoint, which
    rank zero writes. The collective is in ``on_save_checkpoint``, never in ``state_dict``: a direct
    ``callback.state_dict()`` on one rank (a user's own saving) cannot hang.

    On resume (:meth:`load_state_dict`, after :meth:`on_load_checkpoint` told it the rank) each rank
    loads its own state. When the world size changed, or the state has no per-rank entries (one
    ``state_dict()``, a checkpoint written before this format: one rank's state), each rank gets
    :meth:`reshard_state` of the saved states, and the callback says so with a warning.
    """

    state_key: str

    def local_state_dict(self) -> dict[str, Any]:
        """This rank's state (override)."""
        raise NotImplementedError

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`local_state_dict` returned (override)."""
        raise NotImplementedError

    def reshard_state(self, states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
        """The state rank ``rank`` of ``world`` starts from when the checkpoint holds ``states`` from a
        different world size (override; called on every rank, must be deterministic)."""
        raise NotImplementedError

    def reshard_note(self, saved_world: int, world: int) -> str:
        """What :meth:`reshard_state` did, for the warning (override)."""
        return "its state was re-derived"

    # ------------------------------------------------------------------ Lightning's hooks
    def state_dict(self) -> dict[str, Any]:
        return self.local_state_dict()

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.setdefault("callbacks", {})
        local = states.get(self.state_key)
        if local is None:  # Lightning leaves an empty state out
            local = self.local_state_dict()
        gathered = gather_objects(local, trainer)  # every rank is here: dump_checkpoint runs on all of them
        states[self.state_key] = {PER_RANK: gathered, "world_size": len(gathered)}

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this on every rank just before load_state_dict, which gets no trainer
        self.__dict__["_restore_rank"] = rank_world(trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank, world = self.__dict__.pop("_restore_rank", None) or rank_world()
        saved = state_dict.get(PER_RANK)
        if saved is None:  # one rank's state: a state_dict() of its own, or a checkpoint of an earlier version
            saved = [state_dict]
        saved = list(saved)
        if len(saved) == world:
            self.load_local_state_dict(dict(saved[rank]))
            return
        self.load_local_state_dict(self.reshard_state([dict(s) for s in saved], rank, world))
        if rank == 0:
            warnings.warn(
                f"{type(self).__name__}: the checkpoint holds the state of {len(saved)} rank(s), this run has "
                f"{world}: {self.reshard_note(len(saved), world)}.",
                UserWarning,
                stacklevel=2,
            )
