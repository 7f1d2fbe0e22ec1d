"""Run by tests/test_cdep_ddp.py: AttributionRegularizer("cdep") under 2-process DDP (gloo, CPU) on a small BatchNorm
CNN in float64, trained with ``serve_forward=True`` and then with ``serve_forward=False`` from the same seed, in the
same two processes (the second Trainer finds the process group of the first). Each rank saves its initial and final
parameters, buffers, forward counts and penalties to ``<argv[1]>/<mode>_rank<r>.pt`` (tensors and ints only: loaded
with weights_only=True)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from explain_callbacks.callbacks import AttributionRegularizer
from explain_callbacks.models import SmallCNN
from tests.scripts import run_main

SIDE, STEPS, BATCH = 12, 3, 8


class Lit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = SmallCNN(1, num_classes=3, width=4, dropout=0.0)
        self.net_calls = 0  # calls of self.net, served or not (a forward pre-hook sees both)
        self.bn_runs = 0  # runs of the first BatchNorm module: a real forward of the network, never the CD pass
        self.net.register_forward_pre_hook(lambda *_: setattr(self, "net_calls", self.net_calls + 1))
        self.net.features[1].register_forward_pre_hook(lambda *_: setattr(self, "bn_runs", self.bn_runs + 1))

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    n = 2 * STEPS * BATCH  # STEPS batches per rank
    x = torch.rand(n, 1, SIDE, SIDE, generator=g)
    x[:, :, :4, :4] += 2.0 * (torch.arange(n) % 3 == 0).view(-1, 1, 1, 1)  # a decoy patch under the mask
    y = torch.randint(0, 3, (n,), generator=g)
    m = torch.zeros(n, 1, SIDE, SIDE)
    m[:, :, :4, :4] = 1.0
    return TensorDataset(x.double(), y, m.double())


class Penalties(pl.Callback):
    """The penalty R of every step (what the regularizer logged), to check that it was not zero."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics["regularizers/penalty/cdep_step"]))


def fit(mode: str, out_dir: str) -> None:
    pl.seed_everything(0)
    model = Lit().double()  # float64: the two runs then differ by rounding far below the bound of the test
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    pens = Penalties()
    reg = AttributionRegularizer("cdep", weight=2.0, mask=2, model_attr="net", serve_forward=mode == "served")
    tr = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", callbacks=[reg, pens], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=True,
    )  # fmt: skip
    tr.fit(model, DataLoader(data(), batch_size=BATCH, shuffle=False))
    state = {
        "init": init,
        "penalties": torch.tensor(pens.values),
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "net_calls": model.net_calls,
        "bn_runs": model.bn_runs,
        "steps": tr.global_step,
        "wrapped_after": int("training_step" in model.__dict__ or "forward" in model.net.__dict__),
    }
    torch.save(state, Path(out_dir) / f"{mode}_rank{tr.global_rank}.pt")
    print(f"RANK{tr.global_rank} {mode} DDP_OK", flush=True)


def main(out_dir: str) -> None:
    for mode in ("served", "plain"):
        fit(mode, out_dir)


if __name__ == "__main__":
    run_main(main, sys.argv[1])
