"""TRIM: attributions of a model in a transformed domain (Singh, Ha & Yu 2020, "Transformation
Importance with Applications to Cosmology", arXiv:2003.01926), as used by AWD (Ha et al. 2021).

For a transform ``s = W x`` with (approximate) inverse ``W⁻¹``, the model seen from the transformed
domain is

    f̃(s) = f(W⁻¹ s + r),    r = (x − W⁻¹ W x).detach(),

where the residual ``r`` makes ``f̃(W x) = f(x)`` even when ``W⁻¹`` is not an exact inverse. The
attribution of the coefficients is a gradient method applied to ``f̃`` at ``s = W x``:
``saliency`` = ∂f̃_c/∂s, ``input_x_gradient`` = s ⊙ ∂f̃_c/∂s. With ``create_graph=True`` the result is
differentiable with respect to the transform's parameters (double backprop), which is how AWD
penalises ‖TRIM‖₁ while learning the wavelet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .._internal.batching import BatchSize, chunks, select_output

__all__ = ["trim_attribution"]

Coeffs = Sequence[Tensor]


def trim_attribution(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    transform: Callable[[Tensor], Tensor | Coeffs],
    inverse: Callable[[Tensor | Coeffs], Tensor],
    target: Tensor | None = None,
    *,
    method: str = "saliency",
    use_residual: bool = True,
    create_graph: bool = False,
    batch_size: BatchSize = "auto",
) -> Tensor | tuple[Tensor, ...]:
    """TRIM attributions of the coefficients ``transform(x)`` (a tensor or a tuple of tensors).

    Args:
        model: the teacher, taking inputs shaped like ``x``.
        x: inputs (B, ...).
        transform, inverse: the transform and its (approximate) inverse.
        target: class indices (B,) for a classifier, None for a single-output regression.
        method: ``saliency`` (∂f̃/∂s, the default of AWD) or ``input_x_gradient`` (s ⊙ ∂f̃/∂s).
        use_residual: add the detached reconstruction residual (TRIM's correction).
        create_graph: keep the graph so the result can be differentiated w.r.t. the transform's
            parameters (double backprop).
        batch_size: rows per model call.

    Returns the attributions with the structure of ``transform(x)``.
    """
    if method not in ("saliency", "input_x_gradient"):
        raise ValueError(f"TRIM method must be 'saliency' or 'input_x_gradient', got {method!r}.")
    parts: list[tuple[Tensor, ...]] = []
    single = False
    for sl in chunks(x.shape[0], batch_size):
        xc = x[sl]
        with torch.enable_grad():
            s = transform(xc)
            single = isinstance(s, Tensor)
            coeffs = (s,) if single else tuple(s)
            if not create_graph:  # attributions only: coefficients become leaves
                coeffs = tuple(c.detach().requires_grad_(True) for c in coeffs)
            elif not all(c.requires_grad for c in coeffs):
                coeffs = tuple(c if c.requires_grad else c.detach().requires_grad_(True) for c in coeffs)
            rec = inverse(coeffs[0] if single else coeffs)
            x_tilde = rec + (xc - rec).detach() if use_residual else rec
            out = select_output(model(x_tilde), None if target is None else target[sl])
            grads = torch.autograd.grad(out.sum(), coeffs, create_graph=create_graph)
        if method == "input_x_gradient":
            grads = tuple(g * c for g, c in zip(grads, coeffs))
        if not create_graph:
            grads = tuple(g.detach() for g in grads)
        parts.append(tuple(grads))
    result = tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
    return result[0] if single else result
