"""A small fully-convolutional segmentation network and its LightningModule, for the shapes data.

The shapes data (:mod:`explain_callbacks.datasets.shapes`) come as ``(x, y, mask)``: the image, the shape's
class and the object's mask. A segmentation of them labels every pixel: 0 background, ``y + 1`` on the
object. :class:`SegNet` predicts these ``num_classes + 1`` logits per pixel, (B, num_classes + 1, H, W), the
input's resolution (dilated convolutions instead of pooling: no upsampling, every output pixel sees a
31-pixel window). Its outputs are explained with target operators (``RegionTarget``, ``PredictedRegion``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._internal.batch import BatchAdapter, take

__all__ = ["LitSegmenter", "SegNet", "pixel_labels"]

_BATCH = BatchAdapter()


class SegNet(nn.Module):
    """Conv-BatchNorm-ReLU blocks with dilations 1, 2, 4, 8 and a 1x1 classifier: (B, C, H, W) ->
    (B, num_classes + 1, H, W) logits, channel 0 the background (a context-aggregation stack after Yu &
    Koltun 2016, "Multi-scale context aggregation by dilated convolutions").

    Args:
        in_channels: input channels.
        num_classes: object classes (the background is added as channel 0).
        width: channels of the hidden blocks.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for d in (1, 2, 4, 8):
            layers += [nn.Conv2d(c, width, 3, padding=d, dilation=d), nn.BatchNorm2d(width), nn.ReLU()]
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(width, num_classes + 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def pixel_labels(labels: Tensor, masks: Tensor) -> Tensor:
    """Per-pixel classes (B, H, W): 0 off the object, ``label + 1`` on it (masks (B, 1, H, W) or (B, H, W))."""
    m = masks[:, 0] if masks.ndim == 4 else masks
    return (m > 0.5).long() * (labels.long().view(-1, 1, 1) + 1)


class LitSegmenter(pl.LightningModule):
    """Trains ``net`` on per-pixel classes made from ``(x, y, mask)`` batches (:func:`pixel_labels`) with
    cross-entropy. Logs ``train/loss``, ``val/loss``, ``val/acc`` (pixel accuracy), ``val/iou`` (the
    intersection over union of the predicted and true object pixels) and their test counterparts.

    Args:
        net: a network returning (B, num_classes + 1, H, W) logits.
        lr: Adam's learning rate.
        mask_key: where the masks are in a batch (default: the third item of a tuple, ``"mask"`` of a dict).
        class_names: the names of the output channels, the background first; None: ``"background"`` and the data
            module's ``class_names`` (taken at ``setup``). The monitors' captions name the explained and predicted
            classes with them (the data's names would be one channel off).
    """

    def __init__(
        self, net: nn.Module, lr: float = 3e-3, mask_key: int | str | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.net = net
        self.lr = lr
        self.mask_key = mask_key
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.save_hyperparameters(ignore=["net"])

    def setup(self, stage: str) -> None:
        if self.class_names is None:  # the labels' names, one channel on: channel 0 is the background
            names = getattr(getattr(self._trainer, "datamodule", None), "class_names", None)
            if isinstance(names, (list, tuple)) and names:
                self.class_names = ["background", *(str(c) for c in names)]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def unpack(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Inputs and per-pixel labels of a batch."""
        x, y = _BATCH(batch)
        key = self.mask_key if self.mask_key is not None else ("mask" if isinstance(batch, dict) else 2)
        try:
            mask = take(batch, key)
        except (KeyError, IndexError, TypeError) as err:
            raise KeyError(
                f"LitSegmenter found no masks at {key!r} in a batch of type {type(batch).__name__}; give (x, y, mask) "
                "tuples, dicts with a 'mask' key, or set mask_key."
            ) from err
        if y is None:
            raise KeyError("LitSegmenter needs the class labels (second item of the batch) to label the object pixels.")
        return x, pixel_labels(y, mask)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, t = self.unpack(batch)
        loss = F.cross_entropy(self(x), t)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, t = self.unpack(batch)
        out = self(x)
        pred = out.argmax(1)
        inter = ((pred > 0) & (t > 0)).sum().float()
        union = ((pred > 0) | (t > 0)).sum().float().clamp_min(1.0)
        kw: dict[str, Any] = {"batch_size": x.shape[0], "sync_dist": True}
        self.log(f"{stage}/loss", F.cross_entropy(out, t), prog_bar=True, **kw)
        self.log(f"{stage}/acc", (pred == t).float().mean(), prog_bar=True, **kw)
        self.log(f"{stage}/iou", inter / union, **kw)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
