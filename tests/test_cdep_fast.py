"""CDEP's fast path: contextual decomposition carried as (z, β) with γ = z − β, and the task's forward served
from that pass. Checked against the (β, γ) form (the reference's, itself checked against the authors' code),
against autograd of the plain rules (gradcheck), and against a vanilla training step (loss, gradients,
BatchNorm running statistics)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from explain_callbacks.callbacks.regularizer import AttributionRegularizer
from explain_callbacks.interaction import cd as C
from explain_callbacks.models import DecoyCNN, SmallCNN
from explain_callbacks.regularize import RegularizerMixin, build_penalty
from explain_callbacks.regularize.functional import cdep_penalty

from .test_regularize_callback import GradRecorder, Tiny, dataset, trainer


def _with_zeros(t: torch.Tensor) -> torch.Tensor:
    """Values off the kinks of |·| (gradcheck's finite differences), and some exact zeros where the rules
    take their 0/0 and sgn(0) branches."""
    t = t + 0.05 * torch.sign(t)
    t.view(-1)[::7] = 0.0
    return t


def test_led_bias_split_matches_the_plain_rule_and_autograd():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64) + 0.3
    r = _with_zeros(torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64))
    bias = torch.randn(1, 4, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    both = torch.cat([c, r]).requires_grad_()
    for eps in ((C._EPS, C._EPS), (0.0, 2 * C._EPS)):
        assert torch.autograd.gradcheck(lambda b, w, e=eps: C._LedBiasSplit.apply(b, w, e), (both, bias))
        # the (β, γ) rule on β = r, γ = c − r gives the same β', and z' = c + b
        pair = C._bias_split_values(torch.cat([r, c - r]), bias.detach(), eps)
        out = C._LedBiasSplit.apply(both, bias, eps)
        assert torch.allclose(out[3:], pair[:3], atol=1e-15)
        assert torch.allclose(out[:3], c + bias.detach(), atol=1e-15)


def test_led_bias_split_gradient_is_finite_where_both_streams_vanish():
    # "rest": D = ε where r = i = 0; a large upstream gradient must not turn 0·(b·g/ε²) into NaN
    both = torch.zeros(4, 3, requires_grad=True)
    bias = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    out = C._LedBiasSplit.apply(both, bias, (0.0, 2 * C._EPS))
    out.backward(torch.full((4, 3), 1e3))
    assert torch.isfinite(both.grad).all() and torch.isfinite(bias.grad).all()
    assert torch.equal(out[2:], torch.zeros(2, 3))  # β stays exactly 0: the whole bias went to γ


@pytest.mark.parametrize("batch_stats", [True, False])
def test_led_batchnorm_matches_the_pair_rule_and_autograd(batch_stats):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    beta = _with_zeros(torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64))
    beta[0, 0] = 0.0
    z[0, 0] = 0.0  # both streams 0 there: β gets no share of the shift
    both = torch.cat([z, beta]).requires_grad_()
    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    running = (torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5)

    def stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not batch_stats:
            return running
        flat = t[:4].transpose(0, 1).reshape(3, -1)
        return flat.mean(1), flat.var(1, unbiased=False)

    def led(both, w, b):  # the statistics as a differentiable function of z, as nn.BatchNorm's backward has them
        mean, var = stats(both)
        with torch.no_grad():
            m0, v0 = mean.detach(), var.detach()
        out = C._LedNorm.apply(both, w, b, m0, v0, 1e-5, batch_stats)
        if batch_stats:  # the same statistics with autograd, to check the hand-written statistics gradient
            return out + 0.0 * (mean.sum() + var.sum())
        return out

    assert torch.autograd.gradcheck(led, (both, w, b))
    # against the (β, γ) rule with autograd through the statistics
    mean, var = stats(both)
    shape = [1, -1, 1, 1]
    scale = (w * torch.rsqrt(var + 1e-5)).view(shape)
    shift = (b - mean * torch.rsqrt(var + 1e-5) * w).view(shape)
    zz, bb = both[:4], both[4:]
    out = torch.addcmul(shift, zz, scale)
    ref = C._split_shift(bb * scale, (zz - bb) * scale, shift, out)
    got = led(both, w, b)
    assert torch.allclose(got[4:], ref.rel, atol=1e-12) and torch.allclose(got[:4], out, atol=1e-12)
    gw = torch.randn(8, 3, 2, 2, generator=g, dtype=torch.float64)
    expect = torch.autograd.grad((torch.cat([out, ref.rel]) * gw).sum(), (both, w, b))
    for u, v in zip(torch.autograd.grad((got * gw).sum(), (both, w, b)), expect):
        assert torch.allclose(u, v, atol=1e-10)


def _nets() -> list[tuple[str, nn.Module, int]]:
    torch.manual_seed(0)
    return [
        ("smallcnn-train", SmallCNN(1, dropout=0.0).train(), 32),
        ("smallcnn-eval", SmallCNN(1).eval(), 32),
        ("decoycnn", DecoyCNN(1, size=28), 28),
    ]


def _batch(side: int, n: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(side)
    x = torch.rand(n, 1, side, side, generator=g)
    x[:, :, :, : side // 3] = 0.0  # a black band: both streams exactly 0 under the mask's reach
    y = torch.randint(0, 10, (n,), generator=g)
    m = torch.zeros(1, side, side)
    m[:, :5, :5] = 1
    m[:, -5:, -5:] = 1
    return x, y, m


def _grads(net: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [p for p in net.parameters()]))


def _close(got: list[torch.Tensor], expect: list[torch.Tensor], tol: float) -> bool:
    scale = max(e.abs().max().item() for e in expect)
    return all((u - v).abs().max().item() <= tol * scale for u, v in zip(got, expect))


def _errors(net: nn.Module, x: torch.Tensor, m: torch.Tensor, form: str) -> dict[tuple, float]:
    """Parameter-gradient error of each form in float32 and float64 against the (β, γ) form in float64,
    relative to the largest gradient entry."""
    grads = {}
    for dtype in (torch.float32, torch.float64):
        n = copy.deepcopy(net).to(dtype)
        for streams in ("pair", "total"):
            r = cdep_penalty(n, x.to(dtype), m.to(dtype), form=form, streams=streams)
            grads[dtype, streams] = (r.item(), [g.double() for g in _grads(n, r)])
    r_ref, ref = grads[torch.float64, "pair"]
    scale = max(g.abs().max().item() for g in ref)
    assert r_ref > 0 and scale > 0  # not a vacuous comparison
    out = {}
    for key, (r, gs) in grads.items():
        out[key] = max((a - b).abs().max().item() for a, b in zip(gs, ref)) / scale
        out[(*key, "value")] = abs(r - r_ref) / abs(r_ref)
    return out


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("form", ["softmax", "l1"])
def test_total_streams_give_the_pair_streams_penalty_and_gradients(case, form):
    """Equal to 1e-6 in float64. In float32 the parameter gradient of CDEP is ill-conditioned (the rules' |·| have
    kinks where a stream is 0 up to rounding): the (β, γ) form itself is 1e-2 away from its float64 value on
    SmallCNN in train mode; the (z, β) form must be no further from it."""
    name, net, side = _nets()[case]
    x, _, m = _batch(side)
    err = _errors(net, x, m, form)
    assert err[torch.float64, "total"] <= 1e-6 and err[torch.float64, "total", "value"] <= 1e-6, name
    assert err[torch.float32, "total", "value"] <= 1e-6, name
    assert err[torch.float32, "total"] <= max(err[torch.float32, "pair"], 1e-3), name


@pytest.mark.parametrize("case", [0, 2])
def test_return_logits_trains_as_the_separate_forward(case):
    """One step of task + λ·R (float64): the logits served by the CD pass against the model's own forward plus the
    reference (β, γ) penalty; same loss, gradients and BatchNorm running statistics (updated once)."""
    _, base, side = _nets()[case]
    base = base.double()
    x, y, m = _batch(side)
    x, m = x.double(), m.double()
    vanilla, fast = copy.deepcopy(base), copy.deepcopy(base)
    logits_v = vanilla(x)
    loss_v = F.cross_entropy(logits_v, y) + 10.0 * cdep_penalty(vanilla, x, m, streams="pair")
    logits_f, r = cdep_penalty(fast, x, m, return_logits=True)
    loss_f = F.cross_entropy(logits_f, y) + 10.0 * r
    assert torch.allclose(logits_f, logits_v, atol=1e-12)
    assert abs(loss_f.item() - loss_v.item()) <= 1e-6 * loss_v.item()
    assert _close(_grads(fast, loss_f), _grads(vanilla, loss_v), 1e-6)
    for (name, bv), (_, bf) in zip(vanilla.named_buffers(), fast.named_buffers()):
        assert torch.allclose(bf.double(), bv.double(), atol=1e-12, rtol=1e-9), name
    if case == 0:  # the statistics moved (the comparison could fail): once, as in vanilla training
        assert int(fast.features[1].num_batches_tracked) == 1
        assert not torch.equal(fast.features[1].running_var, base.features[1].running_var)
    # float32: the logits are the forward's to rounding
    net32 = copy.deepcopy(base).float()
    logits32, _ = cdep_penalty(net32, x.float(), m.float(), return_logits=True)
    assert torch.allclose(logits32, copy.deepcopy(base).float()(x.float()), atol=1e-5)


def test_return_logits_with_dropout_shares_one_mask_and_grouped_masks():
    torch.manual_seed(3)
    net = SmallCNN(1).train()  # dropout 0.25
    x, _, m = _batch(32, n=6)
    ref = copy.deepcopy(net)
    torch.manual_seed(7)
    logits, _ = cdep_penalty(net, x, m, return_logits=True)
    torch.manual_seed(7)
    assert torch.allclose(logits, ref(x), atol=1e-6)  # the CD pass draws the mask the forward would draw
    # grouped masks (B, G, ...): the B rows of the first group; the running variance counts each sample once
    net2, ref2 = copy.deepcopy(ref).eval(), copy.deepcopy(ref)
    net2.features[1].train()
    ref2.eval()
    ref2.features[1].train()
    groups = torch.stack([m, m.flip(-1), m.flip(-2)], 0).unsqueeze(0)  # (1, 3, 1, H, W)
    logits, r = cdep_penalty(net2, x, groups, return_logits=True)
    assert logits.shape == (6, 10) and r.ndim == 0
    assert torch.allclose(logits, ref2(x), atol=1e-6)
    assert torch.allclose(net2.features[1].running_var, ref2.features[1].running_var, atol=1e-7, rtol=1e-6)


def test_return_logits_refuses_a_custom_decomposition():
    net = DecoyCNN(1, size=28)
    x, _, m = _batch(28, n=2)
    with pytest.raises(ValueError, match="cd_fn"):
        cdep_penalty(net, x, m, return_logits=True, cd_fn=C.cd_logits)


def test_callback_serve_forward_trains_as_without_it():
    ds = dataset(8)
    model = Tiny()
    served, plain = copy.deepcopy(model), copy.deepcopy(model)
    calls = {"n": 0}
    served.net.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    rec_s, rec_p = GradRecorder(), GradRecorder()
    cb = AttributionRegularizer("cdep", weight=3.0, mask=2, model_attr="net", serve_forward=True)
    trainer([cb, rec_s], limit_train_batches=2).fit(served, DataLoader(ds, batch_size=4))
    trainer([AttributionRegularizer("cdep", weight=3.0, mask=2, model_attr="net"), rec_p], limit_train_batches=2).fit(
        plain, DataLoader(ds, batch_size=4)
    )
    assert calls["n"] == 2  # the step's own net(x) was served both times (the hook sees the served call)
    for gs, gp in zip(rec_s.grads, rec_p.grads):
        assert all(torch.allclose(gs[n], gp[n], atol=1e-6, rtol=1e-5) for n in gp)
    for (n, bs), (_, bp) in zip(served.named_buffers(), plain.named_buffers()):
        assert torch.allclose(bs.float(), bp.float(), atol=1e-6), n  # running statistics: updated once per step
    assert "forward" not in served.net.__dict__ and "training_step" not in served.__dict__


def test_callback_serve_forward_on_another_tensor_runs_the_forward_and_warns():
    class Scaled(Tiny):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0] * 1.0), batch[1])  # a new tensor: cannot be served

    model = Scaled()
    ref = copy.deepcopy(model)
    cb = AttributionRegularizer("cdep", weight=3.0, mask=2, model_attr="net", serve_forward=True)
    with pytest.warns(UserWarning, match="serve_forward"):
        trainer([cb], limit_train_batches=2).fit(model, DataLoader(dataset(8), batch_size=4))
    trainer([AttributionRegularizer("cdep", weight=3.0, mask=2, model_attr="net")], limit_train_batches=2).fit(
        ref, DataLoader(dataset(8), batch_size=4)
    )
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    for (n, a), (_, b) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), n  # the unserved pass left the statistics alone
    with pytest.raises(ValueError, match="serve_forward"):
        AttributionRegularizer("rrr", mask=2, serve_forward=True)


def test_mixin_penalized_forward_equals_penalized_loss():
    class Lit(RegularizerMixin, nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = DecoyCNN(1, size=28)
            self.add_penalty("cdep", weight=2.0, model_attr="net")
            self.add_penalty(build_penalty("rrr"), weight=0.5, model_attr="net")

    torch.manual_seed(0)
    a = Lit()
    b = copy.deepcopy(a)
    x, y, m = _batch(28, n=4)
    out, reg = a.penalized_forward(x, y, m)
    loss_a = F.cross_entropy(out, y) + reg
    loss_b = b.penalized_loss(F.cross_entropy(b.net(x), y), x, y, m)
    assert abs(loss_a.item() - loss_b.item()) <= 1e-6 * loss_b.item()
    assert _close(_grads(a, loss_a), _grads(b, loss_b), 1e-6)


@pytest.mark.parametrize("arch", ["mlp", "cnn_bn_maxpool", "resnet_functional", "lstm", "layernorm_cat", "train_bn"])
def test_total_streams_equal_pair_streams_on_every_architecture(arch):
    """Rules without a (z, β) form (LSTM, LayerNorm, GELU/tanh, products, cat) read γ = z − β and continue in the
    (β, γ) form: the decomposition is the same, and the totals are the model's forward."""
    from .test_interaction_cd import _CNN, _LSTMClassifier, _mlp, _ResNet, _warm_bn

    torch.manual_seed(0)

    class LayerNormCat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.ln, self.out = nn.Linear(6, 8), nn.Linear(6, 8), nn.LayerNorm(16), nn.Linear(16, 2)

        def forward(self, x):
            h = torch.cat([F.gelu(self.a(x)), torch.tanh(self.b(x))], dim=1)
            h = self.ln(h) + 0.5 * h
            return self.out(h * 2.0 - 1.0)

    make, shape = {
        "mlp": (_mlp, (10,)),
        "cnn_bn_maxpool": (lambda: _warm_bn(_CNN(), (2, 12, 12)), (2, 12, 12)),
        "resnet_functional": (lambda: _warm_bn(_ResNet(), (1, 10, 10)), (1, 10, 10)),
        "lstm": (_LSTMClassifier, (7, 6)),
        "layernorm_cat": (LayerNormCat, (6,)),
        "train_bn": (lambda: _CNN().train(), (2, 12, 12)),
    }[arch]
    model = make().double()
    x = torch.randn(4, *shape, dtype=torch.float64)
    mask = (torch.rand(shape) > 0.5).double()
    torch.manual_seed(1)  # train mode: the same dropout mask in every pass
    bp, gp = C.cd_logits(model, x, mask, streams="pair")
    torch.manual_seed(1)
    bt, gt = C.cd_logits(model, x, mask, streams="total")
    torch.testing.assert_close(bt, bp, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(gt, gp, atol=1e-10, rtol=1e-9)
    torch.manual_seed(1)
    _, out = C.cd_forward(model, mask * x, (1 - mask) * x)
    torch.manual_seed(1)
    torch.testing.assert_close(out, model(x), atol=1e-10, rtol=1e-9)
