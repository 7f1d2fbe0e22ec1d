"""LRP rules: how one layer hands the relevance of its outputs to its inputs.

For a layer z_k = Σ_j a_j w_jk + b_k the rules share one shape (Montavon et al. 2019, "Layer-wise
relevance propagation: an overview", §10.2):

    R_j = Σ_i  a'_ij · Σ_k ρ_i(w_jk) · c_ik(z) · R_k

a list of *terms* i, each a modified input a' = m_i(a), modified parameters ρ_i(w), ρ_i(b) and an
output coefficient c_i (the stabilised 1/denominator, signed and masked). A rule is applied by a
forward hook that returns the layer's own output (a view: bit for bit the same values) wrapped in
an autograd function whose backward is the rule: given the incoming relevance R it runs the terms'
forwards f(a'_i; ρ_i(θ)) on detached inputs and returns Σ_i a'_i ⊙ ∂f/∂a'_i^T (c_i ⊙ R) (the
"gradient × input" form, Montavon et al. 2019 §10.2.3). The gradient that flows between layers is
the relevance itself.

Stabiliser: s(z) = z + ε·sign(z) with sign(0) = +1 (Bach et al. 2015), so a zero denominator never
divides by zero and the relevance it absorbs is the documented ε term.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AlphaBeta",
    "Epsilon",
    "Flat",
    "Gamma",
    "LSTMRule",
    "Norm",
    "Pass",
    "Rule",
    "WSquare",
    "ZBox",
    "ZPlus",
    "build_rule",
    "stabilize",
    "with_relevance",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def stabilize(z: Tensor, epsilon: float) -> Tensor:
    """z + ε·sign(z), with sign(0) taken as +1 (a zero denominator becomes ε; −0.0 counts as 0)."""
    # (|z| + ε) with z's sign: three passes and no torch.where (5x slower than these on the CPU); z + 0.0 turns
    # −0.0 into +0.0, so a zero gets +ε as documented (copysign alone would give −0.0 a −ε)
    return z.abs().add_(epsilon).copysign_(z + 0.0)


def _inverse(d: Tensor) -> Tensor:
    """1/d, with 0 where d == 0 (only possible with a zero stabiliser: LRP-0 on a dead unit, whose
    relevance is 0 anyway), so that no inf or NaN reaches the relevance."""
    zero = d == 0
    return torch.where(zero, torch.zeros_like(d), 1.0 / torch.where(zero, torch.ones_like(d), d))


def _inv_stab(z: Tensor, epsilon: float) -> Tensor:
    """1 / s_ε(z); a positive ε never leaves a zero to guard against (|s_ε(z)| ≥ ε)."""
    if epsilon > 0:
        return stabilize(z, epsilon).reciprocal_()  # in place: s_ε(z) is a fresh tensor
    return _inverse(z)  # ε = 0: s_0(z) = z


def _over_stab(r: Tensor, z: Tensor, epsilon: float) -> Tensor:
    """r / s_ε(z) in one division (not r · (1/s_ε(z)): a pass fewer over the layer's output)."""
    if epsilon > 0:
        return r / stabilize(z, epsilon)
    return r * _inverse(z)


def _sum(*ts: Tensor | None) -> Tensor:
    """Sum of the terms that were computed (a skipped term is exactly zero)."""
    out = None
    for t in ts:
        if t is not None:
            out = t if out is None else out + t
    if out is None:  # cannot happen with the built-in rules: their first term carries the bias and is never skipped
        raise ValueError("An LRP rule skipped all its terms; give its first term a bias modifier.")
    return out


class LRPUnsupportedError(ValueError):
    """The model holds a construct LRP cannot explain faithfully; the message names the fix."""


class _Relevance(torch.autograd.Function):
    """Forward: the layer's output as it is. Backward: ``fn(inputs, R)``, the rule's relevance of each
    input (None for inputs that do not need it).

    The output is handed in a box (a one-element list), not as an input: a custom Function's output
    that is one of its inputs (or a view of one) may not be modified in place afterwards, and models do
    modify layer outputs in place (``out += identity`` in torchvision's ResNets). The boxed tensor is a
    fresh ``detach()`` of the layer's output (the same storage, no copy), so it becomes the Function's
    own output, which autograd lets the model modify in place as it would the layer's output."""

    @staticmethod
    def forward(ctx: Any, fn: Callable, box: list[Tensor], keep: bool, *xs: Tensor) -> Tensor:
        ctx.fn = fn
        if keep:
            ctx.save_for_backward(*xs)
        return box.pop()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        rel = ctx.fn(ctx.saved_tensors, grad)
        return (None, None, None, *rel)


def with_relevance(
    fn: Callable[[tuple[Tensor, ...], Tensor], list[Tensor | None]], out: Tensor, *xs: Tensor, keep: bool = True
) -> Tensor:
    """``out`` (same values, same storage) whose backward hands relevance R to ``xs`` as ``fn(xs, R)``.
    ``keep=False``: ``fn`` does not read the inputs' values and gets ``()``; they are not saved, so the
    model may modify them in place afterwards (a ReLU's input, as PyTorch's own ReLU allows)."""
    return _Relevance.apply(fn, [out.detach()], keep, *xs)


def _affine(module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The module's own linear map with other parameters (no hooks fire: the functional form)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, _CONV):
        return module._conv_forward(x, weight, bias)
    raise TypeError(
        f"An LRP rule with modified weights applies to nn.Linear and nn.Conv1d/2d/3d, not {type(module).__name__}; "
        "map this layer to 'pass', 'norm' or no rule (the gradient) in the composite."
    )


def _input_grad(module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None, out_grad: Tensor) -> Tensor:
    """(∂f/∂x)ᵀ out_grad of the module's affine map f(x; weight, bias), as the transposed map itself (no autograd
    graph recorded: the rules' terms need no second-order anything). Convolutions with another padding mode or a
    string padding go through autograd."""
    if isinstance(module, nn.Linear):
        return out_grad @ weight
    plain = isinstance(module, _CONV) and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if plain and x.ndim == len(module.kernel_size) + 2:
        conv_input = (torch.nn.grad.conv1d_input, torch.nn.grad.conv2d_input, torch.nn.grad.conv3d_input)
        return conv_input[x.ndim - 3](x.shape, weight, out_grad, module.stride, module.padding, module.dilation,
                                      module.groups)  # fmt: skip
    with torch.enable_grad():
        xl = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_affine(module, xl, weight, bias), xl, out_grad)
    return g


def _modified(t: Tensor | None, fn: Callable[[Tensor], Tensor] | None) -> Tensor | None:
    """``fn(t)`` of a parameter, computed on every call: not cached across calls, because a parameter's version
    counter misses writes (BatchNorm's running statistics in a training forward, ``p.data.copy_``), so a cache keyed
    on it would serve stale weights (measured gain of such a cache: under 5 % of a call on the held-out ResNet)."""
    if t is None or fn is None:
        return None
    return t if fn is _same else fn(t)


@dataclass(frozen=True)
class Term:
    """One summand of a rule: a' = input(a), w' = weight(w), b' = bias(b) (None: bias dropped)."""

    input: Callable[[Tensor], Tensor]
    weight: Callable[[Tensor], Tensor]
    bias: Callable[[Tensor], Tensor] | None


def _same(t: Tensor) -> Tensor:
    return t


def _pos(t: Tensor) -> Tensor:
    return t.clamp(min=0)


def _neg(t: Tensor) -> Tensor:
    return t.clamp(max=0)


def _ones(t: Tensor) -> Tensor:
    return torch.ones_like(t)



class Rule:
    """Base class: ``apply(module, inputs, output)`` returns the output to use in place of
    ``output``: the same value, with the rule's relevance as its gradient."""

    name = "rule"

    def apply(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _single_input(module: nn.Module, inputs: tuple[Any, ...], rule: Rule) -> Tensor:
    tensors = [a for a in inputs if isinstance(a, Tensor)]
    if len(tensors) != 1:
        raise TypeError(
            f"LRP rule {rule.name!r} on {type(module).__name__} expects one tensor input, got {len(tensors)}."
        )
    return tensors[0]


class _TermRule(Rule):
    """A rule given as terms (input and parameter modifiers) and output coefficients."""

    #: the single term is the layer itself (input and parameters unmodified): its forward graph is reused, and
    #: ``scaled(R, z)`` gives R ⊙ c(z)
    reuses_forward = False

    def scaled(self, grad: Tensor, z: Tensor) -> Tensor:
        return grad * self.coefficients([z], z)[0]

    def terms(self) -> Sequence[Term]:
        raise NotImplementedError

    def coefficients(self, zs: list[Tensor | None], z: Tensor) -> list[Tensor]:
        """c_i per output element from the terms' outputs ``zs`` and the layer's output ``z``."""
        raise NotImplementedError

    def scaled_terms(self, grad: Tensor, zs: list[Tensor | None], z: Tensor) -> list[Tensor | None]:
        """c_i ⊙ R per term (None for a skipped term); terms sharing a coefficient share the product."""
        cs = self.coefficients(zs, z)
        scaled: dict[int, Tensor] = {}
        return [None if zi is None else scaled.setdefault(id(cs[i]), grad * cs[i]) for i, zi in enumerate(zs)]

    def apply(
        self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor, params: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """``params``: (weight, bias) to use instead of the module's (a BatchNorm merged into it); ``output``'s
        graph back to the input is then the layer and the BatchNorm (the same affine map)."""
        x = _single_input(module, inputs, self)
        # the parameters themselves: frozen during the call, and every use below runs without grad
        w, b = params if params is not None else (module.weight, getattr(module, "bias", None))
        z = output.detach()
        # The model may modify the layer's output in place after the rule saw it (``out += identity``): z shares
        # its storage, so then z is recomputed from the saved input (the layer's own output, as it was).
        version = output._version

        def layer_output(xd: Tensor) -> Tensor:
            if output._version == version:
                return z
            with torch.no_grad():
                return _affine(module, xd, w, b)

        def backward(xs: tuple[Tensor, ...], grad: Tensor) -> list[Tensor | None]:
            (xd,) = (a.detach() for a in xs)
            z = layer_output(xd)
            # A term of the negative inputs without bias is exactly 0 when no input is negative (after a ReLU):
            # skipped, which saves half the work of z⁺, γ and α-β there.
            terms = self.terms()
            nonneg = any(t.input is _neg for t in terms) and bool(xd.min() >= 0)
            inputs: list[Tensor | None] = []
            weights: list[Tensor | None] = []
            zs: list[Tensor | None] = []
            with torch.no_grad():
                for term in terms:
                    if nonneg and term.input is _neg and term.bias is None:
                        inputs.append(None)
                        weights.append(None)
                        zs.append(None)
                        continue
                    # x⁺ of a non-negative input is the input itself: no copy
                    xi = xd if nonneg and term.input is _pos else term.input(xd)
                    wi = _modified(w, term.weight)
                    inputs.append(xi)
                    weights.append(wi)
                    zs.append(_affine(module, xi, wi, _modified(b, term.bias)))
                outs = self.scaled_terms(grad, zs, z)
                rel = None
                for xi, wi, zi, out in zip(inputs, weights, zs, outs):
                    if zi is None:
                        continue
                    part = xi * _input_grad(module, xi, wi, None, out)  # a' ⊙ ρ(W)ᵀ (c ⊙ R)
                    rel = part if rel is None else rel.add_(part)
            return [rel]

        if self.reuses_forward and output.requires_grad:
            # ε: the term's forward is the layer's own, whose graph is there: R = a ⊙ ∂z/∂a^T (R_out / s(z)) without
            # a second forward. With a merged BatchNorm (``params``) the graph from the BatchNorm's output back to the
            # layer's input is layer -> BatchNorm in eval mode, whose Jacobian is W·γ/σ: the merged weight itself.
            def backward_reuse(xs: tuple[Tensor, ...], grad: Tensor) -> list[Tensor | None]:
                if output._version != version:  # the output was modified in place: its graph is not the layer's
                    return backward(xs, grad)
                (g,) = torch.autograd.grad(output, xs[0], self.scaled(grad, z))
                return [xs[0].detach() * g]

            return with_relevance(backward_reuse, output, x)
        return with_relevance(backward, output, x)


class Epsilon(_TermRule):
    """LRP-ε (Bach et al. 2015): R_j = Σ_k a_j w_jk / s_ε(z_k) · R_k. ε=0 is LRP-0; on a ReLU net
    without biases it equals gradient × input."""

    name = "epsilon"
    reuses_forward = True

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = float(epsilon)

    def terms(self) -> Sequence[Term]:
        return (Term(_same, _same, _same),)

    def coefficients(self, zs: list[Tensor | None], z: Tensor) -> list[Tensor]:
        return [_inv_stab(zs[0], self.epsilon)]

    def scaled(self, grad: Tensor, z: Tensor) -> Tensor:
        return _over_stab(grad, z, self.epsilon)


class ZPlus(_TermRule):
    """z⁺ = alpha1-beta0 (Bach et al. 2015; Montavon et al. 2017 deep Taylor): only positive
    contributions a⁺w⁺ (+ b⁺) and a⁻w⁻ carry relevance, normalised by their sum."""

    name = "zplus"

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = float(stabilizer)

    def terms(self) -> Sequence[Term]:
        return (Term(_pos, _pos, _pos), Term(_neg, _neg, None))

    def coefficients(self, zs: list[Tensor | None], z: Tensor) -> list[Tensor]:
        c = _inv_stab(_sum(zs[0], zs[1]), self.stabilizer)
        return [c, c]

    def scaled_terms(self, grad: Tensor, zs: list[Tensor | None], z: Tensor) -> list[Tensor | None]:
        """R / s(z⁺ + z⁻) in two passes: the denominator a⁺w⁺ + a⁻w⁻ + b⁺ is a sum of non-negative products,
        so s_ε(d) = d + ε (sign(0) = +1) without the sign's passes; the term outputs are fresh tensors."""
        d = _sum(zs[0], zs[1])
        q = grad / d.add_(self.stabilizer) if self.stabilizer > 0 else grad * _inverse(d)
        return [None if zi is None else q for zi in zs]


class AlphaBeta(_TermRule):
    """LRP-αβ (Bach et al. 2015): α · (positive contributions / their sum) − β · (negative
    contributions / their sum), α − β = 1 so relevance is conserved."""

    name = "alpha_beta"

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6) -> None:
        if alpha < 0 or beta < 0 or abs(alpha - beta - 1.0) > 1e-12:
            raise ValueError(f"alpha-beta needs alpha, beta >= 0 and alpha - beta = 1, got alpha={alpha}, beta={beta}.")
        self.alpha, self.beta, self.stabilizer = float(alpha), float(beta), float(stabilizer)

    def terms(self) -> Sequence[Term]:
        return (Term(_pos, _pos, _pos), Term(_neg, _neg, None), Term(_pos, _neg, _neg), Term(_neg, _pos, None))

    def coefficients(self, zs: list[Tensor | None], z: Tensor) -> list[Tensor]:
        cp = self.alpha * _inv_stab(_sum(zs[0], zs[1]), self.stabilizer)
        cn = -self.beta * _inv_stab(_sum(zs[2], zs[3]), self.stabilizer)
        return [cp, cp, cn, cn]


def _gamma_mod(gamma: float, part: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def mod(p: Tensor) -> Tensor:
        return p + gamma * part(p)

    return mod


class Gamma(_TermRule):
    """LRP-γ (Montavon et al. 2019, §10.2.2): ρ(w) = w + γw⁺ favours positive contributions.

    Generalised to signed inputs and outputs: a positive output z_k shares its relevance among
    a⁺(w + γw⁺) + a⁻(w + γw⁻) (the contributions of its own sign, amplified), a negative one among
    a⁺(w + γw⁻) + a⁻(w + γw⁺); the bias is amplified in the first term of each pair.
    """

    name = "gamma"

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6) -> None:
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}.")
        self.gamma, self.stabilizer = float(gamma), float(stabilizer)

    def terms(self) -> Sequence[Term]:
        up, down = _gamma_mod(self.gamma, _pos), _gamma_mod(self.gamma, _neg)
        return (Term(_pos, up, up), Term(_neg, down, None), Term(_pos, down, down), Term(_neg, up, None))

    def coefficients(self, zs: list[Tensor | None], z: Tensor) -> list[Tensor]:
        cp = (z > 0).to(z.dtype) * _inv_stab(_sum(zs[0], zs[1]), self.stabilizer)
        cn = (z < 0).to(z.dtype) * _inv_stab(_sum(zs[2], zs[3]), self.stabilizer)
        return [cp, cp, cn, cn]


class Flat(_TermRule):
    """Flat (Lapuschkin et al. 2019): a = 1 and w = 1, bias 0: relevance spread uniformly over the
    receptive field (for the input layer, where pixel values carry no meaning of their own)."""

    name = "flat"

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = float(stabilizer)

    def terms(self) -> Sequence[Term]:
        return (Term(_ones, _ones, None),)

    def coefficients(self, zs: list[Tensor | None], z: Tensor) -> list[Tensor]:
        return [_inv_stab(zs[0], self.stabilizer)]

    def apply(
        self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor, params: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """With all inputs and weights 1, z_k is the same for every sample and output channel (the number of
        inputs in k's receptive field), and R_j = Σ_k R_k / s(z_k) over the k that see j: the relevance summed
        over the output channels, divided by one (1, 1, ...) map of z, spread back by a one-channel transposed
        convolution and broadcast over the input channels. The same map as the general term computation, without
        its two full-width convolutions and its elementwise passes over the whole output (the input layer's,
        usually the largest of the network)."""
        x = _single_input(module, inputs, self)
        if isinstance(module, nn.Linear):
            n_in = module.in_features

            def backward_linear(_xs: tuple[Tensor, ...], grad: Tensor) -> list[Tensor | None]:
                z = grad.new_full((), float(n_in))
                q = _over_stab(grad.sum(-1, keepdim=True), z, self.stabilizer)
                return [q.expand(*grad.shape[:-1], n_in).contiguous()]

            return with_relevance(backward_linear, output, x, keep=False)
        dims = x.ndim - 2
        plain = isinstance(module, _CONV) and module.groups == 1 and module.padding_mode == "zeros"
        if not plain or isinstance(module.padding, str) or dims != len(module.kernel_size):  # the general terms
            return super().apply(module, inputs, output, params)
        conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        conv_input = (torch.nn.grad.conv1d_input, torch.nn.grad.conv2d_input, torch.nn.grad.conv3d_input)[dims - 1]
        shape, n_in = x.shape, module.in_channels
        kw = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}

        def backward_conv(_xs: tuple[Tensor, ...], grad: Tensor) -> list[Tensor | None]:
            ones_w = grad.new_ones(1, 1, *module.kernel_size)
            z = n_in * conv(grad.new_ones(1, 1, *shape[2:]), ones_w, **kw)  # (1, 1, *out): inputs seen by each output
            q = _over_stab(grad.sum(1, keepdim=True), z, self.stabilizer)
            rel = conv_input((shape[0], 1, *shape[2:]), ones_w, q, **kw)
            return [rel.expand(shape).contiguous()]

        return with_relevance(backward_conv, output, x, keep=False)


class WSquare(_TermRule):
    """w² (Montavon et al. 2017): a = 1, ρ(w) = w² (and b²): relevance in proportion to the squared
    weights, independent of the input (input layer of unbounded real-valued data)."""

    name = "wsquare"

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = float(stabilizer)

    def terms(self) -> Sequence[Term]:
        sq = torch.square
        return (Term(_ones, sq, sq),)

    def coefficients(self, zs: list[Tensor | None], z: Tensor) -> list[Tensor]:
        return [_inv_stab(zs[0], self.stabilizer)]


class ZBox(_TermRule):
    """z^B (Montavon et al. 2017, deep Taylor for a box l ≤ x ≤ h): a w − l w⁺ − h w⁻ for the input
    layer of data bounded by [low, high] (per element, per channel as (1, C, 1, 1), or a number)."""

    name = "zbox"

    def __init__(self, low: float | Tensor | Sequence[float], high: float | Tensor | Sequence[float],
                 stabilizer: float = 1e-6) -> None:  # fmt: skip
        self.low = torch.as_tensor(low, dtype=torch.float64)
        self.high = torch.as_tensor(high, dtype=torch.float64)
        if bool((self.low > self.high).any()):
            raise ValueError("z^B needs low <= high everywhere.")
        self.stabilizer = float(stabilizer)

    def _bound(self, value: Tensor) -> Callable[[Tensor], Tensor]:
        def mod(x: Tensor) -> Tensor:
            try:
                return value.to(dtype=x.dtype, device=x.device).expand_as(x)
            except RuntimeError:
                raise ValueError(
                    f"z^B bounds of shape {tuple(value.shape)} do not broadcast to the input of shape "
                    f"{tuple(x.shape)}; give a number, a per-channel (1, C, 1, 1) tensor or one of the input's shape."
                ) from None

        return mod

    def terms(self) -> Sequence[Term]:
        return (
            Term(_same, _same, _same),
            Term(self._bound(self.low), _pos, _pos),
            Term(self._bound(self.high), _neg, _neg),
        )

    def coefficients(self, zs: list[Tensor | None], z: Tensor) -> list[Tensor]:
        c = _inv_stab(zs[0] - zs[1] - zs[2], self.stabilizer)
        return [c, -c, -c]


class Norm(Rule):
    """Relevance in proportion to each input's contribution, for parameter-free linear layers:
    average pooling (each window a linear map with weights 1/|window|) and :class:`Sum` (a residual
    addition split in proportion to its summands). R_j = a_j ∂z/∂a_j / s(z) · R."""

    name = "norm"

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = float(stabilizer)

    def apply(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
        positions = [i for i, a in enumerate(inputs) if isinstance(a, Tensor) and a.requires_grad]

        def backward(xs: tuple[Tensor, ...], grad: Tensor) -> list[Tensor | None]:
            args = list(inputs)
            with torch.enable_grad():
                leaves = [a.detach().requires_grad_(True) for a in xs]
                for i, leaf in zip(positions, leaves):
                    args[i] = leaf
                # the module's own forward (not __call__: no hooks)
                out = module.forward(*args)
                # z recomputed (not the forward's, whose storage the model may have modified in place since)
                grads = torch.autograd.grad(out, leaves, _over_stab(grad, out.detach(), self.stabilizer))
            return [leaf.detach() * g for leaf, g in zip(leaves, grads)]

        return with_relevance(backward, output, *(inputs[i] for i in positions))


def _identity(_xs: tuple[Tensor, ...], grad: Tensor) -> list[Tensor]:
    return [grad]


class LSTMRule(Rule):
    """Arras et al. 2017 ("Explaining recurrent neural network predictions in sentiment analysis") on a fused
    ``nn.LSTM`` (one layer, one direction, no projection, batched input), step by step backwards in time:

    - h_t = o_t ⊙ tanh(c_t): a gate times a signal, all relevance to the signal, through the tanh to c_t;
    - c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t: the ε rule between the two summands (in proportion to each), then each gate
      product gives all of its share to its signal, c_{t-1} and g_t;
    - g_t = tanh(W_g x_t + U_g h_{t-1} + b): through the tanh, the ε rule of the linear map to x_t and h_{t-1};
      the relevance of h_{t-1} joins what the output hands it at step t-1. The biases absorb their share; so do
      given initial states (h_0, c_0), as constants.

    The forward is the kernel's own. Relevance reaches the inputs through the output sequence and through h_n (a
    view of its last step, same values); c_n carries none."""

    name = "lstm"
    tuple_output = True

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = float(epsilon)

    def apply(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        x = inputs[0] if inputs else None
        problems = []
        if not isinstance(x, Tensor) or x.ndim != 3:
            problems.append("a batched (B, T, D) / (T, B, D) tensor input (not unbatched or packed)")
        if module.num_layers != 1 or module.bidirectional or module.proj_size:
            problems.append("one layer, one direction, no projection (stack single-layer nn.LSTMs instead)")
        if problems:
            raise LRPUnsupportedError(
                f"LRP's LSTM rules (Arras et al. 2017) need {'; '.join(problems)}; or explain this model with a "
                "gradient method: ig, input_x_gradient, expected_gradients or smoothgrad."
            )
        out, (_, c_n) = output
        if not x.requires_grad:
            return output
        state = inputs[1] if len(inputs) > 1 and inputs[1] is not None else None
        xd = x.detach()
        bf = module.batch_first
        w_ih, w_hh = module.weight_ih_l0.detach(), module.weight_hh_l0.detach()
        b = None
        if module.bias:
            b = (module.bias_ih_l0 + module.bias_hh_l0).detach()
        h0 = None if state is None else state[0].detach()[0]
        c0 = None if state is None else state[1].detach()[0]
        eps = self.epsilon
        hidden_seq = out.detach().clone()  # a copy: the model may modify its output in place afterwards

        def backward(_xs: tuple[Tensor, ...], grad: Tensor) -> list[Tensor]:
            xs = xd if bf else xd.transpose(0, 1)  # (B, T, D)
            r_out = grad if bf else grad.transpose(0, 1)
            batch, steps, hidden = xs.shape[0], xs.shape[1], w_hh.shape[1]
            h = xs.new_zeros(batch, hidden) if h0 is None else h0
            c = xs.new_zeros(batch, hidden) if c0 is None else c0
            # the forward again, keeping what the rules read: h_{t-1} is the output's previous step (the kernel's
            # own values), so every step's pre-activations come from one matmul; only c_t is a recurrence
            seq = hidden_seq if bf else hidden_seq.transpose(0, 1)
            h_prev = torch.cat([h[:, None], seq[:, :-1]], 1)  # (B, T, H): h_{t-1}
            z = xs @ w_ih.T + h_prev @ w_hh.T + (0 if b is None else b)
            zi, zf, zg, _ = z.chunk(4, -1)
            i, f, g = zi.sigmoid(), zf.sigmoid(), zg.tanh()
            ig = i * g
            cs = [c]
            for t in range(steps):
                cs.append(f[:, t] * cs[-1] + ig[:, t])
            w_g, u_g = w_ih.chunk(4, 0)[2], w_hh.chunk(4, 0)[2]
            q2 = torch.empty_like(zg)
            r_h = torch.zeros_like(h)
            r_c = torch.zeros_like(c)
            for t in range(steps - 1, -1, -1):
                r_c = r_c + r_h + r_out[:, t]  # h_t's relevance to tanh(c_t), all of it (o_t is a gate)
                q = _over_stab(r_c, cs[t + 1], eps)
                q2[:, t] = _over_stab(ig[:, t] * q, zg[:, t], eps)  # i_t ⊙ g_t's share, all to g_t, through the tanh
                r_c = f[:, t] * cs[t] * q  # f_t ⊙ c_{t-1}'s share, all to c_{t-1}
                r_h = h_prev[:, t] * (q2[:, t] @ u_g)
            r_x = xs * (q2 @ w_g)  # the input's share of every step's candidate, in one matmul
            return [r_x if bf else r_x.transpose(0, 1)]

        wrapped = with_relevance(backward, out, x, keep=False)
        last = (wrapped[:, -1] if bf else wrapped[-1]).unsqueeze(0)  # h_n: the output's last step, as a view
        return wrapped, (last, c_n.detach())


class Pass(Rule):
    """Pass-through: the relevance of the output is the relevance of the input (elementwise
    activations, unmerged BatchNorm). The layer must keep the input's shape."""

    name = "pass"

    def __init__(self) -> None:
        pass

    def apply(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
        x = _single_input(module, inputs, self)
        if x.shape != output.shape:
            raise ValueError(
                f"The pass rule needs a layer that keeps its input's shape; {type(module).__name__} maps "
                f"{tuple(x.shape)} to {tuple(output.shape)}."
            )
        return with_relevance(_identity, output, x, keep=False)


RULES: dict[str, type[Rule]] = {
    "epsilon": Epsilon,
    "zero": Epsilon,
    "gamma": Gamma,
    "zplus": ZPlus,
    "z_plus": ZPlus,
    "alpha1_beta0": ZPlus,
    "alpha_beta": AlphaBeta,
    "alphabeta": AlphaBeta,
    "flat": Flat,
    "wsquare": WSquare,
    "w_square": WSquare,
    "zbox": ZBox,
    "z_box": ZBox,
    "norm": Norm,
    "pass": Pass,
    "lstm": LSTMRule,
}


def build_rule(spec: Rule | str | Mapping[str, Any]) -> Rule:
    """A rule from an instance, a name (``"epsilon"``, ``"gamma"``, ``"zplus"``, ``"alpha_beta"``,
    ``"flat"``, ``"wsquare"``, ``"zbox"``, ``"norm"``, ``"pass"``, ``"lstm"``) or ``{"name": ..., **kwargs}``."""
    if isinstance(spec, Rule):
        return spec
    kwargs: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        spec = kwargs.pop("name", None)
    if not isinstance(spec, str) or spec.lower() not in RULES:
        raise KeyError(f"Unknown LRP rule {spec!r}. Available: {', '.join(sorted(RULES))}, or a Rule instance.")
    if spec.lower() == "zero":
        kwargs.setdefault("epsilon", 0.0)
    return RULES[spec.lower()](**kwargs)
