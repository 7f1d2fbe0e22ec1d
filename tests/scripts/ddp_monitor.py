"""Run by tests/test_ddp.py: the AttributionMonitor under 2-process DDP on CPU (gloo)."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from explain_callbacks.callbacks import AttributionMonitor, InteractionMonitor, SaliencyMasker, SpRAyMonitor
from explain_callbacks.interaction import IntegratedHessians
from tests.helpers_lightning import image_loaders, lit
from tests.scripts import run_main


class FailsOnRankOne:
    """A method that fails on one rank only: the monitor must skip it everywhere instead of hanging."""

    name = "flaky"

    def __call__(self, model, x, target, create_graph=False):
        if torch.distributed.get_rank() == 1:
            raise RuntimeError("only rank 1 fails")
        return x.clone()


class FlakyHessians(IntegratedHessians):
    """An interaction method that fails on rank 1 only."""

    name = "flaky_ih"

    def __call__(self, model, x, target=None, *, groups=None):
        if torch.distributed.get_rank() == 1:
            raise RuntimeError("only rank 1 fails")
        return super().__call__(model, x, target, groups=groups)


class PreparationFailsOnRankOne(AttributionMonitor):
    """Fails before explain() (resolving the model) on rank 1: the others must not wait for it."""

    def model(self, pl_module):
        if torch.distributed.get_rank() == 1:
            raise RuntimeError("no model on rank 1")
        return super().model(pl_module)


def main(out_dir: str) -> None:
    pl.seed_everything(0)
    train, val = image_loaders()
    methods = ["saliency", {"name": "ig", "n_steps": 8}, FailsOnRankOne()]
    mon = AttributionMonitor(budget=None, methods=methods, metrics=["deletion"], num_samples=6)
    inter = InteractionMonitor(
        budget=None, methods=[{"name": "ih", "n_steps": 4}, FlakyHessians(n_steps=4)], num_samples=2
    )
    broken = PreparationFailsOnRankOne(methods=["saliency"], num_samples=2, target="prediction")
    spr = SpRAyMonitor(budget=None, num_samples=12, per_class=None, min_per_class=3, every_n_epochs=1, strict=True)
    masker = SaliencyMasker(budget=None, width=4, num_samples=4, strict=True)
    tr = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", callbacks=[mon, inter, broken, spr, masker],
        logger=TensorBoardLogger(out_dir, name="tb"), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    m = lit()
    tr.fit(m, train, val)
    ce = tr.callback_metrics["maps/sparseness/ig"]
    # every rank sees the same reduced scalar, and a probe of its own shard
    gathered = tr.strategy.all_gather(ce.reshape(1))
    assert torch.allclose(gathered, gathered[0]), gathered
    probes = tr.strategy.all_gather(mon.probe_x[:1])
    assert "flaky" not in mon.last_scores and "cost/seconds/flaky" not in tr.callback_metrics
    assert "deletion" in mon.last_scores["ig"]
    assert "integrated_hessians" in inter.last_scores and "flaky_ih" not in inter.last_scores
    assert broken.last_scores == {}  # skipped on every rank, no hang
    # SpRAy clusters the maps of both ranks (12 each), identically on every rank
    clustered = sum(int(r.sizes.sum()) for r in spr.last_result.values())
    assert 12 < clustered <= 24, clustered  # more than one rank's probe (classes under 3 maps skipped)
    labels = torch.cat([r.labels for r in spr.last_result.values()]).float()
    same = tr.strategy.all_gather(labels)
    assert torch.equal(same[0], same[1])
    # the maskers trained on each rank's shard are averaged every epoch: identical on both ranks
    first = next(iter(masker.masker.parameters())).detach().flatten()[:8]
    both = tr.strategy.all_gather(first)
    assert torch.equal(both[0], both[1])
    if tr.is_global_zero:
        assert not torch.equal(probes[0], probes[1]), "ranks should explain different shards"
        print("DDP_OK", float(ce))


if __name__ == "__main__":
    run_main(main, sys.argv[1])
