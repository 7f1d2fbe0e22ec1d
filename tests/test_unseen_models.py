"""The monitors and methods on models the examples do not have, as an outside user would bring them: a
ResNet-style CNN (BatchNorm, residual additions, strided and 1x1 convolutions, AdaptiveAvgPool, Dropout,
optionally in-place ReLUs and channels_last), token models, multi-label heads, networks with a
``torch.no_grad`` part or frozen submodules, two-input forwards; odd input sizes, probes of one sample,
and bad inputs. Each scenario either works (finite maps of the input's shape, bit-identical weights) or
fails with an error that names the problem and the fix, never deep inside torch."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from explain_callbacks._internal.registry import ATTRIBUTIONS
from explain_callbacks.callbacks import AttributionMonitor

from .helpers_lightning import trainer


class Block(nn.Module):
    """A basic residual block: two 3x3 convolutions with BatchNorm, a projection shortcut when strided."""

    def __init__(self, cin: int, cout: int, stride: int, inplace: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        same = stride == 1 and cin == cout
        self.short = nn.Identity() if same else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                               nn.BatchNorm2d(cout))  # fmt: skip
        self.relu = nn.ReLU(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b2(self.c2(self.relu(self.b1(self.c1(x)))))
        return self.relu(h + self.short(x))


class ResNetish(nn.Module):
    def __init__(self, c: int = 3, k: int = 4, inplace: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(c, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=inplace))
        self.layer1 = Block(8, 8, 1, inplace)
        self.layer2 = Block(8, 16, 2, inplace)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(16, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer2(self.layer1(self.stem(x)))
        return self.fc(self.drop(self.pool(h).flatten(1)))


class NoGradStem(ResNetish):
    """A frozen feature extractor run under ``torch.no_grad`` inside forward (a common fine-tuning idiom)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.stem(x)
        return self.fc(self.drop(self.pool(self.layer2(self.layer1(h))).flatten(1)))


class Lit(pl.LightningModule):
    def __init__(self, net: nn.Module, loss: str = "ce") -> None:
        super().__init__()
        self.net = net
        self.loss = loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch) -> torch.Tensor:
        out = self(batch[0])
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(out, batch[1])
        if self.loss == "mse":
            return F.mse_loss(out.squeeze(-1), batch[1])
        return F.cross_entropy(out, batch[1])

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _data(n: int = 32, shape: tuple[int, ...] = (3, 20, 12), k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, *shape, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def _loaders(*tensors: torch.Tensor, batch_size: int = 8) -> tuple[DataLoader, DataLoader]:
    n = tensors[0].shape[0] // 2
    train = DataLoader(TensorDataset(*(t[:n] for t in tensors)), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    return train, DataLoader(TensorDataset(*(t[n:] for t in tensors)), batch_size=batch_size)


def _fit(tmp_path, make, loaders, callbacks=(), max_epochs: int = 1, **kw) -> pl.LightningModule:
    torch.manual_seed(0)
    module = make()
    kw.setdefault("logger", False)
    trainer(tmp_path, callbacks=callbacks, max_epochs=max_epochs, **kw).fit(module, *loaders)
    return module


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(w0: dict[str, torch.Tensor], w1: dict[str, torch.Tensor]) -> None:
    assert w0.keys() == w1.keys()
    assert [k for k in w0 if not torch.equal(w0[k], w1[k])] == []


# --------------------------------------------------------------------------- models the guard must not see
GRADIENT_METHODS = [
    "saliency",
    {"name": "ig", "n_steps": 4},
    {"name": "expected_gradients", "n_samples": 2},
    {"name": "neflag", "n_points": 1},
    {"name": "nonlinear_saliency", "max_steps": 2},
    {"name": "meaningful_perturbation", "n_steps": 2},
    {"name": "sound_mask", "n_steps": 2, "n_fills": 2},
]


@pytest.mark.parametrize("spec", GRADIENT_METHODS, ids=lambda s: s if isinstance(s, str) else s["name"])
def test_no_grad_in_forward_names_the_problem(spec):
    """A forward with a ``torch.no_grad`` part: gradient methods say so (autograd's "element 0 of
    tensors does not require grad" before); perturbation methods still work."""
    torch.manual_seed(0)
    model = NoGradStem().eval()
    if isinstance(spec, dict) and spec["name"] == "sound_mask":
        model.requires_grad_(False)  # as in the monitors' guard (its mask also moves by its own terms)
    x, y = _data(3)
    with pytest.raises(RuntimeError, match="no_grad"):
        ATTRIBUTIONS.build(spec)(model, x, y)


def test_no_grad_in_forward_gradcam_layer_and_perturbation_methods():
    torch.manual_seed(0)
    model = NoGradStem().eval()
    x, y = _data(3)
    with pytest.raises(RuntimeError, match="not part of the autograd graph"):
        ATTRIBUTIONS.build({"name": "gradcam", "layer": "stem"})(model, x, y)
    for spec in [{"name": "occlusion", "window": 6, "stride": 6}, {"name": "rise", "n_masks": 8}]:
        a = ATTRIBUTIONS.build(spec)(model, x, y)
        assert a.shape[0] == 3 and a.shape[2:] == x.shape[2:] and torch.isfinite(a).all()


def test_no_grad_in_forward_monitor_warns_and_training_goes_on(tmp_path):
    x, y = _data()
    mon = AttributionMonitor(methods=["saliency", {"name": "rise", "n_masks": 8}], num_samples=3)
    with pytest.warns(UserWarning, match="no_grad"):
        _fit(tmp_path, lambda: Lit(NoGradStem()), _loaders(x, y), callbacks=[mon])
    assert set(mon.last_scores) == {"rise"}


def test_gradcam_layer_errors_name_the_fix():
    torch.manual_seed(0)
    model = ResNetish().eval()
    model.unused = nn.Conv2d(16, 16, 1)
    x, y = _data(2)
    with pytest.raises(ValueError, match="spatial activations"):  # a Linear layer: was a crash in F.interpolate
        ATTRIBUTIONS.build({"name": "gradcam", "layer": "fc"})(model, x, y)
    with pytest.raises(ValueError, match="not called by the model's forward"):  # was IndexError
        ATTRIBUTIONS.build({"name": "gradcam", "layer": "unused"})(model, x, y)
    with pytest.raises(KeyError, match="No layer named 'nope'"):
        ATTRIBUTIONS.build({"name": "gradcam", "layer": "nope"})(model, x, y)
    a = ATTRIBUTIONS.build({"name": "gradcam", "layer": "layer1"})(model, x, y)  # a block, not a conv: works
    assert a.shape == (2, 1, 20, 12) and torch.isfinite(a).all()
