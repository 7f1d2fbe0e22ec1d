"""Run by tests/test_text.py: the AttributionMonitor on token ids under 2-process DDP on CPU (gloo)."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from explain_callbacks.callbacks import AttributionMonitor
from explain_callbacks.datasets import TEXT_VOCAB, TextKeywordDataModule
from explain_callbacks.models import LitClassifier, TokenTransformer
from tests.scripts import run_main


class TokensFailOnRankOne(AttributionMonitor):
    """Its token probe cannot be built on rank 1: every rank must skip, none may wait for the others."""

    def _token_inputs(self, model, x):
        if torch.distributed.get_rank() == 1:
            raise ValueError("no embedding on rank 1")
        return super()._token_inputs(model, x)


def main() -> None:
    pl.seed_everything(0)
    dm = TextKeywordDataModule(n_samples=240, max_len=16, batch_size=20, seed=0)
    mon = AttributionMonitor(methods=["input_x_gradient", {"name": "ig", "n_steps": 4}],
                             metrics=[{"name": "deletion", "n_steps": 4}], num_samples=4)  # fmt: skip
    broken = TokensFailOnRankOne(methods=["saliency"], num_samples=2)
    tr = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", callbacks=[mon, broken], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    tr.fit(LitClassifier(TokenTransformer(len(TEXT_VOCAB), 2, max_len=16, d_model=8), lr=5e-3), dm)
    scores = torch.tensor([mon.last_scores["ig"]["deletion"], mon.last_scores["input_x_gradient"]["deletion"]])
    both = tr.strategy.all_gather(scores)
    assert torch.equal(both[0], both[1]), both  # reduced over the ranks: the same everywhere
    ids, maps = mon.probe_x, mon.previous["ig"][..., 0]
    assert bool((maps[ids == 0] == 0).all())
    assert broken.last_scores == {}  # skipped on every rank, no hang
    probes = tr.strategy.all_gather(ids[:1])
    if tr.is_global_zero:
        assert not torch.equal(probes[0], probes[1]), "ranks should explain different shards"
        print("DDP_TOKENS_OK")


if __name__ == "__main__":
    run_main(main)
