"""The LRP attributor: rules applied by forward hooks for the length of one call.

Layer-wise relevance propagation (Bach et al. 2015, "On pixel-wise explanations for non-linear
classifier decisions by layer-wise relevance propagation", PLoS ONE; Montavon et al. 2019, "Layer-wise
relevance propagation: an overview"). The relevance of the explained output f_c(x) (its value, so
that the map sums to f_c up to what biases and stabilisers absorb) is handed back layer by layer by
each layer's rule, chosen by a :class:`~.composites.Composite`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..._internal.batching import BatchSize, chunks, select_output
from ..._internal.guard import ModelState
from ..._internal.outputs import read_scores
from ..._internal.registry import ATTRIBUTIONS
from ..._internal.target_ops import TargetOperator
from ..base import Attributor
from .canonizers import (
    GATE_MODULES,
    FunctionGuard,
    InplaceOff,
    _FunctionSum,
    merged_params,
    probe_plan,
    refuse_unsupported,
)
from .composites import Composite, build_composite
from .rules import Rule, _TermRule

__all__ = ["LRP", "lrp_hooks"]


def _rule_hooks(guard: FunctionGuard, module: nn.Module, rule: Rule, name: str) -> tuple[Any, Any]:
    def pre(_m: nn.Module, _args: tuple[Any, ...]) -> None:
        guard.depth += 1  # the layer's own operations are replaced by the rule: not inspected

    def post(m: nn.Module, args: tuple[Any, ...], out: Any) -> Tensor:
        try:
            if not isinstance(out, Tensor) and not getattr(rule, "tuple_output", False):
                raise TypeError(
                    f"LRP rule {rule.name!r} on layer {name!r} ({type(m).__name__}) needs a tensor output, got "
                    f"{type(out).__name__}; give this layer another rule (name_map={{{name!r}: ...}}) or composite."
                )
            result = rule.apply(m, args, out)
            if isinstance(m, GATE_MODULES):
                guard.gates.add(result)  # nn.Sigmoid's output scales another signal: a gate (Arras et al. 2017)
            return result
        finally:
            guard.depth -= 1  # after the rule: its own operations are not the model's

    return module.register_forward_pre_hook(pre), module.register_forward_hook(post)


def _merged_hooks(
    guard: FunctionGuard, layer: nn.Module, bn: nn.Module, rule: _TermRule
) -> tuple[Any, Any, Any]:
    """The layer's rule applied at the BatchNorm's output with the merged parameters, to the
    layer's input (saved by a pre-hook): the two run as one affine layer for LRP."""
    seen: list[Tensor] = []

    def save(_m: nn.Module, args: tuple[Any, ...]) -> None:
        seen[:] = [args[0]]

    def pre(_m: nn.Module, _args: tuple[Any, ...]) -> None:
        guard.depth += 1

    def post(m: nn.Module, _args: tuple[Any, ...], out: Tensor) -> Tensor:
        try:
            return rule.apply(layer, (seen[0],), out, params=merged_params(layer, m))
        finally:
            guard.depth -= 1

    return layer.register_forward_pre_hook(save), bn.register_forward_pre_hook(pre), bn.register_forward_hook(post)


@dataclass
class _Setup:
    """What one probe of a model found under one composite: its modules (held weakly, in ``modules()`` order),
    which ones get which rule, which BatchNorms are merged into which layer.
    Reused while the model's module tree is the same (same objects, same order): each call then skips the probe
    forward, the refusal and the rule lookups."""

    refs: list[weakref.ref]
    rules: list[tuple[int, str, Rule]]  # (module index, name, rule)
    merges: list[tuple[int, int, _TermRule]]  # (BatchNorm index, layer index, the layer's rule)
    sum_rule: Rule | None

    def valid(self, modules: list[nn.Module]) -> bool:
        return len(modules) == len(self.refs) and all(r() is m for r, m in zip(self.refs, modules))


def _signature(m: nn.Module) -> Any:
    """What of a module, beyond its identity, decides its part of the setup: a BatchNorm without running
    statistics is not merged."""
    return getattr(m, "running_mean", 0) is None


def _setup(model: nn.Module, modules: list[nn.Module], composite: Composite, row: Tensor, canonize: bool) -> _Setup:
    """The cached setup of ``model`` under ``composite`` for rows like ``row``, or a new one (probe forward)."""
    key = (canonize, tuple(row.shape[1:]), row.dtype, row.device, tuple(_signature(m) for m in modules))
    per_model = composite._setups.setdefault(model, {})
    setup = per_model.get(key)
    if setup is not None and setup.valid(modules):
        return setup
    refuse_unsupported(model)
    plan = probe_plan(model, row)
    index = {m: i for i, m in enumerate(modules)}
    names = {m: n for n, m in model.named_modules()}
    merges = []
    if canonize:
        for bn, layer in plan.merges.items():
            rule = composite.rule(names[layer], layer, layer is plan.first)
            if isinstance(rule, _TermRule):
                merges.append((index[bn], index[layer], rule))
    skip = {i for bn, layer, _ in merges for i in (bn, layer)}
    rules = []
    for i, m in enumerate(modules):
        if i in skip:
            continue
        rule = composite.rule(names[m], m, m is plan.first)
        if rule is not None:
            rules.append((i, names[m], rule))
    # additions met in the forward (a + b) get the rule the composite gives a Sum module
    sum_rule = composite.rule("<add>", _FunctionSum(torch.add, {}), False)
    setup = _Setup([weakref.ref(m) for m in modules], rules, merges, sum_rule)
    per_model[key] = setup
    return setup


@contextlib.contextmanager
def lrp_hooks(model: nn.Module, composite: Composite, row: Tensor, canonize: bool = True) -> Iterator[FunctionGuard]:
    """Within the block, the model's backward pass is LRP under ``composite``; the forward values
    are unchanged. Run the model inside the yielded guard (``with guard: model(x)``).

    The model is put in eval mode, its parameters frozen and in-place activations run out of place;
    on exit (also on an error) every hook is removed and modes, ``requires_grad`` flags, ``.grad``
    and ``inplace`` flags are restored. No parameter or buffer is written at any point. Which rule goes
    where is found by one probe forward of ``row`` per model, composite and row shape, and reused while the
    model's modules are the same objects.
    """
    state = ModelState.capture(model)
    inplace = InplaceOff()
    handles: list[Any] = []
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        modules = list(model.modules())
        inplace.apply_to(modules)
        setup = _setup(model, modules, composite, row, canonize)
        guard = FunctionGuard(sum_rule=setup.sum_rule)
        # AttnLRP's ε: the composite's stabiliser for parameter-free merges (that of its sum rule)
        guard.attention_epsilon = float(getattr(guard.sum_rule, "stabilizer", 1e-6))
        for bn, layer, rule in setup.merges:
            handles.extend(_merged_hooks(guard, modules[layer], modules[bn], rule))
        for i, name, rule in setup.rules:
            handles.extend(_rule_hooks(guard, modules[i], rule, name))
        guard.merged = {modules[layer]: modules[bn] for bn, layer, _ in setup.merges}  # layer -> its BatchNorm
        yield guard
    finally:
        for h in handles:
            h.remove()
        inplace.restore()
        state.restore(model)


def _output_relevance(scores: Tensor, target: Tensor | TargetOperator | None) -> Tensor:
    """The relevance put on the output: the explained score's own value at the target, 0 elsewhere
    (trailing dimensions of a segmentation output each keep their own value). For a target operator (a
    region, a position, a box): ``scores ⊙ ∂t(scores)/∂scores``, each output entry weighted by how much it
    counts in the explained scalar t; for the operators' weighted sums of entries this is again each
    selected entry's own value (times its weight), 0 elsewhere, so the relevance sums to t."""
    if isinstance(target, TargetOperator):
        s = scores.detach().requires_grad_(True)
        with torch.enable_grad():
            (w,) = torch.autograd.grad(target(s).sum(), s)
        return s.detach() * w
    s = scores.detach()
    if s.ndim == 1:  # regression
        return s
    if target is None:
        if s.shape[1] != 1:
            select_output(scores, None)  # raises the shared "no target" error
        target = torch.zeros(s.shape[0], dtype=torch.long, device=s.device)
    idx = target.view(-1, *([1] * (s.ndim - 1))).expand(-1, 1, *s.shape[2:])
    return torch.zeros_like(s).scatter_(1, idx, s.gather(1, idx))


@ATTRIBUTIONS.register("lrp")
class LRP(Attributor):
    """Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019) by modified
    backward passes over the user's ``nn.Module``.

    Args:
        composite: which rule goes where: ``"epsilon_plus_flat"`` (default: flat on the first layer,
            z⁺ on convolutions, ε on dense layers; Kohlbrenner et al. 2020's recommendation for CNNs,
            and it needs no input bounds), ``"epsilon_gamma_box"`` (needs ``low=``/``high=``, the
            input's bounds), ``"epsilon_alpha2_beta1"``, ``"epsilon"``, a ``{"name": ...}`` mapping or
            a :class:`~.composites.Composite`.
        layer_map: user rules by layer type, class name or group, before the composite's own, e.g.
            ``{"Conv2d": "gamma", "linear": {"name": "epsilon", "epsilon": 0.1}}``.
        name_map: user rules by module name, e.g. ``{"features.0": {"name": "zbox", "low": 0, "high": 1}}``.
        canonize: explain a BatchNorm that follows a Linear/Conv together with it (merged; the
            parameters are never written). False leaves BatchNorm to the composite (pass-through).
        batch_size: rows per model call (``"auto"``, an int, or None).
        **composite_kwargs: arguments of a named composite (``epsilon``, ``stabilizer``, ``gamma``,
            ``low``, ``high``).

    The map has the input's shape and sums to the explained score f_c(x) up to the relevance that
    biases and stabilisers absorb; ``last_info`` holds ``relevance_sum``, ``explained_output`` and
    ``completeness_error`` = |ΣR − f_c| / |f_c| per sample (0 on bias-free ReLU nets with z⁺/ε).
    Residual additions written ``a + b`` / ``torch.add`` / ``+=`` get the composite's rule for
    :class:`~.canonizers.Sum` (split in proportion to the summands), a product of a sigmoid gate and a
    signal gives all relevance to the signal (Arras et al. 2017); ``F.scaled_dot_product_attention`` gets
    AttnLRP (Achtibat et al. 2024; not conservative: the softmax rule absorbs a part); other products of two
    input-dependent tensors and ``nn.MultiheadAttention`` / transformer layers are refused, the errors naming
    the alternative methods.
    Not differentiable w.r.t. the parameters (``create_graph=True`` is refused).
    """

    name = "lrp"
    differentiable = False

    def __init__(
        self,
        composite: str | Mapping[str, Any] | Composite = "epsilon_plus_flat",
        layer_map: Mapping[Any, Any] | Sequence | None = None,
        name_map: Mapping[str, Any] | None = None,
        canonize: bool = True,
        batch_size: BatchSize = "auto",
        **composite_kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size)
        self._composite = build_composite(composite, **composite_kwargs).with_user_maps(layer_map, name_map)
        self.composite = self._composite.name
        self.canonize = canonize

    def __call__(self, model: nn.Module, inputs: Tensor, target: Tensor | int | None = None, *,
                 create_graph: bool = False, output_key: Any = None) -> Tensor:  # fmt: skip
        if create_graph:
            raise ValueError(
                "LRP maps are not differentiable w.r.t. the parameters (the rules' modified weights are constants); "
                "use a gradient method (input_x_gradient, ig, expected_gradients) for penalties."
            )
        return super().__call__(model, inputs, target, output_key=output_key)

    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"LRP hooks into the layers of an nn.Module, got {type(model).__name__}; pass the model itself "
                "(output_key= reads tuple/dict outputs), or use a gradient method for a plain function."
            )
        maps, total, explained = [], [], []
        with lrp_hooks(model, self._composite, inputs[:1].detach(), self.canonize) as guard:
            for sl in chunks(inputs.shape[0], self.batch_size):
                xc = inputs[sl].detach().requires_grad_(True)
                with guard:
                    out = model(xc)
                    scores = target.pick(out) if isinstance(target, TargetOperator) else read_scores(out)
                r0 = _output_relevance(scores, None if target is None else target[sl])
                (rel,) = torch.autograd.grad(scores, xc, grad_outputs=r0, allow_unused=True)
                if rel is None:
                    rel = torch.zeros_like(xc)
                maps.append(rel.detach())
                total.append(rel.detach().reshape(rel.shape[0], -1).sum(1))
                explained.append(r0.reshape(r0.shape[0], -1).sum(1))
        f = torch.cat(explained)
        s = torch.cat(total)
        self.last_info = {
            "relevance_sum": s,
            "explained_output": f,
            "completeness_error": (s - f).abs() / f.abs().clamp_min(1e-12),
        }
        return torch.cat(maps)

    def _repr_args(self) -> dict[str, Any]:
        return {"composite": self.composite, "canonize": self.canonize, "batch_size": self._batch_size}
