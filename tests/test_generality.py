"""The monitors on LightningModules unlike the examples: dict batches, tuple / dict / ModelOutput-like
outputs, non-square RGB images, regression heads, LayerNorm + GELU, recurrent sequence models,
networks behind an attribute, bf16 mixed precision. Every run is strict (an error fails the test)
and leaves the trained weights bit-identical to a run without callbacks."""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from explain_callbacks._internal.outputs import output_adapter, pick_output
from explain_callbacks.callbacks import AttributionMonitor, InteractionMonitor

from .helpers_lightning import event_tags, trainer


class DictDataset(Dataset):
    """Samples as dicts, RGB 3x12x20 images (not square) or any shape, labels or real targets."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "label": self.y[i]}


def _loaders(x: torch.Tensor, y: torch.Tensor) -> tuple[DataLoader, DataLoader]:
    n = x.shape[0] // 2
    train = DataLoader(DictDataset(x[:n], y[:n]), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    return train, DataLoader(DictDataset(x[n:], y[n:]), batch_size=16)


def _images(n: int = 96, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 12, 20, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    x[torch.arange(n), y % 3, 2 + y * 2, 3 + y * 4] += 2.0
    return x, y


@dataclass
class Output:
    """A Hugging Face style output object."""

    logits: torch.Tensor
    hidden: torch.Tensor


class TupleCNN(nn.Module):
    """BatchNorm + Dropout CNN whose forward returns (logits, features), or an :class:`Output`."""

    def __init__(self, k: int = 4, style: str = "tuple") -> None:
        super().__init__()
        self.style = style
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d((3, 5)))  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(90, k))

    def forward(self, x: torch.Tensor):
        h = self.features(x)
        logits = self.head(h)
        return (logits, h) if self.style == "tuple" else Output(logits, h)


class DictModule(pl.LightningModule):
    """Dict batches; the network lives in ``self.net`` and returns more than logits."""

    def __init__(self, net: nn.Module, regression: bool = False) -> None:
        super().__init__()
        self.net = net
        self.regression = regression

    def forward(self, x: torch.Tensor):
        return self.net(x)

    def _loss(self, batch) -> torch.Tensor:
        key = 0 if getattr(self.net, "style", None) == "tuple" else None
        out = pick_output(self.net(batch["image"]), key)
        if self.regression:
            return F.mse_loss(out.squeeze(-1), batch["label"])
        return F.cross_entropy(out, batch["label"])

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def _fit(tmp_path, make, loaders, callbacks=(), **kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = make()
    trainer(tmp_path, callbacks=callbacks, max_epochs=2, **kw).fit(module, *loaders)
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same(w0: dict[str, torch.Tensor], w1: dict[str, torch.Tensor]) -> None:
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


def test_pick_output_rules_and_errors():
    t = torch.randn(2, 3)
    assert pick_output(t) is t
    assert pick_output({"logits": t, "aux": 1}) is t
    assert pick_output(Output(t, t)) is t
    assert pick_output((t, None), 0) is t
    assert pick_output({"scores": t}, "scores") is t
    assert pick_output((None, t), lambda o: o[1]) is t
    with pytest.raises(TypeError, match="output_key"):
        pick_output((t, t))
    with pytest.raises(KeyError, match="output_key"):
        pick_output({"a": t}, "b")
    net = TupleCNN()
    with output_adapter(net, 0):
        assert isinstance(net(torch.rand(2, 3, 12, 20)), torch.Tensor)
    assert isinstance(net(torch.rand(2, 3, 12, 20)), tuple)  # hook removed


@pytest.mark.parametrize("style", ["tuple", "object"])
def test_dict_batches_tuple_outputs_nonsquare_rgb(tmp_path, style):
    x, y = _images()
    make = lambda: DictModule(TupleCNN(style=style))  # noqa: E731
    w0 = _fit(tmp_path / "a", make, _loaders(x, y), logger=False)
    mon = AttributionMonitor(budget=None,
        methods=["saliency", {"name": "ig", "n_steps": 8}, "gradcam", "occlusion", {"name": "rise", "n_masks": 200}],
        metrics=["deletion", "insertion", "mufidelity", "infidelity", "max_sensitivity", "complexity"],
        num_samples=6, model_attr="net", output_key=0 if style == "tuple" else None, strict=True,
    )  # fmt: skip
    w1 = _fit(tmp_path / "b", make, _loaders(x, y), callbacks=[mon])
    _assert_same(w0, w1)
    assert mon.probe_x.shape == (6, 3, 12, 20)
    scores = mon.last_scores
    for method in ("saliency", "ig", "gradcam", "occlusion", "rise"):
        for metric in ("deletion", "insertion", "mufidelity", "infidelity", "max_sensitivity", "complexity"):
            assert torch.isfinite(torch.as_tensor(scores[method][metric])), (method, metric)
    assert "maps/attributions" in event_tags(tmp_path / "b")["images"]


def test_tuple_output_without_output_key_names_the_fix(tmp_path):
    x, y = _images()
    mon = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4, model_attr="net", strict=True)
    with pytest.raises(TypeError, match="output_key"):
        _fit(tmp_path, lambda: DictModule(TupleCNN()), _loaders(x, y), callbacks=[mon], logger=False)


class RegressionMLP(nn.Module):
    def __init__(self, d: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_tabular_regression_layernorm_gelu(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 10, generator=g)
    y = 2 * x[:, 0] - x[:, 3] + 0.1 * torch.randn(128, generator=g)
    make = lambda: DictModule(RegressionMLP(), regression=True)  # noqa: E731
    w0 = _fit(tmp_path / "a", make, _loaders(x, y), logger=False)
    mon = AttributionMonitor(budget=None,
        methods=["saliency", "ig", "smoothgrad", "occlusion", "neflag10"],
        metrics=["deletion", "abc", "mufidelity", "infidelity"],
        num_samples=8, target=None, strict=True,
    )  # fmt: skip
    w1 = _fit(tmp_path / "b", make, _loaders(x, y), callbacks=[mon])
    _assert_same(w0, w1)
    for method, scores in mon.last_scores.items():
        for metric in ("deletion", "abc", "mufidelity", "infidelity"):
            assert torch.isfinite(torch.as_tensor(scores[metric])), (method, metric)
    # the two informative features carry most of the gradient attribution
    assert mon.last_scores["ig"]["sparseness"] > 0.3


class GRUClassifier(pl.LightningModule):
    """Tuple batches of (B, T, D) sequences through a GRU; the LightningModule is the network."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x)[0][:, -1])

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_recurrent_sequence_model_with_interactions(tmp_path):
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, 3, generator=g)
    y = (x[:, 5, 0] > 0).long()
    loaders = (
        DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8),
        DataLoader(TensorDataset(x[32:], y[32:]), batch_size=8),
    )
    w0 = _fit(tmp_path / "a", GRUClassifier, loaders, logger=False)
    mon = AttributionMonitor(
        budget=None, methods=["saliency", "ig", "smoothgrad"], metrics=["deletion"], num_samples=4, strict=True)
    inter = InteractionMonitor(budget=None, methods=["integrated_hessians"], num_samples=2, strict=True)
    w1 = _fit(tmp_path / "b", GRUClassifier, loaders, callbacks=[mon, inter])
    _assert_same(w0, w1)
    assert torch.isfinite(torch.as_tensor(mon.last_scores["ig"]["deletion"]))


def test_bf16_mixed_precision_training_is_untouched(tmp_path):
    x, y = _images()
    make = lambda: DictModule(TupleCNN(style="object"))  # noqa: E731
    w0 = _fit(tmp_path / "a", make, _loaders(x, y), logger=False, precision="bf16-mixed")
    mon = AttributionMonitor(budget=None,
        methods=["saliency", "ig"], metrics=["deletion"], num_samples=4, model_attr="net", strict=True
    )
    w1 = _fit(tmp_path / "b", make, _loaders(x, y), callbacks=[mon], precision="bf16-mixed")
    _assert_same(w0, w1)
    # maps are computed in float32 with autocast off: IG completeness holds to float32 accuracy
    assert mon.last_scores["ig"]["completeness_error"] < 0.05


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_true_precisions_explain_in_the_weights_dtype(tmp_path, precision):
    x, y = _images()
    make = lambda: DictModule(TupleCNN(style="object"))  # noqa: E731
    mon = AttributionMonitor(budget=None,
        methods=["saliency", {"name": "ig", "n_steps": 8}, "gradcam"], metrics=["deletion"], num_samples=4,
        model_attr="net", strict=True,
    )  # fmt: skip
    _fit(tmp_path, make, _loaders(x, y), callbacks=[mon], precision=precision)
    for method in ("saliency", "ig", "gradcam"):
        assert torch.isfinite(torch.as_tensor(mon.last_scores[method]["deletion"])), method


def test_trainer_test_explains_the_validation_probe_or_a_test_probe(tmp_path):
    x, y = _images()
    make = lambda: DictModule(TupleCNN(style="object"))  # noqa: E731
    torch.manual_seed(0)
    module = make()
    train, val = _loaders(x, y)
    mon = AttributionMonitor(
        budget=None, methods=["saliency"], num_samples=4, model_attr="net", every_n_epochs=5, strict=True)
    tr = trainer(tmp_path / "a", callbacks=[mon], max_epochs=1)
    tr.fit(module, train, val)
    probe = mon.probe_x.clone()
    assert mon.last_scores == {}  # not due during fit
    tr.test(module, val)
    assert torch.equal(mon.probe_x, probe) and "saliency" in mon.last_scores
    fresh = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4, model_attr="net", strict=True)
    trainer(tmp_path / "b", callbacks=[fresh]).test(module, val)
    assert fresh.probe_size == 4 and "saliency" in fresh.last_scores
    assert "test/maps/attributions" in event_tags(tmp_path / "b")["images"]  # test values under test/


@pytest.mark.parametrize("style", ["tuple", "object"])
def test_distiller_with_dict_batches_and_tuple_outputs(tmp_path, style):
    from explain_callbacks.callbacks import Distiller

    x, y = _images()
    make = lambda: DictModule(TupleCNN(style=style))  # noqa: E731
    w0 = _fit(tmp_path / "a", make, _loaders(x, y), logger=False)
    dist = Distiller(
        budget=None,
        students=["tree", {"name": "sparse_logistic", "max_nonzeros": 20}, {"name": "attribution_linear", "k": 8}],
        model_attr="net", output_key=0 if style == "tuple" else None, every_n_epochs=1, buffer_size=256,
        export=False, strict=True,
    )  # fmt: skip
    w1 = _fit(tmp_path / "b", make, _loaders(x, y), callbacks=[dist], logger=False)
    _assert_same(w0, w1)
    record = dist.history[-1]
    assert record["epoch"] == 1
    for key in ("tree", "sparse_logistic", "attribution_linear"):
        assert 0.0 <= record[key]["fidelity"] <= 1.0, key


def test_regularizer_on_a_network_returning_a_tuple(tmp_path):
    from explain_callbacks.callbacks import AttributionRegularizer

    x, y = _images()
    mask = torch.zeros(1, 3, 12, 20)
    mask[..., :4, :4] = 1.0  # penalise a corner
    make = lambda: DictModule(TupleCNN())  # noqa: E731
    w0 = _fit(tmp_path / "a", make, _loaders(x, y), logger=False)
    reg = AttributionRegularizer("rrr", weight=10.0, mask=mask, model_attr="net", output_key=0)
    torch.manual_seed(0)
    module = make()
    tr = trainer(tmp_path / "b", callbacks=[reg], max_epochs=2, logger=False)
    tr.fit(module, *_loaders(x, y))
    penalty = tr.callback_metrics["regularizers/penalty/rrr"]
    assert torch.isfinite(penalty) and penalty > 0
    assert not all(torch.equal(v, w0[k]) for k, v in module.state_dict().items())  # the penalty trained
    no_key = AttributionRegularizer("rrr", mask=mask, model_attr="net")
    with pytest.raises(TypeError, match="output_key"):
        _fit(tmp_path / "c", make, _loaders(x, y), callbacks=[no_key], logger=False)
