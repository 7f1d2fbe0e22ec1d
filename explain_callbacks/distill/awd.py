"""Adaptive wavelet distillation (AWD; Ha, Singh, Kumbier, Lim & Yu 2021, NeurIPS, arXiv:2107.09145).

A wavelet (one learnable low-pass filter h, high-pass g[k] = (−1)^k h[N−1−k]) is learned on the
teacher's training inputs by minimising, per batch of B inputs,

    L = ‖x − W⁻¹Wx‖² / B                                   (reconstruction)
      + λ_lsum (Σh − √2)²/2 + λ_hsum (Σg)²/2 + λ_l2norm (‖h‖² − 1)²/2
      + λ_cmf · CMF + λ_conv · even-lag orthogonality       (wavelet constraints)
      + λ_wave · mean_scales ‖Wx‖₁ / B                      (coefficient sparsity)
      + λ_attr · mean_scales ‖TRIM_f(Wx)‖₁ / B               (interpretation sparsity, double backprop)

(the scale-averaged L1 terms follow the authors' ``tuple_L1Loss``). The distilled model is then a
linear model on the few largest coefficients per scale: for each scale the ``n_coefficients``
coefficients of largest magnitude (signed values, sorted by magnitude: shift invariant, the
authors' ``max_transformer``), fitted to the teacher's outputs. Gradients of L are taken with
``torch.autograd.grad`` with respect to h only, so the teacher's parameters and their ``.grad`` are
never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._internal.batching import chunks
from .._internal.registry import STUDENTS
from .base import Student, single_thread, student_from_dict, teacher_device, teacher_dtype
from .linear import SparseLinearStudent, SparseLogisticStudent
from .trim import trim_attribution
from .wavelets import AdaptiveWavelet, low_to_high

__all__ = ["AWDStudent", "awd_loss", "max_coefficient_features", "scale_names"]

CONSTRAINTS = ("lsum", "hsum", "l2norm", "cmf", "conv")


def scale_names(levels: int) -> list[str]:
    """Names of the coefficient groups, coarsest first: ``a{J}``, ``d{J}``, ..., ``d1``."""
    return [f"a{levels}", *[f"d{j}" for j in range(levels, 0, -1)]]


def _l1_per_scale(coeffs: Sequence[Tensor]) -> Tensor:
    """Mean over scales of Σ|c| per batch (the authors' ``tuple_L1Loss`` divided by the batch size)."""
    b = coeffs[0].shape[0]
    return sum(c.abs().sum() for c in coeffs) / len(coeffs) / b


def awd_loss(
    wavelet: AdaptiveWavelet,
    x: Tensor,
    teacher: nn.Module | Callable[[Tensor], Tensor] | None,
    target: Tensor | None = None,
    *,
    lam_lsum: float = 1.0,
    lam_hsum: float = 1.0,
    lam_l2norm: float = 1.0,
    lam_cmf: float = 1.0,
    lam_conv: float = 1.0,
    lam_l1wave: float = 0.02,
    lam_l1attr: float = 0.01,
    attr_method: str = "saliency",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The AWD objective on one batch and its terms (``teacher`` may be None when ``lam_l1attr = 0``)."""
    coeffs = wavelet(x)
    rec = wavelet.inverse(coeffs)
    terms: dict[str, Tensor] = {"reconstruction": ((x - rec) ** 2).sum() / x.shape[0]}
    terms.update(wavelet.constraint_losses())
    terms["l1wave"] = _l1_per_scale(coeffs)
    total = terms["reconstruction"]
    lams = {"lsum": lam_lsum, "hsum": lam_hsum, "l2norm": lam_l2norm, "cmf": lam_cmf, "conv": lam_conv}
    for k, lam in lams.items():
        total = total + lam * terms[k]
    total = total + lam_l1wave * terms["l1wave"]
    if lam_l1attr > 0:
        if teacher is None:
            raise ValueError("lam_l1attr > 0 needs the teacher model for the TRIM attributions.")
        attrs = trim_attribution(
            teacher, x, wavelet, wavelet.inverse, target, method=attr_method, create_graph=True, batch_size=None
        )
        terms["l1attr"] = _l1_per_scale(attrs if isinstance(attrs, tuple) else (attrs,))
        total = total + lam_l1attr * terms["l1attr"]
    terms["total"] = total
    return total, terms


def max_coefficient_features(coeffs: Sequence[Tensor], n_coefficients: int = 1, signed: bool = False) -> Tensor:
    """For each scale, the ``n_coefficients`` coefficients of largest magnitude, sorted by magnitude.

    ``signed=False`` returns their magnitudes (invariant to the phase of an event as well as its
    position); ``signed=True`` their signed values (the authors' ``max_fun(sgn="abs")``).
    Returns (B, n_scales · n_coefficients), scales in the order given (coarsest first).
    """
    feats = []
    for c in coeffs:
        flat = c.reshape(c.shape[0], -1)
        k = min(n_coefficients, flat.shape[1])
        mag, idx = flat.abs().topk(k, dim=1)
        top = flat.gather(1, idx) if signed else mag
        if k < n_coefficients:  # a scale smaller than n_coefficients: pad with zeros
            top = torch.cat([top, top.new_zeros(top.shape[0], n_coefficients - k)], 1)
        feats.append(top)
    return torch.cat(feats, 1)


@STUDENTS.register("awd", "adaptive_wavelet")
class AWDStudent(Student):
    """Adaptive wavelet distillation for 1-D signals ((N, L) or (N, C, L)) and images ((N, C, H, W)).

    Args:
        wavelet: initial filter (``db1``..``db4`` or a tensor); levels: decomposition levels J.
        n_coefficients: largest coefficients per scale used as features of the linear model.
        signed_features: use the signed values of those coefficients (the authors' choice) instead of
            their magnitudes (default; invariant to an event's phase as well as its position).
        lam_*: weights of the AWD objective (see the module docstring); constraint weights default
            to 1 as in the authors' code, ``lam_l1wave``/``lam_l1attr`` near their cosmology setting.
        attr_method: TRIM attribution, ``saliency`` (the authors' default) or ``input_x_gradient``.
        epochs, batch_size, lr: Adam on h over the fitting inputs (shuffled with a seeded generator).
        init_noise: std of noise added to the initial filter.
        head_alpha, head_max_nonzeros: L1 of the linear/logistic model on the features (relative to
            λ_max; 0 gives an unpenalised fit) or a non-zero budget.
        temperature, ridge: soft targets and ridge of the logistic head (classification).
    """

    name = "awd"
    needs_teacher = True

    def __init__(
        self,
        wavelet: str = "db3",
        levels: int = 3,
        n_coefficients: int = 2,
        signed_features: bool = False,
        lam_lsum: float = 1.0,
        lam_hsum: float = 1.0,
        lam_l2norm: float = 1.0,
        lam_cmf: float = 1.0,
        lam_conv: float = 1.0,
        lam_l1wave: float = 0.02,
        lam_l1attr: float = 0.01,
        attr_method: str = "saliency",
        epochs: int = 20,
        batch_size: int = 64,
        lr: float = 1e-3,
        init_noise: float = 0.0,
        head_alpha: float = 0.0,
        head_max_nonzeros: int | None = None,
        temperature: float = 1.0,
        ridge: float = 1e-4,
        task: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(task=task, seed=seed)
        if n_coefficients < 1:
            raise ValueError(f"n_coefficients must be >= 1, got {n_coefficients}.")
        self.wavelet = wavelet
        self.levels = levels
        self.n_coefficients = n_coefficients
        self.signed_features = signed_features
        self.lams = {
            "lam_lsum": lam_lsum,
            "lam_hsum": lam_hsum,
            "lam_l2norm": lam_l2norm,
            "lam_cmf": lam_cmf,
            "lam_conv": lam_conv,
            "lam_l1wave": lam_l1wave,
            "lam_l1attr": lam_l1attr,
        }
        self.attr_method = attr_method
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.init_noise = init_noise
        self.head_alpha = head_alpha
        self.head_max_nonzeros = head_max_nonzeros
        self.temperature = temperature
        self.ridge = ridge
        self.transform_: AdaptiveWavelet | None = None
        self.head_: SparseLinearStudent | SparseLogisticStudent | None = None
        self.history_: list[dict[str, float]] = []

    def config(self) -> dict[str, Any]:
        return {
            "wavelet": self.wavelet,
            "levels": self.levels,
            "n_coefficients": self.n_coefficients,
            "signed_features": self.signed_features,
            **self.lams,
            "attr_method": self.attr_method,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "init_noise": self.init_noise,
            "head_alpha": self.head_alpha,
            "head_max_nonzeros": self.head_max_nonzeros,
            "temperature": self.temperature,
            "ridge": self.ridge,
            **super().config(),
        }

    # ------------------------------------------------------------------ fitting
    @staticmethod
    def _ndim(shape: tuple[int, ...]) -> int:
        if len(shape) in (1, 2):
            return 1
        if len(shape) == 3:
            return 2
        raise ValueError(
            f"AWD works on 1-D signals (L,) / (C, L) or images (C, H, W) per sample, got per-sample shape {shape}."
        )

    def _new_transform(self, device: torch.device) -> AdaptiveWavelet:
        assert self.input_shape_ is not None
        return AdaptiveWavelet(
            self.wavelet, self.levels, self._ndim(self.input_shape_), init_noise=self.init_noise, seed=self.seed
        ).to(device)

    def _fit(self, x: Tensor, teacher_out: Tensor, teacher: Any) -> None:
        device = teacher_device(teacher, x)
        dtype = teacher_dtype(teacher, x)  # a float64 teacher is trained through in float64
        wt = self._new_transform(device).to(dtype)
        if self.task_ == "classification":
            target_all = teacher_out.argmax(1)
        else:
            if teacher_out.ndim == 2 and teacher_out.shape[1] > 1:
                raise ValueError("AWD's TRIM loss explains one output; multi-output regression is not supported.")
            target_all = None
        opt = torch.optim.Adam(wt.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(int(self.seed))
        n = x.shape[0]
        self.history_ = []
        with torch.inference_mode(False), torch.enable_grad():
            for _epoch in range(self.epochs):
                perm = torch.randperm(n, generator=gen)
                sums: dict[str, float] = {}
                n_batches = 0
                for start in range(0, n, self.batch_size):
                    idx = perm[start : start + self.batch_size]
                    xb = x[idx].to(device=device, dtype=dtype)
                    tb = None if target_all is None else target_all[idx].to(device)
                    loss, terms = awd_loss(wt, xb, teacher, tb, attr_method=self.attr_method, **self.lams)
                    (g,) = torch.autograd.grad(loss, [wt.h])  # never .backward(): the teacher's .grad stays
                    opt.zero_grad(set_to_none=True)
                    wt.h.grad = g
                    opt.step()
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                    n_batches += 1
                self.history_.append({k: v / max(n_batches, 1) for k, v in sums.items()})
        wt.h.grad = None
        self.transform_ = wt.cpu().eval()
        feats = self.features(x)
        names = [f"{s}#{i + 1}" for s in scale_names(self.levels) for i in range(self.n_coefficients)]
        if self.task_ == "classification":
            head: SparseLinearStudent | SparseLogisticStudent = SparseLogisticStudent(
                alpha=self.head_alpha,
                max_nonzeros=self.head_max_nonzeros,
                temperature=self.temperature,
                ridge=self.ridge,
            )
        else:
            head = SparseLinearStudent(alpha=self.head_alpha, max_nonzeros=self.head_max_nonzeros)
        self.head_ = head.fit(feats, teacher_out.cpu(), feature_names=names)

    @torch.no_grad()
    def features(self, x: Tensor, batch_size: int = 512) -> Tensor:
        """The max-coefficient features (N, (J+1)·n_coefficients) of inputs x."""
        if self.transform_ is None:
            raise RuntimeError("AWDStudent is not fitted yet; call fit(x, teacher_outputs, teacher=model) first.")
        with torch.inference_mode(False), single_thread():
            out = [
                max_coefficient_features(
                    self.transform_(x[sl].detach().to(device="cpu", dtype=self.transform_.h.dtype)),
                    self.n_coefficients,
                    self.signed_features,
                )
                for sl in chunks(x.shape[0], batch_size)
            ]
        return torch.cat(out)

    # ------------------------------------------------------------------ using
    def predict(self, x: Tensor) -> Tensor:
        self._check_fitted()
        assert self.head_ is not None
        return self.head_.predict(self.features(x))

    def complexity(self) -> dict[str, int]:
        self._check_fitted()
        assert self.head_ is not None and self.transform_ is not None
        return {
            "nonzeros": self.head_.complexity()["nonzeros"],
            "filter_length": int(self.transform_.h.numel()),
            "features": (self.levels + 1) * self.n_coefficients,
        }

    def wavelet_losses(self) -> dict[str, float]:
        """Constraint terms of the learned filter (near zero for an orthogonal wavelet)."""
        assert self.transform_ is not None
        with torch.no_grad():
            return {k: float(v) for k, v in self.transform_.constraint_losses().items()}

    def describe(self) -> str:
        from ..callbacks._logging import markdown_table

        self._check_fitted()
        assert self.head_ is not None and self.transform_ is not None
        h = self.transform_.h.detach()
        g = low_to_high(h)
        filt = markdown_table(["k", "h[k]", "g[k]"], [[k, float(h[k]), float(g[k])] for k in range(h.numel())])
        cons = ", ".join(f"{k} {v:.2e}" for k, v in self.wavelet_losses().items())
        return (
            f"**AWDStudent**: wavelet from {self.wavelet}, {self.levels} levels, top {self.n_coefficients} "
            f"coefficients per scale\n\nConstraint terms: {cons}\n\n{filt}\n\n{self.head_.describe()}"
        )

    def image(self) -> Tensor | None:
        """The learned filters h and g (and the initial h) as a line plot (None without matplotlib)."""
        if self.transform_ is None:
            return None
        from ..viz import curves_figure, figure_to_tensor
        from .wavelets import daubechies

        h = self.transform_.h.detach()
        curves = {"h (learned)": h, "g (learned)": low_to_high(h)}
        if isinstance(self.wavelet, str):
            curves[f"h ({self.wavelet})"] = daubechies(self.wavelet)
        x = torch.arange(h.numel(), dtype=torch.float32)
        fig = curves_figure(curves, x=x, title="AWD wavelet filters", xlabel="tap k", ylabel="filter coefficient")
        return None if fig is None else figure_to_tensor(fig)

    def get_state(self) -> dict[str, Any]:
        assert self.transform_ is not None and self.head_ is not None
        return {
            "h": self.transform_.h.detach().cpu().clone(),
            "head": self.head_.to_dict(),
            "history": [dict(h) for h in self.history_],
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.transform_ = self._new_transform(torch.device("cpu"))
        with torch.no_grad():
            self.transform_.h.copy_(state["h"])
        self.head_ = student_from_dict(state["head"])  # type: ignore[assignment]
        self.history_ = list(state.get("history", []))
