"""Run by tests/test_influence_ddp.py: the InfluenceMonitor under 2-process DDP on CPU (gloo)."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from explain_callbacks.analysis import self_influence, tracin_scores
from explain_callbacks.callbacks import InfluenceMonitor
from tests.helpers_lightning import image_loaders, lit
from tests.scripts import run_main


class Snapshots(pl.Callback):
    """The weights at each of the monitor's checkpoints (the same on every rank under DDP)."""

    def __init__(self) -> None:
        self.states = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.states.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})


def main(out_dir: str) -> None:
    pl.seed_everything(0)
    train, val = image_loaders()
    snaps = Snapshots()
    # 31 training rows: the ranks hold 16 and 15 of them (uneven shares exercise the padded gather)
    mon = InfluenceMonitor(budget=None, num_train=31, num_samples=3, model_attr="net", batch_size=8, strict=True)
    tr = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", callbacks=[snaps, mon],
        logger=TensorBoardLogger(out_dir, name="tb"), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    m = lit()
    tr.fit(m, train, val)
    assert mon.epochs == [0, 1] and mon.scores.shape == (6, 31), (mon.epochs, mon.scores.shape)
    # identical results on both ranks
    both = tr.strategy.all_gather(torch.cat([mon.self_influence, mon.scores.flatten()]))
    assert torch.equal(both[0], both[1])
    # equal to the functional twin over the whole subset and both ranks' probes
    probe_x = tr.strategy.all_gather(mon.probe_x).flatten(0, 1)
    probe_y = tr.strategy.all_gather(mon.probe_y).flatten(0, 1)
    ref_self = self_influence(snaps.states, mon.train_x, mon.train_y, layers="last", lrs=mon.lrs, model=m.net)
    ref = tracin_scores(snaps.states, mon.train_x, mon.train_y, probe_x, probe_y, layers="last", lrs=mon.lrs,
                        model=m.net)  # fmt: skip
    assert torch.allclose(mon.self_influence, ref_self, rtol=1e-5), (mon.self_influence, ref_self)
    assert torch.allclose(mon.scores, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    if tr.is_global_zero:
        print("DDP_OK", float(mon.self_influence.max()))


if __name__ == "__main__":
    run_main(main, sys.argv[1])
