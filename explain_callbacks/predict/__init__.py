"""Explain a whole data set with Lightning's predict loop: :class:`ExplainWriter` (a ``BasePredictionWriter``) writes
maps and per-sample metric scores in safetensors shards with an index; :class:`ExplainReader` / :func:`read_maps`
read them back; :class:`SplitData` deals a data module's split to the processes in whole batches. The Hydra entry
point is ``python -m explain_callbacks.explain``."""

from .data import BlockBatchSampler, SplitData
from .store import ExplainReader, read_maps
from .summary import summarize
from .writer import ExplainWriter

__all__ = ["BlockBatchSampler", "ExplainReader", "ExplainWriter", "SplitData", "read_maps", "summarize"]
