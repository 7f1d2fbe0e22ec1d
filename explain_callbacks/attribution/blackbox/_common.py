"""Shared base of the black-box (perturbation) methods."""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._internal.batching import BatchSize, chunks
from ..._internal.checks import not_differentiable, require_graph
from ..._internal.layout import StepsLast, reads_channels_first
from ..._internal.masks import OUTPUTS, score_outputs, score_seed
from ..._internal.outputs import read_scores
from ..base import Attributor

__all__ = [
    "AdamState",
    "PerturbationAttributor",
    "grad_scores",
    "mask_resolution",
    "score_grad",
    "target_onehot",
    "total_variation",
    "upsample_mask",
]


class PerturbationAttributor(Attributor):
    """Base of the perturbation methods: not differentiable, a forward-pass ``budget`` and an ``output``.

    Args:
        output: the explained scalar: ``logit`` (the raw model output at the target), ``softmax``,
            ``log_softmax`` or ``sigmoid``.
        budget: at most this many model rows (forward passes) per explained sample; the method lowers
            its sample count to fit, or raises if it cannot.
        batch_size: rows per model call.
        seed: seed of the per-call generator.

    After a call, ``last_info["forwards"]`` holds the number of model rows spent per sample (B,).
    Run it on a model in eval mode (the callbacks do this through the model guard): in train mode,
    BatchNorm statistics would move with every perturbed copy.
    """

    differentiable: ClassVar[bool] = False
    passes: ClassVar[str] = "forward"  # the methods that follow gradients of masks say "grad"
    #: whether the method masks the steps of (B, C, L) signals along the last dim. Such methods explain
    #: a (B, T, D) sequence model (:func:`~explain_callbacks._internal.layout.reads_channels_first`)
    #: through :class:`~explain_callbacks._internal.layout.StepsLast`: masks over its T steps, shared
    #: over the D features, and a (B, T, 1) map.
    step_masks: ClassVar[bool] = False
    #: how 3-D inputs are read by ``step_masks`` methods (their ``channels_first`` argument): True
    #: (B, C, L), False (B, T, D), None decided from the model's first layer.
    channels_first: bool | None = None

    def __init__(
        self, output: str = "logit", budget: int | None = None, batch_size: BatchSize = "auto", seed: int = 0
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
        if budget is not None and budget < 1:
            raise ValueError(f"budget must be a positive number of forward passes per sample or None, got {budget}.")
        self.output = output
        self.budget = budget

    def _call(
        self, model: nn.Module, inputs: Tensor, target: Tensor | int | None, *, create_graph: bool = False
    ) -> Tensor:
        # create_graph and non-tensor inputs take the usual path, which raises the usual errors
        steps_first = self.step_masks and isinstance(inputs, Tensor) and inputs.ndim == 3 and not create_graph
        if not steps_first or reads_channels_first(model, inputs, self.channels_first):
            return super()._call(model, inputs, target, create_graph=create_graph)
        tgt = self._prepare(model, inputs, target)
        view = self._steps_last_view(inputs)
        try:
            steps = view.attribute(StepsLast(model), inputs.transpose(1, 2), tgt)
        finally:
            self.last_info = view.last_info
        return steps.transpose(1, 2).contiguous()

    def _steps_last_view(self, inputs: Tensor) -> Any:
        """A shallow copy of this method for (B, D, T) inputs: settings shaped like the inputs (a tensor
        ``substrate``) are transposed with them."""
        view = copy.copy(self)
        view.last_info = {}
        sub = getattr(self, "substrate", None)
        if isinstance(sub, Tensor):
            try:
                view.substrate = torch.broadcast_to(sub, inputs.shape).transpose(1, 2)
            except RuntimeError as err:
                raise ValueError(
                    f"substrate of shape {tuple(sub.shape)} does not broadcast to inputs {tuple(inputs.shape)}."
                ) from err
        return view

    def n_forwards(self, input_shape: tuple[int, ...]) -> int:
        """Forward passes (model rows) this method spends per explained sample of ``input_shape``
        (the per-sample shape, without the batch dimension)."""
        raise NotImplementedError

    def _record_forwards(self, inputs: Tensor, n: int) -> None:
        self.last_info["forwards"] = torch.full((inputs.shape[0],), int(n), dtype=torch.long)


def grad_scores(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None,
    output: str,
    batch_size: int | None,
    *,
    return_argmax: bool = False,
    onehot: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Per-row input gradient of the explained scalar and the scalar itself (and, with
    ``return_argmax``, the model's arg-max class, −1 for single-output models), chunked by ``batch_size``;
    ``onehot``: the targets' one-hot rows (N, K), when the caller holds them (:func:`score_grad`).

    Rows must be independent (eval-mode BatchNorm). Uses ``torch.autograd.grad`` (parameter ``.grad``
    untouched); the results are detached.
    """
    grads, outs, preds = [], [], []
    with torch.enable_grad():
        for sl in chunks(x.shape[0], batch_size):
            xc = x[sl].detach().requires_grad_(True)
            oh = None if onehot is None else onehot[sl]
            g, y, raw = score_grad(model, xc, None if target is None else target[sl], output, onehot=oh)
            grads.append(g)
            outs.append(y)
            if return_argmax:
                multi = raw.ndim == 2 and raw.shape[1] > 1
                preds.append(raw.detach().argmax(1) if multi else torch.full_like(y, -1, dtype=torch.long))

    def cat(ts: list[Tensor]) -> Tensor:
        return ts[0] if len(ts) == 1 else torch.cat(ts)

    if return_argmax:
        return cat(grads), cat(outs), cat(preds)
    return cat(grads), cat(outs)


def score_grad(
    model: nn.Module, x: Tensor, target: object, output: str, *, read: bool = True, onehot: Tensor | None = None
) -> tuple[Tensor, Tensor, Any]:
    """(∂f/∂x, f, the model's output) of the explained scalar f per row for ``x`` that requires grad: one
    forward and one input-gradient backward, the scalar's own gradient seeded in closed form where
    :func:`~explain_callbacks._internal.masks.score_seed` has it (bit-identical, fewer autograd nodes), else
    differentiated. ``read``: the output goes through ``read_scores`` first (else a target operator reads
    it as returned); ``onehot``: the targets' one-hot rows, when the caller holds them. Run it with grad
    enabled; ∂f/∂x and f are detached."""
    raw = model(x)
    if read:
        raw = read_scores(raw)
    seed = score_seed(raw, target, output, onehot)
    if seed is None:
        y = score_outputs(raw, target, output)
        require_graph(y)
        (g,) = torch.autograd.grad(y.sum(), x, allow_unused=True)
    else:
        y, dz = seed
        require_graph(raw)
        (g,) = torch.autograd.grad(raw, x, dz, allow_unused=True)
    if g is None:
        raise not_differentiable()
    return g, y.detach(), raw


def target_onehot(out: object, target: object) -> Tensor | None:
    """The one-hot rows (N, K) of class indices ``target`` (N,) for a (N, K > 1) output like ``out``: built
    once by a loop over steps with fixed targets, for :func:`score_grad`'s seed; None where the target is
    not class indices or the output not K > 1 class scores (the seed then decides per call)."""
    if not isinstance(target, Tensor) or target.ndim != 1 or target.is_floating_point():
        return None
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[1] < 2 or out.shape[0] != target.shape[0]:
        return None
    return torch.zeros(out.shape, dtype=out.dtype, device=out.device).scatter_(1, target.view(-1, 1), 1.0)


def total_variation(m: Tensor, beta: float = 2.0) -> Tensor:
    """Anisotropic total variation per sample of (B, 1, *spatial) masks: Σ |Δm|^β along each spatial axis."""
    tv = m.new_zeros(m.shape[0])
    for dim in range(2, m.ndim):
        if m.shape[dim] > 1:
            d = m.diff(dim=dim)
            if beta == 2:
                p = d * d
            elif beta == 3:
                p = d * d * d.abs()
            else:
                p = d.abs().pow(beta)
            tv = tv + p.flatten(1).sum(1)
    return tv


class AdamState:
    """Adam (Kingma & Ba 2015) on one tensor, as ``torch.optim.Adam`` with default betas and eps.

    One call of PyTorch's fused Adam kernel per step where the device has it (CPU and CUDA), otherwise
    a handful of tensor operations: the per-step Python overhead of ``torch.optim`` is comparable to a
    small model's forward pass when masks of a few samples are optimised."""

    def __init__(self, param: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param = param
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0
        self._step = torch.zeros((), dtype=torch.float32, device=param.device)
        self._fused = param.device.type in ("cpu", "cuda") and hasattr(torch, "_fused_adam_")
        # in-place updates of a tensor that requires grad need no_grad; a plain tensor's do not, and
        # entering the context every step costs as much as one of the step's tensor operations
        self._context = torch.no_grad if param.requires_grad else contextlib.nullcontext

    def step(self, grad: Tensor) -> None:
        with self._context():
            self._update(grad)

    def _update(self, grad: Tensor) -> None:
        self.t += 1
        if self._fused:
            self._step.fill_(self.t)
            try:
                torch._fused_adam_(
                    [self.param], [grad], [self.m], [self.v], [], [self._step],
                    lr=self.lr, beta1=self.b1, beta2=self.b2, weight_decay=0.0, eps=self.eps,
                    amsgrad=False, maximize=False,
                )  # fmt: skip
                return
            except (RuntimeError, NotImplementedError):  # e.g. a dtype the kernel lacks
                if self.t > 1:
                    raise
                self._fused = False
        self.m.mul_(self.b1).add_(grad, alpha=1 - self.b1)
        self.v.mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        c1 = 1 - self.b1**self.t
        c2 = 1 - self.b2**self.t
        denom = (self.v / c2).sqrt_().add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-self.lr / c1)


def mask_resolution(size: tuple[int, ...], scale: int, minimum: int) -> tuple[int, ...]:
    """Low-resolution mask shape: each side ``ceil(side / scale)``, at least ``minimum`` (at most the side)."""
    return tuple(min(s, max(-(-s // scale), minimum)) for s in size)


@functools.lru_cache(maxsize=64)
def _interp_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n_out, n_in) matrix of 1-D linear interpolation with ``align_corners=False`` (as F.interpolate);
    cached, and always a normal tensor (never an inference-mode one) so it can enter autograd graphs."""
    with torch.inference_mode(False), torch.no_grad():
        eye = torch.eye(n_in, device=device, dtype=dtype).unsqueeze(1)  # (n_in, 1, n_in)
        return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :].t().contiguous()


def upsample_mask(m: Tensor, size: tuple[int, ...]) -> Tensor:
    """Bilinear (linear for sequences) upsampling of (B, 1, *low) masks to ``size``; identity for tabular.

    Equal to ``F.interpolate(..., align_corners=False)``, computed as small matrix products
    ``R_h · m · R_wᵀ`` (bilinear interpolation is separable), whose backward pass is far cheaper on
    CPU than that of ``F.interpolate``.
    """
    if m.ndim == 2 or tuple(m.shape[2:]) == tuple(size):
        return m
    if m.ndim == 3:
        return m @ _interp_matrix(m.shape[-1], size[0], m.device, m.dtype).t()
    rh = _interp_matrix(m.shape[-2], size[0], m.device, m.dtype)
    rw = _interp_matrix(m.shape[-1], size[1], m.device, m.dtype)
    return rh @ m @ rw.t()
