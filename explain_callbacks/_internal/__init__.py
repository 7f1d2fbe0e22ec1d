"""Shared plumbing: model guard, chunked calls, targets, batch adapter, registries, checks."""

from .batch import BatchAdapter
from .batching import chunks, forward_selected, grad_selected, map_chunks, select_output
from .checks import check_inputs, check_map, finite_rows
from .guard import ModelState, detach_clone, model_guard, rng_guard
from .registry import ATTRIBUTIONS, INTERACTIONS, METRICS, PENALTIES, STUDENTS, Registry
from .targets import as_target_tensor, check_target, resolve_target

__all__ = [
    "ATTRIBUTIONS",
    "INTERACTIONS",
    "METRICS",
    "PENALTIES",
    "STUDENTS",
    "BatchAdapter",
    "ModelState",
    "Registry",
    "as_target_tensor",
    "check_inputs",
    "check_map",
    "check_target",
    "chunks",
    "detach_clone",
    "finite_rows",
    "forward_selected",
    "grad_selected",
    "map_chunks",
    "model_guard",
    "resolve_target",
    "rng_guard",
    "select_output",
]
