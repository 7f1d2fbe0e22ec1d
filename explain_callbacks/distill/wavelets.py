"""Orthogonal wavelet transforms with a learnable low-pass filter (1-D and separable 2-D).

The transform is the periodised discrete wavelet transform: with low-pass filter ``h`` of even
length N and high-pass ``g[k] = (−1)^k h[N−1−k]`` (Ha, Singh, Kumbier, Lim, Yu 2021, "Adaptive
wavelet distillation from neural networks through interpretations", NeurIPS, arXiv:2107.09145,
Sec. 3), one level maps a signal x of even length L to

    a[n] = Σ_k h[k] x[(2n + k) mod L],    d[n] = Σ_k g[k] x[(2n + k) mod L],    n = 0..L/2−1.

When h satisfies the orthogonality conditions the analysis operator is an orthogonal matrix, so the
synthesis used here (its adjoint, a transposed convolution with the same filters folded back
periodically) reconstructs x exactly; for a filter that does not, ``inverse(forward(x)) ≠ x`` and the
reconstruction loss measures the gap, as in AWD. (The authors' code uses pytorch_wavelets with
zero padding; periodisation keeps coefficient counts equal to the input size and the transform
exactly orthogonal, a documented difference.)

Daubechies filters db1..db4 are hard-coded (no pywt at run time), in the usual ``rec_lo`` order
(pywt's ``Wavelet("dbN").rec_lo``), computed by minimum-phase spectral factorisation of the
Daubechies polynomial in 50-digit arithmetic (pywt's tables agree to about 1e-12).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DAUBECHIES",
    "AdaptiveWavelet",
    "daubechies",
    "dwt1d",
    "dwt2d",
    "idwt1d",
    "idwt2d",
    "low_to_high",
    "wavedec",
    "wavelet_constraint_losses",
    "waverec",
]

# Daubechies low-pass (scaling) filters with N/2 vanishing moments, normalised so Σh = √2, ‖h‖ = 1.
DAUBECHIES: dict[str, tuple[float, ...]] = {
    "db1": (0.7071067811865475244, 0.7071067811865475244),
    "db2": (0.48296291314453414337, 0.83651630373780790558, 0.22414386804201338103, -0.12940952255126038117),
    "db3": (
        0.33267055295008261600,
        0.80689150931109257649,
        0.45987750211849157010,
        -0.13501102001025458870,
        -0.085441273882026661693,
        0.035226291885709536603,
    ),
    "db4": (
        0.23037781330889650086,
        0.71484657055291564709,
        0.63088076792985890788,
        -0.027983769416859854211,
        -0.18703481171909308408,
        0.030841381835560763627,
        0.032883011666885199735,
        -0.010597401785069032105,
    ),
}
DAUBECHIES["haar"] = DAUBECHIES["db1"]


def daubechies(name: str, dtype: torch.dtype = torch.float64) -> Tensor:
    """The low-pass filter of ``db1``..``db4`` (``haar`` = ``db1``) as a tensor."""
    key = name.lower()
    if key not in DAUBECHIES:
        raise KeyError(
            f"Unknown wavelet {name!r}; hard-coded filters: {sorted(DAUBECHIES)}. Pass a tensor of filter "
            "coefficients (even length) for any other orthogonal wavelet."
        )
    return torch.tensor(DAUBECHIES[key], dtype=dtype)


def low_to_high(h: Tensor) -> Tensor:
    """The conjugate-mirror high-pass filter ``g[k] = (−1)^k h[N−1−k]``."""
    n = h.shape[-1]
    sign = torch.ones(n, dtype=h.dtype, device=h.device)
    sign[1::2] = -1
    return sign * h.flip(-1)


def _check_even(length: int, what: str) -> None:
    if length % 2:
        raise ValueError(
            f"The {what} has odd length {length}; the periodised DWT halves lengths at every level, so the "
            "signal length (or image height/width) must be divisible by 2**levels. Crop or pad the inputs."
        )


def dwt1d(x: Tensor, h: Tensor, g: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One level along the last dim of ``x`` (..., L): approximation and detail, each (..., L/2)."""
    g = low_to_high(h) if g is None else g
    lead, length = x.shape[:-1], x.shape[-1]
    _check_even(length, "signal")
    n = h.shape[-1]
    idx = torch.arange(length + n - 2, device=x.device) % length  # periodic extension
    xp = x.reshape(-1, 1, length)[..., idx]
    w = torch.stack([h, g]).to(x.dtype).unsqueeze(1)  # (2, 1, N)
    out = F.conv1d(xp, w, stride=2)  # (M, 2, L/2)
    return out[:, 0].reshape(*lead, length // 2), out[:, 1].reshape(*lead, length // 2)


def idwt1d(a: Tensor, d: Tensor, h: Tensor, g: Tensor | None = None) -> Tensor:
    """Adjoint of :func:`dwt1d` (its inverse when ``h`` is orthogonal): (..., L/2) x 2 -> (..., L)."""
    g = low_to_high(h) if g is None else g
    lead, half = a.shape[:-1], a.shape[-1]
    length = 2 * half
    n = h.shape[-1]
    w = torch.stack([h, g]).to(a.dtype).unsqueeze(1)
    y = F.conv_transpose1d(torch.stack([a.reshape(-1, half), d.reshape(-1, half)], 1), w, stride=2)
    idx = torch.arange(length + n - 2, device=a.device) % length
    out = torch.zeros(y.shape[0], length, dtype=y.dtype, device=y.device).index_add(1, idx, y[:, 0])
    return out.reshape(*lead, length)


def dwt2d(x: Tensor, h: Tensor, g: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One separable level over the last two dims of (..., H, W): ``LL`` (..., H/2, W/2) and the
    details stacked as (..., 3, H/2, W/2) in the order (low-high, high-low, high-high) where the first
    letter is the filter along H and the second along W."""
    g = low_to_high(h) if g is None else g
    lo_w, hi_w = dwt1d(x, h, g)  # along W
    ll, hl = dwt1d(lo_w.transpose(-1, -2), h, g)  # along H (transposed)
    lh, hh = dwt1d(hi_w.transpose(-1, -2), h, g)
    ll, hl, lh, hh = (t.transpose(-1, -2) for t in (ll, hl, lh, hh))
    return ll, torch.stack([lh, hl, hh], dim=-3)


def idwt2d(ll: Tensor, details: Tensor, h: Tensor, g: Tensor | None = None) -> Tensor:
    """Adjoint of :func:`dwt2d`."""
    g = low_to_high(h) if g is None else g
    lh, hl, hh = details.unbind(-3)
    lo_w = idwt1d(ll.transpose(-1, -2), hl.transpose(-1, -2), h, g).transpose(-1, -2)
    hi_w = idwt1d(lh.transpose(-1, -2), hh.transpose(-1, -2), h, g).transpose(-1, -2)
    return idwt1d(lo_w, hi_w, h, g)


def wavedec(x: Tensor, h: Tensor, levels: int, ndim: int = 1) -> tuple[Tensor, ...]:
    """Multi-level periodised DWT with low-pass ``h``: ``(a_J, d_J, ..., d_1)``, coarsest first (as pywt's
    ``wavedec``); ``ndim=2`` transforms the last two dims separably (details (..., 3, H_j, W_j))."""
    h = h.to(x.dtype)
    g = low_to_high(h)
    details = []
    a = x
    for _ in range(levels):
        a, d = dwt1d(a, h, g) if ndim == 1 else dwt2d(a, h, g)
        details.append(d)
    return (a, *reversed(details))


def waverec(coeffs: tuple[Tensor, ...] | list[Tensor], h: Tensor, ndim: int = 1) -> Tensor:
    """Adjoint of :func:`wavedec` (its inverse for an orthogonal ``h``)."""
    h = h.to(coeffs[0].dtype)
    g = low_to_high(h)
    a = coeffs[0]
    for d in coeffs[1:]:
        a = idwt1d(a, d, h, g) if ndim == 1 else idwt2d(a, d, h, g)
    return a


def wavelet_constraint_losses(h: Tensor) -> dict[str, Tensor]:
    """The wavelet constraint terms of AWD (Ha et al. 2021, Sec. 3.1; the authors' ``losses.py``).

    - ``lsum``: ½ (Σh − √2)²;  ``hsum``: ½ (Σg)²;  ``l2norm``: ½ (‖h‖² − 1)²;
    - ``cmf`` (conjugate mirror filter): ½ Σ_k (|Ĥ_k|² + |Ĥ_{k+N/2}|² − 2)² over the length-N DFT;
    - ``conv`` (even-lag orthogonality): ½ Σ_m (Σ_k h[k] h[k+2m] − δ_m)².

    All vanish for an orthogonal wavelet filter.
    """
    n = h.shape[-1]
    _check_even(n, "wavelet filter")
    g = low_to_high(h)
    lsum = 0.5 * (h.sum() - math.sqrt(2.0)) ** 2
    hsum = 0.5 * g.sum() ** 2
    l2norm = 0.5 * ((h**2).sum() - 1.0) ** 2
    mod = torch.fft.fft(h).abs() ** 2
    cmf = 0.5 * ((mod[: n // 2] + mod[n // 2 :] - 2.0) ** 2).sum()
    # Autocorrelation r[j] = Σ_k h[k] h[k+j], j = -(N-1)..(N-1); even lags only.
    r = F.conv1d(h.view(1, 1, n), h.view(1, 1, n), padding=n - 1).flatten()
    even = r[(n - 1) % 2 :: 2]
    delta = torch.zeros_like(even)
    delta[even.numel() // 2] = 1.0
    conv = 0.5 * ((even - delta) ** 2).sum()
    return {"lsum": lsum, "hsum": hsum, "l2norm": l2norm, "cmf": cmf, "conv": conv}


class AdaptiveWavelet(nn.Module):
    """A multi-level orthogonal DWT whose low-pass filter ``h`` is a learnable parameter.

    Args:
        wavelet: initial filter: a name (``db1``..``db4``, ``haar``) or a 1-D tensor of even length.
        levels: number of decomposition levels J.
        ndim: 1 for signals ((B, L) or (B, C, L)), 2 for images ((B, C, H, W)).
        init_noise: std of Gaussian noise added to the initial filter (AWD starts from a standard
            wavelet plus noise), drawn from a generator seeded with ``seed``.
        dtype: of the filter parameter (float64 keeps Daubechies filters exact to 1e-16).

    ``forward(x)`` returns the coefficients coarsest first, like pywt's ``wavedec``:
    ``(a_J, d_J, ..., d_1)``; in 2-D each detail is (B, C, 3, H_j, W_j). ``inverse`` inverts it.
    """

    def __init__(
        self,
        wavelet: str | Tensor = "db3",
        levels: int = 3,
        ndim: int = 1,
        init_noise: float = 0.0,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}.")
        if ndim not in (1, 2):
            raise ValueError(f"ndim must be 1 (signals) or 2 (images), got {ndim}.")
        h0 = daubechies(wavelet) if isinstance(wavelet, str) else torch.as_tensor(wavelet, dtype=torch.float64)
        if h0.ndim != 1 or h0.numel() % 2:
            raise ValueError(f"The wavelet filter must be 1-D with even length, got shape {tuple(h0.shape)}.")
        if init_noise > 0:
            gen = torch.Generator().manual_seed(int(seed))
            h0 = h0 + init_noise * torch.randn(h0.shape, generator=gen, dtype=torch.float64)
        self.h = nn.Parameter(h0.to(dtype).clone())
        self.levels = levels
        self.ndim = ndim
        self.init = wavelet if isinstance(wavelet, str) else "custom"

    @property
    def g(self) -> Tensor:
        return low_to_high(self.h)

    def _check(self, x: Tensor) -> None:
        need = 2 if self.ndim == 1 else 4
        if self.ndim == 1 and x.ndim not in (2, 3):
            raise ValueError(f"1-D wavelet inputs must be (B, L) or (B, C, L), got shape {tuple(x.shape)}.")
        if self.ndim == 2 and x.ndim != need:
            raise ValueError(f"2-D wavelet inputs must be (B, C, H, W), got shape {tuple(x.shape)}.")
        for size in x.shape[-self.ndim :]:
            if size % (2**self.levels):
                raise ValueError(
                    f"Input size {tuple(x.shape[-self.ndim :])} is not divisible by 2**levels = {2**self.levels}; "
                    "crop/pad the inputs or use fewer levels."
                )

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        self._check(x)
        return wavedec(x, self.h, self.levels, self.ndim)

    def inverse(self, coeffs: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
        if len(coeffs) != self.levels + 1:
            raise ValueError(f"Expected {self.levels + 1} coefficient tensors (a_J, d_J..d_1), got {len(coeffs)}.")
        return waverec(coeffs, self.h, self.ndim)

    def constraint_losses(self) -> dict[str, Tensor]:
        return wavelet_constraint_losses(self.h)

    def extra_repr(self) -> str:
        return f"filter_length={self.h.numel()}, levels={self.levels}, ndim={self.ndim}, init={self.init!r}"
