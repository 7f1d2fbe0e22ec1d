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
    mon = AttributionMonitor(budget=None, methods=["saliency", {"name": "rise", "n_masks": 8}], num_samples=3)
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


# --------------------------------------------------------------------------- every method and metric, by name
ALL_METHODS = [
    "saliency", "input_x_gradient", {"name": "smoothgrad", "n_samples": 3}, {"name": "smoothgrad_sq", "n_samples": 3},
    {"name": "vargrad", "n_samples": 3}, {"name": "ig", "n_steps": 4}, {"name": "expected_gradients", "n_samples": 4},
    "gradcam", {"name": "neuron_region_ig", "layer": "net.layer1", "n_steps": 4},
    {"name": "occlusion", "window": 6, "stride": 6}, {"name": "rise", "n_masks": 16},
    {"name": "sobol", "grid_size": 3, "n_designs": 4}, {"name": "hsic", "grid_size": 3, "n_designs": 16},
    {"name": "meaningful_perturbation", "n_steps": 3}, {"name": "extremal_perturbation", "n_steps": 3},
    {"name": "sound_mask", "n_steps": 3, "n_fills": 2}, {"name": "neflag", "n_points": 2},
    {"name": "nonlinear_saliency", "max_steps": 3}, "cd", "lrp",
]  # fmt: skip
ALL_METRICS = [
    {"name": "deletion", "n_steps": 4}, {"name": "insertion", "n_steps": 4},
    {"name": "insertion_deletion", "n_steps": 4}, {"name": "abc", "n_steps": 4}, {"name": "mufidelity", "n_subsets": 5},
    {"name": "infidelity", "n_perturb": 3},
    "pointing_game", "energy_pointing_game", "complexity", "dabkowski", {"name": "max_sensitivity", "n_samples": 2},
    {"name": "avg_sensitivity", "n_samples": 2}, {"name": "local_lipschitz", "n_samples": 2},
    {"name": "completeness_soundness", "n_steps": 2, "n_other": 1}, "randomisation",
    {"name": "randomisation", "abs": False},
]  # fmt: skip
METRIC_TAGS = [
    "deletion", "insertion", "insertion_deletion", "abc", "mufidelity", "infidelity", "pointing_game",
    "energy_pointing_game", "complexity", "dabkowski", "max_sensitivity", "avg_sensitivity", "local_lipschitz",
    "completeness_soundness", "randomisation", "randomisation_2",
]  # fmt: skip


def test_every_method_and_metric_on_a_resnet_bit_identical(tmp_path):
    """All registered methods and metrics by short name, strict, on a residual CNN with BatchNorm and
    Dropout, non-square 3x20x12 images with ground-truth masks, a probe (3) below batch_size (4): every
    input-shaped method gets every metric, finite; weights and BatchNorm statistics bit-identical."""
    x, y = _data()
    masks = torch.zeros(x.shape[0], 1, 20, 12)
    masks[..., 5:12, 3:8] = 1.0
    make = lambda: Lit(ResNetish())  # noqa: E731
    w0 = _weights(_fit(tmp_path / "a", make, _loaders(x, y, masks), max_epochs=2))
    mon = AttributionMonitor(  # explained once, after the second epoch (every method x every metric: the cost)
        budget=None, methods=ALL_METHODS, metrics=ALL_METRICS, num_samples=3, batch_size=4, strict=True,
        every_n_epochs=2)
    with pytest.warns(UserWarning, match="maps of 'neuron_region_ig' have shape"):  # were skipped silently
        module = _fit(tmp_path / "b", make, _loaders(x, y, masks), callbacks=[mon], max_epochs=2, logger=True)
    _assert_same(w0, _weights(module))
    assert mon.metric_names == METRIC_TAGS  # the second randomisation is logged apart, not over the first
    for name, scores in mon.last_scores.items():
        assert torch.isfinite(torch.as_tensor(scores["sparseness"])), name
        if name == "neuron_region_ig":  # maps of the layer's neurons (B,8,20,12): no input-space metric
            assert "deletion" not in scores
            continue
        for tag in METRIC_TAGS:
            if name in ("meaningful_perturbation", "cd") and tag == "energy_pointing_game":
                continue  # no positive mass in these maps of an untrained net: NaN by definition
            assert torch.isfinite(torch.as_tensor(scores[tag])), (name, tag)
    assert mon.last_scores["saliency"]["randomisation"] != mon.last_scores["saliency"]["randomisation_2"]
    assert "best on **randomisation_2**" in mon.ranking_table()


# --------------------------------------------------------------------------- models and settings
def _monitor(**kw) -> AttributionMonitor:
    methods = ["saliency", {"name": "ig", "n_steps": 4}, {"name": "smoothgrad", "n_samples": 3}, "gradcam",
               {"name": "occlusion", "window": 6, "stride": 6}, {"name": "rise", "n_masks": 16}]  # fmt: skip
    kw.setdefault("metrics", [{"name": "deletion", "n_steps": 4}])
    kw.setdefault("num_samples", 4)
    return AttributionMonitor(budget=None, methods=methods, strict=True, **kw)


class TrainModeAtValidation(Lit):
    """Puts itself back in train mode before validation (the callback then finds a training model)."""

    def on_validation_epoch_start(self) -> None:
        self.train()


class ChannelsLast(Lit):
    def __init__(self) -> None:
        super().__init__(ResNetish().to(memory_format=torch.channels_last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last))


def _frozen_stem() -> Lit:
    module = Lit(ResNetish())
    module.net.stem.requires_grad_(False)
    return module


@pytest.mark.parametrize(
    "make",
    [lambda: Lit(ResNetish(inplace=True)), lambda: TrainModeAtValidation(ResNetish()), ChannelsLast, _frozen_stem],
    ids=["inplace_relu", "train_mode", "channels_last", "frozen_stem"],
)
def test_models_the_guard_must_leave_as_found(tmp_path, make):
    x, y = _data()
    w0 = _weights(_fit(tmp_path / "a", make, _loaders(x, y), max_epochs=2))
    mon = _monitor()
    module = _fit(tmp_path / "b", make, _loaders(x, y), callbacks=[mon], max_epochs=2)
    _assert_same(w0, _weights(module))
    assert len(mon.last_scores) == 6
    for name, scores in mon.last_scores.items():
        assert torch.isfinite(torch.as_tensor(scores["deletion"])), name
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    stem = {n for n, _ in module.net.stem.named_parameters(prefix="net.stem")}
    assert frozen == (stem if make is _frozen_stem else set())  # requires_grad left as found


@pytest.mark.parametrize(
    ("shape", "num_samples", "batch_size"), [((1, 28, 28), 1, 4), ((3, 40, 24), 5, 2), ((3, 7, 9), 3, 256)]
)
def test_odd_sizes_one_sample_probes_and_batch_sizes(tmp_path, shape, num_samples, batch_size):
    x, y = _data(shape=shape)
    metrics = [{"name": "deletion", "n_steps": 4}, {"name": "mufidelity", "n_subsets": 4},
               {"name": "max_sensitivity", "n_samples": 2}]  # fmt: skip
    mon = _monitor(metrics=metrics, num_samples=num_samples, batch_size=batch_size)
    make = lambda: Lit(ResNetish(c=shape[0]))  # noqa: E731
    _fit(tmp_path, make, _loaders(x, y, batch_size=1 if num_samples == 1 else 8), callbacks=[mon])
    assert mon.probe_x.shape == (num_samples, *shape)
    for name, scores in mon.last_scores.items():
        for tag in ("deletion", "mufidelity", "max_sensitivity"):
            assert torch.isfinite(torch.as_tensor(scores[tag])), (name, tag)


def test_maps_do_not_depend_on_batch_size_or_on_the_other_samples():
    torch.manual_seed(0)
    model = ResNetish().eval()
    x, y = _data(5, shape=(3, 13, 11))
    for spec in ["saliency", {"name": "ig", "n_steps": 4}, "gradcam", {"name": "occlusion", "window": 4, "stride": 3}]:
        full = ATTRIBUTIONS.build(spec, batch_size=256)(model, x, y)
        torch.testing.assert_close(ATTRIBUTIONS.build(spec, batch_size=2)(model, x, y), full)
        torch.testing.assert_close(ATTRIBUTIONS.build(spec, batch_size=256)(model, x[3:4], y[3:4]), full[3:4])


# --------------------------------------------------------------------------- token, multi-label, two-input models
class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(tokens).mean(1))


def test_token_inputs_direct_calls_name_the_embedding_fix_and_the_monitor_explains_them(tmp_path):
    """A method called on token ids names the fix (EmbeddingView); the monitor applies it by itself (docs/text.md)."""
    g = torch.Generator().manual_seed(0)
    tokens, y = torch.randint(0, 50, (32, 10), generator=g), torch.randint(0, 3, (32,), generator=g)
    for spec in ["saliency", "occlusion", "rise"]:
        with pytest.raises(TypeError, match=r"nn\.Embedding"):  # was: "... got torch.int64; use .float()"
            ATTRIBUTIONS.build(spec)(TokenNet().eval(), tokens[:2], y[:2])
    mon = AttributionMonitor(budget=None, methods=["saliency", "ig"], metrics=["sparseness"], num_samples=4,
                             strict=True)
    _fit(tmp_path, lambda: Lit(TokenNet()), _loaders(tokens, y), callbacks=[mon])
    assert set(mon.last_scores) == {"saliency", "ig"} and mon.probe_x.dtype == torch.long


def test_token_model_explained_through_its_embeddings(tmp_path):
    """The fix the error names: a module taking the embeddings, and input_key embedding the tokens."""
    g = torch.Generator().manual_seed(0)
    tokens, y = torch.randint(0, 50, (32, 10), generator=g), torch.randint(0, 3, (32,), generator=g)
    module_ref: list[Lit] = []

    def make() -> Lit:
        module_ref[:] = [Lit(TokenNet())]
        return module_ref[0]

    class OnEmbeddings(nn.Module):
        def __init__(self, net: TokenNet) -> None:
            super().__init__()
            self.head = net.head

        def forward(self, e: torch.Tensor) -> torch.Tensor:
            return self.head(e.mean(1))

    def embed(batch):
        return module_ref[0].net.emb(batch[0]).detach()

    mon = AttributionMonitor(budget=None,
        methods=["saliency", {"name": "ig", "n_steps": 8}], metrics=[{"name": "deletion", "n_steps": 4}],
        num_samples=4, input_key=embed, model_attr="on_emb", strict=True,
    )  # fmt: skip

    def make_with_view() -> Lit:
        module = make()
        module.on_emb = OnEmbeddings(module.net)
        return module

    _fit(tmp_path, make_with_view, _loaders(tokens, y), callbacks=[mon])
    assert mon.probe_x.shape == (4, 10, 8)  # (B, T, D) embedded sequences
    assert torch.isfinite(torch.as_tensor(mon.last_scores["ig"]["deletion"]))


def test_multilabel_labels_as_target_name_the_fix(tmp_path):
    x, _ = _data()
    y = (torch.rand(x.shape[0], 4, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    mon = _monitor()
    with pytest.raises(ValueError, match="multi-label"):  # was: "target must have shape (4,) ..., got (16,)"
        _fit(tmp_path / "a", lambda: Lit(ResNetish(), "bce"), _loaders(x, y), callbacks=[mon])
    for target in (2, "prediction"):
        mon = _monitor(target=target)
        _fit(tmp_path / "b", lambda: Lit(ResNetish(), "bce"), _loaders(x, y), callbacks=[mon])
        assert torch.isfinite(torch.as_tensor(mon.last_scores["ig"]["deletion"]))


def test_regression_labels_as_target_name_target_none(tmp_path):
    x, _ = _data()
    y = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(3))
    mon = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4, strict=True)
    with pytest.raises(ValueError, match="target=None"):  # real labels were truncated to class indices silently
        _fit(tmp_path / "a", lambda: Lit(ResNetish(k=1), "mse"), _loaders(x, y), callbacks=[mon])
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(3)).float()
    mon = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4, strict=True)
    with pytest.raises(ValueError, match="target=None"):  # integer-valued real labels: out of range for 1 output
        _fit(tmp_path / "b", lambda: Lit(ResNetish(k=1), "mse"), _loaders(x, y), callbacks=[mon])
    mon = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4, target=None, strict=True)
    _fit(tmp_path / "c", lambda: Lit(ResNetish(k=1), "mse"), _loaders(x, y), callbacks=[mon])
    assert "saliency" in mon.last_scores


class TwoInputs(Lit):
    def __init__(self) -> None:
        super().__init__(ResNetish(k=8))
        self.tab = nn.Linear(5, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, img: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.net(img) + self.tab(tab)))

    def _loss(self, batch) -> torch.Tensor:
        return F.cross_entropy(self(batch[0], batch[1]), batch[2])


def test_two_input_forward_names_the_fix(tmp_path):
    x, y = _data()
    tab = torch.rand(x.shape[0], 5, generator=torch.Generator().manual_seed(4))
    mon = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4, label_key=2, strict=True)
    with pytest.raises(TypeError, match="model_attr"):  # was: "forward() missing 1 required positional argument"
        _fit(tmp_path, TwoInputs, _loaders(x, tab, y), callbacks=[mon])


# --------------------------------------------------------------------------- bad inputs to metrics
def test_metrics_refuse_maps_of_another_method_or_nan_maps():
    from explain_callbacks._internal.registry import METRICS

    torch.manual_seed(0)
    model = ResNetish().eval()
    x, y = _data(4)
    saliency = ATTRIBUTIONS.build("saliency")
    one_channel = torch.rand(4, 1, 20, 12)  # a Grad-CAM-like map: valid input shape, but not saliency's maps
    for spec in [{"name": "max_sensitivity", "n_samples": 2}, {"name": "local_lipschitz", "n_samples": 2},
                 {"name": "completeness_soundness", "n_steps": 2, "n_other": 1}]:  # fmt: skip
        with pytest.raises(ValueError, match="not this method's maps"):  # was a size mismatch deep in torch
            METRICS.build(spec).update(model, x, y, saliency, attributions=one_channel)
    nan_maps = torch.full_like(x, float("nan"))
    for spec in ["deletion", "insertion", "mufidelity", "completeness_error"]:
        with pytest.raises(ValueError, match="NaN"):  # was a number computed from a NaN ordering
            METRICS.build(spec).update(model, x, nan_maps, y)


def test_per_class_probe_with_multilabel_labels_names_the_fix(tmp_path):
    x, _ = _data()
    y = (torch.rand(x.shape[0], 4, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    mon = AttributionMonitor(
        budget=None, methods=["saliency"], num_samples=4, per_class=2, target="prediction", strict=True)
    with pytest.raises(ValueError, match="per_class needs one class label"):  # was int() of a 4-element tensor
        _fit(tmp_path, lambda: Lit(ResNetish(), "bce"), _loaders(x, y), callbacks=[mon])


@pytest.mark.parametrize("penalty", ["rrr", "eg_mask", {"name": "attribution", "method": "ig"}], ids=str)
def test_regularizer_on_token_and_no_grad_models_names_the_fix(tmp_path, penalty):
    from explain_callbacks.callbacks import AttributionRegularizer

    g = torch.Generator().manual_seed(0)
    tokens, yt = torch.randint(0, 50, (32, 10), generator=g), torch.randint(0, 3, (32,), generator=g)
    reg = AttributionRegularizer(penalty, mask=torch.ones(1, 10))
    with pytest.raises(TypeError, match="Embedding"):  # were: 'use .float()', check_uniform_bounds, requires_grad
        _fit(tmp_path / "a", lambda: Lit(TokenNet()), _loaders(tokens, yt), callbacks=[reg])
    x, y = _data()
    reg = AttributionRegularizer(penalty, mask=torch.ones(1, 3, 20, 12))
    with pytest.raises(RuntimeError, match="no_grad"):  # rrr was autograd's "not used in the graph"
        _fit(tmp_path / "b", lambda: Lit(NoGradStem()), _loaders(x, y), callbacks=[reg])


def test_integrated_hessians_past_a_no_grad_part_raise_instead_of_zeros():
    from explain_callbacks._internal.registry import INTERACTIONS

    torch.manual_seed(0)
    x, y = _data(2)
    ih = INTERACTIONS.build({"name": "integrated_hessians", "n_steps": 2})
    with pytest.raises(RuntimeError, match="no_grad"):  # torch.func.grad returned an all-zero matrix
        ih(NoGradStem().eval().requires_grad_(False), x, y)
    scores = ih(ResNetish(inplace=True).eval().requires_grad_(False), x, y)
    assert scores.shape == (2, 16, 16) and torch.isfinite(scores).all() and scores.abs().max() > 0


class NoForward(pl.LightningModule):
    """The network only in ``self.net``, used by the steps; no ``forward`` of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ResNetish()

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_lightning_module_without_forward_names_model_attr(tmp_path):
    x, y = _data()
    mon = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4, strict=True)
    with pytest.raises(NotImplementedError, match=r"model_attr=.*'net'"):  # was torch's "missing ... forward"
        _fit(tmp_path / "a", NoForward, _loaders(x, y), callbacks=[mon])
    mon = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4, model_attr="net", strict=True)
    _fit(tmp_path / "b", NoForward, _loaders(x, y), callbacks=[mon])
    assert "saliency" in mon.last_scores
