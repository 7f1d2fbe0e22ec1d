"""The monitors' time budget: ``budget=0.05`` explains less often and on fewer probes, keeps the explaining time
within the budget, and decides deterministically from the measured times (an injected clock, not wall time)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

from explain_callbacks.attribution import Attributor
from explain_callbacks.callbacks import AttributionMonitor, InteractionMonitor
from explain_callbacks.callbacks.spray_monitor import SpRAyMonitor

from .helpers_lightning import image_loaders, lit, trainer


class FakeClock:
    """Seconds that pass only when the test says so: one per training batch, ``cost`` per explained probe."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Ticks(pl.Callback):
    def __init__(self, clock: FakeClock, per_batch: float) -> None:
        self.clock, self.per_batch = clock, per_batch

    def on_train_batch_end(self, *args) -> None:
        self.clock.now += self.per_batch


class SlowSaliency(Attributor):
    """|input| as the map, costing ``cost`` fake seconds per sample."""

    name = "slow"

    def __init__(self, clock: FakeClock, cost: float) -> None:
        super().__init__()
        self.clock, self.cost = clock, cost
        self.calls: list[int] = []

    def attribute(self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False):
        self.clock.now += self.cost * inputs.shape[0]
        self.calls.append(inputs.shape[0])
        return inputs.abs()


def _fit(tmp_path, budget: float | None, epochs: int = 6, cost: float = 0.3):
    """6 batches per epoch at 1 s each; the method costs ``cost`` s per probe (8 probes: 2.4 s per epoch, 40 %)."""
    clock = FakeClock()
    method = SlowSaliency(clock, cost)
    mon = AttributionMonitor(methods=[method], num_samples=8, budget=budget, log_images=False, log_histograms=False)
    mon.clock = clock
    train, val = image_loaders()
    t = trainer(tmp_path, [Ticks(clock, 1.0), mon], max_epochs=epochs, logger=False)
    t.fit(lit(), train, val)
    return mon, method, clock


def _expected_log(budget: float, epochs: int, per_epoch: float, cost: float, n: int) -> list[tuple[int, int]]:
    """The budget rule on paper: after epoch e's training (per_epoch fake seconds each), with S spent so far,
    A = budget * (elapsed - S) - S; k = 1 before any measurement, else floor(A / cost) capped at n and at twice the
    largest piece so far (the piece grows geometrically from the first), 0 skips."""
    log, spent, measured, largest = [], 0.0, False, 0
    for e in range(epochs):
        elapsed = (e + 1) * per_epoch + spent
        allowed = budget * (elapsed - spent) - spent
        if allowed <= 0:
            continue
        k = 1 if not measured else int(min(n, allowed // cost, 2 * largest))
        if k <= 0:
            continue
        log.append((e, k))
        spent += k * cost
        measured, largest = True, max(largest, k)
    return log


# Fake times are binary fractions (1/16, 0.75 s, ...), so the rule's floor divisions meet no rounding edge.
def test_budget_explains_less_often_and_within_budget(tmp_path):
    _, free_method, _ = _fit(tmp_path / "free", budget=None, cost=0.75)
    assert free_method.calls == [8] * 6  # every epoch, every probe: 36 s of explaining on 36 s of training
    mon, method, _ = _fit(tmp_path / "budget", budget=1 / 16, cost=0.75)
    assert mon.budget_log == [(0, 1), (3, 1), (5, 1)]  # less often (and on one probe)
    assert mon.budget_log == _expected_log(1 / 16, 6, 6.0, 0.75, 8)
    assert [k for _, k in mon.budget_log] == method.calls
    assert mon._spent == pytest.approx(0.75 * sum(method.calls))
    assert mon._spent <= 6 * 6.0 / 16  # within the budget of the training time
    again, _, _ = _fit(tmp_path / "again", budget=1 / 16, cost=0.75)
    assert again.budget_log == mon.budget_log  # deterministic given the measured times


def test_budget_explains_fewer_probes_when_all_would_not_fit(tmp_path):
    mon, _, _ = _fit(tmp_path, budget=0.125, cost=0.25)
    assert mon.budget_log == _expected_log(0.125, 6, 6.0, 0.25, 8) == [(0, 1), (1, 2), (2, 4), (3, 5), (4, 3), (5, 3)]
    assert mon._spent <= 0.125 * 36
    assert "drift" in mon.last_scores["slow"]  # drift over the probes both epochs explained


def test_a_generous_budget_explains_every_epoch_on_every_probe_after_measuring(tmp_path):
    _, method, _ = _fit(tmp_path, budget=1.0, cost=1 / 64)
    assert method.calls == [1, 2, 4, 8, 8, 8]  # one probe measures the cost, then the piece doubles up to all


def test_validate_and_test_ignore_the_budget(tmp_path):
    mon, method, _ = _fit(tmp_path, budget=0.01, epochs=2)
    t = trainer(tmp_path, [mon], logger=False)
    calls = len(method.calls)
    t.validate(lit(), image_loaders()[1])
    assert method.calls[calls:] == [8]


def test_budget_is_checked():
    with pytest.raises(ValueError, match="budget is a fraction"):
        AttributionMonitor(budget=5)
    assert InteractionMonitor(budget=0.05).budget == 0.05
    assert SpRAyMonitor.budget_scales_probes is False


def test_budget_decision_is_the_maximum_over_ranks(monkeypatch):
    """Under DDP the decision reads the ranks' maximum times (here a fake 2-rank gather): the slowest rank's
    cost decides for all, so every rank explains the same epochs on the same number of probes."""
    mon = AttributionMonitor(methods=["saliency"], num_samples=8, budget=0.125)

    class Strategy:
        root_device = torch.device("cpu")

        @staticmethod
        def all_gather(t: Tensor) -> Tensor:
            other = t.clone()
            other[2] = 4 * t[2]  # the other rank is 4x slower per probe
            return torch.stack([t, other])

    class State:
        from lightning.pytorch.trainer.states import TrainerFn

        fn = TrainerFn.FITTING

    class FakeTrainer:
        world_size, strategy, state, fast_dev_run = 2, Strategy, State, False

    mon.probe_x = torch.zeros(8, 1, 4, 4)
    mon._fit_started, mon._spent, mon._per_probe = 0.0, 0.0, 0.125
    mon.clock = lambda: 16.0
    # A = 0.125 * 16 = 2 s: at this rank's 0.125 s per probe all 8, at the slower rank's 0.5 s 4, on both ranks
    assert mon.budget_probes(FakeTrainer) == 4
    FakeTrainer.world_size = 1
    assert mon.budget_probes(FakeTrainer) == 8


@pytest.mark.ddp
def test_budget_decisions_agree_under_ddp():
    """Rank 1 is 4x slower per probe than rank 0: with each rank deciding alone, rank 0 would explain all 4 probes on
    the second epoch while rank 1 skips it (a collective entered by one rank: a hang). Agreed on the maximum times,
    both ranks follow the slow rank's cost."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONWARNINGS="ignore", PL_DISABLE_FORK="1")
    out = subprocess.run([sys.executable, str(root / "tests" / "scripts" / "ddp_budget.py")], capture_output=True,
                         text=True, timeout=300, env=env, cwd=root)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    logs = dict(re.findall(r"RANK(\d) LOG (\[[^\]]*\])", out.stdout))  # the ranks write to one stream
    assert set(logs) == {"0", "1"}, out.stdout[-2000:]
    assert logs["0"] == logs["1"] == str(_expected_log(0.25, 6, 3.0, 1.0, 4))  # the slow rank's cost decides
    assert logs["0"] != str(_expected_log(0.25, 6, 3.0, 0.25, 4))  # what rank 0 alone would have done


def test_attribution_monitor_defaults_to_two_percent_of_training(tmp_path):
    """``AttributionMonitor()`` runs under budget=0.02 (issue 22, item 3): with a method costing 40 % of an
    epoch on all 8 probes, it explains what fits 2 % of the training time, as the budget rule says."""
    clock = FakeClock()
    method = SlowSaliency(clock, 0.3)
    mon = AttributionMonitor(methods=[method], log_images=False, log_histograms=False)
    assert mon.budget == 0.02 and mon.num_samples == 8
    mon.clock = clock
    train, val = image_loaders()
    trainer(tmp_path, [Ticks(clock, 1.0), mon], max_epochs=6, logger=False).fit(lit(), train, val)
    per_epoch = 6.0
    assert mon.budget_log == _expected_log(0.02, 6, per_epoch, 0.3, 8)
    spent = sum(k for _, k in mon.budget_log) * 0.3
    assert spent <= 0.02 * 6 * per_epoch + 0.3  # within the budget up to one probe's cost
