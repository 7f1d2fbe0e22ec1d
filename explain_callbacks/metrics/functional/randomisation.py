"""Model-parameter randomisation sanity check (Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim
2018, "Sanity Checks for Saliency Maps", NeurIPS, arXiv:1810.03292).

Layers are re-initialised from the top (output) down, cascading; after each one the method is re-run
and the per-sample Spearman rank correlation between the maps of the trained and the randomised
model is reported (of |A| by default, as the paper's figures and Quantus' ``MPRT``). A method that
depends on the learned weights falls towards 0; one that does not (an edge detector) stays high.

The check works on a deep copy of the model (the user's model is never modified). Weights are drawn
from a seeded ``torch.Generator`` per layer (PyTorch's default ``U(±1/√fan_in)`` for weights and biases
of layers with a ≥2-D weight; normalisation layers are reset to their identity initialisation, as
``reset_parameters``), so the fully randomised model is the same however it was reached.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..._internal.batching import BatchSize, resolve_batch_size
from ..._internal.ops import pearson, rankdata
from ...attribution.base import make_generator
from ._utils import row_blocks, validate

__all__ = ["copy_model", "model_randomisation", "randomisable_layers", "randomise_layer"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares (does not copy) a Lightning trainer or Fabric it refers to."""
    memo: dict[int, object] = {}
    for m in model.modules():
        for attr in ("_trainer", "_fabric", "_fabric_optimizers", "_device_mesh"):
            v = m.__dict__.get(attr)
            if v is not None and not isinstance(v, (Tensor, nn.Module)):
                memo[id(v)] = v
    return copy.deepcopy(model, memo)


def randomisable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules owning parameters directly, in registration (input-to-output) order."""
    return [(n, m) for n, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]


@torch.no_grad()
def randomise_layer(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise the parameters the module owns, in place, from ``generator``."""
    if isinstance(module, _NORMS):
        module.reset_parameters()  # deterministic: weight 1, bias 0, running statistics reset
        return
    params = dict(module.named_parameters(recurse=False))
    big = [p for p in params.values() if p.ndim >= 2]
    fan_in = big[0][0].numel() if big else None
    for p in params.values():
        if p.ndim >= 2:
            bound = 1.0 / math.sqrt(max(1, p[0].numel()))
        elif fan_in is not None:
            bound = 1.0 / math.sqrt(max(1, fan_in))
        else:
            p.copy_(torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype))
            continue
        p.copy_((torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype) * 2 - 1) * bound)


def _maps(method: Callable[..., Tensor], model: nn.Module, x: Tensor, target: Tensor | None, bs: int | None) -> Tensor:
    parts = []
    with torch.enable_grad():
        for _, sl in row_blocks(1, x.shape[0], bs):
            parts.append(method(model, x[sl], None if target is None else target[sl]).detach())
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def model_randomisation(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | None,
    method: Callable[..., Tensor],
    attributions: Tensor | None = None,
    *,
    mode: str = "cascading",
    layers: Sequence[str] | None = None,
    abs: bool = True,
    return_cascade: bool = False,
    seed: int = 0,
    batch_size: BatchSize = "auto",
) -> Tensor | tuple[list[str], Tensor]:
    """Spearman correlation of trained vs randomised maps.

    Returns (B,) for the fully randomised model (one method call), or with ``return_cascade=True`` the
    layer names in the order they were randomised (top-down) and a (L, B) tensor: row l after
    randomising layers 1..l (``mode="cascading"``) or only layer l (``mode="independent"``).

    Args:
        method: attribution method ``method(model, inputs, target) -> map``.
        attributions: maps of the trained model if already computed.
        layers: names of the layers to randomise (default: every module that owns parameters).
        abs: correlate |A| (the paper's default display) instead of signed maps.
    """
    batch_size = resolve_batch_size(batch_size, model, inputs)
    if mode not in ("cascading", "independent"):
        raise ValueError(f"mode must be 'cascading' or 'independent', got {mode!r}.")
    validate(inputs, None, target)
    x = inputs.detach()
    b = x.shape[0]
    a0 = _maps(method, model, x, target, batch_size) if attributions is None else attributions.detach()
    all_layers = randomisable_layers(model)
    index = {n: i for i, (n, _) in enumerate(all_layers)}
    if layers is not None:
        missing = [n for n in layers if n not in index]
        if missing:
            raise ValueError(f"unknown layers {missing}; layers owning parameters: {list(index)}.")
        chosen = sorted(layers, key=index.__getitem__)
    else:
        chosen = [n for n, _ in all_layers]
    if not chosen:
        raise ValueError("the model has no parameters to randomise.")
    order = list(reversed(chosen))  # top-down
    device = next(model.parameters()).device

    def gen(name: str) -> torch.Generator:
        # mixed so that seed 0 does not replay torch.manual_seed(0) initialisation of the first layer
        return make_generator(device, (seed + 1) * 1_000_003 + 7919 * (index[name] + 1))

    # Spearman = Pearson of ranks: the trained maps are ranked once for every step (each step's maps are
    # ranked as they come, so memory stays at one step's maps whatever the depth)
    r0 = rankdata((a0.abs() if abs else a0).reshape(b, -1))

    def corr(a: Tensor) -> Tensor:  # ranks in the maps' precision (same order), correlation in float64
        if a.shape != a0.shape:
            raise ValueError(
                f"the method's maps have shape {tuple(a.shape)} but attributions= has {tuple(a0.shape)}; pass "
                "the maps this method gives for the inputs (or attributions=None to compute them)."
            )
        q = a.reshape(b, -1).to(a0.dtype)
        return pearson(r0, rankdata(q.abs() if abs else q))

    copy_ = copy_model(model)
    mods = dict(copy_.named_modules())
    if not return_cascade:
        for n in order:
            randomise_layer(mods[n], gen(n))
        out = corr(_maps(method, copy_, x, target, batch_size))
        del copy_
        return out
    rows = []
    for i, n in enumerate(order):
        if mode == "independent" and i > 0:
            copy_ = copy_model(model)
            mods = dict(copy_.named_modules())
        randomise_layer(mods[n], gen(n))
        rows.append(corr(_maps(method, copy_, x, target, batch_size)))
    del copy_
    return order, torch.stack(rows)
