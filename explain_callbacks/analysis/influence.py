"""Training-data attribution by TracIn: which training samples made a prediction (methods.md section 8).

TracIn (Pruthi et al. 2020, "Estimating Training Data Influence by Tracing Gradient Descent", NeurIPS)
scores the influence of a training sample ``z`` on a test sample ``z'`` along the training trajectory::

    TracIn(z, z') = sum_t  eta_t * grad l(w_t, z) . grad l(w_t, z')

over checkpoints ``w_t`` taken with learning rate ``eta_t`` (TracInCP). Positive scores are
*proponents* (a step on ``z`` lowered the loss of ``z'``), negative ones *opponents*. The
*self-influence* ``sum_t eta_t |grad l(w_t, z)|^2`` is large for samples the model keeps fighting:
mislabelled samples rank first.

Choices made here (said, because they change the numbers):

- Per-sample gradients come from ``torch.func``: ``vmap(grad(loss of functional_call(model, params, x_i)))``,
  ``batch_size`` rows per call, differentiated with respect to the parameters of ``layers`` only (module
  names as in Captum; ``"last"``: the last module holding parameters, the cheap default of the paper's
  experiments; ``None``: every parameter). The model runs in eval mode (dropout off, BatchNorm on its
  running statistics), under :func:`~explain_callbacks._internal.guard.model_guard`, so calling these
  functions leaves the model, its ``.grad`` and the global RNG as they were.
- ``projection_dim=k`` replaces each gradient ``g`` (``D`` values) by ``R^T g / sqrt(k)`` with a Gaussian
  ``R`` (``D x k``, seeded, never the global RNG): inner products are preserved in expectation
  (Johnson-Lindenstrauss; TracInCPFastRandProj's idea) and memory drops from ``D`` to ``k`` per sample.
- ``lrs`` weight the checkpoints. TracIn's derivation assumes SGD, where the step is ``-eta * g``. Under
  Adam the step is ``-eta * m_hat / (sqrt(v_hat) + eps)``: the SGD form with the current learning rate is
  what Captum computes and what ``preconditioners=None`` gives; ``preconditioners`` (see
  :func:`adam_preconditioner`) weight each coordinate by ``1 / (sqrt(v_hat) + eps)``, the inner product in
  Adam's metric (momentum is not modelled).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .._internal.guard import model_guard

__all__ = [
    "InfluenceCheckpoint",
    "RandomProjection",
    "adam_preconditioner",
    "layer_parameters",
    "per_sample_gradients",
    "self_influence",
    "tracin_scores",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
CheckpointLike = Union[nn.Module, Mapping[str, Any], str, "os.PathLike[str]"]
Layers = Union[str, Sequence[str], None]


def layer_parameters(model: nn.Module, layers: Layers = None) -> list[str]:
    """Names of the parameters that TracIn differentiates: those of the modules ``layers`` (names as in
    ``model.named_modules()``, their submodules included), of the last module holding parameters for
    ``"last"``, or every parameter for None."""
    names = [n for n, _ in model.named_parameters()]
    if layers is None:
        return names
    if isinstance(layers, str) and layers == "last":
        last = None
        for mname, module in model.named_modules():
            if any(True for _ in module.parameters(recurse=False)):
                last = mname
        if last is None:
            raise ValueError(f"{type(model).__name__} has no parameters: TracIn needs a trainable model.")
        layers = [last]
    elif isinstance(layers, str):
        layers = [layers]
    modules = dict(model.named_modules())
    out: list[str] = []
    for layer in layers:
        if layer not in modules:
            shown = [n for n in modules if n][:15]
            raise ValueError(f"layers: no module named {layer!r} in {type(model).__name__}; modules: {shown}.")
        prefix = f"{layer}." if layer else ""
        found = [n for n in names if n.startswith(prefix)]
        if not found:
            raise ValueError(f"layers: module {layer!r} holds no parameters; pick one that does (or layers=None).")
        out += [n for n in found if n not in out]
    return out


class RandomProjection:
    """``g -> R^T g / sqrt(k)`` with ``R`` a ``D x k`` standard Gaussian matrix drawn from a generator seeded
    with ``seed`` (the same ``R`` for every call and checkpoint, so projected inner products are comparable).

    ``R`` is cached when it takes at most ``cache_bytes``; otherwise it is regenerated block by block on
    every call (memory ``block_rows x k``), trading time for memory on large layers.
    """

    def __init__(self, dim_in: int, dim_out: int, seed: int = 0, cache_bytes: int = 64 * 2**20,
                 block_rows: int = 65536) -> None:  # fmt: skip
        if dim_out < 1:
            raise ValueError(f"projection_dim must be >= 1, got {dim_out}.")
        self.dim_in, self.dim_out, self.seed, self.block_rows = dim_in, dim_out, seed, block_rows
        self._cached: Tensor | None = None
        self._cache = dim_in * dim_out * 4 <= cache_bytes

    def _blocks(self, device: torch.device) -> Iterator[tuple[int, Tensor]]:
        if self._cached is not None:
            yield 0, self._cached.to(device)
            return
        gen = torch.Generator().manual_seed(self.seed)
        whole = []
        for start in range(0, self.dim_in, self.block_rows):
            rows = min(self.block_rows, self.dim_in - start)
            block = torch.randn(rows, self.dim_out, generator=gen) / math.sqrt(self.dim_out)
            if self._cache:
                whole.append(block)
            yield start, block.to(device)
        if self._cache:
            self._cached = torch.cat(whole)

    def __call__(self, g: Tensor) -> Tensor:
        out = g.new_zeros(g.shape[0], self.dim_out)
        for start, block in self._blocks(g.device):
            out += g[:, start : start + block.shape[0]] @ block.to(g.dtype)
        return out


@dataclass
class InfluenceCheckpoint:
    """One point of the trajectory: the parameters and buffers to evaluate the model at, the learning
    rate ``lr`` and an optional per-parameter weight ``scale`` (name -> tensor or number, e.g. per-group
    learning rates or :func:`adam_preconditioner`) multiplying the inner product coordinate-wise."""

    state: dict[str, Tensor]
    lr: float = 1.0
    scale: Mapping[str, Tensor | float] | None = None


def adam_preconditioner(optimizer: torch.optim.Optimizer, model: nn.Module, names: Sequence[str] | None = None
                        ) -> dict[str, Tensor]:  # fmt: skip
    """Adam's coordinate weights ``1 / (sqrt(v_hat) + eps)`` (``v_hat = exp_avg_sq / (1 - beta2^step)``)
    for the named parameters of ``model``, read from ``optimizer``'s state (Adam, AdamW); parameters without
    such state (not stepped yet, another optimiser) get weight 1. Pass as a checkpoint's ``scale``."""
    params = dict(model.named_parameters())
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out: dict[str, Tensor] = {}
    for name in names if names is not None else list(params):
        p = params[name]
        state = optimizer.state.get(p, {})
        group = groups.get(id(p), {})
        v = state.get("exp_avg_sq")
        if v is None or "betas" not in group:
            out[name] = torch.ones_like(p, dtype=torch.float32)
            continue
        step = float(state.get("step", 1))
        v_hat = v.detach().float() / (1 - group["betas"][1] ** max(step, 1.0))
        out[name] = 1.0 / (v_hat.sqrt() + group.get("eps", 1e-8))
    return out


def per_sample_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    *,
    names: Sequence[str] | None = None,
    state: Mapping[str, Tensor] | None = None,
    scale: Mapping[str, Tensor | float] | None = None,
    projection: RandomProjection | None = None,
    batch_size: int = 64,
) -> Tensor:
    """Flattened per-sample gradients ``(N, D)`` (or ``(N, k)`` projected) of ``loss_fn(model(x_i), y_i)``
    with respect to the parameters ``names`` (default: all), evaluated at ``state`` (parameters/buffers by
    name; default: the model's own). ``loss_fn`` is called on one-row batches, so a ``"mean"`` or ``"sum"``
    reduction gives the same per-sample loss. With ``scale`` each coordinate is multiplied by
    ``sqrt(scale)``, so inner products of two outputs are weighted by ``scale``. ``batch_size`` rows per
    ``vmap`` call bound memory by ``batch_size x D``. The model is called as it is: use it in eval mode
    (:func:`tracin_scores` does)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    full = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    if state is not None:
        full.update(state)
    full = {k: v.detach() for k, v in full.items()}
    names = list(names) if names is not None else [n for n, _ in model.named_parameters()]
    diff = {n: full[n] for n in names}
    fixed = {k: v for k, v in full.items() if k not in diff}
    roots = None
    if scale is not None:
        roots = {n: torch.as_tensor(scale[n], dtype=diff[n].dtype, device=diff[n].device).sqrt() for n in names}

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, {**fixed, **p}, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    chunks = []
    for s in range(0, x.shape[0], batch_size):
        g = per_sample(diff, x[s : s + batch_size], y[s : s + batch_size])
        if roots is not None:
            g = {n: g[n] * roots[n] for n in names}
        flat = torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], dim=1)
        chunks.append(projection(flat) if projection is not None else flat)
    if not chunks:
        return x.new_zeros(0, projection.dim_out if projection is not None else sum(diff[n].numel() for n in names))
    return torch.cat(chunks)


def _load(item: str | os.PathLike[str]) -> dict[str, Any]:
    # weights only: a checkpoint file never executes code when loaded
    return torch.load(item, map_location="cpu", weights_only=True)


def _checkpoints(model_or_checkpoints: CheckpointLike | Sequence[CheckpointLike], model: nn.Module | None,
                 lrs: float | Sequence[float] | None) -> tuple[nn.Module, list[InfluenceCheckpoint]]:  # fmt: skip
    items: list[Any]
    if isinstance(model_or_checkpoints, (nn.Module, Mapping, str, os.PathLike)):
        items = [model_or_checkpoints]
    else:
        items = list(model_or_checkpoints)
    if not items:
        raise ValueError("model_or_checkpoints is empty: pass a model, or a list of models / state dicts / files.")
    template = model if model is not None else next((m for m in items if isinstance(m, nn.Module)), None)
    if template is None:
        raise ValueError("checkpoints given as state dicts or files need model= (a module of the same architecture).")
    if lrs is None or isinstance(lrs, (int, float)):
        lr_list: list[float | None] = [None if lrs is None else float(lrs)] * len(items)
    else:
        lr_list = [float(v) for v in lrs]
        if len(lr_list) != len(items):
            raise ValueError(f"lrs has {len(lr_list)} values for {len(items)} checkpoints; give one per checkpoint.")
    expected = {**dict(template.named_parameters()), **dict(template.named_buffers())}
    out = []
    for i, (item, lr) in enumerate(zip(items, lr_list)):
        saved_lr = None
        if isinstance(item, nn.Module):
            state = {**dict(item.named_parameters()), **dict(item.named_buffers())}
        else:
            raw = _load(item) if isinstance(item, (str, os.PathLike)) else dict(item)
            if "state_dict" in raw and isinstance(raw["state_dict"], Mapping):  # a Lightning checkpoint
                try:
                    saved_lr = float(raw["optimizer_states"][0]["param_groups"][0]["lr"])
                except (KeyError, IndexError, TypeError):
                    saved_lr = None
                raw = dict(raw["state_dict"])
            state = {k: v for k, v in raw.items() if isinstance(v, Tensor)}
        missing = [k for k in expected if k not in state]
        if missing:
            raise ValueError(
                f"checkpoint {i} lacks {missing[:5]} of the model's parameters/buffers (keys found: "
                f"{list(state)[:5]}); pass the module the checkpoint was saved from as model= (for a Lightning "
                "checkpoint: the LightningModule)."
            )
        state = {k: state[k].to(expected[k].device) for k in expected}
        out.append(InfluenceCheckpoint(state, lr if lr is not None else (saved_lr if saved_lr is not None else 1.0)))
    return template, out


def _setup(model_or_checkpoints: Any, model: nn.Module | None, lrs: Any, layers: Layers,
           preconditioners: Sequence[Mapping[str, Tensor] | None] | None, projection_dim: int | None, seed: int,
           ) -> tuple[nn.Module, list[InfluenceCheckpoint], list[str], RandomProjection | None]:  # fmt: skip
    template, checkpoints = _checkpoints(model_or_checkpoints, model, lrs)
    names = layer_parameters(template, layers)
    if preconditioners is not None:
        if len(preconditioners) != len(checkpoints):
            raise ValueError(f"preconditioners: {len(preconditioners)} for {len(checkpoints)} checkpoints.")
        for ckpt, pre in zip(checkpoints, preconditioners):
            ckpt.scale = pre
    dim = sum(dict(template.named_parameters())[n].numel() for n in names)
    projection = None if projection_dim is None else RandomProjection(dim, projection_dim, seed)
    return template, checkpoints, names, projection


def tracin_scores(
    model_or_checkpoints: CheckpointLike | Sequence[CheckpointLike],
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    *,
    layers: Layers = None,
    lrs: float | Sequence[float] | None = None,
    model: nn.Module | None = None,
    preconditioners: Sequence[Mapping[str, Tensor] | None] | None = None,
    projection_dim: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> Tensor:
    """TracIn influence ``(n_test, n_train)`` of every training sample on every test sample (Pruthi et al. 2020):
    ``sum_t lrs[t] * grad l(w_t, train_j) . grad l(w_t, test_i)``.

    Args:
        model_or_checkpoints: a model (one checkpoint: its current weights), or a sequence of models, state
            dicts, Lightning checkpoint dicts or checkpoint files (loaded with ``weights_only=True``).
        train_x, train_y, test_x, test_y: samples and the labels the loss is taken at.
        loss_fn: per-sample loss ``loss_fn(output, target)``, called on one-row batches (default cross-entropy).
        layers: module names whose parameters are differentiated; ``"last"``; None: all (Captum's default).
        lrs: the learning rate of each checkpoint (a number for all). None: the rate saved in a Lightning
            checkpoint, else 1.
        model: the module to evaluate state dicts / files with (needed when no checkpoint is a module).
        preconditioners: per checkpoint, per-parameter coordinate weights (:func:`adam_preconditioner`).
        projection_dim: project gradients to this many dimensions (seeded by ``seed``); None: exact.
        batch_size: rows per ``vmap`` call; memory is ``(n_test + batch_size) x D`` (or ``k``) at a time.

    The model is evaluated in eval mode and left as it was (mode, ``.grad``, RNG).
    """
    template, checkpoints, names, projection = _setup(
        model_or_checkpoints, model, lrs, layers, preconditioners, projection_dim, seed
    )
    scores = torch.zeros(test_x.shape[0], train_x.shape[0], dtype=torch.float64, device=test_x.device)
    with model_guard(template):
        for ckpt in checkpoints:
            kw = dict(names=names, state=ckpt.state, scale=ckpt.scale, projection=projection, batch_size=batch_size)
            g_test = per_sample_gradients(template, test_x, test_y, loss_fn, **kw)
            for s in range(0, train_x.shape[0], batch_size):
                g_train = per_sample_gradients(template, train_x[s : s + batch_size], train_y[s : s + batch_size],
                                               loss_fn, **kw)  # fmt: skip
                scores[:, s : s + batch_size] += ckpt.lr * (g_test @ g_train.T).double()
    return scores


def self_influence(
    model_or_checkpoints: CheckpointLike | Sequence[CheckpointLike],
    train_x: Tensor,
    train_y: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    *,
    layers: Layers = None,
    lrs: float | Sequence[float] | None = None,
    model: nn.Module | None = None,
    preconditioners: Sequence[Mapping[str, Tensor] | None] | None = None,
    projection_dim: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> Tensor:
    """TracIn self-influence ``(n_train,)``: ``sum_t lrs[t] * |grad l(w_t, z)|^2`` (Pruthi et al. 2020, section 4.1:
    the highest values flag mislabelled samples). Arguments as in :func:`tracin_scores`; memory is
    ``batch_size x D`` at a time."""
    template, checkpoints, names, projection = _setup(
        model_or_checkpoints, model, lrs, layers, preconditioners, projection_dim, seed
    )
    out = torch.zeros(train_x.shape[0], dtype=torch.float64, device=train_x.device)
    with model_guard(template):
        for ckpt in checkpoints:
            kw = dict(names=names, state=ckpt.state, scale=ckpt.scale, projection=projection, batch_size=batch_size)
            for s in range(0, train_x.shape[0], batch_size):
                g = per_sample_gradients(template, train_x[s : s + batch_size], train_y[s : s + batch_size],
                                         loss_fn, **kw)  # fmt: skip
                out[s : s + batch_size] += ckpt.lr * g.double().pow(2).sum(1)
    return out
