"""The CDEP step's fused rules: BatchNorm and the ReLU after it in one pass for (z, β) streams. Checked with
gradcheck against autograd of the plain formula, and against the unfused rules (the same values bit for bit, the
same gradients) on models that write the ReLU as a module, a function and a method, and on graphs where the
fusion must not apply (the BatchNorm output used twice, an in-between operation)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explain_callbacks.interaction import cd as C
from explain_callbacks.models import SmallCNN
from explain_callbacks.regularize.functional import cdep_penalty


@pytest.mark.parametrize("batch_stats", [True, False])
def test_led_norm_with_relu_matches_relu_after_the_rule_and_autograd(batch_stats):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    beta = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    beta = beta + 0.05 * torch.sign(beta)  # off the kinks of |·| and of ReLU for the finite differences
    both = torch.cat([z, beta]).requires_grad_()
    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    running = (torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5)

    def stats(both: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch statistics of z as the op gets them (constants), and their sum with a zero weight: the
        finite differences of gradcheck then see the statistics move with z, as the op's backward accounts."""
        if not batch_stats:
            return *running, both.sum() * 0.0
        flat = both[:4].transpose(0, 1).reshape(3, -1)
        mean, var = flat.mean(1), flat.var(1, unbiased=False)
        return mean.detach(), var.detach(), 0.0 * (mean.sum() + var.sum())

    def fused(both, w, b):
        mean, var, zero = stats(both)
        return C._LedNorm.apply(both, w, b, mean, var, 1e-5, batch_stats, True) + zero

    def plain(both, w, b):
        mean, var, zero = stats(both)
        return torch.relu(C._LedNorm.apply(both, w, b, mean, var, 1e-5, batch_stats)) + zero

    got, expect = fused(both, w, b), plain(both, w, b)
    assert torch.equal(got, expect)
    assert (got[4:] > 0).any() and (got[4:] == 0).any()  # both sides of β's ReLU are exercised
    gw = torch.randn(8, 3, 2, 2, generator=g, dtype=torch.float64)
    for u, v in zip(
        torch.autograd.grad((got * gw).sum(), (both, w, b)), torch.autograd.grad((expect * gw).sum(), (both, w, b))
    ):
        assert torch.allclose(u, v, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fused, (both, w, b))
    with torch.no_grad():  # the forward without autograd writes the same values
        mean, var, _ = stats(both)
        assert torch.equal(C._LedNorm.forward(C._NoCtx(), both, w, b, mean, var, 1e-5, batch_stats, True), got)


class _Forms(nn.Module):
    """BatchNorm followed by ReLU as a module, a function and a method; a BatchNorm whose output has two users,
    and one with an operation between it and the ReLU: only the first three are fused."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1, self.r1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.c2, self.n2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c3, self.n3 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c4, self.n4 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c5, self.n5 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.r1(self.n1(self.c1(x)))
        x = F.relu(self.n2(self.c2(x)))
        x = self.n3(self.c3(x)).relu()
        y = self.n4(self.c4(x))
        x = F.relu(y) + y  # two users: not fused
        x = F.relu(self.n5(self.c5(x)) * 0.5)  # an operation in between: not fused
        return self.fc(x.flatten(1))


def test_the_graph_fuses_exactly_the_batchnorm_relu_pairs():
    net = _Forms()
    graph = C._trace(net, torch.zeros(1, 1, 8, 8))
    pairs = C._norm_relu_pairs(graph, net, {})
    fused = {str(next(n for n in graph.nodes if n.name == k).target) for k in pairs}
    assert fused == {"n1", "n2", "n3"}
    net = SmallCNN(1)
    pairs = C._norm_relu_pairs(C._trace(net, torch.zeros(1, 1, 32, 32)), net, {})
    assert len(pairs) == 3  # every conv block of SmallCNN: BatchNorm then ReLU


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("arch", ["forms", "smallcnn"])
def test_fused_pass_equals_the_unfused_pass(monkeypatch, train, arch):
    """Values bit for bit (the fused ReLU is the same operation on the same numbers), parameter gradients of the
    CDEP penalty and of the served logits to rounding, in float64."""
    torch.manual_seed(0)
    net = (_Forms() if arch == "forms" else SmallCNN(1, dropout=0.0)).double().train(train)
    side = 8 if arch == "forms" else 32
    x = torch.rand(6, 1, side, side, dtype=torch.float64)
    x[:, :, :, : side // 3] = 0.0
    m = torch.zeros(1, side, side, dtype=torch.float64)
    m[:, :3, :3] = 1

    def run(n: nn.Module) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        logits, r = cdep_penalty(n, x, m, return_logits=True)
        loss = r + logits.square().mean()
        return logits.detach(), r.detach(), list(torch.autograd.grad(loss, list(n.parameters())))

    fused_net, plain_net = net, copy.deepcopy(net)
    got = run(fused_net)
    monkeypatch.setattr(C, "_norm_relu_pairs", lambda *a: {})
    expect = run(plain_net)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
    scale = max(g.abs().max().item() for g in expect[2])
    assert scale > 0
    assert all((u - v).abs().max().item() <= 1e-12 * scale for u, v in zip(got[2], expect[2]))
    for a, b in zip(fused_net.buffers(), plain_net.buffers()):  # running statistics updated alike
        assert torch.equal(a, b)


def _decoy_batch(side: int = 32, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(side)
    x = torch.rand(n, 1, side, side, generator=g, dtype=torch.float64)
    x[:, :, :, : side // 3] = 0.0
    m = torch.zeros(1, side, side, dtype=torch.float64)
    m[:, :5, :5] = 1
    return x, m


def _penalty_and_grads(net: nn.Module, x: torch.Tensor, m: torch.Tensor, compiled: bool):
    logits, r = cdep_penalty(net, x, m, return_logits=True, compiled=compiled)
    loss = r + logits.square().mean()
    return loss.detach(), list(torch.autograd.grad(loss, list(net.parameters())))


def test_compiled_without_a_compiler_warns_once_and_runs_the_eager_rules(monkeypatch):
    """When torch.compile fails (no C++ compiler, say), the pass warns once and gives the eager values exactly."""

    def no_compiler(fn, **kwargs):
        def fails(*args):
            raise RuntimeError("no C++ compiler found")

        return fails

    monkeypatch.setattr(C, "_KERNELS", {})
    monkeypatch.setattr(C, "_COMPILE_FAILED", [])
    monkeypatch.setattr(C.torch, "compile", no_compiler)
    torch.manual_seed(0)
    net = SmallCNN(1, dropout=0.0).double()
    x, m = _decoy_batch()
    expect = _penalty_and_grads(copy.deepcopy(net), x, m, compiled=False)
    with pytest.warns(RuntimeWarning, match="could not compile.*no C\\+\\+ compiler"):
        got = _penalty_and_grads(copy.deepcopy(net), x, m, compiled=True)
    assert torch.equal(got[0], expect[0]) and all(torch.equal(u, v) for u, v in zip(got[1], expect[1]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the next pass neither retries nor warns
        again = _penalty_and_grads(copy.deepcopy(net), x, m, compiled=True)
    assert torch.equal(again[0], expect[0])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["smallcnn-train", "smallcnn-eval", "decoycnn"])
def test_compiled_rules_equal_the_eager_rules(arch):
    """The compiled kernels (minutes of compilation on a small CPU): penalty and parameter gradients equal the eager
    rules' to 1e-6 in float64 (served logits included)."""
    from explain_callbacks.models import DecoyCNN

    torch.manual_seed(0)
    net = {
        "smallcnn-train": lambda: SmallCNN(1, dropout=0.0).train(),
        "smallcnn-eval": lambda: SmallCNN(1).eval(),
        "decoycnn": lambda: DecoyCNN(1, size=32),
    }[arch]().double()
    x, m = _decoy_batch()
    expect = _penalty_and_grads(copy.deepcopy(net), x, m, compiled=False)
    got = _penalty_and_grads(copy.deepcopy(net), x, m, compiled=True)
    assert C._COMPILE_FAILED == []  # the compiled kernels ran
    scale = max(g.abs().max().item() for g in expect[1])
    assert abs(got[0].item() - expect[0].item()) <= 1e-6 * abs(expect[0].item())
    assert all((u - v).abs().max().item() <= 1e-6 * scale for u, v in zip(got[1], expect[1]))


@pytest.mark.slow
def test_compiled_rules_in_float32_are_as_close_to_float64_as_the_reference_form():
    """CDEP's float32 gradient is ill-conditioned where a stream is 0 up to rounding (kinks of |·|): the compiled
    BatchNorm rule forms ĩ from γ = z − β so that it is exactly 0 where γ is; the compiled float32 gradient must be no
    further from the float64 one than the (β, γ) form's (as tests/test_cdep_fast.py asks of the eager rules)."""
    from .test_cdep_fast import _batch, _grads, _nets

    name, net, side = _nets()[0]  # SmallCNN in train mode: the ill-conditioned case
    x, _, m = _batch(side)
    grads = {}
    for dtype, streams, compiled in (
        (torch.float64, "pair", False), (torch.float32, "pair", False), (torch.float32, "total", True)
    ):  # fmt: skip
        n = copy.deepcopy(net).to(dtype)
        r = cdep_penalty(n, x.to(dtype), m.to(dtype), streams=streams, compiled=compiled)
        grads[dtype, streams] = [g.double() for g in _grads(n, r)]
    ref = grads[torch.float64, "pair"]
    scale = max(g.abs().max().item() for g in ref)

    def err(key: tuple) -> float:
        return max((a - b).abs().max().item() for a, b in zip(grads[key], ref)) / scale

    assert C._COMPILE_FAILED == []
    assert err((torch.float32, "total")) <= max(err((torch.float32, "pair")), 1e-3), name
