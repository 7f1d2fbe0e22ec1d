"""LRP on PyTorch's own transformer layers (nn.MultiheadAttention, nn.LayerNorm, nn.TransformerEncoderLayer) by
AttnLRP (Achtibat et al. 2024), and the refusal of fused recurrent layers: conservation where the rules conserve,
and the whole map of a tiny encoder layer against a hand-written reference of the paper's rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explain_callbacks.attribution import LRP, InputXGradient
from explain_callbacks.attribution.lrp import LRPUnsupportedError

TINY = 1e-12  # ε and stabiliser: the rules' exact forms (no relevance absorbed by the stabiliser)


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Encoder(nn.Module):
    """embed -> one nn.TransformerEncoderLayer (post-norm, ReLU) -> mean over tokens -> head; bias-free."""

    def __init__(self, d: int = 4, heads: int = 2, bias: bool = False) -> None:
        super().__init__()
        torch.manual_seed(21)
        self.embed = nn.Linear(3, d, bias=False)
        self.layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, bias=bias)
        self.head = nn.Linear(d, 2, bias=False)
        if bias:
            with torch.no_grad():
                for name, p in self.layer.named_parameters():
                    if name.endswith("bias"):
                        p.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(x)).mean(1))


def _over(r: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return r / (z + TINY * torch.where(z >= 0, 1.0, -1.0))


def _eps_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, r: torch.Tensor) -> torch.Tensor:
    """ε rule of z = x Wᵀ + b, written per output unit: R_j = Σ_k x_j w_kj / s(z_k) · R_k."""
    z = x @ w.T + (0 if b is None else b)
    return torch.einsum("...j,kj,...k->...j", x, w, _over(r, z))


def _ln_rule(ln: nn.LayerNorm, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """AttnLRP's LayerNorm: σ a constant, so y_k = γ_k/σ (x_k − mean x) + β_k = Σ_j x_j J_kj + β_k with
    J_kj = γ_k/σ (δ_kj − 1/N): the ε rule on that linear map, as an explicit (N, N) matrix per token."""
    n = x.shape[-1]
    sigma = (x.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    y = ln(x)
    gamma = ln.weight if ln.weight is not None else torch.ones(n, dtype=x.dtype)
    jac = gamma[:, None] * (torch.eye(n, dtype=x.dtype) - 1.0 / n)  # (k, j), to be divided by σ per token
    return torch.einsum("...j,kj,...k->...j", x, jac, _over(r, y) / sigma)


def _mha_rule(mha: nn.MultiheadAttention, x: torch.Tensor, r_out: torch.Tensor) -> torch.Tensor:
    """AttnLRP of self-attention y = MHA(x, x, x), head by head and token by token, from the paper's rules:
    ε on the projections, the uniform rule (halves) on A·V and QKᵀ, R_S = S ⊙ (R_A − A ΣR_A) on the softmax."""
    d, h = mha.embed_dim, mha.num_heads
    hd = d // h
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = (None, None, None) if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
    q, k, v = x @ wq.T + (0 if bq is None else bq), x @ wk.T + (0 if bk is None else bk), x @ wv.T + (
        0 if bv is None else bv)  # fmt: skip
    heads = []
    for i in range(h):
        sl = slice(i * hd, (i + 1) * hd)
        s = q[..., sl] @ k[..., sl].transpose(-2, -1) / hd**0.5
        a = torch.softmax(s, -1)
        heads.append((s, a, a @ v[..., sl]))
    o = torch.cat([hh[2] for hh in heads], -1)
    r_o = _eps_linear(o, mha.out_proj.weight, mha.out_proj.bias, r_out)
    r_q, r_k, r_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i, (s, a, oh) in enumerate(heads):
        sl = slice(i * hd, (i + 1) * hd)
        vh, qh, kh = v[..., sl], q[..., sl], k[..., sl]
        c = _over(r_o[..., sl], oh)  # (B, T, hd)
        # O_tp = Σ_j A_tj V_jp: half to A, half to V
        r_a = 0.5 * torch.einsum("btj,bjp,btp->btj", a, vh, c)
        r_v[..., sl] = 0.5 * torch.einsum("btj,bjp,btp->bjp", a, vh, c)
        r_s = s * (r_a - a * r_a.sum(-1, keepdim=True))
        # S_tj = Σ_p Q_tp K_jp / √hd: half to Q, half to K
        cs = 0.5 * _over(r_s, s) / hd**0.5
        r_q[..., sl] = torch.einsum("btp,bjp,btj->btp", qh, kh, cs)
        r_k[..., sl] = torch.einsum("btp,bjp,btj->bjp", qh, kh, cs)
    return _eps_linear(x, wq, bq, r_q) + _eps_linear(x, wk, bk, r_k) + _eps_linear(x, wv, bv, r_v)


def _sum_rule(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = _over(r, a + b)
    return a * c, b * c


def reference_map(model: Encoder, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The whole map by hand: head ε, the mean's gradient, norm2, the residual sum, the ReLU MLP (ε, pass, ε),
    norm1, the residual sum, the attention, embed ε (composite "epsilon", tiny ε)."""
    layer = model.layer
    with torch.no_grad():
        e = model.embed(x)
        u1 = e + layer.self_attn(e, e, e, need_weights=False)[0]
        h1 = layer.norm1(u1)
        z1 = layer.linear1(h1)
        ff = layer.linear2(torch.relu(z1))
        u2 = h1 + ff
        h2 = layer.norm2(u2)
        m = h2.mean(1)
        f = m @ model.head.weight.T
        r_f = torch.zeros_like(f).scatter_(1, t[:, None], f.gather(1, t[:, None]))
        r_m = _eps_linear(m, model.head.weight, None, r_f)
        r_h2 = (r_m / x.shape[1])[:, None, :].expand_as(h2)
        r_u2 = _ln_rule(layer.norm2, u2, r_h2)
        r_h1, r_ff = _sum_rule(h1, ff, r_u2)
        r_relu = _eps_linear(torch.relu(z1), layer.linear2.weight, layer.linear2.bias, r_ff)
        r_h1 = r_h1 + _eps_linear(h1, layer.linear1.weight, layer.linear1.bias, r_relu)
        r_u1 = _ln_rule(layer.norm1, u1, r_h1)
        r_e, r_sa = _sum_rule(e, u1 - e, r_u1)
        r_e = r_e + _mha_rule(layer.self_attn, e, r_sa)
        return _eps_linear(x, model.embed.weight, None, r_e)


@pytest.mark.parametrize("bias", [False, True])
def test_encoder_layer_equals_hand_written_attnlrp(bias):
    """nn.TransformerEncoderLayer (its fused MultiheadAttention and LayerNorms) explained by AttnLRP: the map equals
    the hand-written reference of the rules to 1e-8 (and differs from gradient × input)."""
    model, x, t = Encoder(bias=bias).double().eval(), _x(3, 5, 3), torch.tensor([0, 1, 1])
    got = LRP("epsilon", epsilon=TINY, stabilizer=TINY)(model, x, t)
    ref = reference_map(model, x, t)
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(got, ref, atol=1e-8 * scale, rtol=1e-6)
    assert (got - InputXGradient(batch_size=None)(model, x, t)).abs().max() > 1e-2 * scale
    # the same layer sequence-first (batch_first=False: the attention's (L, B, E) layout): the same map
    seq_first = SeqFirst(model).eval()
    torch.testing.assert_close(LRP("epsilon", epsilon=TINY, stabilizer=TINY)(seq_first, x, t), got, rtol=1e-9,
                               atol=1e-12 * scale)  # fmt: skip


class SeqFirst(nn.Module):
    def __init__(self, enc: Encoder) -> None:
        super().__init__()
        import copy

        self.m = copy.deepcopy(enc)
        self.m.layer.batch_first = self.m.layer.self_attn.batch_first = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m.head(self.m.layer(self.m.embed(x).transpose(0, 1)).mean(0))


def test_layer_norm_rule_conserves():
    """Without β, y = γ ⊙ (x − mean x)/σ is linear in x once σ is a constant: Σ_j R_x,j = Σ_k R_y,k."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6, bias=False), nn.LayerNorm(6, bias=False), nn.Linear(6, 3, bias=False))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    model = model.double().eval()
    x, t = _x(4, 5, seed=3), torch.tensor([0, 1, 2, 0])
    rel = LRP("epsilon", epsilon=TINY, stabilizer=TINY)(model, x, t)
    torch.testing.assert_close(rel.sum(1), model(x).gather(1, t[:, None])[:, 0].detach(), rtol=1e-8, atol=1e-12)
    # functional F.layer_norm gets the same rule as the module
    fn = nn.Sequential(model[0], _FunctionalLN(model[1]), model[2]).eval()
    torch.testing.assert_close(LRP("epsilon", epsilon=TINY, stabilizer=TINY)(fn, x, t), rel, rtol=1e-10, atol=1e-12)


class _FunctionalLN(nn.Module):
    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        self.weight = ln.weight
        self.n = ln.normalized_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.n, self.weight)


class ValueOnly(nn.Module):
    """MultiheadAttention whose queries and keys are a constant: the weights do not depend on the input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.embed = nn.Linear(3, 4, bias=False)
        self.mha = nn.MultiheadAttention(4, 2, bias=False, batch_first=True)
        self.register_buffer("c", torch.randn(1, 5, 4))
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.c.expand(x.shape[0], -1, -1)
        return self.head(self.mha(c, c, self.embed(x))[0].mean(1))  # (a sum's gradient would copy R)


def test_multihead_attention_with_constant_weights_conserves():
    """With input-independent attention weights, MHA is linear in the values: every rule on the path (ε on the
    projections, the ε rule on A·V with V the only input-dependent factor) conserves: Σ R = f_c."""
    model, x, t = ValueOnly().double().eval(), _x(3, 5, 3, seed=4), torch.tensor([0, 1, 0])
    rel = LRP("epsilon", epsilon=TINY, stabilizer=TINY)(model, x, t)
    torch.testing.assert_close(rel.flatten(1).sum(1), model(x).gather(1, t[:, None])[:, 0].detach(), rtol=1e-8,
                               atol=1e-12)  # fmt: skip


def test_key_padding_mask_and_forward_values():
    """A key-padding mask (computed from the input: tokens marked 5.0) and a head reading token 0 alone: the padded
    tokens reach the output only as token 0's keys and values, which the mask removes, so their relevance is 0
    (without the mask it is not). The forward output is bit-identical under LRP (to the layer's path with grad)."""
    model, x = Encoder().double().eval(), _x(2, 5, 3, seed=5)
    x[0, 3:, 2] = 5.0

    class FirstToken(nn.Module):
        def __init__(self, masked: bool) -> None:
            super().__init__()
            self.m, self.masked = model, masked

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pad = x[..., 2] == 5.0 if self.masked else None
            return self.m.head(self.m.layer(self.m.embed(x), src_key_padding_mask=pad)[:, 0])

    lrp, t = LRP("epsilon", epsilon=TINY, stabilizer=TINY), torch.tensor([0, 1])
    rel = lrp(FirstToken(True).eval(), x, t)
    assert torch.isfinite(rel).all() and rel[0, :3].abs().sum() > 0
    assert rel[0, 3:].abs().max() == 0
    assert lrp(FirstToken(False).eval(), x, t)[0, 3:].abs().max() > 1e-3 * rel.abs().max()
    net = FirstToken(True).eval()
    # with grad and frozen parameters, as under LRP (no_grad takes the layer's fused kernel; parameters that
    # need grad pick other attention kernels): the same Python path, so the same bits
    net.requires_grad_(False)
    plain = net(x.clone().requires_grad_(True))
    from explain_callbacks.attribution.lrp import epsilon_only, lrp_hooks

    with lrp_hooks(net, epsilon_only(), x[:1]) as guard, guard:
        out = net(x.clone().requires_grad_(True))
    assert torch.equal(out.detach(), plain)


class CellLSTM(nn.Module):
    """The LSTM of ``lstm`` written step by step from nn.Linear and torch.sigmoid/tanh (PyTorch's gate order i, f, g,
    o): the engine's generic rules explain it (gate products: all to the signal; sums: in proportion; linear maps:
    ε), an independent reference for the fused layer's rule. Biases sit in the input map only (the fused layer's
    b_hh is 0), as a step-by-step ε rule with h_0 = 0 needs."""

    def __init__(self, lstm: nn.LSTM, head: nn.Linear, out: str) -> None:
        super().__init__()
        d, hdim = lstm.input_size, lstm.hidden_size
        self.lin_x, self.lin_h, self.head, self.out, self.hdim = nn.Linear(d, 4 * hdim), nn.Linear(
            hdim, 4 * hdim, bias=False), head, out, hdim  # fmt: skip
        with torch.no_grad():
            self.lin_x.weight.copy_(lstm.weight_ih_l0)
            self.lin_x.bias.copy_(lstm.bias_ih_l0 + lstm.bias_hh_l0)
            self.lin_h.weight.copy_(lstm.weight_hh_l0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = torch.zeros(x.shape[0], self.hdim, dtype=x.dtype)
        hs = []
        for t in range(x.shape[1]):
            z = self.lin_x(x[:, t]) if t == 0 else self.lin_x(x[:, t]) + self.lin_h(h)  # h_0 = 0: no term
            i, f, g, o = z.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g) if t else torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs.append(h)
        return self.head(h if self.out == "h_n" else torch.stack(hs, 1).mean(1))


class FusedLSTM(nn.Module):
    def __init__(self, out: str) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.lstm, self.head, self.out = nn.LSTM(3, 5, batch_first=True), nn.Linear(5, 2), out
        with torch.no_grad():
            self.lstm.bias_hh_l0.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq, (h_n, _) = self.lstm(x)
        return self.head(h_n[0] if self.out == "h_n" else seq.mean(1))


@pytest.mark.parametrize("out", ["h_n", "mean"])
def test_fused_lstm_equals_the_cell_written_out(out):
    """nn.LSTM by Arras et al. 2017's rules (LSTMRule, through h_n or the output sequence) equals the same LSTM
    written from nn.Linear and sigmoid gates, explained by the engine's generic gate, sum and ε rules, to 1e-8; it is
    not the gradient × input map (which the fused kernel's gradient would give)."""
    model = FusedLSTM(out).double().eval()
    cell = CellLSTM(model.lstm, model.head, out).double().eval()
    x, t = _x(3, 6, 3, seed=14), torch.tensor([0, 1, 1])
    torch.testing.assert_close(model(x), cell(x))
    lrp = LRP("epsilon", epsilon=TINY, stabilizer=TINY)  # no first-layer rule: the cell's first layer is lin_x
    got, ref = lrp(model, x, t), lrp(cell, x, t)
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(got, ref, atol=1e-8 * scale, rtol=1e-6)
    assert (got - InputXGradient(batch_size=None)(model, x, t)).abs().max() > 1e-2 * scale


def test_recurrent_layers_are_refused():
    """nn.GRU/RNN run as one fused kernel without LRP rules (their gradient would pass for relevance): refused; so
    are LSTMs the rules do not cover (stacked, bidirectional)."""
    for cell in (nn.GRU, nn.RNN):
        model = nn.Sequential(cell(3, 4, batch_first=True))
        with pytest.raises(LRPUnsupportedError, match=r"recurrent layer '0'.*Arras.*input_x_gradient"):
            LRP()(model, _x(2, 5, 3).float(), None)
    for kw in ({"num_layers": 2}, {"bidirectional": True}):
        with pytest.raises(LRPUnsupportedError, match=r"one layer, one direction.*input_x_gradient"):
            LRP()(_LSTMHead(kw).eval(), _x(2, 5, 3).float(), torch.tensor([0, 1]))


class _LSTMHead(nn.Module):
    def __init__(self, kw: dict) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True, **kw)
        self.head = nn.Linear(8 if kw.get("bidirectional") else 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0].mean(1))


def test_unsupported_attention_options_are_refused():
    mha = nn.MultiheadAttention(4, 2, add_bias_kv=True, batch_first=True)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha, self.head = mha, nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.mha(x, x, x)[0].mean(1))

    with pytest.raises(LRPUnsupportedError, match=r"bias_k, bias_v.*input_x_gradient"):
        LRP()(M().eval(), _x(2, 5, 4).float(), torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- what LRP keeps between calls
def _bn_cnn() -> nn.Module:
    torch.manual_seed(6)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                      nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))  # fmt: skip
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    return m.double().eval()


def test_maps_follow_writes_that_version_counters_miss():
    """Nothing derived from the parameters is kept between calls: after a training-mode forward (BatchNorm's running
    statistics change without a version bump) and a ``p.data`` write (no bump either) the map is that of the new
    state, equal to a fresh copy's (a cache keyed on parameter versions served the old merged BatchNorm here)."""
    import copy

    model, x, t = _bn_cnn(), _x(3, 2, 6, 6, seed=7), torch.tensor([0, 1, 2])
    lrp = LRP(batch_size=None)
    before = lrp(model, x, t)
    with torch.no_grad():
        model.train()
        model(3.0 * x + 1.0)  # running statistics move; no weight changes
        model.eval()
    after_stats = lrp(model, x, t)
    torch.testing.assert_close(after_stats, LRP(batch_size=None)(copy.deepcopy(model), x, t), rtol=0, atol=0)
    assert (after_stats - before).abs().max() > 1e-3 * before.abs().max()
    model[3].weight.data.mul_(-1.0)  # the z⁺ rule's positive weights change
    after_data = lrp(model, x, t)
    torch.testing.assert_close(after_data, LRP(batch_size=None)(copy.deepcopy(model), x, t), rtol=0, atol=0)
    assert (after_data - after_stats).abs().max() > 1e-3 * before.abs().max()


def test_setup_probed_once_and_redone_when_modules_change():
    """Which rule goes where is found by one probe forward per model and row shape; a replaced submodule is seen."""
    model, x, t = _bn_cnn(), _x(3, 2, 6, 6, seed=8), torch.tensor([0, 1, 2])
    rows: list[int] = []
    model.register_forward_pre_hook(lambda _m, a: rows.append(a[0].shape[0]))
    lrp = LRP(batch_size=None)
    lrp(model, x, t)
    n_first = len(rows)
    lrp(model, x, t)
    assert rows[n_first:] == [3]  # the second call: the batch only, no probe row
    model[4] = nn.Identity()  # the second BatchNorm removed: a new setup (no merge there)
    rows.clear()
    got = lrp(model, x, t)
    assert 1 in rows  # probed again
    import copy

    torch.testing.assert_close(got, LRP(batch_size=None)(copy.deepcopy(model), x, t), rtol=0, atol=0)
