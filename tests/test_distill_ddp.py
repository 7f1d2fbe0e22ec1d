"""The Distiller under 2-process DDP (gloo, CPU): buffers gathered, identical students on every rank,
exports and TensorBoard output from rank zero only.

The test runs this file as a script in a subprocess (Lightning's DDP launcher re-executes the script).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def main(out_dir: str) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    sys.path.insert(0, str(ROOT))
    from explain_callbacks.callbacks.distiller import Distiller
    from explain_callbacks.datasets import BreastCancerDataModule
    from explain_callbacks.models import MLP, LitClassifier

    torch.set_num_threads(1)
    pl.seed_everything(0)
    dm = BreastCancerDataModule(batch_size=32, seed=0)
    model = LitClassifier(MLP(30, 2, hidden=(16,)), lr=3e-3)
    dist = Distiller(
        budget=None,
        students=["tree", {"name": "sparse_logistic", "max_nonzeros": 5}], buffer_size=4096, every_n_epochs=1,
        strict=True,
    )  # fmt: skip
    tr = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", callbacks=[dist],
        logger=TensorBoardLogger(out_dir, name="tb"), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    tr.fit(model, dm)
    n_local = torch.tensor([len(dist.buffer)])
    sizes = tr.strategy.all_gather(n_local).flatten()
    # every rank buffered its own shard (DistributedSampler pads to equal shards); students saw the union
    per_rank = -(-len(dm.train_set) // 2)
    assert sizes.tolist() == [per_rank, per_rank], sizes
    x_local = dist.buffer.get()["x"]
    firsts = tr.strategy.all_gather(x_local[:1])
    # identical students everywhere: same predictions on the same inputs
    xt = dm.test_set.tensors[0]
    preds = tr.strategy.all_gather(dist.students["sparse_logistic"].predict(xt))
    tree_preds = tr.strategy.all_gather(dist.students["tree"].predict(xt))
    fid = tr.strategy.all_gather(tr.callback_metrics["distillation/fidelity/tree"].reshape(1))
    if tr.is_global_zero:
        assert not torch.equal(firsts[0], firsts[1]), "ranks should buffer different shards"
        assert torch.equal(preds[0], preds[1]) and torch.equal(tree_preds[0], tree_preds[1])
        assert torch.allclose(fid, fid[0])
        assert set(dist.exported) == {"tree", "sparse_logistic"}
        print("DDP_OK", float(fid[0]))
    else:
        assert dist.exported == {}


@pytest.mark.ddp
def test_distiller_under_ddp(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PL_DISABLE_FORK="1", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "DDP_OK" in out.stdout
    assert len(list(tmp_path.rglob("events.out.tfevents.*"))) == 1  # only rank zero writes
    assert sorted(p.name for p in tmp_path.rglob("distill/*")) == ["sparse_logistic.pt", "tree.pt"]


if __name__ == "__main__":
    main(sys.argv[1])
    # Lightning leaves the process group alive; gloo torn down at interpreter exit can abort instead
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
