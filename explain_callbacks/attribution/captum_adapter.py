"""Use any ``captum.attr`` method wherever an explain_callbacks method is accepted."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import Attributor

__all__ = ["CaptumAttributor"]


class CaptumAttributor(Attributor):
    """Adapter for Captum (optional dependency).

    Args:
        method: a Captum attribution class (built per call with the model) such as
            ``captum.attr.IntegratedGradients``, or an instance already bound to the model.
        name: short name for logging (default: the class name in lower case).
        init_kwargs: extra constructor arguments (e.g. ``layer=`` for layer methods).
        **attribute_kwargs: passed to ``.attribute`` (``n_steps``, ``baselines``, ...).

    Captum's maps are not differentiable w.r.t. the parameters (``create_graph`` is refused).
    """

    differentiable = False

    def __init__(
        self, method: Any, name: str | None = None, init_kwargs: dict[str, Any] | None = None, **attribute_kwargs: Any
    ) -> None:
        super().__init__(batch_size=None)
        self.method = method
        cls = method if isinstance(method, type) else type(method)
        if not hasattr(cls, "attribute"):
            raise TypeError(f"{cls.__name__} has no .attribute(); pass a captum.attr method class or instance.")
        self.name = name or cls.__name__.lower()
        self.init_kwargs = init_kwargs or {}
        self.attribute_kwargs = attribute_kwargs

    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        explainer = self.method(model, **self.init_kwargs) if isinstance(self.method, type) else self.method
        out = explainer.attribute(inputs, target=target, **self.attribute_kwargs)
        return out[0] if isinstance(out, tuple) else out
