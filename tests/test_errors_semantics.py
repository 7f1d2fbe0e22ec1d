"""Errors and semantics from the outside audit (issue 16, items 10-13).

Broke before:
- 10: ``strict=True`` warned (did not raise) on NaN/Inf maps; metrics dropped NaN samples silently.
- 11: ``rrr_penalty`` returned a NaN penalty for NaN inputs and failed on an empty batch; RISE and
  ``rrr_penalty`` raised ``AttributeError: 'dict' object has no attribute 'ndim'`` on tuple/dict outputs;
  a wrong input shape surfaced as the model's own error quoting the one-row probe.
- 12: ``infidelity`` gave other scores for the same values stored channels_last or transposed.
- 13: gradient methods called inside ``torch.no_grad()`` / ``torch.inference_mode()`` failed, blaming
  the model's forward.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from explain_callbacks.attribution import ATTRIBUTIONS, build_attributor
from explain_callbacks.metrics import METRICS
from explain_callbacks.metrics import functional as MF
from explain_callbacks.metrics.base import ExplanationMetric
from explain_callbacks.regularize import attribution_penalty, eg_mask_prior, rrr_penalty

from .helpers_lightning import image_loaders, lit, trainer


def _cnn(c: int = 3, k: int = 5, h: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * h * h, k)
    ).eval()  # fmt: skip


def _images(b: int = 3, c: int = 3, h: int = 8):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, c, h, h, generator=g), torch.arange(b) % 5


class DictOut(nn.Module):
    def __init__(self, net: nn.Module, key: str = "logits") -> None:
        super().__init__()
        self.net, self.key = net, key

    def forward(self, x):
        return {self.key: self.net(x), "aux": x.mean()}


class TupleOut(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x), x.mean()


# --------------------------------------------------------------------------- 13: caller's grad context
# every method of the registry (one name per class/variant), with settings that keep the test fast
FAST = {
    "ig": {"n_steps": 4},
    "expected_gradients": {"n_samples": 4},
    "smoothgrad": {"n_samples": 3},
    "smoothgrad_sq": {"n_samples": 3},
    "vargrad": {"n_samples": 3},
    "rise": {"n_masks": 16},
    "sobol": {"n_designs": 8},
    "hsic": {"n_designs": 16},
    "meaningful_perturbation": {"n_steps": 3},
    "extremal_perturbation": {"n_steps": 3},
    "sound_mask": {"n_steps": 3},
    "nonlinear_saliency": {"max_steps": 3},
    "neflag": {"n_points": 4, "n_iter": 2},
    "neuron_region_ig": {"layer": "0", "n_steps": 4},
    "grad_cam": {"layer": "0"},
}


def _registry_methods() -> list[str]:
    """One registered name per distinct constructor (aliases left out)."""
    seen, names = set(), []
    for name in ATTRIBUTIONS.names():
        ctor = ATTRIBUTIONS.get(name)
        if ctor not in seen:
            seen.add(ctor)
            names.append(name)
    return names


def _build(name: str):
    ctor = ATTRIBUTIONS.get(name)
    kw = next((v for k, v in FAST.items() if ATTRIBUTIONS.get(k) is ctor), {})
    return build_attributor(name, **kw)


@pytest.mark.parametrize("name", _registry_methods())
def test_every_method_gives_the_same_map_inside_no_grad_and_inference_mode(name):
    model = _cnn()
    x, y = _images(b=2)
    method = _build(name)
    if type(method).__name__ == "RealTimeSaliency":  # its map comes from a masking network (untrained here)
        from explain_callbacks.attribution.blackbox.realtime import MaskingNetwork

        torch.manual_seed(1)
        method.masker = MaskingNetwork(3, 5, width=4)
    ref = method(model, x, y)
    with torch.no_grad():
        in_no_grad = method(model, x, y)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()  # inference tensors, as in a Lightning test_step
        in_inference = method(model, xi, yi)
    assert not in_inference.is_inference()
    torch.testing.assert_close(in_no_grad, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(in_inference, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kw", [("ih", {"n_steps": 3}), ("cd", {}), ("hsic", {"n_designs": 16}),
                                     ("sobol", {"n_designs": 8})])  # fmt: skip
def test_every_interaction_gives_the_same_scores_inside_no_grad_and_inference_mode(name, kw):
    from explain_callbacks.interaction import build_interaction

    model = _cnn()
    x, y = _images(b=2)
    method = build_interaction({"name": name, **kw})
    ref = method(model, x, y, groups=4)
    with torch.no_grad():
        torch.testing.assert_close(method(model, x, y, groups=4), ref)
    with torch.inference_mode():
        got = method(model, x.clone(), y.clone(), groups=4)
    torch.testing.assert_close(got, ref)


def test_create_graph_map_inside_no_grad_still_reaches_the_parameters():
    model = _cnn()
    for p in model.parameters():
        p.requires_grad_(True)
    x, y = _images(b=2)
    with torch.no_grad():
        a = build_attributor("saliency")(model, x, y, create_graph=True)
    assert a.requires_grad
    (g,) = torch.autograd.grad(a.pow(2).sum(), model[0].weight)
    assert g.abs().sum() > 0


# --------------------------------------------------------------------------- 12: infidelity layout
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_infidelity_is_the_same_for_the_same_values_in_another_layout(layout):
    model = _cnn(h=8)
    x, y = _images(b=3)
    a = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    if layout == "channels_last":
        x2 = x.contiguous(memory_format=torch.channels_last)
        a2 = a.contiguous(memory_format=torch.channels_last)
    else:  # the same values, stored (B, C, W, H) and viewed back
        x2 = x.transpose(2, 3).contiguous().transpose(2, 3)
        a2 = a.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(x2, x) and not x2.is_contiguous()
    ref = MF.infidelity(model, x, a, y, n_perturb=6)
    got = MF.infidelity(model, x2, a2, y, n_perturb=6)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    # and equal to the closed form with the noise drawn in logical order (the contiguous draw)
    g = torch.Generator().manual_seed(0)
    noise = torch.empty(x.shape).normal_(0.0, 0.1, generator=g)
    assert MF.infidelity(model, x, a, y, perturbation=(noise).unsqueeze(1)).shape == (3,)


# --------------------------------------------------------------------------- 11: outputs, shapes, RRR
@pytest.mark.parametrize("wrapper", ["dict", "tuple"])
def test_rise_and_rrr_read_tuple_and_dict_outputs(wrapper):
    net = _cnn()
    x, y = _images(b=2)
    mask = torch.zeros(8, 8)
    mask[:3] = 1
    rise = build_attributor("rise", n_masks=16)
    model = DictOut(net) if wrapper == "dict" else TupleOut(net)
    key = "logits" if wrapper == "dict" else 0
    torch.testing.assert_close(rise(model, x, y, output_key=key), rise(net, x, y))
    torch.testing.assert_close(rrr_penalty(model, x, mask, output_key=key), rrr_penalty(net, x, mask))
    keyed = attribution_penalty(model, x, y, mask, "saliency", output_key=key)
    torch.testing.assert_close(keyed, attribution_penalty(net, x, y, mask, "saliency"))
    if wrapper == "dict":  # a "logits" entry is read without output_key, as everywhere
        torch.testing.assert_close(rise(model, x, y), rise(net, x, y))
        torch.testing.assert_close(rrr_penalty(model, x, mask), rrr_penalty(net, x, mask))
    else:  # a tuple: the standard error, naming output_key (was AttributeError: 'tuple' ... 'ndim')
        with pytest.raises(TypeError, match="output_key"):
            rise(model, x, y)
        with pytest.raises(TypeError, match="output_key"):
            rrr_penalty(model, x, mask)
        with pytest.raises(TypeError, match="output_key"):
            eg_mask_prior(model, x, y, mask)


def test_penalty_objects_and_the_mixin_take_output_key():
    from explain_callbacks.models import LitClassifier
    from explain_callbacks.regularize import RegularizerMixin, build_penalty

    net = _cnn()
    x, y = _images(b=2)
    mask = torch.zeros(8, 8)
    mask[:3] = 1
    pen = build_penalty("rrr")
    ref = pen(net, x, y, mask, step=0)
    torch.testing.assert_close(pen(TupleOut(net), x, y, mask, step=0, output_key=0), ref)
    with pytest.raises(TypeError, match="output_key"):
        pen(TupleOut(net), x, y, mask, step=0)

    class Lit(RegularizerMixin, LitClassifier):
        pass

    m = Lit(TupleOut(net))
    m.add_penalty("rrr", weight=2.0, model_attr="net", output_key=0)
    task = torch.tensor(1.0)
    torch.testing.assert_close(m.penalized_loss(task, x, y, mask, log=False), task + 2.0 * ref)


@pytest.mark.parametrize("name", ["saliency", "ig", "rise", "occlusion", "sobol", "smoothgrad"])
def test_a_scores_dict_without_logits_names_output_key_in_every_method(name):
    model = DictOut(_cnn(), key="scores")
    x, y = _images(b=2)
    method = _build(name)
    with pytest.raises(TypeError, match="output_key"):
        method(model, x, y)
    torch.testing.assert_close(method(model, x, y, output_key="scores"), method(model.net, x, y))


@pytest.mark.parametrize("name", ["deletion", "infidelity", "mufidelity", "completeness_soundness", "max_sensitivity"])
def test_metrics_take_output_key(name):
    net = _cnn()
    x, y = _images(b=2)
    a = build_attributor("saliency")(net, x, y)
    kw = {
        "deletion": {"n_steps": 3}, "infidelity": {"n_perturb": 3}, "mufidelity": {"n_subsets": 4},
        "completeness_soundness": {"n_other": 1, "n_steps": 3}, "max_sensitivity": {"n_samples": 2},
    }[name]  # fmt: skip
    scores = {}
    for model, key in ((net, None), (TupleOut(net), 0)):
        metric = METRICS.build(name, output_key=key, **kw)
        if metric.kind == "explainer":
            metric.update(model, x, y, build_attributor("saliency"), attributions=a)
        else:
            metric.update(model, x, a, y)
        scores[key] = metric.compute()
    torch.testing.assert_close(scores[0], scores[None])
    fn = {"deletion": MF.deletion, "infidelity": MF.infidelity, "mufidelity": MF.mufidelity}.get(name)
    if fn is not None:
        torch.testing.assert_close(fn(TupleOut(net), x, a, y, output_key=0, **kw), fn(net, x, a, y, **kw))
        with pytest.raises(TypeError, match="output_key"):
            fn(TupleOut(net), x, a, y, **kw)


def test_a_plain_function_model_takes_output_key_too():
    net = _cnn()
    x, y = _images(b=2)
    ref = build_attributor("saliency")(net, x, y)

    def fn(t):
        return (net(t), None)

    torch.testing.assert_close(build_attributor("saliency")(fn, x, y, output_key=0), ref)


@pytest.mark.parametrize("name", ["saliency", "ig", "rise"])
def test_a_wrong_input_shape_says_the_shape_given_and_what_the_layer_takes(name):
    model = _cnn(c=3)
    x = torch.rand(4, 1, 8, 8)  # one channel, the model takes three
    with pytest.raises(RuntimeError) as info:
        _build(name)(model, x, torch.zeros(4, dtype=torch.long))
    msg = str(info.value)
    assert "(4, 1, 8, 8)" in msg  # the shape given, not only the one-row probe's [1, 1, 8, 8]
    assert "layer '0' (Conv2d)" in msg and "3 channels" in msg
    assert isinstance(info.value.__cause__, RuntimeError)  # the model's own error kept
    assert "expected input[1, 1, 8, 8] to have 3 channels" in str(info.value.__cause__)


def test_a_wrong_spatial_size_names_the_linear_layer_and_its_width():
    model = _cnn(c=3, h=8)
    x = torch.rand(2, 3, 10, 10)
    want = r"inputs of shape \(2, 3, 10, 10\).*layer '3' \(Linear\) received \(1, 400\) but takes \(\.\.\., 256\)"
    with pytest.raises(RuntimeError, match=want):
        build_attributor("saliency")(model, x, torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"inputs of shape \(2, 3, 10, 10\)"):
        rrr_penalty(model, x, torch.ones(10, 10))


def test_errors_of_the_library_itself_are_not_rewrapped():
    model = _cnn()
    x, _ = _images(b=2)
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 4\]") as info:
        build_attributor("saliency")(model, x, torch.tensor([0, 9]))
    assert "The model failed" not in str(info.value)


def test_rrr_refuses_non_finite_inputs_naming_the_samples():
    model = _cnn()
    x, _ = _images(b=3)
    x[1, 0, 0, 0] = float("nan")
    x[2, 1, 2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf in samples \[1, 2\] of 3"):
        rrr_penalty(model, x, torch.ones(8, 8))
    with pytest.raises(ValueError, match=r"NaN or Inf in samples \[1, 2\]"):
        eg_mask_prior(model, x, None, torch.ones(8, 8))


def test_rrr_on_an_empty_batch_is_a_zero_with_a_zero_gradient():
    model = _cnn()
    for p in model.parameters():
        p.requires_grad_(True)
    x = torch.rand(0, 3, 8, 8)
    r = rrr_penalty(model, x, torch.ones(8, 8))
    assert r.shape == () and float(r.detach()) == 0.0 and not torch.signbit(r) and r.requires_grad
    grads = torch.autograd.grad(r, list(model.parameters()))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    for fn in (
        lambda: attribution_penalty(model, x, torch.zeros(0, dtype=torch.long), torch.ones(8, 8), "saliency"),
        lambda: eg_mask_prior(model, x, torch.zeros(0, dtype=torch.long), torch.ones(8, 8)),
    ):
        assert float(fn()) == 0.0


# --------------------------------------------------------------------------- 10: strict, dropped samples
class NaNMaps:
    name = "nanmaps"

    def __call__(self, model, x, target, create_graph=False):
        out = torch.ones_like(x)
        out[0] = float("nan")
        return out


def test_strict_raises_on_nan_maps_and_otherwise_warns(tmp_path):
    from explain_callbacks import AttributionMonitor

    _, val = image_loaders()
    with pytest.raises(FloatingPointError, match=r"method 'nanmaps' produced NaN/Inf attributions.*strict=True"):
        trainer(tmp_path, callbacks=[AttributionMonitor(
            budget=None, methods=[NaNMaps()], num_samples=4, strict=True)]).validate(
            lit(), val
        )
    mon = AttributionMonitor(budget=None, methods=[NaNMaps(), "saliency"], num_samples=4)
    with pytest.warns(UserWarning, match="method 'nanmaps' produced NaN/Inf attributions"):
        trainer(tmp_path, callbacks=[mon]).validate(lit(), val)
    assert "saliency" in mon.last_scores and "nanmaps" not in mon.last_scores


def test_a_metric_warns_once_how_many_samples_it_dropped():
    model = _cnn()
    x, y = _images(b=4)
    a = torch.rand(x.shape)
    masks = torch.zeros(4, 8, 8)
    masks[1:, 2:5, 2:5] = 1  # sample 0 has an empty mask: its pointing game is undefined (NaN)
    metric = METRICS.build("pointing_game")
    with pytest.warns(UserWarning, match=r"1 of 4 samples gave a NaN/Inf score"):
        metric.update(model, x, a, y, masks=masks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per metric object
        metric.update(model, x, a, y, masks=masks)
    value = metric.compute()
    assert torch.isfinite(value) and metric.last_counts == (6, 2)


def test_the_monitor_names_metric_method_and_dropped_samples(tmp_path):
    from explain_callbacks import AttributionMonitor

    _, val = image_loaders()

    class HalfNaN(ExplanationMetric):  # NaN on the first half of the probe set (or all of it), 1 elsewhere
        short_name = "halfnan"
        higher_is_better = True

        def __init__(self, all_nan: bool = False, **kwargs) -> None:
            super().__init__(**kwargs)
            self.all_nan = all_nan

        def _scores(self, model, inputs, attributions, target, masks):
            s = torch.ones(inputs.shape[0], dtype=torch.float64)
            s[: inputs.shape[0] if self.all_nan else inputs.shape[0] // 2] = float("nan")
            return s

    mon = AttributionMonitor(budget=None, methods=["saliency"], metrics=[HalfNaN()], num_samples=4)
    with pytest.warns(UserWarning, match=r"metric 'halfnan' on 'saliency': 2 of 4 samples .* NaN/Inf score"):
        trainer(tmp_path, callbacks=[mon]).validate(lit(), val)
    assert mon.last_scores["saliency"]["halfnan"] == 1.0
    mon = AttributionMonitor(budget=None, methods=["saliency"], metrics=[HalfNaN(all_nan=True)], num_samples=4)
    with pytest.warns(UserWarning, match=r"metric 'halfnan' on 'saliency': all 4 samples .* nothing is logged"):
        trainer(tmp_path, callbacks=[mon]).validate(lit(), val)
    assert "halfnan" not in mon.last_scores["saliency"]
