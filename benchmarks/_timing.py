"""Timing shared by the benchmarks (imported as a sibling module: the benchmarks run as scripts)."""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch


def sync() -> None:
    """Wait for queued CUDA work, so a timer sees it (no-op on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def bare_pass(model: torch.nn.Module, x: torch.Tensor, grad: bool) -> None:
    """One model call on ready-made rows: a forward without grad, or (``grad``) a forward and the
    input-gradient backward of output 0 (what a gradient method's call costs)."""
    if grad:
        x = x.detach().requires_grad_(True)
        torch.autograd.grad(model(x)[:, 0].sum(), x)
    else:
        with torch.no_grad():
            model(x)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best of ``repeats`` wall times (after one warm-up call when repeats > 1) and the last result."""
    times, out = [], None
    if repeats > 1:
        out = fn()
        sync()
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times), out


def paired_times(
    method: Callable[[], object],
    bare: Callable[[], object],
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, float, float]:
    """Fastest time of each and the median over rounds of the ratio method / bare, the two run back to
    back in each round (alternating which goes first). On a shared machine the CPU clock speed drifts
    with the other core's load (turbo), by up to a third between minutes; a ratio of neighbours in
    time cancels most of that, where a ratio of two minima taken minutes apart does not."""
    tm: list[float] = []
    tb: list[float] = []
    for r in range(max(1, repeats)):
        order = [(method, tm), (bare, tb)] if r % 2 == 0 else [(bare, tb), (method, tm)]
        for fn, acc in order:
            t = clock()
            fn()
            acc.append(clock() - t)
    return min(tm), min(tb), statistics.median(a / b for a, b in zip(tm, tb))


def median_time(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, the functions interleaved in every round (after one warm-up each)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def patched(name: str, values: Iterator[np.ndarray]) -> Iterator[None]:
    """Replace ``np.random.<name>`` by a function returning the next precomputed array (Quantus draws its subsets
    and noise from the global numpy RNG: fed ours, it scores the same perturbations)."""
    orig = getattr(np.random, name)
    setattr(np.random, name, lambda *a, **k: next(values))
    try:
        yield
    finally:
        setattr(np.random, name, orig)


def quiet(fn: Callable[[], Any]) -> Any:
    """``fn()`` without its warnings and printed output (Quantus prints and warns on every call)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(None):
            return fn()
