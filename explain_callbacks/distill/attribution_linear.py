"""A linear student on the k features with the largest mean |attribution| of the teacher.

The features are ranked by ``mean_i |A(f, x_i)_j|`` over (a subsample of) the buffered inputs, with
``A`` any explain_callbacks attribution method (Integrated Gradients by default, Sundararajan et al.
2017) explaining the teacher's predicted class (classification) or its output (regression); an
unpenalised linear (regression) or logistic (classification, soft targets) model is then fitted on
those k features.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._internal.registry import STUDENTS
from .base import Student, student_from_dict, teacher_device, teacher_dtype
from .linear import SparseLinearStudent, SparseLogisticStudent

__all__ = ["AttributionLinearStudent", "mean_abs_attribution"]


def mean_abs_attribution(
    teacher: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    target: Tensor | None,
    method: Any = "ig",
    batch_size: int = 256,
) -> Tensor:
    """Mean |attribution| per input feature, (prod(input shape),), computed in chunks of ``batch_size`` rows."""
    from ..attribution import build_attributor

    attr = build_attributor(method)
    total = torch.zeros(x[0].numel(), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        a = attr(teacher, x[sl], None if target is None else target[sl])
        total += a.detach().abs().reshape(a.shape[0], -1).double().sum(0)
    return (total / x.shape[0]).cpu()


@STUDENTS.register("attribution_linear", "topk_linear")
class AttributionLinearStudent(Student):
    """Linear/logistic student on the top-k features by mean |attribution| of the teacher.

    Args:
        k: number of features kept.
        method: attribution method: a registered short name (``ig``, ``saliency``, ...), a
            ``{"name": ..., **kwargs}`` mapping or an Attributor instance. Default IG with 16 steps.
        max_samples: inputs attributed (the first ones of the buffer; the ranking is a mean).
        batch_size: rows per attribution call.
        temperature, ridge: of the logistic fit (classification).

    ``fit`` needs ``teacher=``: the model in the same input space as ``x``.
    """

    name = "attribution_linear"
    needs_teacher = True

    def __init__(
        self,
        k: int = 5,
        method: str | Mapping[str, Any] | Any = None,
        max_samples: int = 256,
        batch_size: int = 256,
        temperature: float = 1.0,
        ridge: float = 1e-4,
        task: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(task=task, seed=seed)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        self.k = k
        self.method = {"name": "ig", "n_steps": 16, "completeness": False} if method is None else method
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.temperature = temperature
        self.ridge = ridge
        self.features_: Tensor | None = None
        self.importance_: Tensor | None = None
        self.inner_: SparseLinearStudent | SparseLogisticStudent | None = None

    def config(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "method": self.method,
            "max_samples": self.max_samples,
            "batch_size": self.batch_size,
            "temperature": self.temperature,
            "ridge": self.ridge,
            **super().config(),
        }

    def _fit(self, x: Tensor, teacher_out: Tensor, teacher: Any) -> None:
        n = min(self.max_samples, x.shape[0])
        device = teacher_device(teacher, x)
        xs = x[:n].to(device=device, dtype=teacher_dtype(teacher, x))
        target = teacher_out[:n].argmax(1).to(device) if self.task_ == "classification" else None
        with torch.enable_grad():
            self.importance_ = mean_abs_attribution(teacher, xs, target, self.method, self.batch_size)
        k = min(self.k, self.importance_.numel())
        self.features_ = self.importance_.argsort(descending=True)[:k].sort().values
        X = x.reshape(x.shape[0], -1)[:, self.features_.to(x.device)]
        names = [self.feature_name(int(i)) for i in self.features_]
        if self.task_ == "classification":
            self.inner_ = SparseLogisticStudent(alpha=0.0, temperature=self.temperature, ridge=self.ridge)
        else:
            self.inner_ = SparseLinearStudent(alpha=0.0)
        self.inner_.fit(X, teacher_out, feature_names=names)

    def _select(self, x: Tensor) -> Tensor:
        self._check_fitted()
        assert self.features_ is not None
        return x.reshape(x.shape[0], -1)[:, self.features_.to(x.device)]

    def predict(self, x: Tensor) -> Tensor:
        assert self.inner_ is not None
        return self.inner_.predict(self._select(x))

    def complexity(self) -> dict[str, int]:
        self._check_fitted()
        assert self.inner_ is not None
        return {"nonzeros": self.inner_.complexity()["nonzeros"], "features": int(self.features_.numel())}

    def describe(self) -> str:
        from ..callbacks._logging import markdown_table

        self._check_fitted()
        assert self.inner_ is not None and self.importance_ is not None and self.features_ is not None
        coef = self.inner_.coef_
        order = self.importance_[self.features_].argsort(descending=True).tolist()
        heads = ["feature", "mean abs attribution", *self.inner_._output_names()]
        rows = [
            [self.feature_name(int(self.features_[j])), float(self.importance_[self.features_[j]]), *coef[j].tolist()]
            for j in order
        ]
        rows.append(["(intercept)", "", *self.inner_.intercept_.tolist()])
        return f"**AttributionLinearStudent**: top {self.features_.numel()} features\n\n" + markdown_table(heads, rows)

    def image(self) -> Tensor | None:
        """Mean |attribution| as an image for image-shaped inputs, with the chosen pixels outlined."""
        if self.importance_ is None or self.input_shape_ is None or len(self.input_shape_) < 2:
            return None
        from ..viz import figure_to_tensor, is_figure, tiles_figure

        m = self.importance_.float().reshape(self.input_shape_)
        if m.ndim == 3:
            m = m.sum(0)
        fig = tiles_figure([m], ["mean |attribution|"], signed=False, title="AttributionLinearStudent",
                           colorbar_label="mean |attribution|")  # fmt: skip
        return figure_to_tensor(fig) if is_figure(fig) else fig

    def get_state(self) -> dict[str, Any]:
        assert self.inner_ is not None
        return {
            "features": self.features_,
            "importance": self.importance_,
            "inner": self.inner_.to_dict(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.features_ = state["features"]
        self.importance_ = state["importance"]
        self.inner_ = student_from_dict(state["inner"])  # type: ignore[assignment]
