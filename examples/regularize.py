"""Attribution regularizers on DecoyDigits, three ways: the callback, the mixin, and the plain function.

    .venv/bin/python examples/regularize.py            # about a minute on 2 CPU cores

1. ``AttributionRegularizer`` added to an unchanged LightningModule (the Hydra rows do the same:
   ``python examples/train.py experiment=decoy_rrr``).
2. ``RegularizerMixin``: the module writes ``self.penalized_loss(task, x, y, mask)`` itself.
3. Manual optimisation (where the callback refuses): ``loss = task + λ · rrr_penalty(...)``.

Each is trained on digits whose grey corner patch encodes the label and tested where it does not;
the vanilla model is printed first for comparison.
"""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from explain_callbacks.callbacks.regularizer import AttributionRegularizer
from explain_callbacks.datasets.decoy import DecoyDigitsDataModule
from explain_callbacks.models import MLP, LitClassifier
from explain_callbacks.regularize import RegularizerMixin, rrr_penalty

EPOCHS = 20
LAMBDA = 10.0


class MixinClassifier(RegularizerMixin, LitClassifier):
    """LitClassifier whose training step adds the penalties registered with ``add_penalty``."""

    def training_step(self, batch, batch_idx):
        x, y, mask = batch
        task = F.cross_entropy(self(x), y)
        return self.penalized_loss(task, x, y, mask)


class ManualClassifier(LitClassifier):
    """Manual optimisation: the penalty is part of the loss given to ``manual_backward``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y, mask = batch
        opt = self.optimizers()
        loss = F.cross_entropy(self(x), y) + LAMBDA * rrr_penalty(self, x, mask)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def fit_and_test(model: pl.LightningModule, callbacks=()) -> float:
    dm = DecoyDigitsDataModule(batch_size=64, seed=0)
    trainer = pl.Trainer(
        max_epochs=EPOCHS, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, dm)
    return 100 * trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]


def net() -> MLP:
    return MLP(1024, 10, hidden=(256, 256))


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.manual_seed(0)
    print(f"vanilla:              {fit_and_test(LitClassifier(net())):.1f} % test accuracy")
    torch.manual_seed(0)
    cb = AttributionRegularizer("rrr", weight=LAMBDA, mask=2)  # mask: the batch's third item
    print(f"callback (RRR):       {fit_and_test(LitClassifier(net()), [cb]):.1f} %")
    torch.manual_seed(0)
    mixed = MixinClassifier(net())
    mixed.add_penalty("rrr", weight=LAMBDA)
    print(f"mixin (RRR):          {fit_and_test(mixed):.1f} %")
    torch.manual_seed(0)
    print(f"manual optimisation:  {fit_and_test(ManualClassifier(net())):.1f} %")


if __name__ == "__main__":
    main()
