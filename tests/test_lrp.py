"""LRP engine: closed forms (conservation, LRP-0 = gradient × input), no side effects, refusals, and
the registry name through the AttributionMonitor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explain_callbacks.attribution import LRP, InputXGradient, build_attributor
from explain_callbacks.attribution.lrp import (
    Composite,
    LRPUnsupportedError,
    Sum,
    ZPlus,
    epsilon_plus_flat,
    lrp_hooks,
)

from .helpers_lightning import image_loaders, lit, trainer


def relu_cnn(bias: bool) -> nn.Module:
    torch.manual_seed(4)
    m = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1, bias=bias),
        nn.ReLU(inplace=True), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 2 * 2, 16, bias=bias), nn.ReLU(),
        nn.Linear(16, 4, bias=bias),
    ).double()  # fmt: skip
    return m.eval()


class ResidualNet(nn.Module):
    """A residual block whose addition is written with Sum, or as ``a + b``, ``torch.add``, ``+=``, ``add_``,
    or a product ``a * b`` of two input-dependent tensors (no gate: refused)."""

    def __init__(self, form: str = "sum") -> None:
        super().__init__()
        torch.manual_seed(5)
        self.form = form
        self.inp = nn.Linear(6, 8, bias=False)
        self.block = nn.Sequential(nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU())
        self.add = Sum()
        self.out = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        h = self.inp(x)
        r = self.block(h)
        if self.form == "sum":
            h = self.add(h, r)
        elif self.form == "plus":
            h = h + r
        elif self.form == "torch.add":
            h = torch.add(r, h)
        elif self.form == "iadd":  # in place on the output of a layer with a rule (torchvision's `out += identity`)
            h += r
        elif self.form == "add_":  # in place, result not rebound: aliases must see the sum
            h.add_(r)
        elif self.form == "product":
            h = h * r
        return self.out(torch.relu(h))


def _x(*shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) - 0.3


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_alpha2_beta1", "epsilon"])
def test_conservation_bias_free_relu_cnn(composite):
    """Σ R = f_c (the explained logit) on bias-free ReLU nets: z⁺, α2β1 and ε conserve; max pooling
    (winner takes all), average pooling (norm rule), flatten and ReLU pass relevance unchanged."""
    model, x = relu_cnn(bias=False), _x(5, 2, 8, 8)
    target = torch.tensor([0, 1, 2, 3, 1])
    lrp = LRP(composite, epsilon=1e-10, stabilizer=1e-10)  # the ε terms absorb what they absorb: made tiny
    rel = lrp(model, x, target)
    logit = model(x).gather(1, target[:, None])[:, 0].detach()
    torch.testing.assert_close(rel.flatten(1).sum(1), logit, rtol=1e-6, atol=1e-10)
    assert float(lrp.last_info["completeness_error"].max()) < 1e-6
    # with biases the relevance they absorb is missing: the check can fail
    model_b = relu_cnn(bias=True)
    with torch.no_grad():
        for m in model_b.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.fill_(0.3)
    lrp(model_b, x, target)
    assert float(lrp.last_info["completeness_error"].max()) > 1e-3


@pytest.mark.parametrize("form", ["sum", "plus", "torch.add", "iadd", "add_"])
def test_conservation_through_residual(form):
    """Σ R = f_c through a residual addition however it is written: each form gets the sum rule (its
    gradient would copy the relevance to both branches and break conservation)."""
    model, x = ResidualNet(form).double().eval(), _x(4, 6)
    target = torch.tensor([0, 1, 2, 0])
    lrp = LRP("epsilon", epsilon=1e-9, stabilizer=1e-9)
    rel = lrp(model, x, target)
    logit = model(x).gather(1, target[:, None])[:, 0].detach()
    torch.testing.assert_close(rel.sum(1), logit, rtol=1e-6, atol=1e-9)
    assert float(lrp.last_info["completeness_error"].max()) < 1e-6


@pytest.mark.parametrize("form", ["plus", "torch.add", "iadd", "add_"])
@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon"])
def test_residual_written_with_plus_equals_sum_module(form, composite):
    """``a + b`` (and torch.add, +=, add_) is explained exactly as the model rewritten with lrp.Sum,
    with the default stabilisers (not only where they vanish)."""
    x, t = _x(5, 6), torch.tensor([0, 1, 2, 0, 1])
    ref = LRP(composite)(ResidualNet("sum").double().eval(), x, t)
    torch.testing.assert_close(LRP(composite)(ResidualNet(form).double().eval(), x, t), ref, rtol=1e-12, atol=0)
    # the sum rule is the composite's rule for Sum: a user's mapping of "sum" applies to `+` too
    half = LRP(composite, layer_map={"sum": {"name": "norm", "stabilizer": 1.0}})
    torch.testing.assert_close(half(ResidualNet(form).double().eval(), x, t),
                               half(ResidualNet("sum").double().eval(), x, t), rtol=1e-12, atol=0)  # fmt: skip
    assert not torch.allclose(half(ResidualNet(form).double().eval(), x, t), ref)


def test_residual_sum_closed_form():
    """f(x) = u·x + v·x (two bias-free branches, summed with ``+``): the sum rule hands each branch its own
    contribution (u·x and v·x), the ε rule of each branch spreads it as x ⊙ u and x ⊙ v: R = x ⊙ (u + v).
    The branches' gradient would hand each the whole f (relevance doubled, R = f·(x⊙u/(u·x) + x⊙v/(v·x)))."""

    class TwoBranch(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(8)
            self.u, self.v = nn.Linear(5, 1, bias=False), nn.Linear(5, 1, bias=False)

        def forward(self, x):
            return self.u(x) + self.v(x)

    model, x = TwoBranch().double().eval(), _x(4, 5) + 0.5
    rel = LRP("epsilon", epsilon=1e-12, stabilizer=1e-12)(model, x, torch.zeros(4, dtype=torch.long))
    u, v = model.u.weight.detach()[0], model.v.weight.detach()[0]
    torch.testing.assert_close(rel, x * (u + v), rtol=1e-9, atol=1e-12)
    f = (x @ (u + v))[:, None]
    doubled = f * (x * u / (x @ u)[:, None] + x * v / (x @ v)[:, None])
    assert not torch.allclose(rel, doubled, rtol=1e-3)


def test_inplace_on_a_rule_output():
    """A layer output modified in place (``out += bias``, ``out.mul_(...)``-style code) works under LRP as
    without it (a rule's output used to be a view of a custom Function, which autograd refuses to modify)."""

    class Offset(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(9)
            self.fc, self.head = nn.Linear(6, 8), nn.Linear(8, 2)
            self.register_buffer("offset", torch.full((8,), 0.25))

        def forward(self, x):
            h = self.fc(x)
            if self.training is False and getattr(self, "inplace", True):
                h += self.offset
            else:
                h = h + self.offset
            return self.head(torch.relu(h))

    model, x, t = Offset().double().eval(), _x(3, 6), torch.tensor([0, 1, 0])
    got = LRP("epsilon")(model, x, t)
    model.inplace = False
    torch.testing.assert_close(got, LRP("epsilon")(model, x, t), rtol=1e-12, atol=1e-15)


def test_lrp0_equals_gradient_times_input():
    """ε→0 on a zero-bias ReLU net: LRP-0 = gradient × input (Montavon et al. 2019, §10.2.1)."""
    model, x = relu_cnn(bias=False), _x(3, 2, 8, 8)
    target = torch.tensor([3, 0, 2])
    got = LRP("epsilon", epsilon=0.0, stabilizer=0.0)(model, x, target)
    ref = InputXGradient(batch_size=None)(model, x, target)  # the initial relevance f_c makes LRP-0 = x ⊙ ∇f_c
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: (p.requires_grad, p.grad) for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
        {n: getattr(m, "inplace", None) for n, m in model.named_modules()},
    )


def _assert_untouched(model, snap):
    sd, params, modes, inplace = snap
    now = model.state_dict()
    assert sd.keys() == now.keys()
    for k in sd:
        assert torch.equal(sd[k], now[k]), k
    for n, p in model.named_parameters():
        assert p.requires_grad == params[n][0] and p.grad is params[n][1], n
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: getattr(m, "inplace", None) for n, m in model.named_modules()} == inplace
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks, type(m).__name__


def _bn_model():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Dropout(0.2),
                      nn.Flatten(), nn.Linear(4 * 8 * 8, 3))  # fmt: skip
    m.train()
    m[0].weight.requires_grad_(False)  # a mix of flags must come back as it was
    m[5].weight.grad = torch.ones_like(m[5].weight)
    return m


def test_no_side_effects():
    model = _bn_model()
    snap = _snapshot(model)
    x = _x(4, 2, 8, 8).float()
    LRP()(model, x, torch.tensor([0, 1, 2, 0]))
    _assert_untouched(model, snap)


def test_no_side_effects_after_error():
    """A refusal raised in the middle of the LRP forward still removes every hook and restores flags."""
    model = ResidualNet("product")
    model.train()
    snap = _snapshot(model)
    with pytest.raises(LRPUnsupportedError, match=r"'mul'.*neither factor is a gate.*ig, input_x_gradient"):
        LRP()(model, _x(2, 6).float(), torch.tensor([0, 1]))
    _assert_untouched(model, snap)

    class Boom(nn.Module):  # fails on the LRP pass (the only call with a graph), after the hooks are in place
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            if x.requires_grad:
                raise RuntimeError("boom")
            return self.fc(x)

    boom = Boom()
    snap = _snapshot(boom)
    with pytest.raises(RuntimeError, match="boom"):
        LRP(batch_size=None)(boom, _x(2, 6).float(), torch.tensor([0, 1]))
    _assert_untouched(boom, snap)


def test_forward_values_unchanged_under_hooks():
    """The hooks change only the backward pass: outputs are bit-identical (BatchNorm merged too)."""
    model = _bn_model().eval()
    x = _x(4, 2, 8, 8).float()
    with torch.no_grad():
        ref = model(x)
    with lrp_hooks(model, epsilon_plus_flat(), x[:1]) as guard, guard:
        out = model(x.requires_grad_(True))
    assert torch.equal(out.detach(), ref)


def test_refuses_fused_recurrent_layer_by_name():
    """A fused GRU hides its gates from the rules: refused by the module's name, the error naming the alternatives
    (nn.TransformerEncoderLayer and nn.LSTM are explained: tests/test_lrp_transformer.py)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.GRU(8, 8, batch_first=True))
    with pytest.raises(LRPUnsupportedError, match=r"'1'.*Arras.*input_x_gradient"):
        LRP()(model, torch.rand(2, 1, 4), torch.tensor([0, 1]))


def test_functional_activation_is_pass_through():
    """torch.tanh(x) in a forward gets the pass rule like nn.Tanh (not tanh' times the relevance)."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    f = Functional().double()
    mod = nn.Sequential(f.a, nn.Tanh(), f.b)
    x, t = _x(3, 5), torch.tensor([0, 1, 0])
    got, ref = LRP("epsilon")(f, x, t), LRP("epsilon")(mod, x, t)
    torch.testing.assert_close(got, ref)
    grad_chain = LRP("epsilon", layer_map={"Tanh": "norm"})  # anything but pass differs: the check can fail
    assert not torch.allclose(grad_chain(mod, x, t), ref)


def test_user_maps_by_type_and_name():
    model, x, t = relu_cnn(bias=True), _x(2, 2, 8, 8), torch.tensor([0, 1])
    by_name = LRP(name_map={"0": "zplus", "3": {"name": "gamma", "gamma": 0.5}})(model, x, t)
    custom = Composite(
        layer_map=[(nn.ReLU, "pass"), (nn.AvgPool2d, "norm"), (nn.Linear, "epsilon")],
        name_map={"0": ZPlus(), "3": {"name": "gamma", "gamma": 0.5}},
    )
    torch.testing.assert_close(by_name, LRP(custom)(model, x, t))
    by_type = LRP(layer_map={"Conv2d": "gamma"})(model, x, t)
    assert not torch.allclose(by_type, by_name)
    with pytest.raises(KeyError, match="Unknown LRP rule 'gama'"):
        LRP(layer_map={"conv": "gama"})
    with pytest.raises(ValueError, match=r"low=\.\.\. and high="):
        LRP("epsilon_gamma_box")


def test_contract_chunks_contexts_output_key():
    model, x = relu_cnn(bias=True), _x(5, 2, 8, 8)
    t = torch.tensor([0, 1, 2, 3, 0])
    ref = LRP(batch_size=None)(model, x, t)
    torch.testing.assert_close(LRP(batch_size=2)(model, x, t), ref)
    with torch.inference_mode():
        torch.testing.assert_close(LRP()(model, x, t), ref)

    class Tuple(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x), x.mean()

    torch.testing.assert_close(LRP()(Tuple(), x, t, output_key=0), ref)
    with pytest.raises(ValueError, match="no target"):
        LRP()(model, x)
    with pytest.raises(ValueError, match="not differentiable"):
        LRP()(model, x, t, create_graph=True)
    assert isinstance(build_attributor("lrp"), LRP)
    assert build_attributor({"name": "lrp", "composite": "epsilon_alpha2_beta1"}).composite == "epsilon_alpha2_beta1"


def test_attribution_monitor_by_name(tmp_path):
    """'lrp' through the AttributionMonitor: logged, and the trained weights bit-identical to a run
    without the monitor."""
    from explain_callbacks.callbacks import AttributionMonitor

    train, val = image_loaders()
    m0 = lit()
    trainer(tmp_path / "a", max_epochs=1, logger=False).fit(m0, train, val)
    train, val = image_loaders()
    m1 = lit()
    mon = AttributionMonitor(budget=None, methods=["lrp"], num_samples=6, strict=True)
    trainer(tmp_path / "b", callbacks=[mon], max_epochs=1).fit(m1, train, val)
    assert "lrp" in mon.last_scores and "completeness_error" in mon.last_scores["lrp"]
    w0, w1 = m0.state_dict(), m1.state_dict()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


def test_linear_then_batchnorm_on_sequences_not_merged():
    """A Linear on (B, T, F) followed by BatchNorm1d(T) normalises over another axis than the Linear's
    features: merging would change the function; it is left to the pass rule (here T == F, so the channel
    counts alone would not tell)."""
    from explain_callbacks.attribution.lrp.canonizers import probe_plan

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(16, 2)).double().eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    x = _x(3, 4, 4)
    assert probe_plan(model, x[:1]).merges == {}
    t = torch.tensor([0, 1, 0])
    torch.testing.assert_close(LRP()(model, x, t), LRP(canonize=False)(model, x, t))


class Gated(nn.Module):
    """out = head(gate ⊙ signal) with the gate written in several ways (Arras et al. 2017's LSTM gates)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(10)
        self.form = form
        self.sig, self.gate = nn.Linear(5, 4, bias=False), nn.Linear(5, 8, bias=False)
        self.head = nn.Linear(4, 3, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        s = self.sig(x)
        if self.form == "gate*signal":
            z = torch.sigmoid(self.gate(x))[:, :4] * s
        elif self.form == "signal*gate":
            z = s * self.gate(x).sigmoid()[:, 4:]
        elif self.form == "module":
            z = self.sigmoid(self.gate(x))[:, :4] * s
        elif self.form == "chunk":
            g1, _g2 = torch.sigmoid(self.gate(x)).chunk(2, dim=1)
            z = s.mul(g1)
        elif self.form == "glu":  # F.glu(cat[a, b]) = a ⊙ σ(b): the gate is the second half
            g = self.gate(x)[:, :4]
            z = nn.GLU(dim=1)(torch.cat([s, g], 1))
        elif self.form == "imul":
            z = s.clone()
            z *= torch.sigmoid(self.gate(x))[:, :4]
        elif self.form == "two signals":
            z = s * self.gate(x)[:, :4]
        elif self.form == "two gates":
            g = torch.sigmoid(self.gate(x))
            z = g[:, :4] * g[:, 4:]
        elif self.form == "quotient":
            z = s / (1 + self.gate(x)[:, :4].abs())
        return self.head(z)


@pytest.mark.parametrize("form", ["gate*signal", "signal*gate", "module", "chunk", "imul", "glu"])
def test_gate_signal_take_all_closed_form(form):
    """z = g ⊙ s: all relevance of z goes to the signal s (Arras et al. 2017), none to the gate. With ε rules
    on bias-free layers: R_z = z ⊙ w_c (the head), R_x = x ⊙ W_sᵀ(R_z / s) and Σ R = f_c."""
    model, x = Gated(form).double().eval(), _x(4, 5) + 0.2
    t = torch.tensor([0, 1, 2, 0])
    lrp = LRP("epsilon", epsilon=1e-12, stabilizer=1e-12)
    rel = lrp(model, x, t)
    with torch.no_grad():
        s = model.sig(x)
        g = torch.sigmoid(model.gate(x))
        g = g[:, 4:] if form == "signal*gate" else g[:, :4]
        r_z = (g * s) * model.head.weight[t]
        ref = x * ((r_z / s) @ model.sig.weight)
    torch.testing.assert_close(rel, ref, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(rel.sum(1), model(x).gather(1, t[:, None])[:, 0].detach(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    ("form", "match"),
    [
        ("two signals", "neither factor is a gate"),
        ("two gates", "both factors are gates"),
        ("quotient", "'div'.*quotient"),
    ],
)
def test_unresolved_products_refused(form, match):
    with pytest.raises(LRPUnsupportedError, match=match + r".*input_x_gradient"):
        LRP()(Gated(form).eval(), _x(2, 5).float(), torch.tensor([0, 1]))


def test_stabilize_sign_of_zero():
    """s_ε(z) = z + ε·sign(z) with sign(0) = +1, for −0.0 too (as Zennit's stabiliser), bit for bit."""
    from explain_callbacks.attribution.lrp import stabilize

    z = torch.tensor([-2.5, -1e-30, -0.0, 0.0, 1e-30, 3.0], dtype=torch.float64)
    ref = torch.tensor([-2.5 - 1e-6, -1e-30 - 1e-6, 1e-6, 1e-6, 1e-30 + 1e-6, 3.0 + 1e-6], dtype=torch.float64)
    assert torch.equal(stabilize(z, 1e-6), ref)
    assert torch.equal(stabilize(z.float(), 0.5), ref.float().sign().where(z != 0, 1.0) * (z.float().abs() + 0.5))


def test_squeeze_excitation_gate_conserves():
    """A squeeze-and-excitation block (Hu et al. 2018): x ⊙ σ(conv(pool(x))), the gate (B, C, 1, 1) broadcast
    over the positions, from an nn.Sigmoid module: the gate takes no relevance, Σ R = f_c on a bias-free net
    (the product's gradient would hand relevance to both factors and break it)."""

    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(12)
            self.conv = nn.Conv2d(2, 6, 3, padding=1, bias=False)
            self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(6, 6, 1, bias=False), nn.Sigmoid())
            self.head = nn.Sequential(nn.ReLU(), nn.AvgPool2d(4), nn.Flatten(), nn.Linear(6 * 2 * 2, 3, bias=False))

        def forward(self, x):
            h = self.conv(x)
            return self.head(h * self.squeeze(h))

    model, x, t = SE().double().eval(), _x(3, 2, 8, 8), torch.tensor([0, 1, 2])
    for composite in ("epsilon", "epsilon_plus_flat"):
        lrp = LRP(composite, epsilon=1e-12, stabilizer=1e-12)
        rel = lrp(model, x, t)
        torch.testing.assert_close(rel.flatten(1).sum(1), model(x).gather(1, t[:, None])[:, 0].detach(), rtol=1e-7,
                                   atol=1e-12)  # fmt: skip


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(3, 5, 3, padding=1),
        nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2, bias=False),
        nn.Conv1d(3, 4, 5, stride=3),
        nn.Conv3d(3, 2, 2, padding=1),
        nn.Conv2d(4, 6, 3, groups=2),  # the general terms
        nn.Conv2d(3, 4, 3, padding="same"),  # the general terms
        nn.Linear(6, 5),
    ],
    ids=["conv2d", "conv2d-strided-dilated", "conv1d", "conv3d", "grouped", "padding-same", "linear"],
)
def test_flat_fast_path_equals_terms(layer):
    """The flat rule's one-channel computation equals its general term form (ones through the layer)."""
    from explain_callbacks.attribution.lrp import Flat
    from explain_callbacks.attribution.lrp.rules import _TermRule

    class TermFlat(Flat):
        apply = _TermRule.apply

    torch.manual_seed(13)
    shape = {nn.Conv1d: (3, 3, 17), nn.Conv3d: (3, 3, 5, 6, 4), nn.Linear: (3, 6)}.get(type(layer), (3, 3, 9, 10))
    if getattr(layer, "groups", 1) == 2:
        shape = (3, 4, 9, 10)
    model = nn.Sequential(layer, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).double()
    x = _x(*shape)
    model(x)
    t = torch.tensor([0, 2, 1])
    got = LRP("epsilon", name_map={"0": Flat()})(model, x, t)
    ref = LRP("epsilon", name_map={"0": TermFlat()})(model, x, t)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    assert got.abs().sum() > 0


class TinyAttention(nn.Module):
    """One head of F.scaled_dot_product_attention over (B, T, 4) tokens, bias-free, then a linear head on the
    mean token. ``fixed_qk``: queries and keys are parameters (attention weights independent of the input)."""

    def __init__(self, fixed_qk: bool = False, mask: str = "none") -> None:
        super().__init__()
        torch.manual_seed(14)
        self.fixed_qk, self.mask = fixed_qk, mask
        self.q, self.k, self.v = (nn.Linear(4, 4, bias=False) for _ in range(3))
        self.qk = nn.Parameter(torch.randn(2, 5, 4))
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        q, k = (self.qk[0], self.qk[1]) if self.fixed_qk else (self.q(x), self.k(x))
        q, k = q.expand(x.shape[0], -1, -1), k.expand(x.shape[0], -1, -1)
        m = None
        if self.mask == "bool":
            m = torch.ones(5, 5, dtype=torch.bool).tril()
        elif self.mask == "float":
            m = torch.linspace(-1, 1, 25, dtype=x.dtype).view(5, 5)
        o = F.scaled_dot_product_attention(q, k, self.v(x), attn_mask=m, is_causal=self.mask == "causal")
        return self.head(o.mean(1))


def test_attention_with_fixed_weights_is_linear_and_conserves():
    """With input-independent attention weights A, O = A V is linear in V: the rule gives V all of O's
    relevance (the ε rule), Σ R = f_c exactly on the bias-free net."""
    model, x, t = TinyAttention(fixed_qk=True).double().eval(), _x(3, 5, 4) + 0.2, torch.tensor([0, 1, 2])
    lrp = LRP("epsilon", epsilon=1e-12, stabilizer=1e-12)
    rel = lrp(model, x, t)
    torch.testing.assert_close(rel.flatten(1).sum(1), model(x).gather(1, t[:, None])[:, 0].detach(), rtol=1e-8,
                               atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float"])
def test_attnlrp_relevance_total_closed_form(mask):
    """AttnLRP (Achtibat et al. 2024) on one attention layer: the uniform rule splits each bilinear product in
    halves that each conserve, the softmax rule gives S ⊙ (R_A − A ΣR_A), an additive mask absorbs its share.
    Σ R over the input then has the closed form ½ΣR_O + Σ_ij raw_ij/S_ij (S_ij R_A,ij − S_ij A_ij ΣR_A,i)
    with R_A,ij = ½ A_ij Σ_p V_jp R_O,ip / O_ip, from the forward quantities alone."""
    model, x, t = TinyAttention(mask=mask).double().eval(), _x(2, 5, 4) + 0.2, torch.tensor([0, 2])
    rel = LRP("epsilon", epsilon=1e-12, stabilizer=1e-12)(model, x, t)
    with torch.no_grad():
        q, k, v = model.q(x), model.k(x), model.v(x)
        raw = q @ k.transpose(-2, -1) / 2.0  # scale 1/sqrt(4)
        s = raw.clone()
        if mask in ("causal", "bool"):
            s = s.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
        elif mask == "float":
            s = s + torch.linspace(-1, 1, 25, dtype=x.dtype).view(5, 5)
        a = torch.softmax(s, -1)
        o = a @ v
        # the head's ε rule gives the mean token m R_m = m ⊙ w_c; the mean's gradient hands each token R_m / 5
        r_o = (o.mean(1, keepdim=True) * model.head.weight[t][:, None, :] / 5).expand_as(o)
        r_a = 0.5 * a * ((r_o / o) @ v.transpose(-2, -1))
        fin = torch.isfinite(s)
        s0 = torch.where(fin, s, torch.zeros_like(s))
        r_s = torch.where(fin, s0 * (r_a - a * r_a.sum(-1, keepdim=True)), torch.zeros_like(s))
        r_raw = r_s * torch.where(fin, raw / torch.where(fin, s0, torch.ones_like(s0)), torch.zeros_like(s))
        total = 0.5 * r_o.sum((1, 2)) + r_raw.sum((1, 2))
    torch.testing.assert_close(rel.flatten(1).sum(1), total, rtol=1e-7, atol=1e-10)
    # not conservative (the softmax's constant term is absorbed): the closed form is not the logit
    assert not torch.allclose(total, model(x).gather(1, t[:, None])[:, 0].detach(), rtol=1e-3)


class TinyTransformer(nn.Module):
    """Embedding, one pre-activation-free transformer block written as most code writes it (a module named
    ``SelfAttention`` with q/k/v/out projections and F.scaled_dot_product_attention, residuals with ``+``, a
    ReLU MLP), mean over tokens, a linear head; bias-free so that only the softmax absorbs relevance."""

    class SelfAttention(nn.Module):
        def __init__(self, d: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.qkv, self.out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)

        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            o = F.scaled_dot_product_attention(q, k, v)
            return self.out(o.transpose(1, 2).reshape(b, n, d))

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(15)
        self.embed = nn.Linear(4, 8, bias=False)
        self.attn = self.SelfAttention(8, 2)
        self.mlp = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 8, bias=False))
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h)
        h = h + self.mlp(h)
        return self.head(h.mean(1))


def test_attnlrp_tiny_transformer():
    """A tiny transformer is explained (it was refused by the name of its attention module): finite maps, not
    the gradient × input ones. Not conservative: the softmax rule absorbs the constant term of its expansion
    (test_attnlrp_relevance_total_closed_form gives the total of one layer exactly); with attention weights
    independent of the input the rules conserve (test_attention_with_fixed_weights_is_linear_and_conserves)."""
    model, x = TinyTransformer().double().eval(), _x(4, 6, 4) + 0.1
    t = torch.tensor([0, 1, 2, 0])
    rel = LRP("epsilon", epsilon=1e-12, stabilizer=1e-12)(model, x, t)
    assert torch.isfinite(rel).all() and rel.abs().sum() > 0
    ixg = InputXGradient(batch_size=None)(model, x, t)
    assert not torch.allclose(rel, ixg, rtol=1e-2)

    class Dropped(TinyTransformer.SelfAttention):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x, dropout_p=0.1)

    with pytest.raises(LRPUnsupportedError, match=r"without dropout.*input_x_gradient"):
        LRP()(nn.Sequential(Dropped(4, 1), nn.Flatten(), nn.Linear(24, 2)).eval(), x.float(), t % 2)
