"""Explaining token models in the space of their embeddings.

Token ids are integers: no gradient, no interpolation and no mask reaches them. As for integrated
gradients on text (Sundararajan, Taly & Yan 2017, arXiv:1703.01365, Sec. 6.3), the model is read as
a function of its embedding layer's output ``E = embedding(ids)`` (B, T, D): every method and metric
then works on E like on any (B, T, D) sequence, and a token's score is its map summed over D.

:class:`EmbeddingView` runs the model on stand-in ids and swaps the embedding layer's output for
the given E with a forward hook (removed after each call). That is exact when the model uses its ids
only through that layer; :meth:`EmbeddingView.check` verifies it on real ids (a padding mask computed
from the ids, say, would differ) and names the fix otherwise.

:class:`TokenProbe` is what the callbacks build from a probe set of ids: the view, the embeddings, which
positions are real tokens (not padding), and the embedding of the *substrate token* that perturbation
metrics put in place of a removed token. :func:`token_scores` reduces a map to one score per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._internal.outputs import pick_output
from .layers import find_layer

__all__ = ["TOKEN_REDUCTIONS", "EmbeddingView", "TokenProbe", "find_embedding", "token_scores"]


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


#: how a (B, T, D) map becomes one score per token: ``"sum"`` over the embedding dims (signed; for IG the
#: token's share of the output difference, by completeness), ``"norm"`` (L2 norm over D; unsigned magnitude)
TOKEN_REDUCTIONS = ("sum", "norm")


def token_scores(maps: Tensor, reduce: str = "sum", valid: Tensor | None = None) -> Tensor:
    """One score per token, (B, T), from a (B, T, D) map (or a (B, T, 1) map of a mask method, taken as is):
    summed over D (``"sum"``) or its L2 norm over D (``"norm"``); zero where ``valid`` (B, T) is False
    (padding)."""
    if reduce not in TOKEN_REDUCTIONS:
        raise ValueError(f"token_reduce must be one of {TOKEN_REDUCTIONS}, got {reduce!r}.")
    if maps.ndim != 3:
        raise ValueError(f"token maps are (B, T, D) or (B, T, 1), got shape {tuple(maps.shape)}.")
    if maps.shape[-1] == 1:
        scores = maps[..., 0] if reduce == "sum" else maps[..., 0].abs()
    else:
        scores = maps.sum(-1) if reduce == "sum" else maps.norm(dim=-1)
    if valid is not None:
        scores = scores * valid.to(scores.device, scores.dtype)
    return scores


@dataclass
class TokenProbe:
    """A probe set of token ids made explainable: the model as a function of its embeddings.

    Attributes:
        view: the :class:`EmbeddingView` of the model.
        ids: the token ids (B, T).
        embedded: their embeddings (B, T, D): what methods and metrics explain.
        valid: (B, T) bool, False at padding (``ids == pad_id``): padding gets zero attribution and no metric
            removes or counts it.
        substrate: (D,) the embedding of the substrate token, what perturbation metrics put in place of a removed
            token (see :meth:`of` for which token that is).
        pad_id / substrate_id: the ids used (None: none).
    """

    view: EmbeddingView
    ids: Tensor
    embedded: Tensor
    valid: Tensor
    substrate: Tensor
    pad_id: int | None
    substrate_id: int | None

    @classmethod
    def of(
        cls, model: nn.Module, ids: Tensor, embedding: str | nn.Module | None = None, pad_id: int | None = None,
        substrate_token: int | None = None, attention_mask: Tensor | None = None,
    ) -> TokenProbe:  # fmt: skip
        """Build the probe of ``ids`` for ``model``.

        ``pad_id``: the padding id; None takes the embedding layer's ``padding_idx`` (no padding when it has
        none). ``attention_mask`` (B, T), nonzero at real tokens, says where the padding is instead of the ids (for
        tokenizers whose padding id is also a real token, e.g. GPT-2's end-of-text). The substrate token, in this
        order: ``substrate_token`` when given (e.g. a ``[MASK]`` id), else the padding id, else none: the zero
        vector (as a zero baseline).
        """
        if ids.is_floating_point() or ids.ndim != 2:
            raise TypeError(f"token probes are (B, T) integer ids, got {tuple(ids.shape)} {ids.dtype}.")
        view = EmbeddingView(model, embedding)
        layer = view._layer
        n_tokens = getattr(layer, "num_embeddings", None)
        if pad_id is None:
            pad = getattr(layer, "padding_idx", None)
            pad_id = None if pad is None else int(pad)
        sub = substrate_token if substrate_token is not None else pad_id
        for what, tid in (("pad_id", pad_id), ("substrate_token", sub)):
            if tid is not None and n_tokens is not None and not 0 <= int(tid) < int(n_tokens):
                raise ValueError(f"{what}={tid} is not a token id of the embedding (0..{int(n_tokens) - 1}).")
        embedded = view.embed(ids)
        if sub is None:
            substrate = embedded.new_zeros(embedded.shape[-1])
        else:
            substrate = view.embed(torch.full((1, 1), int(sub), dtype=torch.long, device=ids.device))[0, 0]
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(ids.shape):
                raise ValueError(
                    f"the attention mask has shape {tuple(attention_mask.shape)}, the token ids {tuple(ids.shape)}; "
                    "give one (B, T) mask per probe, nonzero at real tokens."
                )
            valid = attention_mask.to(ids.device) != 0
        else:
            valid = torch.ones_like(ids, dtype=torch.bool) if pad_id is None else ids != int(pad_id)
        return cls(view, ids, embedded, valid, substrate, pad_id, None if sub is None else int(sub))

    def scores(self, maps: Tensor, reduce: str = "sum") -> Tensor:
        """:func:`token_scores` of ``maps`` with the padding zeroed, (B, T)."""
        return token_scores(maps, reduce, self.valid[: maps.shape[0]])
