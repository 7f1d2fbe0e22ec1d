"""A token model under the AttributionMonitor: a small transformer on planted-keyword sentences.

    .venv/bin/python examples/text.py                       # about 3 minutes on a busy 2-core CPU
    .venv/bin/python examples/text.py --png tokens.png      # also save the last token heatmap figure

The same run from the Hydra configs: ``python examples/train.py experiment=text``.

Each sentence holds one keyword ("great", "superb", "fun": positive; "awful", "boring", "poor": negative) among
neutral words; the probe's token ids are explained in the space of the transformer's token embedding (found by
itself: its only ``nn.Embedding``), one score per token, the padding left out. Deletion and insertion remove whole
tokens, replaced by ``<mask>``. At the end the script prints how often each method's top token is the keyword and
the methods' ranking; TensorBoard shows the token heatmaps (IMAGES: maps/attributions; TEXT: maps/tokens).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from explain_callbacks.callbacks import AttributionMonitor
from explain_callbacks.datasets import TEXT_VOCAB, TextKeywordDataModule
from explain_callbacks.models import LitClassifier, TokenTransformer
from explain_callbacks.viz import is_figure


class SavingMonitor(AttributionMonitor):
    """The monitor, also saving each token heatmap figure to ``png`` (the last one stays): logging renders a
    figure and frees it, so it is saved first."""

    png: Path | None = None

    def log_image(self, trainer: pl.Trainer, tag: str, image) -> None:
        if tag == "maps/attributions" and self.png is not None and is_figure(image):
            image.savefig(self.png, dpi=100)
        super().log_image(trainer, tag, image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--logdir", default=None, help="TensorBoard directory (default: a temporary one)")
    parser.add_argument("--png", default=None, help="save the last token heatmap figure here")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Lightning's own LeafSpec deprecation (a Lightning/torch version mismatch) and its advice on the logging
    # interval of short epochs: nothing a user of the example acts on
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    pl.seed_everything(0, verbose=False)

    data = TextKeywordDataModule(n_samples=2000, max_len=16, batch_size=64, seed=0)
    model = LitClassifier(TokenTransformer(len(TEXT_VOCAB), num_classes=2, max_len=16), lr=3e-3,
                          lr_schedule="cosine")  # fmt: skip
    # saliency with abs=True: the token score sums |gradient| over the embedding dims (the signed dims would cancel)
    monitor = SavingMonitor(
        methods=[{"name": "saliency", "abs": True}, "input_x_gradient", {"name": "ig", "n_steps": 16}],
        metrics=[{"name": "deletion", "n_steps": 16}, {"name": "insertion", "n_steps": 16}],
        num_samples=8, every_n_epochs=2, substrate_token=TextKeywordDataModule.mask_id,
    )  # fmt: skip
    monitor.png = Path(args.png) if args.png else None
    logdir = args.logdir or tempfile.mkdtemp(prefix="explain_text_")
    trainer = pl.Trainer(
        max_epochs=args.epochs, callbacks=[monitor], logger=TensorBoardLogger(logdir, name="text"),
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, deterministic=True,
        accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model, data)
    trainer.validate(model, data, verbose=False)
    print(f"validation accuracy: {float(trainer.callback_metrics['val/acc']):.3f}")

    # how often the top token of each method's last maps is the planted keyword (chance: 1 / sentence length)
    ids = monitor.probe_x
    keyword = (ids >= 2) & (ids < 8)  # the keyword ids follow <pad> and <mask>
    for name, maps in monitor.previous.items():
        top = maps[..., 0].argmax(1)
        print(f"{name:>18}: top token = keyword in {float(keyword[torch.arange(len(ids)), top].float().mean()):.0%}")
    print(monitor.ranking_table())
    print(f"TensorBoard logs: tensorboard --logdir {logdir}")
    if args.png:
        print(f"token heatmaps (the last validation) saved to {args.png}")


if __name__ == "__main__":
    main()
