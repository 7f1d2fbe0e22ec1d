"""A signature student: a sparse linear/logistic model on the path signature of the model's sequence input.

Lyons & McLeod, "Signature methods in machine learning" (2022, arXiv:2206.14674), Sec. 3: a continuous
function of a stream is approximated uniformly on compact sets by a linear functional of its
(time-augmented) signature, so a sparse linear model on (log-)signature coordinates is a faithful
and readable surrogate of a sequence model: level-1 terms are channels' net increments, level-2
Lyndon terms are the signed Lévy areas of ordered channel pairs (which channel moves first),
higher levels are iterated brackets. The model is :class:`~explain_callbacks.distill.SparseLogisticStudent`
(classification) or :class:`~explain_callbacks.distill.SparseLinearStudent` (regression) fitted on
those features, so fitting, sparsity and export are theirs.

:meth:`SignatureStudent.attribute` attributes the student's logit back to time steps and channels:
Integrated Gradients from the zero stream through the differentiable signature, computed exactly
(the logit is a polynomial of degree ``depth`` along the straight path, so ``⌈depth/2⌉``
Gauss-Legendre points integrate it without error): the map sums to ``f(x) − f(0)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._internal.guard import grad_enabled, normal_tensor
from .._internal.registry import STUDENTS
from ..analysis.signatures import (
    BACKENDS,
    gauss_legendre,
    logsignature,
    lyndon_words,
    polynomial_ig_points,
    signature,
    signature_words,
    word_bracket,
)
from .base import Student, student_from_dict
from .linear import SparseLinearStudent, SparseLogisticStudent

__all__ = ["SignatureFeatures", "SignatureStudent"]

LAYOUTS = ("BTD", "BDT")
KINDS = ("logsignature", "signature")


class SignatureFeatures(nn.Module):
    """Streams -> (log-)signature features, a differentiable module (no parameters).

    Args:
        depth: truncation level.
        kind: ``logsignature`` (Lyndon coordinates: increments, Lévy areas, brackets) or ``signature``.
        time, base, leadlag: augmentations of :func:`~explain_callbacks.analysis.signatures.augment`.
        layout: ``BTD`` (batch, time, channels) or ``BDT`` (channels first, as Conv1d); (B, T) inputs are
            one-channel streams.
        backend: ``auto`` (pySigLib when installed, else pure torch), ``torch`` or ``pysiglib``.
    """

    def __init__(
        self, depth: int = 3, kind: str = "logsignature", time: bool = True, base: bool = True,
        leadlag: bool = False, layout: str = "BTD", backend: str = "auto",
    ) -> None:  # fmt: skip
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        self.backend = backend
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be 'BTD' (batch, time, channels) or 'BDT' (channels first), got {layout!r}.")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}.")
        self.depth, self.kind, self.time, self.base = depth, kind, time, base
        self.leadlag, self.layout = leadlag, layout

    def stream(self, x: Tensor) -> Tensor:
        """The input as (B, T, D)."""
        if x.ndim == 2:
            return x.unsqueeze(-1)
        if x.ndim != 3:
            raise ValueError(
                f"SignatureStudent takes sequences (B, T, D) ({self.layout!r} layout) or (B, T), got "
                f"{tuple(x.shape)}; set layout='BDT' for channels-first (Conv1d) inputs."
            )
        return x.transpose(1, 2) if self.layout == "BDT" else x

    def forward(self, x: Tensor) -> Tensor:
        s = self.stream(x)
        s = s if s.is_floating_point() else s.float()
        kw = {"time": self.time, "base": self.base, "leadlag": self.leadlag, "backend": self.backend}
        if self.kind == "signature":
            return signature(s, self.depth, **kw)
        return logsignature(s, self.depth, mode="words", **kw)

    def channel_names(self, channels: int, names: Sequence[str] | None = None) -> list[str]:
        """Names of the augmented channels (lead/lag copies, then ``t``)."""
        base = list(names) if names is not None else [f"x{i}" for i in range(channels)]
        if len(base) != channels:
            raise ValueError(f"{len(base)} channel names for {channels} channels; pass one per channel.")
        out = [f"{n}.lead" for n in base] + [f"{n}.lag" for n in base] if self.leadlag else base
        return [*out, "t"] if self.time else out

    def words(self, channels: int) -> list[tuple[int, ...]]:
        """The word (augmented-channel indices) of each feature."""
        d = channels * (2 if self.leadlag else 1) + (1 if self.time else 0)
        return list(lyndon_words(d, self.depth)) if self.kind == "logsignature" else signature_words(d, self.depth)

    def feature_names(self, channels: int, names: Sequence[str] | None = None) -> list[str]:
        """``Δx0`` (increment), ``area(x0,x1)`` (signed Lévy area), ``[x0,[x0,x1]]`` (bracket) or ``S(x0,x1,x1)``."""
        ch = self.channel_names(channels, names)
        out = []
        for w in self.words(channels):
            if self.kind == "signature":
                out.append("S(" + ",".join(ch[i] for i in w) + ")")
            elif len(w) == 1:
                out.append(f"Δ{ch[w[0]]}")
            elif len(w) == 2:
                out.append(f"area({ch[w[0]]},{ch[w[1]]})")
            else:
                out.append(word_bracket(w, ch))
        return out


class _SignatureLogit(nn.Module):
    """The fitted student as a differentiable module: streams -> logits (B, K) or regression outputs (B, m).
    Two classes (one log-odds z) give the logits ``[−z/2, z/2]``: the probabilities of ``[0, z]``, with each
    class's logit informative (the target class's logit is what attributions and metrics explain)."""

    def __init__(self, features: SignatureFeatures, coef: Tensor, intercept: Tensor, binary: bool) -> None:
        super().__init__()
        self.features = features
        self.register_buffer("coef", coef.detach().clone())
        self.register_buffer("intercept", intercept.detach().clone())
        self.binary = binary

    def forward(self, x: Tensor) -> Tensor:
        z = self.features(x).to(self.coef.dtype) @ self.coef + self.intercept
        return torch.cat([-0.5 * z, 0.5 * z], 1) if self.binary else z


@STUDENTS.register("signature", "path_signature")
class SignatureStudent(Student):
    """Sparse linear/logistic model on truncated (log-)signature features of sequence inputs.

    Args:
        depth: signature truncation level (3 sees increments, areas and one more bracket).
        kind: ``logsignature`` (default: Lyndon coordinates, level 2 = signed Lévy areas; fewer features)
            or ``signature`` (linear functionals of it are universal, Lyons & McLeod 2022, Thm. 3.2).
        time: add time as a channel (the model may depend on speed, not only the path's shape).
        base: start every stream at the origin (the model may depend on absolute values, not only moves).
        leadlag: the lead-lag transform (quadratic variation; doubles the channels).
        layout: ``BTD`` (batch, time, channels) or ``BDT`` (channels first).
        channel_names: names of the D input channels (default ``x0``, ``x1``, ...).
        alpha, max_nonzeros, refit, temperature, ridge: of the inner sparse model (see
            :class:`~explain_callbacks.distill.SparseLogisticStudent`).
        batch_size: streams per signature call (memory: B·T·D^depth numbers).
        backend: signature backend, ``auto`` (pySigLib when installed, else pure torch), ``torch`` or ``pysiglib``.
        n_examples: training streams kept (the first ones) for :meth:`image`, which draws them with their
            attribution maps; 0 keeps none (then no image; the streams are stored in the exported file).
    """

    name = "signature"

    def __init__(
        self,
        depth: int = 3,
        kind: str = "logsignature",
        time: bool = True,
        base: bool = True,
        leadlag: bool = False,
        layout: str = "BTD",
        channel_names: Sequence[str] | None = None,
        alpha: float = 0.05,
        max_nonzeros: int | None = None,
        refit: bool = True,
        temperature: float = 1.0,
        ridge: float = 1e-4,
        batch_size: int = 512,
        n_examples: int = 4,
        backend: str = "auto",
        task: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(task=task, seed=seed)
        self.features = SignatureFeatures(depth, kind, time, base, leadlag, layout, backend)  # validates
        self.backend = backend
        self.depth, self.kind, self.time, self.base = depth, kind, time, base
        self.leadlag, self.layout = leadlag, layout
        self.channel_names = list(channel_names) if channel_names is not None else None
        self.alpha, self.max_nonzeros, self.refit = alpha, max_nonzeros, refit
        self.temperature, self.ridge = temperature, ridge
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = batch_size
        if n_examples < 0:
            raise ValueError(f"n_examples must be >= 0, got {n_examples}.")
        self.n_examples = n_examples
        self.examples_: Tensor | None = None  # the first n_examples training streams, for image()
        self.inner_: SparseLinearStudent | SparseLogisticStudent | None = None
        self.channels_: int | None = None
        self.importance_: Tensor | None = None  # |standardised weight| per feature (max over outputs)

    def config(self) -> dict[str, Any]:
        return {
            "depth": self.depth,
            "kind": self.kind,
            "time": self.time,
            "base": self.base,
            "leadlag": self.leadlag,
            "layout": self.layout,
            "channel_names": self.channel_names,
            "alpha": self.alpha,
            "max_nonzeros": self.max_nonzeros,
            "refit": self.refit,
            "temperature": self.temperature,
            "ridge": self.ridge,
            "batch_size": self.batch_size,
            "n_examples": self.n_examples,
            "backend": self.backend,
            **super().config(),
        }

    # ------------------------------------------------------------------ features
    def transform(self, x: Tensor) -> Tensor:
        """Signature features (N, F) of inputs ``x`` in float64 on the CPU (the sparse solvers' space),
        computed on ``x``'s device in chunks of ``batch_size`` streams."""
        with torch.no_grad():
            parts = [
                self.features(x[i : i + self.batch_size].double()).cpu() for i in range(0, x.shape[0], self.batch_size)
            ]
        return torch.cat(parts, 0)

    def feature_names_signature(self) -> list[str]:
        """Readable name of each signature feature (``Δx0``, ``area(x0,x1)``, ...)."""
        assert self.channels_ is not None
        return self.features.feature_names(self.channels_, self.channel_names)

    def _fit(self, x: Tensor, teacher_out: Tensor, teacher: Any) -> None:
        self.channels_ = int(self.features.stream(x[:1]).shape[2])
        if self.channel_names is not None and len(self.channel_names) != self.channels_:
            raise ValueError(
                f"channel_names has {len(self.channel_names)} names for {self.channels_} channels; "
                "pass one per channel."
            )
        F = self.transform(x)
        common = {"alpha": self.alpha, "max_nonzeros": self.max_nonzeros, "refit": self.refit}
        if self.task_ == "classification":
            inner: SparseLinearStudent | SparseLogisticStudent = SparseLogisticStudent(
                **common, temperature=self.temperature, ridge=self.ridge, task="classification"
            )
        else:
            inner = SparseLinearStudent(**common, task="regression")
        if self.inner_ is not None and type(self.inner_) is type(inner):
            inner._warm = self.inner_._warm  # the Distiller's next epoch starts from the last solution
        inner.fit(F, teacher_out, feature_names=self.feature_names_signature())
        self.inner_ = inner
        assert inner.coef_ is not None
        self.importance_ = (inner.coef_.abs() * F.std(0, unbiased=False).unsqueeze(1)).amax(1)
        self.examples_ = x[: self.n_examples].detach().cpu().clone() if self.n_examples else None

    # ------------------------------------------------------------------ using
    def decision_function(self, x: Tensor) -> Tensor:
        self._check_fitted()
        assert self.inner_ is not None
        return self.inner_.decision_function(self.transform(x))

    def predict(self, x: Tensor) -> Tensor:
        self._check_fitted()
        assert self.inner_ is not None
        return self.inner_.predict(self.transform(x))

    def complexity(self) -> dict[str, int]:
        self._check_fitted()
        assert self.inner_ is not None
        return self.inner_.complexity()

    def module(self) -> nn.Module:
        """The fitted student as a differentiable ``nn.Module`` (float64) from streams to logits (two classes:
        ``[−z/2, z/2]``, z the log-odds) or regression outputs: for the attribution methods and metrics of
        explain_callbacks (e.g. ``completeness_error(student.module(), x, student.attribute(x), target)``)."""
        self._check_fitted()
        assert self.inner_ is not None and self.inner_.coef_ is not None and self.inner_.intercept_ is not None
        binary = self.task_ == "classification" and self.inner_.coef_.shape[1] == 1
        return _SignatureLogit(self.features, self.inner_.coef_, self.inner_.intercept_, binary)

    def ranking(self) -> list[tuple[str, float, list[float]]]:
        """Non-zero terms by standardised weight, largest first: ``(name, |standardised weight|, weights)``."""
        self._check_fitted()
        assert self.inner_ is not None and self.importance_ is not None and self.inner_.coef_ is not None
        names = self.feature_names_signature()
        sup = self.inner_.support()
        order = sup[self.importance_[sup].argsort(descending=True)].tolist()
        return [(names[i], float(self.importance_[i]), self.inner_.coef_[i].tolist()) for i in order]

    def channel_importance(self) -> dict[str, float]:
        """Standardised weight of the terms each (augmented) channel appears in, summed."""
        assert self.channels_ is not None and self.importance_ is not None
        ch = self.features.channel_names(self.channels_, self.channel_names)
        out = dict.fromkeys(ch, 0.0)
        for w, imp in zip(self.features.words(self.channels_), self.importance_.tolist(), strict=True):
            for c in set(w):
                out[ch[c]] += imp
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def describe(self, max_rows: int = 20) -> str:
        from ..callbacks._logging import markdown_table  # lazy: callbacks import Lightning

        self._check_fitted()
        assert self.inner_ is not None
        rank = self.ranking()
        heads = ["term", "reads as", "standardised |weight|", *self.inner_._output_names()]
        rows = [[n, _reading(n), imp, *w] for n, imp, w in rank[:max_rows]]
        rows.append(["(intercept)", "", "", *self.inner_.intercept_.tolist()])
        aug = [a for a, on in (("time", self.time), ("basepoint", self.base), ("lead-lag", self.leadlag)) if on]
        c = self.complexity()
        head = (
            f"**SignatureStudent**: {c['nonzeros']} non-zero weights on {c['features']} level-≤{self.depth} "
            f"{self.kind} terms of {self.channels_} channels ({', '.join(aug) or 'no augmentation'})"
        )
        if len(rank) > max_rows:
            head += f" (largest {max_rows} shown)"
        chans = [[k, v] for k, v in self.channel_importance().items() if v > 0]
        return (
            head + "\n\n" + markdown_table(heads, rows)
            + "\n\nChannels (summed standardised |weight| of the terms they appear in):\n\n"
            + markdown_table(["channel", "weight"], chans)
        )  # fmt: skip

    def attribute(self, x: Tensor, target: Tensor | int | None = None) -> Tensor:
        """The student's decision attributed to time steps and channels, a map of ``x``'s shape.

        Integrated Gradients (Sundararajan et al. 2017) from the zero stream of :meth:`module`'s output for
        ``target`` (a class's logit, two classes ``±z/2``; default: the student's predicted class; regression:
        the output column, default 0). Exact: the logit is a polynomial of degree ≤ depth in the path scale α,
        so ``⌈depth/2⌉`` Gauss-Legendre points integrate the gradient without error; the map sums to
        ``f(x) − f(0)`` per stream. Computed in float64 on ``x``'s device, in chunks of ``batch_size`` streams.
        """
        dtype = x.dtype if x.is_floating_point() else torch.float32
        tgt = None if target is None else torch.as_tensor(target, dtype=torch.long, device=x.device).expand(x.shape[0])
        parts = []
        with grad_enabled():  # whatever the caller's context (no_grad, inference_mode: a validation loop)
            mod = self.module().to(x.device)  # built here: buffers made in inference mode cannot enter a graph
            for i in range(0, x.shape[0], self.batch_size):
                xd = normal_tensor(x[i : i + self.batch_size].detach()).to(torch.float64)  # type: ignore[union-attr]
                t = None if tgt is None else normal_tensor(tgt[i : i + self.batch_size])
                parts.append(self._integrated_gradients(mod, xd, t).to(dtype))  # type: ignore[arg-type]
        return torch.cat(parts, 0)

    def _integrated_gradients(self, mod: nn.Module, xd: Tensor, target: Tensor | None) -> Tensor:
        with torch.no_grad():
            out = mod(xd)
        if target is None:
            tgt = out.argmax(1) if self.task_ == "classification" else torch.zeros(xd.shape[0], dtype=torch.long)
        else:
            tgt = target
        if int(tgt.max()) >= out.shape[1] or int(tgt.min()) < 0:
            raise ValueError(f"target must index the student's {out.shape[1]} outputs, got {tgt.unique().tolist()}.")
        nodes, weights = gauss_legendre(polynomial_ig_points(self.depth))
        total = torch.zeros_like(xd)
        for a, w in zip(nodes.tolist(), weights.tolist(), strict=True):
            xa = (a * xd).requires_grad_(True)
            o = mod(xa)
            (g,) = torch.autograd.grad(o.gather(1, tgt.unsqueeze(1)).sum(), xa)
            total = total + w * g
        return xd * total

    def image(self) -> Tensor | None:
        """The kept training streams with the student's attribution maps over time (``sequence_figure``, as the
        AttributionMonitor draws sequence maps), (3, H, W) in [0, 1]; None without examples."""
        if not self.fitted or self.examples_ is None or self.examples_.shape[0] == 0:
            return None
        from ..viz import figure_to_tensor, is_figure
        from ..viz.figures import sequence_figure

        x = self.examples_
        amap = self.attribute(x)
        pred = self.predict(x)

        def as_fdt(t: Tensor) -> Tensor:  # sequence_figure draws (N, channels, time)
            return t.unsqueeze(1) if t.ndim == 2 else t if self.layout == "BDT" else t.transpose(1, 2)

        captions = [f"student: {'class' if self.task_ == 'classification' else 'output'} {p}" for p in pred.tolist()]
        fig = sequence_figure(
            as_fdt(x), {"signature IG": as_fdt(amap)}, signed={"signature IG": True}, captions=captions,
            feature_names=self.channel_names, title="SignatureStudent: decision over time and channels",
        )  # fmt: skip
        return figure_to_tensor(fig) if is_figure(fig) else fig

    # ------------------------------------------------------------------ export
    def get_state(self) -> dict[str, Any]:
        assert self.inner_ is not None
        return {
            "channels": self.channels_,
            "importance": self.importance_,
            "examples": self.examples_,
            "inner": self.inner_.to_dict(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.channels_ = state["channels"]
        self.importance_ = state["importance"]
        self.examples_ = state.get("examples")
        self.inner_ = student_from_dict(state["inner"])  # type: ignore[assignment]


def _reading(name: str) -> str:
    """A plain-words reading of a log-signature term (for describe())."""
    if name.startswith("Δ"):
        return f"net change of {name[1:]}"
    if name.startswith("area("):
        a, b = name[5:-1].split(",")
        return f"signed area: {a} moves before {b} (+) or after (−)"
    if name.startswith("["):
        return "iterated area (higher-order ordering)"
    return "iterated integral"
