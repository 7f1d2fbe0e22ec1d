"""Run by tests/test_concept_monitor.py: the ConceptMonitor under 2-process DDP on CPU (gloo)."""

from __future__ import annotations

import sys
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from explain_callbacks.attribution.lrp import LRP, concept_atlas
from explain_callbacks.callbacks import ConceptMonitor
from tests.helpers_lightning import image_loaders, lit
from tests.scripts import run_main


def _trainer(out_dir: str, mon: ConceptMonitor, logger: bool) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", callbacks=[mon],
        logger=TensorBoardLogger(out_dir, name="tb") if logger else False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


def main(out_dir: str) -> None:
    pl.seed_everything(0)
    train, val = image_loaders()
    mon = ConceptMonitor(budget=None, num_reference=16, num_samples=3, model_attr="net", strict=True, atlas_top=2)
    tr = _trainer(out_dir, mon, True)
    m = lit()
    tr.fit(m, train, val)
    assert [e for e, _ in mon.history] == [0, 1], mon.history
    # the same global shares on both ranks, equal to the atlas over both ranks' reference sets together
    both = tr.strategy.all_gather(mon.shares)
    assert torch.equal(both[0], both[1])
    ref_x = tr.strategy.all_gather(mon.ref_x).flatten(0, 1)
    ref_y = tr.strategy.all_gather(mon.ref_y).flatten(0, 1)
    assert not torch.equal(ref_x[:16], ref_x[16:])  # each rank its own shard
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atlas = concept_atlas(LRP(), m.net.eval(), ref_x, ref_y, "features.0", top=2)
    assert torch.equal(atlas.concepts, mon.atlas.concepts), (atlas, mon.atlas)
    assert torch.allclose(atlas.relevance, mon.atlas.relevance, atol=1e-5)

    # a failure on rank 1 alone (a layer it does not have): both ranks skip the epoch, nobody hangs, training goes on
    bad = ConceptMonitor(
        budget=None, num_reference=8, num_samples=2, model_attr="net", layer="nope" if tr.global_rank else None
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(out_dir, bad, False).fit(lit(), train, val)
    assert bad.history == [], bad.history
    if tr.global_rank == 1:
        assert any("No layer named" in str(w.message) for w in caught), [str(w.message) for w in caught]
    if tr.is_global_zero:
        print("DDP_OK")


if __name__ == "__main__":
    run_main(main, sys.argv[1])
