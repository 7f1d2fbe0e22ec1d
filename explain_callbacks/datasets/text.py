"""A procedural text data set with a planted keyword rule (token models, explained in embedding space).

Every sentence is a run of neutral filler words with exactly one *keyword* planted at a random
position: a word of the positive list (label 1) or of the negative list (label 0). Nothing else
carries the label (the fillers are drawn independently of it), so the keyword is the whole cause
of the label and its position is a ground truth for token attributions. Sentences have random
lengths and are right-padded with the padding token ``<pad>`` (id 0); ``<mask>`` (id 1) is the
token deletion metrics replace removed words with when asked to (see ``docs/text.md``).

Generated from a seeded ``torch.Generator``; nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .tabular_images import TensorDataModule

__all__ = ["KEYWORDS", "TEXT_VOCAB", "TextKeywordDataModule", "make_keyword_text"]

PAD, MASK = "<pad>", "<mask>"
#: the planted keywords: index 0 the negative words (label 0), index 1 the positive ones (label 1)
KEYWORDS: tuple[tuple[str, ...], tuple[str, ...]] = (("awful", "boring", "poor"), ("great", "superb", "fun"))
_FILLERS = (
    "the", "a", "this", "that", "film", "movie", "story", "plot", "actor", "cast", "scene", "music", "camera",
    "script", "it", "was", "is", "very", "quite", "rather", "and", "but", "so", "with", "of", "in", "on", "at",
    "for", "to", "from", "as", "its", "his", "her", "their", "one", "two", "some", "more", "then", "also", "just",
    "really", "still", "ending", "start", "middle", "night", "day", "city", "house", "road",
)  # fmt: skip
#: the vocabulary: ``<pad>``, ``<mask>``, the keywords, then the fillers (id = position in the tuple)
TEXT_VOCAB: tuple[str, ...] = (PAD, MASK, *KEYWORDS[0], *KEYWORDS[1], *_FILLERS)


def make_keyword_text(n: int, max_len: int = 16, min_len: int = 6, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids (n, max_len) long, y (n,) long, keyword (n, max_len) bool)``: token ids right-padded with 0, the
    label (1: a positive keyword, 0: a negative one, balanced at random) and the keyword's position."""
    if not 2 <= min_len <= max_len:
        raise ValueError(f"need 2 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}.")
    g = torch.Generator().manual_seed(int(seed))
    first_filler = 2 + len(KEYWORDS[0]) + len(KEYWORDS[1])
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    ids = torch.randint(first_filler, len(TEXT_VOCAB), (n, max_len), generator=g)
    pos = (torch.rand(n, generator=g) * lengths).long()  # uniform over each sentence's own positions
    y = (torch.rand(n, generator=g) < 0.5).long()
    which = torch.randint(0, len(KEYWORDS[0]), (n,), generator=g)
    keyword_id = 2 + which + y * len(KEYWORDS[0])  # negative keywords first, then the positive ones
    rows = torch.arange(n)
    ids[rows, pos] = keyword_id
    ids[torch.arange(max_len).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    keyword = torch.zeros(n, max_len, dtype=torch.bool)
    keyword[rows, pos] = True
    return ids, y, keyword


class TextKeywordDataModule(TensorDataModule):
    """Planted-keyword sentences (see :func:`make_keyword_text`); batches ``(ids (B, T), y, keyword (B, T))``.

    ``vocab`` (id -> word) and ``pad_id`` / ``mask_id`` are read by the AttributionMonitor to write the token
    heatmaps as words and to find the padding; ``class_names`` names the labels.

    Args:
        n_samples, max_len, min_len: of :func:`make_keyword_text`.
        batch_size, seed, fractions: of the train/val/test split (see ``TensorDataModule``).
    """

    num_classes = 2
    class_names = ("negative", "positive")
    vocab = TEXT_VOCAB
    pad_id = 0
    mask_id = 1

    def __init__(self, n_samples: int = 2000, max_len: int = 16, min_len: int = 6, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_samples, self.max_len, self.min_len = n_samples, max_len, min_len
        self.vocab_size = len(TEXT_VOCAB)

    def load(self) -> tuple[Tensor, ...]:
        return make_keyword_text(self.n_samples, self.max_len, self.min_len, seed=self.seed)
