"""Black-box and learned-mask attribution methods (perturbation family)."""

__all__: list[str] = []
