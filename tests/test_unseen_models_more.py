"""The functional APIs on more model families an outside user would bring, called directly: a tiny vision
transformer (Conv2d patch embedding, cls token, ``nn.TransformerEncoderLayer`` with batch_first, whose
attention runs the fused SDPA kernel), 1-D CNNs on (B, C, L) signals, a binary classifier with one
logit (B, 1), and networks with operations contextual decomposition has no rule for. Each case failed
(or was silently wrong) before its fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain_callbacks.attribution import HSIC, GradCAM, IntegratedGradients, Saliency
from explain_callbacks.interaction import CDUnsupportedError, IntegratedHessians, build_interaction, cd_logits
from explain_callbacks.regularize import attribution_penalty, eg_mask_prior, rrr_penalty


class TinyViT(nn.Module):
    def __init__(self, c: int = 3, d: int = 16, p: int = 4, h: int = 8, k: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(c, d, p, stride=p)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, (h // p) ** 2 + 1, d) * 0.1)
        self.enc = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, activation="gelu", batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.enc(t)[:, 0]))


def _vit() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return TinyViT().eval(), torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])


def _param_grads(model: nn.Module, value: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return [g for g in grads if g is not None]


# ------------------------------------------------------------------ transformers: second derivatives


@pytest.mark.parametrize("method", [Saliency(), IntegratedGradients(n_steps=4), GradCAM(layer="patch")])
def test_vit_maps_with_create_graph_have_parameter_gradients(method):
    """The fused CPU attention kernel has no double backward; maps for penalties use the math kernel."""
    model, x, t = _vit()
    plain = method(model, x, t)
    m = method(model, x, t, create_graph=True)
    torch.testing.assert_close(m.detach(), plain, rtol=1e-4, atol=1e-6)  # same values as the fused kernel
    grads = _param_grads(model, m.pow(2).sum())
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters())


def test_vit_penalties_are_differentiable():
    model, x, t = _vit()
    mask = torch.zeros_like(x)
    mask[..., :4] = 1.0
    for pen in (
        rrr_penalty(model, x, mask),
        eg_mask_prior(model, x, t, mask),
        attribution_penalty(model, x, t, mask, Saliency()),
    ):
        assert pen.ndim == 0 and torch.isfinite(pen)
        assert any(g.abs().sum() > 0 for g in _param_grads(model, pen))


def test_vit_integrated_hessians_complete():
    """Integrated Hessians (Janizek et al. 2021) through attention: rows sum to IG, IG to f(x) − f(x')."""
    model, x, t = _vit()
    ih = IntegratedHessians(n_steps=8, rule="gausslegendre")
    s = ih(model, x, t, groups=2)
    assert s.shape == (3, 4, 4) and torch.isfinite(s).all()
    torch.testing.assert_close(s, s.transpose(1, 2))
    ig_sum = ih.last_info["ig"].sum(1)
    delta = ih.last_info["delta"]
    assert (ig_sum - delta).abs().max() < 0.05 * delta.abs().max() + 1e-4


# ------------------------------------------------------------------ binary classifiers with one logit


def test_rrr_on_one_binary_logit_is_the_two_class_penalty():
    """A (B, 1) logit z: log_softmax over one column is 0, so RRR was 0 for every model. It is the
    penalty of the equivalent two-class model [0, z] (log σ(z), log σ(−z))."""
    torch.manual_seed(0)
    one = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))

    class Two(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = one(x)
            return torch.cat([torch.zeros_like(z), z], 1)

    x = torch.randn(5, 6)
    mask = torch.zeros_like(x)
    mask[:, :3] = 1.0
    p1 = rrr_penalty(one, x, mask)
    p2 = rrr_penalty(Two(), x, mask)
    assert p1 > 0
    torch.testing.assert_close(p1, p2)
    assert any(g.abs().sum() > 0 for g in _param_grads(one, p1))


# ------------------------------------------------------------------ 1-D signals


def _signal_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 6, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).eval()


def test_hsic_interactions_on_conv1d_signals():
    """(B, C, L) signals: one group per step (or g windows), HSIC's 1-D mask layout; was a ValueError
    about tabular inputs and images."""
    model = _signal_cnn()
    x, t = torch.randn(3, 2, 16), torch.tensor([0, 1, 2])
    inter = build_interaction("hsic", n_designs=128)
    s = inter(model, x, t)
    assert s.shape == (3, 16, 16) and torch.isfinite(s).all()
    h = HSIC(grid_size=16, n_designs=128, output="logit")(model, x, t)  # the same designs and cells
    torch.testing.assert_close(s.diagonal(dim1=1, dim2=2), h[:, 0].to(s.dtype), rtol=1e-5, atol=1e-7)
    assert inter(model, x, t, groups=4).shape == (3, 4, 4)


# ------------------------------------------------------------------ contextual decomposition errors


class AbsHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h.abs()  # no CD rule


def test_cd_unsupported_operation_names_the_users_line_not_torch_fx():
    """The location was torch.fx's own ``proxy.py ... create_node`` frame."""
    x = torch.randn(2, 10)
    with pytest.raises(CDUnsupportedError) as err:
        cd_logits(AbsHead(), x, torch.ones(10))
    msg = str(err.value)
    assert "test_unseen_models_more.py" in msg and "h.abs()" in msg
    assert "proxy.py" not in msg
    seq = nn.Sequential(nn.Linear(10, 12), nn.Softmax(dim=1), nn.Linear(12, 3))
    with pytest.raises(CDUnsupportedError) as err:
        cd_logits(seq, x, torch.ones(10))
    msg = str(err.value)
    assert "Softmax" in msg and "module '1'" in msg and "proxy.py" not in msg


@pytest.mark.parametrize(
    "act",
    [nn.SiLU(), nn.Softplus(), nn.ELU(), nn.LeakyReLU(0.2), nn.Hardswish(), nn.Sigmoid(), nn.Tanh(), nn.GELU()],
    ids=lambda a: type(a).__name__,
)
def test_cd_streams_sum_to_every_activation(act):
    """β + γ equals the true activation after each elementwise nonlinearity and at the logits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), act, nn.Linear(12, 12), act, nn.Linear(12, 3)).eval()
    x = torch.randn(4, 10, dtype=torch.float64)
    model = model.double()
    mask = (torch.rand(10) > 0.5).double()
    beta, gamma = cd_logits(model, x, mask)
    torch.testing.assert_close(beta + gamma, model(x))
    hidden = model[:2]
    b1, g1 = cd_logits(hidden, x, mask)
    torch.testing.assert_close(b1 + g1, hidden(x))


# ------------------------------------------------------------------ float64 teachers in the students


def test_students_that_run_the_teacher_accept_float64_networks():
    """attribution_linear and AWD cast the inputs to float32 before calling the teacher: a float64
    network failed with 'mat1 and mat2 must have the same dtype' / 'Input type (float) and bias type
    (double)'."""
    from explain_callbacks.distill import build_student

    torch.manual_seed(0)
    tab = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(64, 10, dtype=torch.float64)
    with torch.no_grad():
        out = tab(x)
    s = build_student({"name": "attribution_linear", "k": 3, "method": {"name": "ig", "n_steps": 4}})
    s.fit(x, out, teacher=tab)
    assert s.predict(x).shape == (64,) and s.importance_.shape == (10,)

    sig = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).double().eval()
    xs = torch.randn(24, 1, 16, dtype=torch.float64)
    with torch.no_grad():
        out = sig(xs)
    awd = build_student({"name": "awd", "epochs": 1})
    awd.fit(xs, out, teacher=sig)
    assert awd.predict(xs).shape == (24,)
    assert all(p.grad is None for p in sig.parameters())


# ------------------------------------------------------------------ decoders: transposed convolutions


class UpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1)
        self.up2 = nn.ConvTranspose2d(4, 4, 2, stride=1, dilation=2)
        self.resize = nn.Upsample(size=(8, 8), mode="bilinear")
        self.head = nn.Linear(4 * 64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.down(x))
        h = torch.relu(self.up(h, output_size=[8, 8]))
        h = torch.tanh(self.up2(h))
        return self.head(self.resize(h).flatten(1))


def test_cd_through_transposed_convolutions():
    """ConvTranspose (linear, with a bias) had no CD rule; the linear rule applies, output_size too."""
    from explain_callbacks.attribution import build_attributor

    torch.manual_seed(0)
    model = UpNet().double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    mask = (torch.rand(1, 8, 8) > 0.5).double()
    beta, gamma = cd_logits(model, x, mask)
    torch.testing.assert_close(beta + gamma, model(x))
    b_all, g_all = cd_logits(model, x, torch.ones(1, 8, 8))
    torch.testing.assert_close(b_all + g_all, model(x))
    assert (b_all - model(x)).abs().max() < (beta - model(x)).abs().max()  # the whole input explains more
    m = build_attributor("cd")(model, x, torch.tensor([0, 1, 2]))
    assert m.shape == (3, 1, 8, 8) and torch.isfinite(m).all()


# ------------------------------------------------------------------ input layouts and inputs that require grad


def _dwsep() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.Conv2d(4, 8, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()


def test_occlusion_on_channels_last_and_non_contiguous_inputs():
    """The accumulator was ``zeros_like(inputs)`` (channels_last strides) then ``.view``: a RuntimeError."""
    from explain_callbacks.attribution import build_attributor

    occ = build_attributor("occlusion")
    model, x, t = _dwsep(), torch.randn(2, 4, 8, 8), torch.tensor([0, 2])
    ref = occ(model, x, t)
    torch.testing.assert_close(occ(model, x.to(memory_format=torch.channels_last), t), ref)
    sig, s = _signal_cnn(), torch.randn(2, 16, 2).transpose(1, 2)  # (B, C, L) view of a (B, L, C) tensor
    torch.testing.assert_close(occ(sig, s, t), occ(sig, s.contiguous(), t))


@pytest.mark.parametrize("name", ["input_x_gradient", "ig", "expected_gradients", "gradcam"])
def test_maps_of_inputs_that_require_grad_carry_no_graph(name):
    """x ⊙ g with x requiring grad kept a graph to x (Grad-CAM: the whole forward pass) although
    create_graph=False; a backward through it would differentiate x alone, not g."""
    from explain_callbacks.attribution import build_attributor

    method = build_attributor(name)
    model, x, t = _dwsep(), torch.randn(2, 4, 8, 8), torch.tensor([0, 2])
    xr = x.clone().requires_grad_(True)
    m = method(model, xr, t)
    assert not m.requires_grad and m.grad_fn is None
    assert xr.grad is None
    torch.testing.assert_close(m, method(model, x, t))
    assert method(model, xr, t, create_graph=True).requires_grad  # penalties keep theirs


# ------------------------------------------------------------------ recurrent networks: no forward-mode AD


class LSTMHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 8, batch_first=True)
        self.mid = nn.Linear(8, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.mid(self.rnn(x)[0][:, -1])))


def test_neuron_region_ig_past_an_lstm():
    """nn.LSTM has no forward-mode derivative on CPU ('Trying to use forward AD with mkldnn_rnn_layer'):
    the layer JVP falls back to two reverse passes; neuron IGs still sum to IG (Lundstrom et al. 2022)."""
    from explain_callbacks.attribution import NeuronRegionIG

    torch.manual_seed(0)
    model = LSTMHead().eval()
    x, t = torch.randn(3, 12, 3), torch.tensor([0, 1, 2])
    nrig = NeuronRegionIG(layer="mid", n_steps=16)
    a = nrig(model, x, t)
    assert a.shape == (3, 6) and torch.isfinite(a).all()
    ig = IntegratedGradients(n_steps=16)(model, x, t)
    torch.testing.assert_close(a.sum(1), ig.flatten(1).sum(1), rtol=1e-4, atol=1e-6)
    pen = nrig(model, x, t, create_graph=True).pow(2).sum()
    assert any(g.abs().sum() > 0 for g in _param_grads(model, pen))
    # the fallback equals forward-mode AD where both exist
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.Softplus(), nn.Linear(4, 2)).double()
    z, v = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    fwd = NeuronRegionIG._layer_jvp(mlp, mlp[2], z, v)
    rev = NeuronRegionIG._layer_jvp_double_vjp(mlp, mlp[2], z, v, keep_graph=False)
    torch.testing.assert_close(rev, fwd)


def test_eg_tv_prior_on_signals_is_the_1d_total_variation_of_the_channel_sum():
    """(B, C, L) EG maps were read as (H, W) images: differences between neighbouring channels counted."""
    from explain_callbacks.regularize import eg_tv_prior, expected_gradients_k

    model = _signal_cnn()
    x, t = torch.randn(4, 2, 16), torch.tensor([0, 1, 2, 0])
    pen = eg_tv_prior(model, x, t, seed=3)
    a = expected_gradients_k(model, x, t, seed=3).sum(1)
    torch.testing.assert_close(pen, (a[:, 1:] - a[:, :-1]).abs().sum(1).mean())
    assert any(g.abs().sum() > 0 for g in _param_grads(model, pen))


def test_cd_on_a_transformer_names_attention_and_the_alternatives():
    """Traced: the encoder layer is named with no way out; untraceable (len(x)): a torch.fx error with a
    hint about data-dependent control flow. Both now say CD has no rule for attention and what to use."""
    model, x, _ = _vit()
    with pytest.raises(CDUnsupportedError, match="TransformerEncoderLayer") as err:
        cd_logits(model, x, torch.ones(1, 8, 8))
    assert "no rule for attention" in str(err.value) and "integrated_hessians" in str(err.value)

    class LenViT(TinyViT):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.patch(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(len(x), -1, -1), t], 1) + self.pos
            return self.head(self.norm(self.enc(t)[:, 0]))

    with pytest.raises(CDUnsupportedError, match="holds attention \\('enc'") as err:
        cd_logits(LenViT().eval(), x, torch.ones(1, 8, 8))
    assert "no rule for attention" in str(err.value) and "integrated_hessians" in str(err.value)
