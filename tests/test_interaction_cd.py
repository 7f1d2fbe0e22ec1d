"""Contextual decomposition: exactness oracles of methods.md §5 on real architectures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explain_callbacks.interaction import CDUnsupportedError, cd_batched, cd_logits, cd_scores


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.LeakyReLU(0.1), nn.Dropout(0.2), nn.Linear(16, 3)
    ).eval()


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = F.max_pool2d(torch.sigmoid(self.bn2(self.conv2(x))), 2)
        return self.fc(self.drop(x.view(x.size(0), -1)))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.short(x)
        return F.relu(out)


class _ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.b1 = _Block(4, 4, 1)
        self.b2 = _Block(4, 8, 2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.b2(self.b1(x))
        x = F.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1)
        return self.head(x)


class _LSTMClassifier(nn.Module):
    def __init__(self, layers: int = 2, bidirectional: bool = True) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(8 * (2 if bidirectional else 1), 3)

    def forward(self, x):
        out, (_h, _c) = self.lstm(x)
        return self.fc(out[:, -1])


def _warm_bn(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, *shape) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize(
    ("name", "make", "shape", "mask_fn"),
    [
        ("mlp", _mlp, (10,), lambda s: (torch.rand(s) > 0.5).double()),
        ("cnn_bn_maxpool", lambda: _warm_bn(_CNN(), (2, 12, 12)), (2, 12, 12), None),
        ("resnet_functional", lambda: _warm_bn(_ResNet(), (1, 10, 10)), (1, 10, 10), None),
        ("lstm", _LSTMClassifier, (7, 6), lambda s: torch.tensor([0, 0, 1, 1, 0, 0, 0.0]).view(7, 1)),
    ],
)
def test_beta_plus_gamma_equals_logits(name, make, shape, mask_fn):
    model = make()
    x = torch.randn(4, *shape)
    if mask_fn is None:
        mask = torch.zeros(1, *shape)
        mask[..., 2:6, 3:8] = 1
    else:
        mask = mask_fn(shape)
    beta, gamma = cd_logits(model, x, mask)
    logits = model(x)
    assert beta.shape == logits.shape
    torch.testing.assert_close(beta + gamma, logits, atol=1e-5, rtol=0)
    # float32 too (the default training precision)
    model32 = model.float()
    b32, g32 = cd_logits(model32, x.float(), mask.float())
    torch.testing.assert_close(b32 + g32, model32(x.float()), atol=1e-5, rtol=1e-5)
    # S = everything: gamma vanishes; S = nothing: beta vanishes
    b_all, g_all = cd_logits(model.double(), x, torch.ones(1, *shape))
    assert g_all.abs().max() < 1e-10
    torch.testing.assert_close(b_all, logits)
    b_none, _ = cd_logits(model, x, torch.zeros(1, *shape))
    if name != "cnn_bn_maxpool":  # sigmoid(0) = 0.5 lands in beta by the reference rule σ(β)
        assert b_none.abs().max() < 1e-10


def test_linear_closed_form():
    lin = nn.Linear(6, 3)
    x = torch.randn(5, 6)
    m = torch.tensor([1, 0, 1, 0, 0, 1.0])
    beta, gamma = cd_logits(lin, x, m)
    r = (m * x) @ lin.weight.T
    i = ((1 - m) * x) @ lin.weight.T
    p = (r.abs() + 1e-20) / (r.abs() + i.abs() + 2e-20)
    torch.testing.assert_close(beta, r + lin.bias * p)
    torch.testing.assert_close(gamma, i + lin.bias * (1 - p))


def test_bias_free_relu_mlp_gives_f_of_masked_input():
    net = nn.Sequential(
        nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.ReLU(), nn.Linear(16, 2, bias=False)
    )
    x = torch.randn(6, 8)
    m = (torch.rand(6, 8) > 0.4).double()
    beta, gamma = cd_logits(net, x, m)
    torch.testing.assert_close(beta, net(m * x))
    torch.testing.assert_close(beta + gamma, net(x))


def test_maxpool_gathers_at_argmax_of_sum_and_bn_rule():
    """Reference rules written out by hand for conv → BN → ReLU → max-pool → linear."""
    conv, bn, fc = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Linear(2 * 3 * 3, 2)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), fc).eval()
    x = torch.randn(3, 1, 8, 8)
    m = torch.zeros(1, 1, 8, 8)
    m[..., :4, :] = 1

    def lin_rule(rel, irr, layer, bias):
        r, i = layer(rel), layer(irr)
        p = (r.abs() + 1e-20) / (r.abs() + i.abs() + 2e-20)
        return r + bias * p, i + bias * (1 - p)

    rel, irr = lin_rule(m * x, (1 - m) * x, lambda t: F.conv2d(t, conv.weight), conv.bias.view(1, -1, 1, 1))
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)
    shift = bn.bias.view(1, -1, 1, 1) - bn.running_mean.view(1, -1, 1, 1) * scale
    r, i = (rel * scale + shift) - shift, (irr * scale + shift) - shift  # bn(β) − bn(0), as the reference
    share = r.abs() / (r.abs() + i.abs())
    new_rel = r + shift * share.nan_to_num(nan=0.0)  # no ε: 0/0 gives β nothing
    irr = bn(rel + irr) - new_rel
    rel = new_rel
    rel, irr = F.relu(rel), F.relu(rel + irr) - F.relu(rel)
    _, idx = F.max_pool2d(rel + irr, 2, return_indices=True)
    rel = rel.flatten(2).gather(2, idx.flatten(2)).view_as(idx)
    irr = irr.flatten(2).gather(2, idx.flatten(2)).view_as(idx)
    rel, irr = lin_rule(rel.flatten(1), irr.flatten(1), lambda t: F.linear(t, fc.weight), fc.bias)
    beta, gamma = cd_logits(model, x, m)
    torch.testing.assert_close(beta, rel)
    torch.testing.assert_close(gamma, irr)


def _murdoch_reference(lstm: nn.LSTM, x: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Port of the reference ``cd_text`` (Murdoch 2018) for one sequence, phrase [start, stop]."""

    def sig(z):
        return 1 / (1 + np.exp(-z))

    def three(a, b, c, act):
        return (
            0.5 * (act(a + c) - act(c) + act(a + b + c) - act(b + c)),
            0.5 * (act(b + c) - act(c) + act(a + b + c) - act(a + c)),
            act(c),
        )

    w_ih = lstm.weight_ih_l0.detach().numpy()
    w_hh = lstm.weight_hh_l0.detach().numpy()
    b = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().numpy()
    w_ii, w_if, w_ig, w_io = np.split(w_ih, 4, 0)
    w_hi, w_hf, w_hg, w_ho = np.split(w_hh, 4, 0)
    b_i, b_f, b_g, b_o = np.split(b, 4)
    t_len, hdim = x.shape[0], lstm.hidden_size
    rel, irr = np.zeros((t_len, hdim)), np.zeros((t_len, hdim))
    rel_h, irr_h = np.zeros((t_len, hdim)), np.zeros((t_len, hdim))
    for t in range(t_len):
        prh = rel_h[t - 1] if t > 0 else np.zeros(hdim)
        pih = irr_h[t - 1] if t > 0 else np.zeros(hdim)
        ri, rg, rf, ro = w_hi @ prh, w_hg @ prh, w_hf @ prh, w_ho @ prh
        ii, ig, if_, io = w_hi @ pih, w_hg @ pih, w_hf @ pih, w_ho @ pih
        inside = start <= t <= stop
        if inside:
            ri, rg, rf, ro = ri + w_ii @ x[t], rg + w_ig @ x[t], rf + w_if @ x[t], ro + w_io @ x[t]
        else:
            ii, ig, if_, io = ii + w_ii @ x[t], ig + w_ig @ x[t], if_ + w_if @ x[t], io + w_io @ x[t]
        rci, ici, bci = three(ri, ii, b_i, sig)
        rcg, icg, bcg = three(rg, ig, b_g, np.tanh)
        rel[t] = rci * (rcg + bcg) + bci * rcg
        irr[t] = ici * (rcg + icg + bcg) + (rci + bci) * icg
        if inside:
            rel[t] += bci * bcg
        else:
            irr[t] += bci * bcg
        if t > 0:
            rcf, icf, bcf = three(rf, if_, b_f, sig)
            rel[t] += (rcf + bcf) * rel[t - 1]
            irr[t] += (rcf + icf + bcf) * irr[t - 1] + icf * rel[t - 1]
        o = sig(w_io @ x[t] + w_ho @ (prh + pih) + b_o)
        a, bb = rel[t], irr[t]
        new_rel = 0.5 * (np.tanh(a) + (np.tanh(a + bb) - np.tanh(bb)))
        new_irr = 0.5 * (np.tanh(bb) + (np.tanh(a + bb) - np.tanh(a)))
        rel_h[t], irr_h[t] = o * new_rel, o * new_irr
    return rel_h, irr_h


def test_lstm_matches_murdoch_reference():
    lstm = nn.LSTM(5, 7)
    x = torch.randn(9, 1, 5)
    start, stop = 3, 5
    m = torch.zeros(9, 1, 1)
    m[start : stop + 1] = 1
    (out, (h_n, _c_n)) = _lstm_call(lstm, x, m)
    ref_rel, ref_irr = _murdoch_reference(lstm, x[:, 0].numpy(), start, stop)
    np.testing.assert_allclose(out.rel[:, 0].detach().numpy(), ref_rel, atol=1e-10)
    np.testing.assert_allclose(out.irr[:, 0].detach().numpy(), ref_irr, atol=1e-10)
    torch.testing.assert_close(h_n.rel[0], out.rel[-1])


def _lstm_call(lstm, x, m):
    from explain_callbacks.interaction.cd import Decomposition, _lstm

    return _lstm(lstm, Decomposition(m * x, (1 - m) * x), None)


def test_batched_groups_match_single_calls_and_scores():
    model = _warm_bn(_CNN(), (2, 12, 12))
    x = torch.randn(3, 2, 12, 12)
    masks = torch.zeros(4, 1, 12, 12)
    masks[0, :, :6, :6] = 1
    masks[1, :, 6:, :6] = 1
    masks[2, :, :6, 6:] = 1
    masks[3, :, 6:, 6:] = 1
    beta, gamma = cd_batched(model, x, masks, batch_size=5)
    assert beta.shape == (3, 4, 5)
    for g in range(4):
        b1, g1 = cd_logits(model, x, masks[g])
        torch.testing.assert_close(beta[:, g], b1)
        torch.testing.assert_close(gamma[:, g], g1)
    target = torch.tensor([0, 3, 4])
    sc = cd_scores(model, x, masks, target)
    torch.testing.assert_close(sc, beta[torch.arange(3), :, target])
    # per-sample masks (B, G, ...)
    per = masks.unsqueeze(0).expand(3, -1, -1, -1, -1)
    beta2, _ = cd_batched(model, x, per)
    torch.testing.assert_close(beta2, beta)


def test_differentiable_wrt_parameters():
    model = _mlp().train()
    model[4].p = 0.0
    x = torch.randn(4, 10)
    m = torch.zeros(10)
    m[:3] = 1
    beta, gamma = cd_logits(model, x, m)
    loss = torch.softmax(torch.stack([beta, gamma], -1), -1)[..., 0].mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_training_mode_batchnorm_and_dropout_stay_exact():
    model = _CNN().train()
    x = torch.randn(6, 2, 12, 12)
    m = torch.zeros(1, 1, 12, 12)
    m[..., :5, :] = 1
    model.drop.p = 0.0  # the model's own dropout draw differs from ours; compare without it
    rm = model.bn1.running_mean.clone()
    beta, gamma = cd_logits(model, x, m)
    assert torch.equal(model.bn1.running_mean, rm)  # CD does not update running statistics
    with torch.no_grad():
        ref = model(x)  # training-mode forward: batch statistics
    torch.testing.assert_close(beta + gamma, ref, atol=1e-8, rtol=0)
    # dropout in training mode: one mask for both streams, so the decomposition stays exact
    model.drop.p = 0.5
    beta, gamma = cd_logits(model, x, m)
    assert torch.isfinite(beta).all()


class _Softmaxed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.softmax(self.fc(x), -1)


class _WithGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(self.gru(x)[0][:, -1])


def test_unsupported_layers_raise_naming_the_op_and_module():
    with pytest.raises(CDUnsupportedError, match=r"softmax.*fx node.*without its final softmax"):
        cd_logits(_Softmaxed(), torch.randn(2, 4), torch.ones(4))
    with pytest.raises(CDUnsupportedError, match=r"module 'gru' of type GRU"):
        cd_logits(_WithGRU(), torch.randn(2, 3, 4), torch.ones(1, 3, 1))
    with pytest.raises(CDUnsupportedError, match=r"Embedding"):
        cd_logits(nn.Sequential(nn.Linear(3, 3), nn.Embedding(3, 2)), torch.randn(2, 3), torch.ones(3))


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_raises_clear_error():
    with pytest.raises(CDUnsupportedError, match="could not trace"):
        cd_logits(_Branchy(), torch.randn(2, 3), torch.ones(3))


def test_layernorm_gelu_concat_residual():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(6, 8)
            self.ln = nn.LayerNorm(16)
            self.out = nn.Linear(16, 2)

        def forward(self, x):
            h = torch.cat([F.gelu(self.a(x)), torch.tanh(self.b(x))], dim=1)
            h = self.ln(h) + 0.5 * h
            return self.out(h * 2.0 - 1.0)

    net = Net()
    x = torch.randn(5, 6)
    beta, gamma = cd_logits(net, x, torch.tensor([1, 1, 0, 0, 1, 0.0]))
    torch.testing.assert_close(beta + gamma, net(x))


def test_dict_output_with_logits_is_decomposed_like_the_logits():
    """A network returning ``{"logits": ..., "features": ...}`` (the Hugging Face habit, read by the
    monitors through ``pick_output``) is decomposed at its logits, as the same network returning them."""

    class Net(nn.Module):
        def __init__(self, as_dict: bool) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
            self.head = nn.Linear(8, 3)
            self.as_dict = as_dict

        def forward(self, x: torch.Tensor):
            h = self.body(x)
            z = self.head(h)
            return {"logits": z, "features": h} if self.as_dict else z

    torch.manual_seed(0)
    plain, wrapped = Net(False), Net(True)
    wrapped.load_state_dict(plain.state_dict())
    x, mask = torch.randn(4, 6), (torch.arange(6) < 3).float()
    rel_p, irr_p = cd_logits(plain, x, mask)
    rel_w, irr_w = cd_logits(wrapped, x, mask)
    torch.testing.assert_close(rel_w, rel_p, rtol=0, atol=0)
    torch.testing.assert_close(irr_w, irr_p, rtol=0, atol=0)
    torch.testing.assert_close(rel_w + irr_w, plain(x), rtol=1e-5, atol=1e-6)


def test_unsupported_operation_names_the_users_line():
    """CD's refusal names the line of the user's forward (the tracer's own stack filter, which does not call
    torch.fx's compiler-importing one)."""
    from explain_callbacks.interaction.cd import cd_forward

    class FFTNet(nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real.flatten(1)  # no CD rule: the error points here

    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(CDUnsupportedError, match=r"test_interaction_cd\.py\", line \d+, in forward"):
        cd_forward(FFTNet(), x * 0.5, x * 0.5)
