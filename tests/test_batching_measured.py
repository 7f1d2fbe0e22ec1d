"""``batch_size="auto"`` chosen by measurement: candidates timed with the model's own passes (an injected
clock makes the timings exact here), the fastest kept and cached per model, row shape, dtype, device and
kind of pass, shown in ``repr``; the model left as found; the user's int still wins. (The rest of the suite
runs with the measurement off: tests/conftest.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from explain_callbacks._internal.batching import AUTO_ROWS_MAX, auto_rows, choose_rows, resolve_batch_size
from explain_callbacks.attribution import IntegratedGradients, Occlusion, Saliency
from explain_callbacks.interaction import CDInteraction, IntegratedHessians
from explain_callbacks.metrics import Deletion
from explain_callbacks.metrics.functional import deletion


class FakeClock:
    """A clock that advances only when the model below runs: by ``cost(rows)`` per call."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def per_row_cost(best: int) -> callable:
    """Seconds for a call of ``n`` rows: per row 1 ms at ``best`` rows, 20 % more per doubling or halving."""
    return lambda n: n * 1e-3 * (1 + 0.2 * abs(math.log2(n / best)))


class Timed(nn.Module):
    """A small MLP that records its calls and advances ``clock`` by ``cost(rows)`` per call."""

    def __init__(self, clock: FakeClock, cost: callable, d: int = 6) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 16), nn.Softplus(), nn.Linear(16, 3))
        self.clock, self.cost = clock, cost
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):  # not when CD traces the forward symbolically
            self.calls.append(x.shape[0])
            self.clock.now += self.cost(x.shape[0])
        return self.net(x)


def test_the_fastest_candidate_is_kept_cached_and_shown():
    clock = FakeClock()
    model = Timed(clock, per_row_cost(64))
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    with auto_rows(measure=True, clock=clock, budget_s=1e9):
        sal = Saliency()
        sal(model, x, y)
        choice = sal.rows_choice
        assert sal.batch_size == choice.rows == 64 and choice.how == "measured" and choice.kind == "grad"
        # the rule's 256 first (a tiny MLP), 512 slower, so down: 128, 64, then 32 is slower and ends the search
        assert [r for r, _ in choice.timings] == [256, 512, 128, 64, 32]
        assert dict(choice.timings)[64] == pytest.approx(1e-3)
        assert "batch_size=auto -> 64 rows/call (forward+backward measured: " in repr(sal)
        assert "64: 1 ms/row" in repr(sal) and "512: 1.6 ms/row" in repr(sal)
        # cached: the next call makes the method's calls only (one of 5 rows)
        model.calls.clear()
        Saliency()(model, x, y)
        assert model.calls == [5]
        # another kind of pass is measured on its own
        model.calls.clear()
        assert resolve_batch_size("auto", model, x, kind="forward") == 64
        assert model.calls and max(model.calls) == 512
        # another row shape (and another dtype) are measured again; a fixed int wins without measuring
        model.calls.clear()
        x3 = torch.randn(5, 6).double()
        model.double()
        assert resolve_batch_size("auto", model, x3, kind="forward") == 64 and model.calls
        model.calls.clear()
        assert Saliency(batch_size=2)(model, x3, y).shape == x3.shape
        assert model.calls == [2, 2, 1]


def test_budget_and_tolerance_bound_the_search():
    clock = FakeClock()
    model = Timed(clock, per_row_cost(8))
    x = torch.randn(3, 6)
    # one timed call of the rule's 256 rows costs 0.256 * 2 s: the budget stops after it
    with auto_rows(measure=True, clock=clock, budget_s=0.1, repeats=1):
        choice = choose_rows("auto", model, x, kind="forward")
        assert choice.rows == AUTO_ROWS_MAX and [r for r, _ in choice.timings] == [256]
    # a flat cost within the tolerance: the search climbs to rows_max and keeps the largest of equals
    # (min_gain=0: every doubling is worth timing)
    model.cost = lambda n: n / 1024  # exact in binary: equal per-row times compare equal
    with auto_rows(measure=True, clock=clock, budget_s=1e9, rows_max=1024, min_gain=0.0):
        choice = choose_rows("auto", model, x, kind="forward")
        assert [r for r, _ in choice.timings] == [256, 512, 1024] and choice.rows == 1024
    # by default a doubling that gains less than 2 % per row ends the search (the next would cost twice
    # the rows to time for less): flat costs stop at the first doubling, the larger of equals kept
    with auto_rows(measure=True, clock=clock, budget_s=1e9, rows_max=1024):
        choice = choose_rows("auto", model, x, kind="forward")
        assert [r for r, _ in choice.timings] == [256, 512] and choice.rows == 512
    # gains of 10 % per doubling go on: 256 -> 512 -> 1024
    model.cost = lambda n: n / 1024 * {256: 1.0, 512: 0.9}.get(n, 0.81)
    with auto_rows(measure=True, clock=clock, budget_s=1e9, rows_max=1024):
        choice = choose_rows("auto", model, x, kind="forward")
        assert [r for r, _ in choice.timings] == [256, 512, 1024] and choice.rows == 1024
    # within the tolerance (5 %) the larger call wins: 512 rows 3 % slower per row than 256, 1024 20 % slower
    model.cost = lambda n: n / 1024 * {256: 1.0, 512: 1.03}.get(n, 1.2)
    with auto_rows(measure=True, clock=clock, budget_s=1e9, rows_max=1024, min_gain=0.0):
        choice = choose_rows("auto", model, x, kind="forward")
        assert [r for r, _ in choice.timings] == [256, 512, 1024, 128] and choice.rows == 512  # 128: no new best
    # the memory bound: candidates stop where the activation elements per call would exceed it
    # 6 + 16 + 16 + 3 = 41 activation elements per row
    with auto_rows(measure=True, clock=clock, budget_s=1e9, elements_max=300 * 40):
        choice = choose_rows("auto", model, x, kind="forward")
        assert max(r for r, _ in choice.timings) <= 300 and choice.rows <= 300


@auto_rows(measure=True)
def test_measurement_leaves_the_model_exactly_as_found():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).train()  # fmt: skip
    net[3].eval()
    net[6].weight.requires_grad_(False)
    net[0].weight.grad = torch.ones_like(net[0].weight)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    flags = [p.requires_grad for p in net.parameters()]
    x = torch.rand(4, 3, 8, 8)
    rng = torch.get_rng_state()
    with torch.no_grad():  # the caller's grad mode does not matter: backward passes still measured
        for kind in ("forward", "grad", "double"):
            assert choose_rows("auto", net, x, kind=kind).how == "measured"
    with torch.inference_mode():  # nor inference-mode inputs
        assert choose_rows("auto", net, x.clone(), kind="grad").how == "measured"
    assert [m.training for m in net.modules()] == modes
    assert [p.requires_grad for p in net.parameters()] == flags
    assert torch.equal(net[0].weight.grad, torch.ones_like(net[0].weight))
    assert all(p.grad is None for n, p in net.named_parameters() if n != "0.weight")
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # weights and BatchNorm statistics
    assert torch.equal(torch.get_rng_state(), rng)


def test_every_family_measures_its_own_kind_of_pass():
    """Gradient methods time forward+backward, create_graph and Hessian methods double backward, black-box
    methods, CD and the metrics forwards: after each call that kind is cached (no further model call)."""
    torch.manual_seed(0)
    clock = FakeClock()
    model = Timed(clock, per_row_cost(32))
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])

    def cached(kind: str) -> bool:
        model.calls.clear()
        choice = choose_rows("auto", model, x, kind=kind)
        return not model.calls and choice.how == "measured" and choice.rows == 32

    with auto_rows(measure=True, clock=clock, budget_s=1e9):
        IntegratedGradients(n_steps=4)(model, x, y)
        assert cached("grad") and not cached("double")
    with auto_rows(measure=True, clock=clock, budget_s=1e9):
        IntegratedGradients(n_steps=4)(model, x, y, create_graph=True)
        assert cached("double") and not cached("forward")
    with auto_rows(measure=True, clock=clock, budget_s=1e9):
        IntegratedHessians(n_steps=2)(model, x, y)
        assert cached("double") and not cached("grad")
    with auto_rows(measure=True, clock=clock, budget_s=1e9):
        Occlusion(window=2)(model, x, y)
        assert cached("forward") and not cached("grad")
    with auto_rows(measure=True, clock=clock, budget_s=1e9):
        CDInteraction()(model, x, y)
        assert cached("forward")
    with auto_rows(measure=True, clock=clock, budget_s=1e9):
        deletion(model, x, torch.randn(4, 6), y)
        assert cached("forward")
    with auto_rows(measure=True, clock=clock, budget_s=1e9):
        metric = Deletion()
        metric.update(model, x, torch.randn(4, 6), y)
        assert cached("forward") and "batch_size=auto -> 32 rows/call (forward measured" in repr(metric)


@auto_rows(measure=True)
def test_a_failing_measurement_falls_back_to_the_rule():
    """A model whose output cannot be read without output_key: the timed pass fails, the rule's choice
    stands and says why, and the method raises the model's own error as before."""

    class DictOut(nn.Module):
        def forward(self, x: torch.Tensor) -> dict:
            return {"scores": x.sum(1, keepdim=True)}

    choice = choose_rows("auto", DictOut(), torch.randn(3, 4), kind="grad")
    assert choice.how == "rule" and "measuring failed" in choice.describe()


def test_auto_rows_rejects_unknown_settings():
    with pytest.raises(TypeError, match="unknown settings"), auto_rows(mesure=False):
        pass


@pytest.mark.parametrize("create_graph", [False, True])
def test_path_methods_make_calls_of_exactly_the_chunk(create_graph):
    """IG's n_steps x B points and EG's draws go in calls of exactly ``batch_size`` rows (a call may end one
    step and start the next), not in whole steps: 3 samples x 5 steps in calls of 4 rows are 4, 4, 4, 3
    (whole steps would make five calls of 3). The map is the one of a single call."""
    from explain_callbacks.attribution import ExpectedGradients
    from tests.test_blackbox_core import CountingModel

    torch.manual_seed(0)
    model = CountingModel(nn.Sequential(nn.Linear(6, 16), nn.Softplus(), nn.Linear(16, 3)))
    x, y, ref = torch.randn(3, 6), torch.tensor([0, 2, 1]), torch.randn(7, 6)
    for make in (
        lambda bs: IntegratedGradients(n_steps=5, completeness=False, batch_size=bs),
        lambda bs: ExpectedGradients(reference=ref, n_samples=5, batch_size=bs),
    ):
        whole = make(None)(model, x, y, create_graph=create_graph)
        model.calls.clear()
        cut = make(4)(model, x, y, create_graph=create_graph)
        assert model.calls == [4, 4, 4, 3]
        torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-6)
        assert cut.requires_grad == create_graph
