"""Attribution penalties as plain functions of (model, inputs, targets, mask) returning a scalar.

Each function is differentiable with respect to the model's parameters, so ``loss = task + λ·R``
trains the explanation. They are meant to run inside ``training_step`` (under autocast and DDP's
forward, the model in train mode): input gradients are taken with
``torch.autograd.grad(..., create_graph=True)``, never ``.backward()``, so parameter ``.grad`` is
untouched until the one backward of the total loss.

The extra forward passes a penalty makes would update BatchNorm running statistics a second time
with the same batch; ``keep_norm_stats=True`` (default) restores those buffers afterwards, so the
penalty's passes normalise with batch statistics (train mode, as the task forward does) without
counting twice in the running averages. Dropout in train mode draws from the global RNG like any
forward pass of training.

References:
    CDEP: Rieger, Singh, Murdoch & Yu, "Interpretations are useful: penalizing explanations to align
    neural networks with prior knowledge", ICML 2020 (arXiv:1909.13584), and the authors' code
    (github.com/laura-rieger/deep-explanation-penalization, ``score_funcs.cdep``).
    RRR: Ross, Hughes & Doshi-Velez, "Right for the right reasons", IJCAI 2017 (arXiv:1703.03717).
    Attribution priors: Erion, Janizek, Sturmfels, Lundberg & Lee, "Improving performance of deep
    learning models with axiomatic attribution priors and expected gradients", Nature Machine
    Intelligence 2021 (arXiv:1906.10670).

Every penalty (the functions and the objects of :mod:`.penalties`) checks its batch first: inputs
holding NaN or Inf raise a ValueError naming the samples (a penalty taken there is NaN, and a NaN added
to the loss silently turns every weight into NaN at the next step: the data needs cleaning, and no
penalty value is right for such a sample); an empty batch gives a zero penalty that is still a function
of the parameters (its gradient is zero), so ``loss = task + λ·R`` backpropagates as usual. The
penalties that run the model's forward take ``output_key`` (where the scores are in a tuple/dict
output) and re-raise errors of the model's forward with the input shape given.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._internal.batching import twice_differentiable
from .._internal.checks import all_finite, not_differentiable
from .._internal.outputs import OutputSpec, keyed_output, model_errors, read_scores
from .._internal.softplus import relu_as_softplus

__all__ = [
    "attribution_penalty",
    "cdep_penalty",
    "cdep_terms",
    "check_penalty_inputs",
    "eg_mask_prior",
    "eg_sparsity_prior",
    "eg_tv_prior",
    "expected_gradients_k",
    "gini",
    "map_stability_penalty",
    "norm_stats_kept",
    "prepare_mask",
    "rrr_penalty",
    "total_variation",
    "zero_penalty",
]

REDUCTIONS = ("mean", "sum")
_F = TypeVar("_F", bound=Callable[..., Tensor])


def zero_penalty(model: Any, inputs: Tensor) -> Tensor:
    """A zero penalty that is a function of the trainable parameters (gradient zero), on the inputs'
    device: what an empty batch contributes to ``loss = task + λ·R`` (a constant 0 would have no
    gradient, and ``torch.autograd.grad(R, params)`` would fail)."""
    dtype = torch.promote_types(inputs.dtype, torch.float32) if inputs.is_floating_point() else torch.float32
    zero = torch.zeros((), device=inputs.device, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, nn.Module) else []
    if not params or not torch.is_grad_enabled():
        return zero.requires_grad_(torch.is_grad_enabled())
    # 0 · Σ p (not Σ 0 · p): one multiply; a finite Σ keeps the value exactly 0
    return zero + sum((p.sum() for p in params), zero).to(dtype) * 0.0  # + 0: never -0


def check_penalty_inputs(inputs: Tensor, what: str = "penalty") -> None:
    """Refuse inputs with NaN or Inf (naming the samples and the fix). Why an error and not a value: the
    penalty of such a sample is NaN, which added to the loss makes every weight NaN after one step,
    silently; dropping the sample instead would hide that the task loss of the same batch is NaN too."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}.")
    if inputs.is_floating_point() and inputs.numel() and not all_finite(inputs):
        bad = (~torch.isfinite(inputs.detach().reshape(inputs.shape[0], -1))).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"The {what} got inputs with NaN or Inf in samples {bad[:10]}"
            f"{' (and more)' if len(bad) > 10 else ''} of {inputs.shape[0]}: the penalty there is NaN and would "
            "turn the weights into NaN at the next step. Clean the data (torch.nan_to_num, or drop those rows "
            "in the data module)."
        )


def _penalty(what: str, *, output_key: bool = True) -> Callable[[_F], _F]:
    """Decorate a penalty ``fn(model, inputs, ...)``: :func:`check_penalty_inputs`, a
    :func:`zero_penalty` for an empty batch, errors of the model's forward re-raised with the input
    shape (:func:`~explain_callbacks._internal.outputs.model_errors`) and, with ``output_key``, the
    keyword ``output_key=`` reading the scores of a tuple/dict output
    (:func:`~explain_callbacks._internal.outputs.output_adapter`)."""

    def deco(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(model: Any, inputs: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            key: OutputSpec = kwargs.pop("output_key", None) if output_key else None
            check_penalty_inputs(inputs, what)
            if inputs.ndim > 0 and inputs.shape[0] == 0:
                if kwargs.get("return_logits"):  # the forward of an empty batch is the model's own business
                    return model(inputs), zero_penalty(model, inputs)
                return zero_penalty(model, inputs)
            with model_errors(model, inputs), keyed_output(model, key) as called:
                return fn(called, inputs, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def norm_stats_kept(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Restore BatchNorm running statistics (mean, var, batch counter) on exit.

    The forward passes inside keep using batch statistics in train mode; only the running buffers
    are put back, so the penalty's extra passes do not count twice in the running averages.
    """
    if not enabled or not isinstance(model, nn.Module):
        yield
        return
    saved: list[tuple[Tensor, Tensor]] = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.training:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buf = getattr(m, name, None)
                if isinstance(buf, Tensor):
                    saved.append((buf, buf.detach().clone()))
    try:
        yield
    finally:
        # Through ``.data``: the autograd graph of the pass saved these buffers (version-checked), and
        # a train-mode backward reads the saved batch statistics, not the running ones.
        with torch.no_grad():
            for buf, value in saved:
                buf.data.copy_(value)


def prepare_mask(mask: Tensor | None, inputs: Tensor, *, what: str = "penalty", groups: bool = False) -> Tensor:
    """Validate ``mask`` and return it as a float tensor broadcastable to ``inputs``.

    Accepted shapes: anything that broadcasts to the inputs' (B, C, H, W) / (B, D) shape, e.g.
    (H, W), (1, H, W), (B, 1, H, W), (C, H, W). With ``groups=True`` a mask of ``inputs.ndim + 1``
    dimensions is read as (B or 1, G, *sample_shape): G separate feature groups per sample.
    """
    if mask is None:
        raise ValueError(
            f"The {what} needs a mask of the penalised features (1 = penalise); pass mask= (a tensor, or in the "
            "callback a batch key/index or a callable of the batch)."
        )
    if not isinstance(mask, Tensor):
        mask = torch.as_tensor(mask)
    mask = mask.to(device=inputs.device, dtype=inputs.dtype if inputs.is_floating_point() else torch.float32)
    if groups and mask.ndim == inputs.ndim + 1:
        sample = inputs.shape[1:]
        try:
            torch.broadcast_shapes(mask.shape[2:], sample)
        except RuntimeError as err:
            raise ValueError(
                f"grouped mask of shape {tuple(mask.shape)} (B, G, *sample) does not broadcast to samples of shape "
                f"{tuple(sample)}."
            ) from err
        if mask.shape[0] not in (1, inputs.shape[0]):
            raise ValueError(
                f"grouped mask has {mask.shape[0]} rows but the batch has {inputs.shape[0]}; use 1 or the batch size."
            )
        return mask
    if mask.ndim > inputs.ndim:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} has more dimensions than inputs {tuple(inputs.shape)}"
            + ("" if not groups else " + 1 (grouped masks are (B, G, *sample))")
            + "; pass a per-sample mask (B, ...) or one shared mask (...)."
        )
    try:
        shape = torch.broadcast_shapes(mask.shape, inputs.shape)
    except RuntimeError as err:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to inputs of shape {tuple(inputs.shape)}; "
            "give it the input's spatial shape, e.g. (H, W), (1, H, W) or (B, 1, H, W)."
        ) from err
    if shape != inputs.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} would enlarge inputs {tuple(inputs.shape)} to {shape}.")
    return mask


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


def _per_sample_sum(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def _up(t: Tensor) -> Tensor:
    """Half / bfloat16 (autocast) to float32 for the reductions; float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _leaf(inputs: Tensor) -> Tensor:
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be floating point to take input gradients, got {inputs.dtype}; use .float().")
    return inputs.detach().requires_grad_(True)


# --------------------------------------------------------------------------- CDEP
@_penalty("CDEP penalty", output_key=False)  # CD reads the traced graph: tuples' first entry and "logits"
def cdep_penalty(
    model: nn.Module,
    inputs: Tensor,
    mask: Tensor,
    *,
    form: str = "softmax",
    cd_fn: Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
    keep_norm_stats: bool = True,
    bias_at_zero: str = "rest",
    streams: str = "total",
    return_logits: bool = False,
    compiled: bool = False,
) -> Tensor | tuple[Any, Tensor]:
    """Contextual Decomposition Explanation Penalty (Rieger et al. 2020).

    Contextual decomposition splits the logits into β (the contribution of the masked, spurious
    features S) and γ (everything else), β + γ = logits. Forms:

    - ``"softmax"`` (default; the authors' code, ``score_funcs.cdep``): the mean over the batch and
      the classes of ``softmax([β_c, γ_c])[0] = σ(β_c − γ_c)``;
    - ``"l1"`` (the paper's equation, ‖β(x) − 0‖₁): Σ_c |β_c| per sample, averaged over the batch.

    ``mask`` broadcasts to the inputs (1 = the penalised region S), or is grouped (B or 1, G, *sample):
    G separate regions per sample, decomposed in one batched call and summed over groups, as the
    authors' code sums one CDEP term per blob (ColorMNIST: 8 random single pixels per step).

    **The task's forward from the CD pass** (``return_logits=True``): the decomposition carries the true
    activation β + γ through the model's own operations (``streams="total"``), so its output *is* the
    forward pass of the batch. ``logits, r = cdep_penalty(model, x, mask, return_logits=True)`` and
    ``loss = task(logits, y) + λ·r`` train exactly as ``task(model(x), y) + λ·cdep_penalty(model, x, mask)``
    (equal to float rounding) without the separate forward and backward of the task. The BatchNorm running
    statistics are then updated once, from this pass, as the model's forward would have (with
    ``keep_norm_stats`` as it is: the pass replaces that forward); dropout draws one mask, shared by the task
    and the penalty. ``logits`` has the structure of the model's output (a tuple/dict with every tensor the
    true one); with grouped masks it holds the B rows of the first group.

    Args:
        cd_fn: the decomposition ``(model, inputs, mask) -> (beta, gamma)``; default
            :func:`explain_callbacks.interaction.cd.cd_logits`. Not with ``return_logits``.
        keep_norm_stats: restore BatchNorm running statistics after a ``cd_fn`` that calls the model (the
            default decomposition never updates them).
        bias_at_zero: how the linear rule splits a bias where both streams vanish, see
            :func:`~explain_callbacks.interaction.cd.cd_propagate` (``"rest"``: β stays 0 outside S's reach).
        streams: ``"total"`` (default; β + γ and β carried, the faster form) or ``"pair"`` (β and γ, the
            reference's form); the two agree to float rounding.
        return_logits: return ``(output, penalty)``, the output the model's forward of ``inputs`` would give.
        compiled: run the decomposition's rules as kernels compiled by ``torch.compile`` (``streams="total"``;
            faster per step after a one-off compilation of tens of seconds, needs a C++ compiler on the CPU; values
            equal to float rounding; falls back to the eager rules with a warning), see
            :func:`~explain_callbacks.interaction.cd.cd_forward`.
    """
    if return_logits and cd_fn is not None:
        raise ValueError(
            "return_logits=True takes the model's output from the default decomposition (streams='total'); "
            "a custom cd_fn returns only (beta, gamma). Drop cd_fn, or call the model for the logits yourself."
        )
    r, output, stats, groups = cdep_terms(
        model, inputs, mask, form=form, cd_fn=cd_fn, keep_norm_stats=keep_norm_stats, bias_at_zero=bias_at_zero,
        streams="total" if return_logits else streams, stats=return_logits, compiled=compiled,
    )  # fmt: skip
    if not return_logits:
        return r
    from ..interaction.cd import update_norm_stats

    update_norm_stats(stats, replicas=groups)
    return output, r


def cdep_terms(
    model: nn.Module,
    inputs: Tensor,
    mask: Tensor,
    *,
    form: str = "softmax",
    cd_fn: Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
    keep_norm_stats: bool = True,
    bias_at_zero: str = "rest",
    streams: str = "total",
    stats: bool = False,
    compiled: bool = False,
) -> tuple[Tensor, Any, list, int]:
    """The CDEP penalty of :func:`cdep_penalty` and what its CD pass gives besides: the model's output for
    ``inputs`` (None with a custom ``cd_fn``), the batch statistics of its BatchNorm layers in training mode
    (with ``stats``: for :func:`~explain_callbacks.interaction.cd.update_norm_stats`, when the output serves
    as the step's forward) and the number of feature groups per sample. No input checks (the callers'
    :func:`cdep_penalty` and the regularizer callback do them)."""
    if form not in ("softmax", "l1"):
        raise ValueError(f"form must be 'softmax' (the authors' code) or 'l1' (the paper's ‖β‖₁), got {form!r}.")
    m = prepare_mask(mask, inputs, what="CDEP penalty", groups=True)
    x = inputs.detach()
    n_groups = 1
    b = inputs.shape[0]
    if m.ndim == inputs.ndim + 1:  # (B|1, G, *sample): one row per (sample, group)
        n_groups = m.shape[1]
        m = m.expand(b, n_groups, *inputs.shape[1:]).reshape(b * n_groups, *inputs.shape[1:])
        x = x.unsqueeze(1).expand(b, n_groups, *inputs.shape[1:]).reshape(b * n_groups, *inputs.shape[1:])
    else:
        m = m.expand_as(inputs)
    output: Any = None
    recorded: list = []
    with norm_stats_kept(model, keep_norm_stats):
        if cd_fn is None:
            from ..interaction.cd import cd_forward

            dec, output = cd_forward(
                model, m * x, (1 - m) * x, bias_at_zero=bias_at_zero, streams=streams,
                norm_stats=recorded if stats else None, compiled=compiled,
            )  # fmt: skip
            beta, gamma = dec.rel, dec.irr
        else:
            beta, gamma = cd_fn(model, x, m)
    if n_groups > 1 and output is not None:
        output = _first_group(output, b, n_groups)
    beta = _up(beta).reshape(beta.shape[0], -1)
    gamma = _up(gamma).reshape(gamma.shape[0], -1)
    # softmax(stack([β, γ]))[β] = σ(β − γ), averaged over classes; or ‖β‖₁ per row
    per_row = torch.sigmoid(beta - gamma).mean(1) if form == "softmax" else beta.abs().sum(1)
    # mean over samples, sum over groups
    return per_row.mean() * n_groups, output, recorded, n_groups


def _first_group(obj: Any, b: int, g: int) -> Any:
    """The rows of the first feature group in every tensor of a (nested) output of B·G rows."""
    if isinstance(obj, Tensor) and obj.ndim and obj.shape[0] == b * g:
        return obj.view(b, g, *obj.shape[1:])[:, 0]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_first_group(o, b, g) for o in obj)
    if isinstance(obj, dict):
        return {k: _first_group(v, b, g) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------- RRR
@_penalty("RRR penalty")
def rrr_penalty(
    model: nn.Module,
    inputs: Tensor,
    mask: Tensor,
    *,
    reduction: str = "mean",
    keep_norm_stats: bool = True,
) -> Tensor:
    """Right for the Right Reasons (Ross et al. 2017): Σ_d (A_d · ∂(Σ_c log p_c)/∂x_d)².

    The input gradient of the summed log-probabilities over the classes, masked by the annotation A
    (here ``mask``, 1 on the forbidden features) and squared. ``reduction="mean"`` averages the
    per-sample sums over the batch (batch-size independent); ``"sum"`` sums them, as Ross et al.'s
    code does. The model's outputs are read as logits (``log_softmax`` is applied; a model that
    already returns log-probabilities gives the same result, ``log_softmax`` being idempotent); a
    single output (B, 1) is one binary logit z, whose classes have log σ(z) and log σ(−z) (a
    log-softmax over one column would be 0 and the penalty 0 for every model).
    Ross et al.'s extra L2 weight term is left to the optimiser's weight decay. ``output_key=``
    reads the scores of a model returning a tuple/dict; NaN/Inf inputs raise, an empty batch gives a
    zero penalty (see the module docstring).
    """
    m = prepare_mask(mask, inputs, what="RRR penalty")
    x = _leaf(inputs)
    with norm_stats_kept(model, keep_norm_stats), twice_differentiable():
        out = read_scores(model(x))  # a tuple/dict output: the error naming output_key
        if out.ndim < 2:
            raise ValueError(f"RRR needs class scores of shape (B, K); the model returned shape {tuple(out.shape)}.")
        out = _up(out)
        if out.shape[1] == 1:  # one binary logit z: the two classes' log-probabilities log σ(z), log σ(−z)
            out = torch.cat([torch.zeros_like(out), out], 1)
        logp = F.log_softmax(out, dim=1)
        (g,) = torch.autograd.grad(logp.sum(), x, create_graph=True, allow_unused=True)
    if g is None:  # the scores depend on the parameters only (no_grad/detach on the input path)
        raise not_differentiable()
    return _reduce(_per_sample_sum((m * g).pow(2)), reduction)


# --------------------------------------------------------------------------- expected gradients priors
def expected_gradients_k(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    *,
    n_samples: int = 1,
    seed: int = 0,
    reference: Tensor | None = None,
) -> Tensor:
    """Expected Gradients with ``n_samples`` (baseline, α) draws per input, differentiable.

    ``EG(x) = (1/k) Σ_j (x − x'_j) ⊙ ∂f_c(x'_j + α_j (x − x'_j))/∂x``, x'_j drawn from ``reference``
    (default: the batch itself, as Erion et al. do in training) and α_j ~ U(0, 1); k = 1 per step is
    the training setting of Erion et al. All k·B path points go through the model in one call, so
    train-mode layers see one batch. ``targets`` (B,) selects the explained class (None: a single
    output). The draws come from a generator seeded with ``seed`` (never the global RNG): vary it
    per step (the penalty objects and the callback do).
    """
    from ..attribution.path import ExpectedGradients

    eg = ExpectedGradients(reference=reference, n_samples=n_samples, batch_size=None, seed=seed)
    tgt = None if targets is None else targets.to(inputs.device).long().view(-1)
    return eg.attribute(model, inputs.detach(), tgt, create_graph=True)


def total_variation(maps: Tensor, *, reduce_channels: bool = True) -> Tensor:
    """Anisotropic L1 total variation per sample: Σ |A_{i+1,j} − A_{i,j}| + |A_{i,j+1} − A_{i,j}|.

    ``maps`` (B, C, H, W) are summed over channels first (the pixel attribution) unless
    ``reduce_channels=False``; (B, H, W) maps are used as they are. Returns (B,).
    """
    if maps.ndim == 4 and reduce_channels:
        maps = maps.sum(1)
    if maps.ndim < 3:
        raise ValueError(f"total variation needs image maps (B, H, W) or (B, C, H, W), got {tuple(maps.shape)}.")
    dh = (maps[..., 1:, :] - maps[..., :-1, :]).abs()
    dw = (maps[..., :, 1:] - maps[..., :, :-1]).abs()
    return _per_sample_sum(dh) + _per_sample_sum(dw)


def gini(values: Tensor, eps: float = 1e-12) -> Tensor:
    """Gini coefficient of non-negative ``values`` along the last dimension (differentiable).

    ``G = Σ_i (2i − n − 1) v_(i) / (n Σ v)`` with v sorted ascending, i = 1..n; 0 for equal values,
    (n − 1)/n for a single non-zero value.
    """
    n = values.shape[-1]
    v, _ = torch.sort(values, dim=-1)
    i = torch.arange(1, n + 1, device=values.device, dtype=values.dtype)
    return ((2 * i - n - 1) * v).sum(-1) / (n * v.sum(-1) + eps)


@_penalty("EG smoothness prior")
def eg_tv_prior(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    *,
    n_samples: int = 1,
    seed: int = 0,
    reference: Tensor | None = None,
    reduction: str = "mean",
    keep_norm_stats: bool = True,
) -> Tensor:
    """Pixel smoothness prior of Erion et al. (2021): total variation of the EG map (channel-summed).

    Images (B, C, H, W): the anisotropic 2-D total variation of the channel-summed map. Signals
    (B, C, L) (the package's sequence layout): the 1-D total variation along L of the channel-summed
    map, Σ_t |A_{t+1} − A_t| (a 3-D map read as one (H, W) image would add differences between
    neighbouring channels).
    """
    with norm_stats_kept(model, keep_norm_stats):
        attr = expected_gradients_k(model, inputs, targets, reference=reference, n_samples=n_samples, seed=seed)
    attr = _up(attr)
    if attr.ndim == 3:
        a = attr.sum(1)
        return _reduce(_per_sample_sum((a[:, 1:] - a[:, :-1]).abs()), reduction)
    return _reduce(total_variation(attr), reduction)


@_penalty("EG sparsity prior")
def eg_sparsity_prior(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    *,
    n_samples: int = 1,
    seed: int = 0,
    reference: Tensor | None = None,
    reduce_channels: bool = True,
    keep_norm_stats: bool = True,
) -> Tensor:
    """Sparsity prior of Erion et al. (2021): −Gini of the batch's mean |EG| per feature.

    Minimising it maximises the Gini coefficient of the global attribution (Φ̄_i = mean over the
    batch of |EG_i|), so the model relies on few features. The value lies in [−1, 0]. Image maps
    are summed over channels first (``reduce_channels``).
    """
    with norm_stats_kept(model, keep_norm_stats):
        attr = expected_gradients_k(model, inputs, targets, reference=reference, n_samples=n_samples, seed=seed)
    attr = _up(attr)
    if attr.ndim == 4 and reduce_channels:
        attr = attr.sum(1)
    glob = attr.abs().reshape(attr.shape[0], -1).mean(0)
    return -gini(glob)


@_penalty("EG region prior")
def eg_mask_prior(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    mask: Tensor,
    *,
    n_samples: int = 1,
    seed: int = 0,
    reference: Tensor | None = None,
    power: float = 1.0,
    reduction: str = "mean",
    keep_norm_stats: bool = True,
) -> Tensor:
    """Region prior on Expected Gradients: Σ_d |mask_d · EG_d|^power per sample (Erion et al. 2021;
    the EG comparison of the CDEP paper penalises Σ over the decoy region of |EG|)."""
    m = prepare_mask(mask, inputs, what="EG region prior")
    with norm_stats_kept(model, keep_norm_stats):
        attr = expected_gradients_k(model, inputs, targets, reference=reference, n_samples=n_samples, seed=seed)
    return _reduce(_per_sample_sum((m * _up(attr)).abs().pow(power)), reduction)


# --------------------------------------------------------------------------- generic
@_penalty("attribution penalty")
def attribution_penalty(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    mask: Tensor,
    method: object,
    *,
    power: float = 2.0,
    reduction: str = "mean",
    keep_norm_stats: bool = True,
) -> Tensor:
    """Σ_d |mask_d · A_d|^power of any differentiable attribution method A (a penalty on a region).

    ``method`` is an :class:`~explain_callbacks.attribution.Attributor` (or a registered name such as
    ``"saliency"``, ``"input_x_gradient"``, ``"ig"``, ``"expected_gradients"``) computed with
    ``create_graph=True``, so the penalty has a gradient with respect to the parameters. Black-box
    methods and Captum objects have none and are refused.
    """
    from ..attribution import build_attributor

    attributor = build_attributor(method)
    if not getattr(attributor, "differentiable", False) or not hasattr(attributor, "attribute"):
        raise ValueError(
            f"{attributor!r} is not differentiable with respect to the parameters; penalties need one of "
            "saliency, input_x_gradient, ig, expected_gradients (explain_callbacks.attribution)."
        )
    m = prepare_mask(mask, inputs, what="attribution penalty")
    tgt = None if targets is None else targets.to(inputs.device).long().view(-1)
    # the method's own β-smoothing (softplus for ReLU), as its ``__call__`` applies it
    smooth = relu_as_softplus(getattr(attributor, "beta", None))
    with norm_stats_kept(model, keep_norm_stats), twice_differentiable(), smooth:
        # ``attribute`` directly: ``__call__`` would add a forward pass just to check the target range.
        attr = attributor.attribute(model, inputs.detach(), tgt, create_graph=True)
    return _reduce(_per_sample_sum((m * _up(attr)).abs().pow(power)), reduction)


# --------------------------------------------------------------------------- attributional robustness
def _unit_importance(attr: Tensor) -> Tensor:
    """|A| summed over channels (images/signals), flattened and scaled to unit sum, times the number of
    features (so a uniform map has entries 1 and the penalty's scale does not depend on the input size)."""
    a = _up(attr).abs()
    a = a.sum(1) if a.ndim >= 3 else a
    flat = a.reshape(a.shape[0], -1)
    return flat * (flat.shape[1] / flat.sum(1, keepdim=True).clamp_min(1e-12))


@_penalty("map-stability penalty")
def map_stability_penalty(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    *,
    method: object = "saliency",
    radius: float = 8 / 255,
    n_samples: int = 1,
    softplus_beta: float | None = None,
    attack_steps: int = 1,
    attack_beta: float | None = 10.0,
    seed: int = 0,
    reduction: str = "mean",
    keep_norm_stats: bool = True,
) -> Tensor:
    """Attributional-robustness penalty: how far the map moves under small adversarial input perturbations.

    ``R = mean_δ (1/N) ‖ĥ(x + δ) − ĥ(x)‖²``, ĥ the importance map (|A| summed over channels) scaled to mean 1
    over its N features, A a differentiable method computed with ``create_graph=True`` (so R has parameter
    gradients). δ starts uniform in the L∞ ball of radius ``radius`` (``n_samples`` draws per sample,
    ``(torch.rand(n_samples, *x.shape) · 2 − 1) · radius`` from a generator seeded by ``seed``) and then takes
    ``attack_steps`` signed-gradient ascent steps of size 2·``radius``/``attack_steps`` on ‖ĥ(x + δ) − ĥ(x)‖²,
    kept in the ball: the attributional-robustness training of Chen et al. 2019 ("Robust attribution
    regularization") and Singh et al. 2020 ("Attributional robustness training using input-gradient spatial
    alignment"); ``attack_steps=0``: the random δ only. The ascent direction is taken under ReLU →
    softplus(``attack_beta``) (a ReLU network's map is piecewise constant in x, its input gradient zero almost
    everywhere; the fragility attack does the same) and carries no parameter graph; each step costs about one
    more double-backward of the method.

    Training with R flattens the map's dependence on the input, the curvature that Dombrowski et al. 2019
    ("Explanations can be manipulated and geometry is to blame") bound to defend against manipulation. The
    scale-free ĥ keeps the model from lowering R by merely shrinking its gradients. On the benchmark's digits
    CNN (benchmarks/bench_robustness.py, 2 seeds) one ascent step with λ = 2, switched on after the fit, raised
    the top-k intersection under the fragility attack by 0.115 for 0.65 points of test accuracy.
    ``targets``: the explained classes (the labels), or None for the model's prediction. ``softplus_beta``:
    ReLU → softplus(β) in the passes of R itself; None: the network as is.
    """
    from ..attribution import build_attributor

    attributor = build_attributor(method)
    if not getattr(attributor, "differentiable", False) or not hasattr(attributor, "attribute"):
        raise ValueError(
            f"{attributor!r} is not differentiable with respect to the parameters; the map-stability penalty "
            "needs one of saliency, input_x_gradient, ig, expected_gradients (explain_callbacks.attribution)."
        )
    if not radius > 0:
        raise ValueError(f"radius must be > 0 (the L∞ size of the random perturbations), got {radius}.")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1 (perturbations per sample and step), got {n_samples}.")
    if isinstance(attack_steps, bool) or not isinstance(attack_steps, int) or attack_steps < 0:
        raise ValueError(f"attack_steps must be an int >= 0 (0: random perturbations only), got {attack_steps!r}.")
    x = inputs.detach()
    b = x.shape[0]
    beta = softplus_beta if softplus_beta is not None else getattr(attributor, "beta", None)
    with norm_stats_kept(model, keep_norm_stats), twice_differentiable(), relu_as_softplus(beta):
        if targets is None:
            with torch.no_grad():
                tgt = read_scores(model(x)).argmax(1)
        else:
            tgt = targets.to(x.device).long().view(-1)
        gen = torch.Generator(device=x.device).manual_seed(int(seed))
        delta = (torch.rand((n_samples, *x.shape), generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) * radius
        if attack_steps:
            delta = _map_ascent(attributor, model, x, tgt, delta, radius, attack_steps, attack_beta)
        both = torch.cat([x, (x.unsqueeze(0) + delta).flatten(0, 1)])  # one method call for x and every x + δ
        attr = attributor.attribute(model, both, tgt.repeat(n_samples + 1), create_graph=True)
    h = _unit_importance(attr)
    h0, hd = h[:b], h[b:].view(n_samples, b, -1)
    per_sample = (hd - h0.unsqueeze(0)).pow(2).mean(2).mean(0)
    return _reduce(per_sample, reduction)


def _map_ascent(
    attributor: Any, model: nn.Module, x: Tensor, tgt: Tensor, delta: Tensor, radius: float, steps: int,
    beta: float | None,
) -> Tensor:  # fmt: skip
    """δ (n_samples, *x.shape) after ``steps`` signed-gradient ascent steps on ‖ĥ(x + δ) − ĥ(x)‖² inside the
    L∞ ball of ``radius``, gradients under softplus(β); detached (the penalty differentiates only at the end)."""
    n, b = delta.shape[0], x.shape[0]
    size = 2 * radius / steps
    with relu_as_softplus(beta):
        h0 = _unit_importance(attributor.attribute(model, x, tgt)).detach()
        for _ in range(steps):
            xd = (x.unsqueeze(0) + delta).flatten(0, 1).requires_grad_(True)
            h = _unit_importance(attributor.attribute(model, xd, tgt.repeat(n), create_graph=True))
            dist = (h.view(n, b, -1) - h0).pow(2).sum()
            # a map that cannot move (a linear model) has no graph to x: δ stays where it is
            grad = torch.autograd.grad(dist, xd, allow_unused=True)[0] if dist.requires_grad else None
            if grad is None:
                break
            delta = (delta + size * grad.view_as(delta).sign()).clamp(-radius, radius).detach()
    return delta
