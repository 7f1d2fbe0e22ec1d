"""Model-parameter randomisation sanity check (Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim
2018, "Sanity Checks for Saliency Maps", NeurIPS, arXiv:1810.03292).

Layers are re-initialised from the top (output) down, cascading; after each one the method is re-run
and the per-sample Spearman rank correlation between the maps of the trained and the randomised
model is reported (of |A| by default, as the paper's figures and Quantus' ``MPRT``). A method that
depends on the learned weights falls towards 0; one that does not (an edge detector) stays high.

The user's model is never modified, and never copied (unless it holds TorchScript modules, whose
compiled code does not see swapped attributes): :func:`randomised_view` swaps fresh tensors
into the parameter and buffer slots of the layers being randomised (and clones of every buffer, so a
forward pass in training mode cannot move the trained running statistics), and puts the very same
tensor objects back on exit. Their values, version counters, ``.grad`` and ``requires_grad`` are never
touched, so an optimiser or a live autograd graph holding them is unaffected, and a LightningModule
that cannot be deep-copied (a lock, a data loader, a logger handle) works too. Weights are drawn from a
seeded ``torch.Generator`` per layer (PyTorch's default ``U(±1/√fan_in)`` for weights and biases of
layers with a ≥2-D weight; normalisation layers are reset to their identity initialisation, as
``reset_parameters``), so the fully randomised model is the same however it was reached.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..._internal.batching import BatchSize, _structure_changed, resolve_batch_size
from ..._internal.ops import rankdata
from ...attribution.base import make_generator
from ._guard import model_left_as_found
from ._utils import MethodRuns, Target, check_finite_map, method_inputs, prepare_target, row_blocks, validate

__all__ = ["layer_generator", "model_randomisation", "randomisable_layers", "randomise_layer", "randomised_view"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
#: map elements of the randomised steps kept before they are ranked together (32 MiB of float32)
_RANK_ELEMENTS = 1 << 23


def _subclass_names(classes: tuple[type, ...]) -> frozenset[str]:
    names, todo = set(), list(classes)
    while todo:
        c = todo.pop()
        names.add(c.__name__)
        todo.extend(c.__subclasses__())
    return frozenset(names)


_NORM_NAMES = _subclass_names(_NORMS)  # TorchScript modules keep their class name in ``original_name``


def randomisable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules owning parameters directly, in registration (input-to-output) order."""
    return [(n, m) for n, m in model.named_modules() if _owns_parameters(m)]


def _owns_parameters(module: nn.Module) -> bool:
    if isinstance(module, torch.jit.ScriptModule):  # its _parameters is a wrapper of the compiled module's
        return next(module.parameters(recurse=False), None) is not None
    return any(p is not None for p in module._parameters.values())  # parameters(recurse=False), without a walk


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or (
        getattr(module, "original_name", None) in _NORM_NAMES and isinstance(module, torch.jit.ScriptModule)
    )


def _fresh_parameters(module: nn.Module, generator: torch.Generator) -> dict[str, Tensor]:
    """New values of the parameters a layer that is not a norm layer owns, by slot name, drawn from
    ``generator`` in slot order (PyTorch's default ``U(±1/√fan_in)``; 1-D parameters of a layer without a
    ≥2-D weight: N(0, 1)). Each is a fresh contiguous tensor: in-place draws fill memory order, so a
    channels_last weight would get other values at each index than the same weight stored contiguously.
    Fresh tensors that do not require grad: no grad mode needed."""
    params = [(n, p) for n, p in module._parameters.items() if p is not None]
    # fan-in: the elements of one output row of the first >=2-D parameter (p[0].numel(), without a view)
    fan_in = next((math.prod(p.shape[1:]) for _, p in params if p.ndim >= 2), None)
    out = {}
    for name, p in params:
        fresh = torch.empty(p.shape, dtype=p.dtype, device=p.device)
        if p.ndim < 2 and fan_in is None:
            fresh.normal_(generator=generator)
        else:
            bound = 1.0 / math.sqrt(max(1, math.prod(p.shape[1:]) if p.ndim >= 2 else fan_in))
            fresh.uniform_(-bound, bound, generator=generator)
        out[name] = fresh
    return out


@torch.no_grad()
def randomise_layer(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise the parameters the module owns, in place, from ``generator``."""
    if isinstance(module, _NORMS):
        module.reset_parameters()  # deterministic: weight 1, bias 0, running statistics reset
        return
    if _is_norm(module):  # a compiled norm layer has no Python reset_parameters: the same reset, by name
        for name, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None:
                t.fill_(1 if name in ("weight", "running_var") else 0)
        return
    for name, fresh in _fresh_parameters(module, generator).items():
        module._parameters[name].copy_(fresh)


Randomise = Callable[[str, torch.Generator | None], None]


def _deepcopy_sharing_trainer(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares (does not copy) a Lightning trainer or Fabric it refers to."""
    memo: dict[int, object] = {}
    for m in model.modules():
        for attr in ("_trainer", "_fabric", "_fabric_optimizers", "_device_mesh"):
            v = m.__dict__.get(attr)
            if v is not None and not isinstance(v, (Tensor, nn.Module)):
                memo[id(v)] = v
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def randomised_view(model: nn.Module) -> Iterator[tuple[nn.Module, Randomise]]:
    """A context in which layers of ``model`` can be re-initialised without touching its tensors.

    Yields ``(view, randomise)``: run the method on ``view``; ``randomise(name, generator)`` re-draws the
    layer ``name`` (of :func:`randomisable_layers`) with :func:`randomise_layer`; ``randomise(name, None)``
    calls the layer's own ``reset_parameters()`` on the clones, drawing from the global RNG (fork and seed it
    around the call). ``view`` is ``model``
    itself: the layer's parameters (in every slot that shares them, so tied weights stay tied) and
    buffers are replaced by clones, which are then re-drawn in place. On entry every buffer of the model
    is replaced by a clone as well (a forward pass in training mode updates BatchNorm statistics in
    place). On exit every slot gets its original tensor object back (parameters through ``setattr``, so
    modules that keep other references to their weights, as ``nn.LSTM``'s ``_flat_weights``, follow), and
    so does every plain tensor attribute (the old ``weight_norm`` hook recomputes ``weight`` there). A
    weight kept only outside the module's slots (in a list, say) is not seen, hence not re-drawn. TorchScript
    modules run compiled code that does not see swapped attributes: a model containing one is deep-copied
    instead, and ``view`` is the copy.
    """
    mods = dict(model.named_modules())  # one walk of the module tree (the set model.modules() gives)
    if any(isinstance(m, torch.jit.ScriptModule) for m in mods.values()):
        copy_ = _deepcopy_sharing_trainer(model)
        copies = dict(copy_.named_modules())
        def randomise_copy(name: str, generator: torch.Generator | None) -> None:
            with torch.no_grad():
                copies[name].reset_parameters() if generator is None else randomise_layer(copies[name], generator)

        yield copy_, randomise_copy
        return
    # id(original tensor) -> the slots holding it: (owner, name, is it a buffer slot)
    slots: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for m in mods.values():
        for store, is_buffer in ((m._parameters, False), (m._buffers, True)):
            for name, t in store.items():
                if t is not None:
                    slots.setdefault(id(t), []).append((m, name, is_buffer))
    saved: list[tuple[nn.Module, str, bool, Tensor]] = []  # (owner, name, is_buffer, original), in swap order
    # plain tensors modules keep in their __dict__ (the old weight_norm / spectral_norm hooks recompute
    # ``weight`` there from the swapped parameters): put back as found
    plain = [(m, k, v) for m in mods.values() for k, v in vars(m).items() if isinstance(v, Tensor)]

    from torch.nn.modules.module import _global_parameter_registration_hooks as global_hooks

    def put(owner: nn.Module, name: str, is_buffer: bool, t: Tensor) -> None:
        if is_buffer:  # straight into the buffer dict: setattr would turn a Parameter into a parameter slot
            owner._buffers[name] = t
        elif (
            type(owner).__setattr__ is nn.Module.__setattr__
            and owner._parameters.get(name) is not None
            and all(h is _structure_changed for h in global_hooks.values())
        ):  # what setattr of a Parameter into an existing slot does, without its checks (a third of a swap).
            # The one global hook allowed is the package's own structure counter (installed on first use):
            # a swap keeps every module, shape, dtype and device, so it is no structure change, and telling
            # the counter would make the next method call walk the whole model again
            owner._parameters[name] = t
        else:  # setattr: modules that keep other references to their weights (nn.LSTM) follow
            setattr(owner, name, t)

    def swap(t: Tensor, value: Tensor | None = None) -> None:
        """Put a new tensor (a clone of ``t``, or ``value``) into every slot holding the original ``t``; called
        under ``no_grad`` (entered once per layer, not per tensor: its entry costs as much as a small swap)."""
        if id(t) not in slots:
            if value is not None:  # a clone of ours already: re-drawn in place
                t.copy_(value)
            return  # (the originals stay alive in ``saved``: no id is reused)
        new = t.clone() if value is None else value
        if value is not None and not t.is_contiguous():  # the original's layout kept (channels_last stays so)
            new = torch.empty_like(t).copy_(value)
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, t.requires_grad)
        for owner, name, is_buffer in slots.pop(id(t)):
            saved.append((owner, name, is_buffer, t))
            put(owner, name, is_buffer, new)

    @torch.no_grad()
    def randomise(name: str, generator: torch.Generator | None) -> None:
        module = mods[name]
        if generator is None:  # the layer's own initialisation, from the global RNG (seeded by the caller), on
            # clones of every tensor under it: a reset_parameters() may re-initialise its children too
            for t in [*module.parameters(), *module.buffers()]:
                swap(t)
            module.reset_parameters()
            return
        if _is_norm(module):  # reset in place, on clones
            for store in (module._parameters, module._buffers):
                for t in list(store.values()):
                    if t is not None:
                        swap(t)
            randomise_layer(module, generator)
            return
        # the fresh draws go into the slots themselves (no clone of the trained values to overwrite)
        fresh = _fresh_parameters(module, generator)
        for n, t in list(module._parameters.items()):
            if t is not None:
                swap(t, fresh[n])
        for t in list(module._buffers.values()):
            if t is not None:
                swap(t)

    try:
        with torch.no_grad():
            for m in mods.values():
                for t in list(m._buffers.values()):
                    if t is not None:
                        swap(t)
        yield model, randomise
    finally:
        for owner, name, is_buffer, t in reversed(saved):
            put(owner, name, is_buffer, t)
        for m, k, v in plain:
            m.__dict__[k] = v


def check_draws(draws: str) -> str:
    """``draws`` of :func:`model_randomisation`, or a ValueError naming the choices."""
    if draws not in ("seeded", "reset_parameters"):
        raise ValueError(f"draws must be 'seeded' or 'reset_parameters', got {draws!r}.")
    return draws


def layer_generator(device: torch.device, seed: int, layer_index: int) -> torch.Generator:
    """The generator that re-draws layer ``layer_index`` (of :func:`randomisable_layers`) for ``seed``."""
    # mixed so that seed 0 does not replay torch.manual_seed(0) initialisation of the first layer
    return make_generator(device, (seed + 1) * 1_000_003 + 7919 * (layer_index + 1))


def _maps(runs: MethodRuns, model: nn.Module, x: Tensor, target: Tensor | None, bs: int | None) -> Tensor:
    if bs is None or bs >= x.shape[0]:  # one block (the method chunks its own calls)
        return runs(model, x, target)
    parts = [runs(model, x[sl], None if target is None else target[sl]) for _, sl in row_blocks(1, x.shape[0], bs)]
    return torch.cat(parts)


@model_left_as_found
def model_randomisation(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    method: Callable[..., Tensor],
    attributions: Tensor | None = None,
    *,
    mode: str = "cascading",
    layers: Sequence[str] | None = None,
    abs: bool = True,
    return_cascade: bool = False,
    seed: int = 0,
    draws: str = "seeded",
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
        seed: the fresh weights' seed.
        draws: ``"seeded"`` (default): each layer from its own generator (:func:`layer_generator`), the global
            RNG untouched; ``"reset_parameters"``: each layer's own ``reset_parameters()`` after
            ``torch.manual_seed(seed + 1)``, in a forked global RNG (left as found) — the draws of Quantus'
            ``MPRT`` (Hedström et al. 2023) with ``seed=`` its seed, so the two give equal values; every
            chosen layer needs a ``reset_parameters`` method.
    """
    batch_size = resolve_batch_size(batch_size, model, inputs)
    if mode not in ("cascading", "independent"):
        raise ValueError(f"mode must be 'cascading' or 'independent', got {mode!r}.")
    check_draws(draws)
    target = prepare_target(model, inputs, target)
    validate(inputs, None, target, inputs_checked=True)  # prepare_target checked them
    x = method_inputs(inputs)
    b = x.shape[0]
    runs = MethodRuns(method)  # checked once, then re-run without repeating the checks
    a0 = _maps(runs, model, x, target, batch_size) if attributions is None else attributions.detach().to(x.device)
    check_finite_map(a0)  # NaN ranks would correlate as numbers
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
    if draws == "reset_parameters":
        modules = dict(model.named_modules())
        no_reset = [n for n in chosen if not callable(getattr(modules[n], "reset_parameters", None))]
        if no_reset:
            raise ValueError(
                f"draws='reset_parameters' needs a reset_parameters() method on every layer randomised; {no_reset} "
                "have none. Pass layers= without them, or draws='seeded'."
            )
    cuda = device.type == "cuda"
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []

    def redraw(randomise: Randomise, name: str) -> None:
        if draws == "seeded":
            randomise(name, layer_generator(device, seed, index[name]))
            return
        if cuda:
            with torch.random.fork_rng(devices=devices):  # the global RNGs are left as found
                torch.manual_seed(seed + 1)  # before each layer, as Quantus' random-layer generator
                randomise(name, None)
            return
        # the CPU generator alone: torch.manual_seed also seeds every accelerator (~100 us a layer, as much as an
        # 8-row pass of a small MLP); the CPU draws are the same
        cpu = torch.default_generator
        state = cpu.get_state()
        try:
            cpu.manual_seed(seed + 1)
            randomise(name, None)
        finally:
            cpu.set_state(state)

    # Each step's maps are kept and ranked together with the next steps' (one sort of all their rows instead
    # of a sort's fixed cost per step; the trained maps ride along in the first group, so they cost no sort
    # of their own), in groups of at most _RANK_ELEMENTS map elements, so memory stays bounded whatever the
    # depth. Spearman = Pearson of the average ranks, whose mean is (n + 1) / 2 in every row: centred ranks,
    # one product per row with the trained ones; 0 where either side is constant (as ops.spearman_to)
    n_el = a0[0].numel()
    pending: list[Tensor] = [a0]
    trained: list[Tensor] = []  # [centred ranks of the trained maps (B, n), their sums of squares (B,)]
    rows: list[Tensor] = []

    def flush() -> None:
        if not pending:
            return
        q = torch.stack([p.to(a0.dtype) for p in pending]).reshape(len(pending), b, n_el)
        r = rankdata(q.abs() if abs else q).sub_((n_el + 1) / 2)
        pending.clear()
        if not trained:
            trained.extend((r[0], torch.linalg.vecdot(r[0], r[0])))
            r = r[1:]
        if r.shape[0]:
            den = (trained[1] * torch.linalg.vecdot(r, r)).sqrt()
            rho = torch.linalg.vecdot(r, trained[0].expand_as(r)) / den.clamp_min(1e-300)
            rows.extend(torch.where(den > 0, rho, 0.0).unbind(0))

    def randomised_maps(view: tuple[nn.Module, Randomise], names: Sequence[str]) -> None:
        for n in names:
            redraw(view[1], n)
        a = _maps(runs, view[0], x, target, batch_size)
        if a.shape != a0.shape:
            raise ValueError(
                f"the method's maps have shape {tuple(a.shape)} but attributions= has {tuple(a0.shape)}; pass "
                "the maps this method gives for the inputs (or attributions=None to compute them)."
            )
        pending.append(a)
        if len(pending) * a.numel() >= _RANK_ELEMENTS:
            flush()

    if not return_cascade:
        with randomised_view(model) as view:
            randomised_maps(view, order)
        flush()
        return rows[0]
    if mode == "independent":  # each layer alone, on the trained model
        for n in order:
            with randomised_view(model) as view:
                randomised_maps(view, [n])
    else:
        with randomised_view(model) as view:
            for n in order:
                randomised_maps(view, [n])
    flush()
    return order, torch.stack(rows)
