"""Truncated path signatures and log-signatures of streams, batched and differentiable, in pure torch.

Lyons & McLeod, "Signature methods in machine learning" (2022, arXiv:2206.14674): a stream
``x_0, …, x_{T-1}`` in R^D is read as the piecewise-linear path through its points; its signature is
the sequence of iterated integrals ``S^{i1…ik} = ∫_{t1<…<tk} dx^{i1}_{t1} … dx^{ik}_{tk}``, k = 1…m.
For a linear segment with increment Δ it is the tensor exponential ``exp(Δ) = (Δ, Δ^{⊗2}/2!, …)``
and, by Chen's identity, the signature of a concatenation is the tensor product of the pieces'
signatures, so ``S(x) = exp(Δ_1) ⊗ … ⊗ exp(Δ_{T-1})``.

Backends (``backend=``): ``torch`` is the reference implementation here: the product over the ``T − 1``
increments is a balanced tree of batched tensor products (``⌈log₂ T⌉`` rounds, each over all pairs at once),
so the Python overhead grows with ``log T`` and everything runs on the inputs' device with autograd.
``pysiglib`` (pySigLib ≥ 4, ``pip install 'explain_callbacks[signatures]'``) computes the same signature in
C++/CUDA with PyTorch autograd, about 40x faster on the CPU (``benchmarks/bench_signatures.py``); ``auto``
(default) uses it when it is installed and can run on the inputs' device, else ``torch``. The log-signature
is taken in torch from either. Of the other libraries compared, iisignature 0.24 and esig 1.0 / roughpy
0.3 work on NumPy arrays (no torch autograd, no GPU tensors); iisignature is the test oracle.

Layout: levels are flattened row-major and concatenated, level 1 first, as iisignature's ``sig``
(word ``(i1, …, ik)`` at offset ``Σ_{j<k} D^j + Σ_l i_l D^{k-l}``); there are
``D + D² + … + D^m`` coordinates (:func:`signature_channels`). The log-signature is ``log S`` in the
truncated tensor algebra, either expanded (``mode="expand"``, iisignature's ``"x"`` method) or read
at the Lyndon words (``mode="words"``, Witt's-formula many coordinates, an injective linear image of
the log-signature: the expansion of the Lyndon basis element of word w is w plus larger words, so
the map is triangular). At level 2 the log-signature is the antisymmetric part of ``S^{(2)}``:
its Lyndon coordinate ``(i, j)``, i < j, is the signed Lévy area of channels i and j.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BACKENDS",
    "augment",
    "gauss_legendre",
    "basepoint",
    "lead_lag",
    "levy_area",
    "logsignature",
    "logsignature_channels",
    "polynomial_ig_points",
    "lyndon_words",
    "signature",
    "signature_channels",
    "signature_levels",
    "signature_words",
    "tensor_exp",
    "tensor_log",
    "tensor_product",
    "time_augment",
    "word_bracket",
]


# ---------------------------------------------------------------------------- checks and sizes
def _check_stream(x: Tensor, what: str = "stream") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of shape (B, T, D), got {type(x).__name__}.")
    if x.ndim != 3:
        raise ValueError(
            f"{what} must have shape (B, T, D) (batch, time, channels), got {tuple(x.shape)}; add a batch axis "
            "with x.unsqueeze(0), or a channel axis with x.unsqueeze(-1) for one-channel series."
        )
    if not x.is_floating_point():
        raise TypeError(f"{what} must be floating point, got {x.dtype}; convert with x.float() or x.double().")


def _check_depth(depth: int) -> None:
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"depth (the truncation level) must be an int >= 1, got {depth!r}.")


def signature_channels(channels: int, depth: int) -> int:
    """Number of signature coordinates ``D + D² + … + D^depth``."""
    _check_depth(depth)
    return sum(channels**k for k in range(1, depth + 1))


@lru_cache(maxsize=64)
def lyndon_words(channels: int, depth: int) -> tuple[tuple[int, ...], ...]:
    """Lyndon words over ``0…channels−1`` of length ≤ depth, by length then lexicographically (Duval's
    algorithm); their number at length k is Witt's ``(1/k) Σ_{d|k} μ(d) D^{k/d}``."""
    _check_depth(depth)
    words: list[tuple[int, ...]] = []
    w = [-1]
    while w:  # Duval (1988): all Lyndon words up to length `depth` in lexicographic order
        w[-1] += 1
        words.append(tuple(w))
        m = len(w)
        while len(w) < depth:
            w.append(w[len(w) - m])
        while w and w[-1] == channels - 1:
            w.pop()
    return tuple(sorted(words, key=lambda u: (len(u), u)))


def logsignature_channels(channels: int, depth: int) -> int:
    """Number of log-signature coordinates in ``mode="words"`` (the number of Lyndon words)."""
    return len(lyndon_words(channels, depth))


def signature_words(channels: int, depth: int) -> list[tuple[int, ...]]:
    """The word of each signature coordinate, in the order of :func:`signature` (row-major per level)."""
    _check_depth(depth)
    return [tuple(w) for k in range(1, depth + 1) for w in itertools.product(range(channels), repeat=k)]


def _word_offset(word: Sequence[int], channels: int) -> int:
    """Position of ``word`` in the flattened signature (see the module docstring)."""
    idx = 0
    for i in word:
        idx = idx * channels + int(i)
    return sum(channels**j for j in range(1, len(word))) + idx


def word_bracket(word: Sequence[int], names: Sequence[str] | None = None) -> str:
    """The Lie bracket of a Lyndon word by its standard factorisation (w = uv, v its longest proper Lyndon
    suffix), e.g. ``(0, 0, 1)`` -> ``[x0,[x0,x1]]``: how a log-signature coordinate reads."""
    w = tuple(int(i) for i in word)
    if len(w) == 1:
        return names[w[0]] if names is not None else f"x{w[0]}"
    for s in range(1, len(w)):
        v = w[s:]
        if all(v < v[j:] for j in range(1, len(v))):  # v is Lyndon (strictly smaller than its proper suffixes)
            return f"[{word_bracket(w[:s], names)},{word_bracket(v, names)}]"
    raise ValueError(f"{word} is not a Lyndon word.")  # pragma: no cover - single letters return above


# ---------------------------------------------------------------------------- augmentations
def time_augment(x: Tensor, times: Tensor | None = None) -> Tensor:
    """Append time as the last channel: ``times`` (T,) or (B, T), default ``linspace(0, 1, T)``. Makes the
    signature see the speed of the stream (the plain signature is invariant to reparametrisation) and,
    with a strictly increasing channel, determines the path uniquely (Lyons & McLeod 2022, Sec. 2.3)."""
    _check_stream(x)
    b, t, _ = x.shape
    if times is None:
        times = torch.linspace(0.0, 1.0, t, dtype=x.dtype, device=x.device) if t > 1 else x.new_zeros(t)
    times = times.to(device=x.device, dtype=x.dtype)
    if tuple(times.shape) not in ((t,), (b, t)):
        raise ValueError(
            f"times must be (T,) or (B, T) = {(b, t)} for streams {tuple(x.shape)}, got {tuple(times.shape)}."
        )
    times = times.expand(b, t)
    return torch.cat([x, times.unsqueeze(-1)], -1)


def basepoint(x: Tensor, point: Tensor | float = 0.0) -> Tensor:
    """Prepend a starting point (default the origin): the signature is translation invariant; starting
    every stream at the same point makes it see the stream's absolute values (its first point)."""
    _check_stream(x)
    p = torch.as_tensor(point, dtype=x.dtype, device=x.device)
    start = p.expand(x.shape[0], 1, x.shape[2]) if p.ndim < 2 else p.reshape(x.shape[0], 1, x.shape[2])
    return torch.cat([start, x], 1)


def lead_lag(x: Tensor) -> Tensor:
    """The lead-lag transform (Lyons & McLeod 2022, Sec. 2.3.3): a stream of 2T − 1 points in R^{2D},
    ``(lead, lag)`` with ``lead = x_0, x_1, x_1, x_2, x_2, …`` and ``lag = x_0, x_0, x_1, x_1, …``; the
    Lévy area between a channel's lead and lag is half its quadratic variation ``Σ (Δx)²``."""
    _check_stream(x)
    r = x.repeat_interleave(2, dim=1)
    return torch.cat([r[:, 1:], r[:, :-1]], -1)


def augment(
    x: Tensor, *, time: bool = False, base: bool = False, leadlag: bool = False, times: Tensor | None = None
) -> Tensor:
    """Lead-lag, then time, then basepoint (the order of Lyons & McLeod's examples): the output's channels
    are ``[lead (D), lag (D)]`` or ``x (D)``, then ``t`` when ``time``."""
    if leadlag:
        x = lead_lag(x)
        if times is not None:  # each time repeated as the points are
            times = times.repeat_interleave(2, dim=-1)[..., 1:]
    if time:
        x = time_augment(x, times)
    if base:
        x = basepoint(x)
    return x


# ---------------------------------------------------------------------------- tensor algebra
def tensor_exp(delta: Tensor, depth: int) -> list[Tensor]:
    """``exp(Δ)`` truncated at ``depth``: levels ``Δ^{⊗k}/k!``, each (..., D^k)."""
    out = [delta]
    for k in range(2, depth + 1):
        # Δ^{⊗k} = Δ ⊗ Δ^{⊗(k-1)}: the new letter first keeps the long axis innermost (a broadcast over an inner
        # axis of D elements ran ~3x slower), and dividing Δ (D numbers) rather than the product saves a pass
        out.append(((delta / k).unsqueeze(-1) * out[-1].unsqueeze(-2)).flatten(-2))
    return out


def tensor_product(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    """``(1 + a) ⊗ (1 + b)`` truncated at the common depth, both without their level-0 term 1:
    level k is ``a_k + b_k + Σ_{i=1}^{k-1} a_i ⊗ b_{k-i}``."""
    depth = len(a)
    out = []
    for k in range(1, depth + 1):
        acc = a[k - 1] + b[k - 1]  # a fresh tensor: the outer products accumulate into it in place (no temporaries)
        for i in range(1, k):
            ai, bj = a[i - 1], b[k - i - 1]
            acc.view(*acc.shape[:-1], ai.shape[-1], bj.shape[-1]).addcmul_(ai.unsqueeze(-1), bj.unsqueeze(-2))
        out.append(acc)
    return out


def _product_no_const(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    """``a ⊗ b`` for elements with zero level-0 term (levels ≥ 2 only are non-zero in the result)."""
    depth = len(a)
    out = [torch.zeros_like(a[0])]
    for k in range(2, depth + 1):
        acc = torch.zeros_like(a[k - 1])
        for i in range(1, k):
            acc = acc + (a[i - 1].unsqueeze(-1) * b[k - i - 1].unsqueeze(-2)).flatten(-2)
        out.append(acc)
    return out


def tensor_log(s: Sequence[Tensor]) -> list[Tensor]:
    """``log(1 + s) = Σ_{n=1}^{m} (−1)^{n+1} s^{⊗n} / n`` truncated at depth m (exact: s has no level 0, so
    ``s^{⊗n}`` vanishes below level n)."""
    depth = len(s)
    out = [t.clone() for t in s]
    power = list(s)
    for n in range(2, depth + 1):
        power = _product_no_const(power, s)
        sign = 1.0 if n % 2 else -1.0
        out = [o + (sign / n) * p for o, p in zip(out, power, strict=True)]
    return out


# ---------------------------------------------------------------------------- signatures
BACKENDS = ("auto", "torch", "pysiglib")


def _pysiglib(x: Tensor, backend: str) -> Any:
    """pySigLib's torch API when ``backend`` asks for it (``auto``: when installed and able to run on ``x``'s
    device and dtype), else None."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "torch":
        return None
    try:
        import pysiglib
        from pysiglib import torch_api
    except ImportError:
        if backend == "pysiglib":
            raise ImportError(
                "backend='pysiglib' needs pySigLib: pip install 'explain_callbacks[signatures]' (or pip install "
                "pysiglib), or use backend='torch'."
            ) from None
        return None
    usable = (x.device.type == "cpu" or (x.device.type == "cuda" and bool(pysiglib.BUILT_WITH_CUDA))) and x.dtype in (
        torch.float32, torch.float64,
    )  # fmt: skip
    if not usable and backend == "pysiglib":
        raise ValueError(
            f"pySigLib cannot compute on {x.device} {x.dtype} (CUDA build: {bool(pysiglib.BUILT_WITH_CUDA)}); use "
            "backend='torch' (or 'auto'), or float32/float64 inputs."
        )
    return torch_api if usable else None


def signature_levels(x: Tensor, depth: int, backend: str = "auto") -> list[Tensor]:
    """The signature of each stream of ``x`` (B, T, D) as its levels, ``[(B, D), (B, D²), …, (B, D^depth)]``.

    ``torch`` backend: Chen's identity over the increments, multiplied as a balanced tree (associativity of ⊗):
    each round multiplies all adjacent pairs at once, an odd one out set aside. ``pysiglib``: pySigLib's
    differentiable ``sig`` (see the module docstring). A stream of one point has the trivial signature (all
    zeros beyond level 0).
    """
    _check_stream(x)
    _check_depth(depth)
    b, t, d = x.shape
    if t < 2:
        return [x.new_zeros(b, d**k) for k in range(1, depth + 1)]
    lib = _pysiglib(x, backend)
    if lib is not None:
        flat = lib.sig(x.contiguous(), depth)
        return list(flat.split([d**k for k in range(1, depth + 1)], -1))
    delta = x[:, 1:] - x[:, :-1]  # (B, T-1, D)
    levels = tensor_exp(delta, depth)  # each (B, n, D^k)
    carried: list[list[Tensor]] = []  # last factors set aside when a round has an odd count, latest first
    while levels[0].shape[1] > 1:
        n = levels[0].shape[1]
        if n % 2:  # set the last factor aside (copying all the others to append it cost ~40 % at T = 256)
            carried.insert(0, [t[:, -1] for t in levels])
            n -= 1
        levels = tensor_product([t[:, 0:n:2] for t in levels], [t[:, 1:n:2] for t in levels])
    out = [t[:, 0] for t in levels]
    for factor in carried:  # the factors set aside follow the tree's product, in path order
        out = tensor_product(out, factor)
    return out


def signature(
    x: Tensor,
    depth: int,
    *,
    time: bool = False,
    base: bool = False,
    leadlag: bool = False,
    times: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Truncated signature of streams ``x`` (B, T, D): (B, D' + D'² + … + D'^depth), D' the channels after
    :func:`augment` (lead-lag, time, basepoint), levels concatenated as iisignature's ``sig``.

    Differentiable in ``x`` (and ``times``); runs on ``x``'s device and dtype.
    """
    x = augment(x, time=time, base=base, leadlag=leadlag, times=times)
    return torch.cat(signature_levels(x, depth, backend), -1)


def logsignature(
    x: Tensor,
    depth: int,
    *,
    mode: str = "words",
    time: bool = False,
    base: bool = False,
    leadlag: bool = False,
    times: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Truncated log-signature of streams ``x`` (B, T, D).

    ``mode="expand"``: ``log S`` in tensor coordinates (same layout as :func:`signature`, iisignature's
    ``logsig`` with method ``"x"``); ``mode="words"``: its coordinates at the Lyndon words
    (:func:`lyndon_words` of the augmented channel count), whose level-2 entries are the Lévy areas.
    """
    if mode not in ("words", "expand"):
        raise ValueError(f"mode must be 'words' (Lyndon coordinates) or 'expand' (tensor coordinates), got {mode!r}.")
    x = augment(x, time=time, base=base, leadlag=leadlag, times=times)
    flat = torch.cat(tensor_log(signature_levels(x, depth, backend)), -1)
    if mode == "expand":
        return flat
    idx = _lyndon_index(x.shape[2], depth)
    return flat[:, idx.to(flat.device)]


@lru_cache(maxsize=64)
def _lyndon_index(channels: int, depth: int) -> Tensor:
    return torch.tensor([_word_offset(w, channels) for w in lyndon_words(channels, depth)], dtype=torch.long)


def levy_area(x: Tensor, i: int = 0, j: int = 1) -> Tensor:
    """Signed Lévy area of channels ``i`` and ``j`` of streams (B, T, D):
    ``½ Σ_{s<t} (Δx^i_s Δx^j_t − Δx^j_s Δx^i_t)``, the antisymmetric part of the level-2 signature (the
    closed form on a piecewise-linear path, computed directly as a check and a rule for synthetic labels)."""
    _check_stream(x)
    a = x[..., i] - x[:, :1, i]
    b = x[..., j] - x[:, :1, j]
    # shoelace form: ½ ∫ (a db − b da) on each linear segment
    return 0.5 * (a[:, :-1] * b[:, 1:] - b[:, :-1] * a[:, 1:]).sum(1)


def gauss_legendre(n: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Nodes and weights of the n-point Gauss-Legendre rule on [0, 1] (exact for polynomials of degree
    ≤ 2n − 1); from the Golub-Welsch eigenproblem."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    k = torch.arange(1, n, dtype=torch.float64)
    beta = k / torch.sqrt(4 * k * k - 1)
    jac = torch.diag(beta, 1) + torch.diag(beta, -1)
    nodes, vecs = torch.linalg.eigh(jac)
    weights = 2 * vecs[0] ** 2
    return ((nodes + 1) / 2).to(dtype), (weights / 2).to(dtype)


def polynomial_ig_points(depth: int) -> int:
    """Gauss-Legendre points that make Integrated Gradients exact for a function polynomial of degree
    ``depth`` along the straight path (its gradient has degree depth − 1): ``⌈depth/2⌉``."""
    return max(1, math.ceil(depth / 2))
