"""Explaining token models in the space of their embeddings.

Token ids are integers: no gradient, no interpolation and no mask reaches them. As for integrated
gradients on text (Sundararajan, Taly & Yan 2017, arXiv:1703.01365, Sec. 6.3), the model is read as
a function of its embedding layer's output ``E = embedding(ids)`` (B, T, D): every method and metric
then works on E like on any (B, T, D) sequence, and a token's score is its map summed over D.

:class:`EmbeddingView` runs the model on stand-in ids and swaps the embedding layer's output for
the given E with a forward hook (removed after each call). That is exact when the model uses its ids
only through that layer; :meth:`EmbeddingView.check` verifies it on real ids (a padding mask computed
from the ids, say, would differ) and names the fix otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._internal.outputs import pick_output
from .layers import find_layer

__all__ = ["EmbeddingView", "find_embedding"]


def find_embedding(model: nn.Module, layer: str | nn.Module | None = None) -> nn.Module:
    """The embedding layer to explain from: ``layer`` (a name or a module), else the model's only
    ``nn.Embedding``; an error names the candidates when there are none or several."""
    if layer is not None:
        return find_layer(model, layer)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if len(found) == 1:
        return found[0][1]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no nn.Embedding to explain token ids from; pass embedding='<layer name>' "
            "(the module turning ids into vectors), or feed float inputs."
        )
    names = [n for n, _ in found]
    raise ValueError(
        f"{type(model).__name__} has several nn.Embedding layers {names}; pass embedding=<name> of the token "
        "embedding (positional or segment embeddings then stay as the model computes them)."
    )


class EmbeddingView(nn.Module):
    """``model`` seen as a function of its token embeddings: ``view(E)`` = ``model(ids)`` with the
    embedding layer's output replaced by E (B, T, D).

    Args:
        model: the token model (it takes a (B, T) long tensor of ids).
        embedding: the embedding layer (name or module); None: the model's only ``nn.Embedding``.

    ``view.embed(ids)`` gives the embeddings to explain (no graph). Mode, parameters and hooks are the
    model's own; the view holds no state.
    """

    def __init__(self, model: nn.Module, embedding: str | nn.Module | None = None) -> None:
        super().__init__()
        self.inner = model
        self.training = model.training  # mirror the mode without calling train()/eval() on the model
        layer = find_embedding(model, embedding)
        object.__setattr__(self, "_layer", layer)  # a submodule of ``model`` already: not registered twice
        pad = getattr(layer, "padding_idx", None)
        n_tokens = getattr(layer, "num_embeddings", 1)
        # stand-in ids, never the padding id: a model masking its padding sees none
        self._stand_in = 0 if pad is None else (int(pad) + 1) % max(int(n_tokens), 1)

    def embed(self, ids: Tensor) -> Tensor:
        """The embeddings of ``ids`` (B, T, D), detached."""
        if ids.is_floating_point():
            raise TypeError(f"embed takes token ids (an integer tensor), got {ids.dtype}.")
        with torch.no_grad():
            return self._layer(ids).detach()

    def forward(self, embedded: Tensor) -> object:
        ids = torch.full(embedded.shape[:-1], self._stand_in, dtype=torch.long, device=embedded.device)

        def swap(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            if out.shape != embedded.shape:
                raise RuntimeError(
                    f"the embedding layer gave {tuple(out.shape)} for ids {tuple(ids.shape)}, not the explained "
                    f"{tuple(embedded.shape)}; EmbeddingView needs a layer mapping (B, T) ids to (B, T, D)."
                )
            return embedded.to(out.dtype)

        handle = self._layer.register_forward_hook(swap)
        try:
            return self.inner(ids)
        finally:
            handle.remove()

    @torch.no_grad()
    def check(self, ids: Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> None:
        """Raise if the view does not reproduce ``model(ids)`` (the model reads its ids beyond the
        embedding layer, e.g. a padding mask built from them)."""
        want = pick_output(self.inner(ids))
        got = pick_output(self(self.embed(ids)))
        if not torch.allclose(got, want, atol=atol, rtol=rtol):
            diff = float((got - want).abs().max())
            raise ValueError(
                f"{type(self.inner).__name__} reads its token ids beyond the embedding layer (max output difference "
                f"{diff:.3g} when only the embeddings are given), e.g. a padding mask computed from the ids. Explain "
                "a module that takes the embeddings and the mask instead (model_attr=..., input_key=a function of "
                "the batch), or drop the mask for the probe set."
            )
