"""Attention kernels that can be differentiated twice.

``F.scaled_dot_product_attention`` (used by ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer`` in PyTorch >= 2.0) dispatches on CPU and CUDA to fused flash /
memory-efficient kernels whose backward has no derivative: a map built with ``create_graph=True``
(attribution penalties, EG priors, RRR) or a Hessian-vector product (integrated Hessians) through a
transformer fails with "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is
not implemented". Inside :func:`twice_differentiable` the math kernel, written in ordinary
differentiable operations, is used instead (same values to rounding); the previous kernel choice is
restored on exit, so nothing global changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import Tensor, nn

from .._internal.batching import BatchSize, grad_selected


@contextlib.contextmanager
def twice_differentiable(enabled: bool = True) -> Iterator[None]:
    """Use the math attention kernel while ``enabled`` (a no-op otherwise, or on PyTorch < 2.3)."""
    if not enabled:
        yield
        return
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # PyTorch < 2.3: torch.backends.cuda.sdp_kernel covers CUDA only
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def grad_selected_twice(
    model: nn.Module | Callable[[Tensor], Tensor],
    inputs: Tensor,
    target: Tensor | None,
    batch_size: BatchSize = None,
    *,
    create_graph: bool = False,
) -> Tensor:
    """:func:`explain_callbacks._internal.batching.grad_selected` whose graph (``create_graph=True``)
    can be differentiated again through attention layers."""
    with twice_differentiable(create_graph):
        out = grad_selected(model, inputs, target, batch_size, create_graph=create_graph)
    assert isinstance(out, Tensor)
    return out
