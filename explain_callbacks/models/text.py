"""A small transformer classifier of token ids (the token models' example network)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TokenTransformer"]


class TokenTransformer(nn.Module):
    """Token ids (B, T) -> token embedding (``tok``, the only ``nn.Embedding``; its padding row is zero) plus
    a learned positional table -> ``n_layers`` pre-norm transformer encoder layers -> mean over the positions
    -> linear head with ``num_classes`` logits.

    The ids are read only through ``tok``: the positional table is a parameter, not a second embedding layer,
    and padding is not masked from the ids (the padding row is zero and the network learns to ignore it), so
    the network is exactly a function of its token embeddings and
    :class:`~explain_callbacks.attribution.EmbeddingView` explains it without approximation.
    """

    def __init__(
        self, vocab_size: int, num_classes: int = 2, max_len: int = 64, d_model: int = 32, n_heads: int = 2,
        n_layers: int = 1, dropout: float = 0.1, pad_id: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=2 * d_model, dropout=dropout, batch_first=True, norm_first=True
        )
        # enable_nested_tensor=False: no fast path that reads a padding mask (there is none) and no warning about it
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.pos.shape[0]:
            raise ValueError(f"sequences of {ids.shape[1]} tokens exceed max_len={self.pos.shape[0]}.")
        h = self.encoder(self.tok(ids) + self.pos[: ids.shape[1]])
        return self.head(h.mean(1))
