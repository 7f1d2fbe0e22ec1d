"""Chunked model calls: memory bounded by ``batch_size`` rows, not by n_steps x batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from .checks import not_differentiable, require_graph
from .outputs import pick_output

__all__ = ["chunks", "forward_selected", "grad_selected", "map_chunks", "select_output"]


def chunks(n: int, batch_size: int | None) -> Iterator[slice]:
    """Slices ``[0, n)`` in pieces of at most ``batch_size`` (all at once if None)."""
    step = n if not batch_size or batch_size <= 0 else int(batch_size)
    step = max(step, 1)
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def steps_per_call(batch_size: int | None, batch: int, n_steps: int) -> int:
    """How many steps (noise draws, path points) of a ``batch``-row input fit in one call of at most
    ``batch_size`` rows (all ``n_steps`` when ``batch_size`` is None; at least one)."""
    return max(1, (batch_size or batch * n_steps) // batch)


def select_output(out: Tensor, target: Tensor | None) -> Tensor:
    """The scalar output per row that an attribution explains.

    ``out`` of shape (N,) or (N, 1) is a regression output (target ignored); (N, K) is gathered at
    ``target`` (N,). Extra trailing dimensions are summed after gathering (e.g. segmentation).
    """
    if not isinstance(out, Tensor):
        pick_output(out)  # raises the error that names the fix, or ...
        raise TypeError(
            f"The model returned a {type(out).__name__} with scores inside; wrap it so that it returns "
            "the scores (callbacks do this with output_key=...)."
        )
    if out.ndim == 1:
        return out
    if target is None:
        if out.shape[1] == 1:
            return out[:, 0].reshape(out.shape[0], -1).sum(1)
        raise ValueError(
            f"The model returns {out.shape[1]} outputs per sample but no target was given; "
            "pass target=<class indices of shape (B,)> or use a target policy ('label', 'prediction')."
        )
    sel = out.gather(1, target.view(-1, *([1] * (out.ndim - 1))).expand(-1, 1, *out.shape[2:]))
    return sel.reshape(out.shape[0], -1).sum(1)


def _expand_target(target: Tensor | None, n_rows: int) -> Tensor | None:
    if target is None:
        return None
    if target.shape[0] == n_rows:
        return target
    reps = n_rows // target.shape[0]
    return target.repeat(reps)


def forward_selected(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    target: Tensor | None,
    batch_size: int | None = None,
) -> Tensor:
    """``select_output(model(x), target)`` computed in chunks; returns (N,)."""
    target = _expand_target(target, x.shape[0])
    outs = []
    for sl in chunks(x.shape[0], batch_size):
        outs.append(select_output(model(x[sl]), None if target is None else target[sl]))
    return torch.cat(outs) if outs else x.new_zeros(0)


def grad_selected(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    target: Tensor | None,
    batch_size: int | None = None,
    *,
    create_graph: bool = False,
    return_outputs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-row input gradient of the selected output, ``d f_target(x_n) / d x_n``, chunked.

    Rows must be independent (eval-mode BatchNorm), so the gradient of the sum over a chunk is the
    per-row gradient. ``torch.autograd.grad(..., inputs=...)`` leaves parameter ``.grad`` untouched.
    ``target`` may have B rows for an input of k*B rows (repeated blocks, as built by path methods).
    """
    target = _expand_target(target, x.shape[0])
    grads, outs = [], []
    for sl in chunks(x.shape[0], batch_size):
        xc = x[sl]
        if not xc.requires_grad:
            xc = xc.detach().requires_grad_(True)
        y = select_output(model(xc), None if target is None else target[sl])
        require_graph(y)
        (g,) = torch.autograd.grad(y.sum(), xc, create_graph=create_graph, allow_unused=True)
        if g is None:  # the output depends on the parameters only (no_grad/detach on the input path)
            raise not_differentiable()
        grads.append(g)
        if return_outputs:
            outs.append(y if create_graph else y.detach())
    g = torch.cat(grads) if grads else torch.zeros_like(x)
    if return_outputs:
        return g, torch.cat(outs)
    return g


def map_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int | None) -> Tensor:
    """Apply ``fn`` to row chunks of ``x`` and concatenate."""
    return torch.cat([fn(x[sl]) for sl in chunks(x.shape[0], batch_size)])
