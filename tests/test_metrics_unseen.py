"""The metrics on settings the other metric tests do not use: targets as ints, lists or out of range;
models left in training mode (BatchNorm, dropout, frozen layers); channels_last models under the
randomisation check; maps that broadcast ((B,T,1) mask maps of sequences, (B,H,W) maps of images and
volumes); non-finite maps in the explainer metrics and drift; degenerate settings; multi-label
(sigmoid) scores; Captum on the new settings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from explain_callbacks.attribution import ATTRIBUTIONS, Saliency
from explain_callbacks.metrics import METRICS, Deletion
from explain_callbacks.metrics import functional as MF

NAMES = [
    "deletion", "insertion", "insertion_deletion", "abc", "mufidelity", "infidelity", "pointing_game",
    "energy_pointing_game", "sparseness", "complexity", "completeness_error", "dabkowski",
    "max_sensitivity", "avg_sensitivity", "local_lipschitz", "completeness_soundness", "randomisation",
]  # fmt: skip
FAST = {
    "deletion": {"n_steps": 4}, "insertion": {"n_steps": 4}, "insertion_deletion": {"n_steps": 4},
    "abc": {"n_steps": 4}, "mufidelity": {"n_subsets": 6}, "infidelity": {"n_perturb": 4},
    "max_sensitivity": {"n_samples": 2}, "avg_sensitivity": {"n_samples": 2}, "local_lipschitz": {"n_samples": 2},
    "completeness_soundness": {"n_other": 1, "n_steps": 4},
}  # fmt: skip
# every functional that runs the model and takes a target: (model, x, a, y) -> scores
WITH_MODEL = {
    "deletion": lambda m, x, a, y: MF.deletion(m, x, a, y, n_steps=3),
    "insertion": lambda m, x, a, y: MF.insertion(m, x, a, y, n_steps=3),
    "insertion_deletion": lambda m, x, a, y: MF.insertion_deletion(m, x, a, y, n_steps=3),
    "abc": lambda m, x, a, y: MF.abc(m, x, a, y, n_steps=3),
    "mufidelity": lambda m, x, a, y: MF.mufidelity(m, x, a, y, n_subsets=4),
    "infidelity": lambda m, x, a, y: MF.infidelity(m, x, a, y, n_perturb=3),
    "completeness_error": lambda m, x, a, y: MF.completeness_error(m, x, a, y),
    "dabkowski": lambda m, x, a, y: MF.dabkowski_saliency(m, x, a, y),
    "max_sensitivity": lambda m, x, a, y: MF.max_sensitivity(m, x, y, Saliency(), a, n_samples=2),
    "local_lipschitz": lambda m, x, a, y: MF.local_lipschitz(m, x, y, Saliency(), a, n_samples=2),
    "completeness_soundness": lambda m, x, a, y: MF.completeness_soundness(m, x, y, Saliency(), a, n_steps=3)[0],
    "randomisation": lambda m, x, a, y: MF.model_randomisation(m, x, y, Saliency(), a),
}


def _cnn(c: int = 3, k: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, k)
    ).eval()  # fmt: skip


def _images(b: int = 3, c: int = 3, h: int = 7, w: int = 9):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, c, h, w, generator=g), torch.arange(b) % 5


# --------------------------------------------------------------------------- targets
@pytest.mark.parametrize("name", sorted(WITH_MODEL))
def test_targets_as_int_list_or_tensor_and_clear_range_errors(name):
    """An int or a list is a target, as for the methods (was: AttributeError 'int' has no 'ndim'); a class
    outside the outputs, a negative one or a float target raise errors that name the fix (was: an index
    error inside gather, or gather's dtype error)."""
    torch.manual_seed(0)
    model = _cnn()
    x, y = _images()
    a = Saliency()(model, x, y)
    fn = WITH_MODEL[name]
    ref = fn(model, x, a, torch.full((3,), 2))
    torch.testing.assert_close(fn(model, x, a, 2), ref)
    torch.testing.assert_close(fn(model, x, a, [2, 2, 2]), ref)
    for bad in (torch.tensor([0, 1, 5]), torch.tensor([0, -1, 2])):
        with pytest.raises(ValueError, match=r"must lie in \[0, 4\]"):
            fn(model, x, a, bad)
    with pytest.raises(TypeError, match="integer class indices"):
        fn(model, x, a, torch.tensor([0.0, 1.0, 2.0]))


def test_target_of_a_single_output_model_and_the_class_api():
    torch.manual_seed(0)
    reg = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).eval()
    x = torch.randn(4, 6)
    a = Saliency()(reg, x, None)
    torch.testing.assert_close(MF.abc(reg, x, a, 0, n_steps=3), MF.abc(reg, x, a, None, n_steps=3))
    with pytest.raises(ValueError, match="target=None"):
        MF.deletion(reg, x, a, 1, n_steps=3, output="logit")
    model = _cnn()
    xi, y = _images()
    ai = Saliency()(model, xi, y)
    metric = Deletion(n_steps=3)
    metric.update(model, xi, ai, 4)
    torch.testing.assert_close(metric.last_scores, MF.deletion(model, xi, ai, torch.full((3,), 4), n_steps=3))


# --------------------------------------------------------------------------- models in training mode
class _TrainNet(nn.Module):
    """BatchNorm, dropout and a frozen first layer; left in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, 5)
        self.conv.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1)
        return self.head(self.drop(h))


@pytest.mark.parametrize("name", NAMES)
def test_a_model_in_training_mode_is_left_as_found_and_the_metric_is_deterministic(name):
    """Was: every metric that runs the model moved the BatchNorm running statistics (randomisation too:
    its trained maps ran on the live model), drew dropout masks from the global RNG and gave other
    scores on each call."""
    torch.manual_seed(0)
    net = _TrainNet().train()
    x, y = _images(b=4, h=8, w=8)
    y = y % 5
    masks = torch.zeros(4, 8, 8)
    masks[:, 2:5, 2:5] = 1
    a = Saliency()(net.eval(), x, y)
    net.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    versions = {k: v._version for k, v in net.state_dict().items()}
    flags = [p.requires_grad for p in net.parameters()]
    rng = torch.get_rng_state()
    metric = METRICS.build(name, **FAST.get(name, {}))
    scores = []
    for _ in range(2):
        metric.reset()
        if metric.kind == "explainer":
            metric.update(net, x, y, Saliency(), masks=masks)
        else:
            metric.update(net, x, a, y, masks=masks)
        scores.append(metric.last_scores.clone())
    assert all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]) and v._version == versions[k], k
    assert flags == [p.requires_grad for p in net.parameters()]
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(rng, torch.get_rng_state()), "the global RNG moved"
    torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- memory format
def test_randomisation_does_not_depend_on_the_models_memory_format():
    """Was: in-place draws fill memory order, so a channels_last model was randomised to other weights
    than the same model stored contiguously (Spearman 0.08 against 0.01 on the same maps)."""
    torch.manual_seed(0)
    model = _cnn()
    x, y = _images(h=8, w=8)
    cl = _cnn()
    cl.load_state_dict(model.state_dict())
    cl = cl.to(memory_format=torch.channels_last)
    assert not cl[0].weight.is_contiguous()
    for kw in ({}, {"return_cascade": True}):
        ref = MF.model_randomisation(model, x, y, Saliency(), **kw)
        got = MF.model_randomisation(cl, x.to(memory_format=torch.channels_last), y, Saliency(), **kw)
        if kw:
            assert ref[0] == got[0]
            ref, got = ref[1], got[1]
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- maps that broadcast
class _Tiny(nn.Module):
    """(B, T, D) sequences through a linear projection and a one-head attention layer."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 8)
        self.attn = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.proj(x)).mean(1))


def test_step_maps_of_sequences_broadcast_over_the_features():
    """RISE and Sobol give (B,T,1) maps for (B,T,D) sequences; every metric refused them ('do not match
    inputs'). They score as the map repeated over the D features."""
    torch.manual_seed(0)
    model = _Tiny().eval()
    x, y = torch.randn(2, 6, 3), torch.tensor([0, 3])
    maps = ATTRIBUTIONS.build({"name": "rise", "n_masks": 16})(model, x, y)
    assert maps.shape == (2, 6, 1)
    full = maps.expand_as(x).contiguous()
    for name, fn in WITH_MODEL.items():
        if name in ("dabkowski", "max_sensitivity", "local_lipschitz", "completeness_soundness", "randomisation"):
            continue  # images only / re-run a method whose maps have the input's shape
        if name == "completeness_error":  # ΣA of the map as given: a step's value counts once, not D times
            torch.testing.assert_close(fn(model, x, maps, y), fn(model, x, full / 3, y), msg=name)
            continue
        torch.testing.assert_close(fn(model, x, maps, y), fn(model, x, full, y), msg=name)
    torch.testing.assert_close(MF.sparseness(maps), MF.sparseness(full))


@pytest.mark.parametrize("shape", [(7, 9), (4, 5, 6)])
def test_maps_without_a_channel_dim_are_one_channel_maps(shape):
    """(B,*spatial) maps of images and volumes score as (B,1,*spatial) (were refused)."""
    torch.manual_seed(0)
    c = 2
    if len(shape) == 2:
        model = _cnn(c=c)
    else:
        model = nn.Sequential(nn.Conv3d(c, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                              nn.Linear(3, 5)).eval()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, c, *shape, generator=g)
    y = torch.tensor([1, 4])
    a = torch.randn(2, *shape, generator=g)
    a1 = a.unsqueeze(1)
    masks = torch.rand(2, *shape, generator=g) > 0.7
    for name, fn in WITH_MODEL.items():
        if name in ("max_sensitivity", "local_lipschitz", "completeness_soundness", "randomisation"):
            continue
        if name == "dabkowski" and len(shape) != 2:
            continue
        torch.testing.assert_close(fn(model, x, a, y), fn(model, x, a1, y), msg=name)
    for fn in (MF.pointing_game, MF.energy_pointing_game):
        torch.testing.assert_close(fn(a, masks, x), fn(a1, masks, x), equal_nan=True)


def test_pointing_game_of_a_2d_map_without_inputs():
    """A (B,H,W) map with (B,H,W) masks and no inputs was read as (B,C,L) and collapsed to columns: a
    maximum five rows away from the mask, in its column, was a hit."""
    a = torch.zeros(1, 8, 8)
    a[0, 1, 1] = 1.0
    m = torch.zeros(1, 8, 8)
    m[0, 6, 1] = 1.0
    assert MF.pointing_game(a, m, tolerance=1).tolist() == [0.0]
    assert MF.pointing_game(a, m, tolerance=5).tolist() == [1.0]
    assert MF.pointing_game(a[:, None], m, tolerance=1).tolist() == [0.0]
    m2 = torch.zeros(1, 8, 8)
    m2[0, 1, 5:] = 1.0  # the same row, four columns right: a column-collapsed read sees no mask there
    assert MF.energy_pointing_game(a, m2).tolist() == [0.0]


# --------------------------------------------------------------------------- non-finite maps, degenerate settings
def test_non_finite_maps_raise_in_explainer_metrics_and_drift():
    """Were: NaN scores (sensitivity, left out silently by the classes), numbers (randomisation ranks
    NaN as a value) and a correlation near 1 (drift)."""
    torch.manual_seed(0)
    model = _cnn()
    x, y = _images()
    a = Saliency()(model, x, y)
    bad = a.clone()
    bad[0, 0, 0, 0] = float("nan")
    inf = a.clone()
    inf[1, 0, 0, 0] = float("inf")
    for m in (bad, inf):
        for fn in (
            lambda m: MF.max_sensitivity(model, x, y, Saliency(), m, n_samples=2),
            lambda m: MF.local_lipschitz(model, x, y, Saliency(), m, n_samples=2),
            lambda m: MF.model_randomisation(model, x, y, Saliency(), m),
            lambda m: MF.explanation_drift(m, a),
            lambda m: MF.explanation_drift(a, m),
        ):
            with pytest.raises(ValueError, match="NaN or Inf"):
                fn(m)


def test_degenerate_settings_raise_instead_of_a_constant_or_nan():
    """Were: 0.0 for every sample (one subset, every feature in each subset, drop_prob > 1, empty
    squares), NaN (no perturbation) or torch errors (no draw, an empty grid)."""
    torch.manual_seed(0)
    model = _cnn()
    x, y = _images()
    a = Saliency()(model, x, y)
    cases = [
        lambda: MF.mufidelity(model, x, a, y, n_subsets=1),
        lambda: MF.mufidelity(model, x, a, y, subset_size=1.0, n_subsets=4),
        lambda: MF.mufidelity(model, x, a, y, grid_size=0, n_subsets=4),
        lambda: MF.mufidelity(model, x, a, y, grid_size=3, drop_prob=1.5, n_subsets=4),
        lambda: MF.mufidelity(model, x, a, y, subsets=torch.ones(3, 1, 63, dtype=torch.bool)),
        lambda: MF.infidelity(model, x, a, y, n_perturb=0),
        lambda: MF.infidelity(model, x, a, y, perturbation="square", patch_size=0),
        lambda: MF.max_sensitivity(model, x, y, Saliency(), n_samples=0),
        lambda: MF.local_lipschitz(model, x, y, Saliency(), n_samples=0),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(ValueError):
            case()
            pytest.fail(f"case {i} did not raise")


# --------------------------------------------------------------------------- multi-label scores
def test_sigmoid_output_scores_each_label_by_its_own_probability():
    """Multi-label models had only the softmax over labels or the raw logit; ``output="sigmoid"`` scores
    σ(z_c), as a one-logit binary classifier's probability too."""
    torch.manual_seed(0)
    model = nn.Linear(6, 4).eval()
    x, y = torch.randn(3, 6), torch.tensor([0, 2, 3])
    a = Saliency()(model, x, y)
    _, curve, _ = MF.deletion(model, x, a, y, n_steps=3, output="sigmoid", return_curve=True)
    _, logit_curve, _ = MF.deletion(model, x, a, y, n_steps=3, output="logit", return_curve=True)
    torch.testing.assert_close(curve, logit_curve.sigmoid())
    torch.testing.assert_close(curve[:, 0], model(x).sigmoid().gather(1, y[:, None])[:, 0].double())
    binary = nn.Linear(6, 1).eval()
    ab = Saliency()(binary, x, None)
    _, bc, _ = MF.insertion(binary, x, ab, None, n_steps=2, output="sigmoid", return_curve=True)
    torch.testing.assert_close(bc[:, -1], binary(x)[:, 0].sigmoid().double())
    assert math.isfinite(float(MF.mufidelity(model, x, a, y, n_subsets=5, subset_size=2, output="sigmoid")[0]))


# --------------------------------------------------------------------------- Captum on the new settings
def test_infidelity_of_step_maps_and_regressions_equals_captum():
    """Captum's infidelity with the same noise: a (B,T,1) map on a (B,T,D) sequence model (Captum gets the
    map repeated over D), and a one-output regression on tabular data (target None), float64."""
    captum_metrics = pytest.importorskip("captum.metrics")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    cases = []
    seq = _Tiny().double().eval()
    xs = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    maps = torch.randn(2, 6, 1, generator=g, dtype=torch.float64)
    cases.append((seq, xs, maps, maps.expand_as(xs).contiguous(), torch.tensor([1, 2])))
    reg = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double().eval()
    xr = torch.randn(4, 5, generator=g, dtype=torch.float64)
    ar = Saliency()(reg, xr, None)
    cases.append((reg, xr, ar, ar, None))
    r = 5
    for model, x, a, a_full, y in cases:
        b = x.shape[0]
        noise = torch.randn(b, r, *x.shape[1:], generator=g, dtype=torch.float64) * 0.1

        def perturb(inputs, noise=noise, b=b, x=x):
            pert = noise.reshape(b * r, *x.shape[1:])
            return pert, inputs - pert

        ref = captum_metrics.infidelity(model, perturb, x, a_full, target=y, n_perturb_samples=r)
        ours = MF.infidelity(model, x, a, y, perturbation=noise, output="logit", batch_size=3)
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_maps_and_masks_on_another_device_than_the_inputs():
    """Maps (and masks) computed on the CPU for a model on the GPU score as maps on the GPU."""
    torch.manual_seed(0)
    model = _cnn().cuda()
    x, y = _images()
    x, y = x.cuda(), y.cuda()
    a = Saliency()(model, x, y)
    masks = torch.rand(3, 7, 9, device="cuda") > 0.5
    for name, fn in WITH_MODEL.items():
        torch.testing.assert_close(fn(model, x, a.cpu(), y), fn(model, x, a, y), msg=name)
    for fn in (MF.pointing_game, MF.energy_pointing_game):
        torch.testing.assert_close(fn(a.cpu(), masks, x), fn(a, masks, x), equal_nan=True)
        torch.testing.assert_close(fn(a, masks.cpu(), x), fn(a, masks, x), equal_nan=True)


def test_a_model_returning_a_dict_gets_the_methods_wrap_it_error():
    """The methods name the fix (output_key, a wrapper); the metrics raised AttributeError ('dict'
    object has no attribute 'ndim' / 'softmax')."""

    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _cnn()

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"scores": self.net(x)}

    torch.manual_seed(0)
    model = DictOut().eval()
    x, y = _images()
    a = Saliency()(model.net, x, y)
    for name, fn in WITH_MODEL.items():
        if name in ("max_sensitivity", "local_lipschitz", "randomisation"):
            continue  # these call the model only through the method
        with pytest.raises(TypeError, match=r"wrap it|not a tensor of scores"):
            fn(model, x, a, y)


@pytest.mark.parametrize("name", NAMES)
def test_metrics_in_a_lightning_test_step_under_inference_mode(name):
    """Lightning's validate/test steps run under torch.inference_mode, where explainer metrics failed
    ('Setting requires_grad=True on inference tensor', 'Inference tensors cannot be saved for backward'
    from the randomised weights, or the method's 'does not depend differentiably')."""
    torch.manual_seed(0)
    model = _cnn()
    x0, y0 = _images(b=4, h=8, w=8)
    a0 = Saliency()(model, x0, y0)
    ref = METRICS.build(name, **FAST.get(name, {}))
    with torch.inference_mode():
        x, y, a = x0.clone(), y0.clone(), a0.clone()  # inference tensors, as in a test_step
        masks = torch.zeros(4, 8, 8)
        masks[:, 2:5, 2:5] = 1
        metric = METRICS.build(name, **FAST.get(name, {}))
        if metric.kind == "explainer":
            metric.update(model, x, y, Saliency(), masks=masks)
        else:
            metric.update(model, x, a, y, masks=masks)
        value = metric.compute()
    if ref.kind == "explainer":
        ref.update(model, x0, y0, Saliency(), masks=masks.clone())
    else:
        ref.update(model, x0, a0, y0, masks=masks.clone())
    torch.testing.assert_close(value, ref.compute())


# --------------------------------------------------------------------------- (B,T,D) sequences: positions
class _StepGRU(nn.Module):
    """(B, T, D) sequences read by a GRU (steps along dim 1)."""

    def __init__(self, d: int = 3, k: int = 4) -> None:
        super().__init__()
        self.gru = nn.GRU(d, 6, batch_first=True)
        self.head = nn.Linear(6, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x)[0][:, -1])


class _SignalOf(nn.Module):
    """The same network taking (B, D, T) signals (a Conv1d-style layout)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner(z.transpose(1, 2))


def test_settings_along_positions_run_along_the_steps_of_sequences():
    """Blur/mean substrates, position features, grid cells, squares and blocks ran along the D features of
    (B,T,D) sequences (blurring or averaging different features together, grids over features). They now
    run along the T steps, as the mask methods do: equal to the same network fed (B,D,T) signals."""
    torch.manual_seed(0)
    seq = _StepGRU().eval()
    sig = _SignalOf(seq).eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 10, 3, generator=g), torch.tensor([0, 1, 3])
    a = torch.randn(3, 10, 3, generator=g)
    steps = torch.randn(3, 10, 1, generator=g)  # a (B,T,1) map of a mask method
    z, az, sz = x.transpose(1, 2), a.transpose(1, 2), steps.transpose(1, 2)
    cases = [
        lambda m, x, a: MF.deletion(m, x, a, y, substrate="mean", n_steps=4),
        lambda m, x, a: MF.deletion(m, x, a, y, features="pixel", n_steps=4),
        lambda m, x, a: MF.insertion(m, x, a, y, substrate="blur", blur_sigma=2.0, n_steps=4),
        lambda m, x, a: MF.insertion_deletion(
            m, x, a, y, insertion_substrate="blur", deletion_substrate="mean", n_steps=4
        ),
        lambda m, x, a: MF.abc(m, x, a, y, baseline="mean", n_steps=4),
        lambda m, x, a: MF.mufidelity(m, x, a, y, preset="xplique", grid_size=4, n_subsets=8),
        lambda m, x, a: MF.mufidelity(m, x, a, y, baseline="mean", n_subsets=8),
        lambda m, x, a: MF.infidelity(m, x, a, y, perturbation="square", patch_size=3, n_perturb=4),
        lambda m, x, a: MF.infidelity(m, x, a, y, perturbation="patch_sequence", patch_size=3, baseline="mean"),
    ]
    for i, fn in enumerate(cases):
        torch.testing.assert_close(fn(seq, x, a), fn(sig, z, az), msg=f"case {i}")
        torch.testing.assert_close(fn(seq, x, steps), fn(sig, z, sz), msg=f"case {i}, (B,T,1) map")
    # channels_first=True keeps the (B,C,L) reading: a plain function of the inputs has no layer to tell
    for kw in ({"substrate": "mean"}, {"features": "pixel"}):
        torch.testing.assert_close(
            MF.deletion(seq, x, a, y, n_steps=4, channels_first=True, **kw),
            MF.deletion(lambda t: seq(t), x, a, y, n_steps=4, **kw),
        )
    metric = METRICS.build({"name": "mufidelity", "preset": "xplique", "n_subsets": 8, "channels_first": False})
    metric.update(sig.inner, x, a, y)
    torch.testing.assert_close(metric.last_scores, MF.mufidelity(sig, z, az, y, preset="xplique", n_subsets=8))
    # the default settings do not depend on the layout, and are unchanged
    torch.testing.assert_close(MF.deletion(seq, x, a, y, n_steps=4), MF.deletion(lambda t: seq(t), x, a, y, n_steps=4))
