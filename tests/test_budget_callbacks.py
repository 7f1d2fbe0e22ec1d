"""Every monitoring callback's time budget (``budget=0.02`` by default): the decisions of the shared rule
(:class:`~explain_callbacks.callbacks.base.TimeBudget`) for each kind of work (probes, a whole probe, student-fit rows,
masker steps, basin-hopping seconds), read on an injected clock so they are reproducible, and a resumed fit going on
with the budget it had."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from explain_callbacks.analysis import landscape_analysis
from explain_callbacks.analysis.landscape import basin_hopping
from explain_callbacks.callbacks import (
    ConceptMonitor,
    Distiller,
    InfluenceMonitor,
    InteractionMonitor,
    LandscapeMonitor,
    SaliencyMasker,
    SpRAyMonitor,
)

from .helpers_lightning import image_loaders, lit, trainer
from .test_budget import FakeClock, Ticks

BUDGETED = (InteractionMonitor, ConceptMonitor, InfluenceMonitor, SpRAyMonitor, LandscapeMonitor, SaliencyMasker,
            Distiller)  # fmt: skip
# what they train or search is the point of using them: a 2 % share leaves a masker untrained and a landscape
# with its start's minimum alone, so they run their full schedule unless given a share
FULL_BY_DEFAULT = (LandscapeMonitor, SaliencyMasker)


@pytest.mark.parametrize("cls", BUDGETED, ids=lambda c: c.__name__)
def test_every_monitoring_callback_defaults_to_two_percent(cls):
    assert cls().budget == (None if cls in FULL_BY_DEFAULT else 0.02)
    assert cls(budget=0.02).budget == 0.02
    assert cls(budget=None).budget is None
    with pytest.raises(ValueError, match="budget is a fraction"):
        cls(budget=2.0)


def _paper(budget: float, epochs: int, per_epoch: float, cost: float, n: int, scales: bool) -> list[tuple[int, int]]:
    """The rule on paper for probes: after epoch e's training, A = budget * training - spent; before a measurement
    one probe (all without scaling), then floor(A / cost) probes capped at n and at twice the largest piece so far
    (geometric growth from the first; without scaling all n or none)."""
    log, spent, measured, largest = [], 0.0, False, 0
    for e in range(epochs):
        allowed = budget * (e + 1) * per_epoch - spent
        if allowed <= 0:
            continue
        k = (1 if scales else n) if not measured else int(min(n, allowed // cost))
        if scales and measured:
            k = min(k, 2 * largest)
        if not scales and k < n:
            k = 0
        if k <= 0:
            continue
        log.append((e, k))
        spent += k * cost
        measured, largest = True, max(largest, k)
    return log


@pytest.mark.parametrize(
    ("cls", "kwargs", "scales"),
    [
        # probes as the unit: a method whose pair scores depend on every group (CD alone: tests/test_budget_pieces.py)
        (InteractionMonitor, {"methods": ["integrated_hessians"]}, True),
        (ConceptMonitor, {}, True),
        (SpRAyMonitor, {"every_n_epochs": 1, "per_class": None, "num_samples": 8}, False),  # clusters: whole probe
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_probe_monitors_skip_and_shrink_by_the_rule(tmp_path, monkeypatch, cls, kwargs, scales):
    """Each probe monitor's explanation (replaced by one costing 0.25 fake s per probe) under budget 1/8 on 6 s epochs:
    the explained epochs and probe counts are the rule's, with or without shrinking the probe."""
    clock = FakeClock()
    sizes: list[int] = []

    def explain(trainer, pl_module, x, y, target):
        clock.now += 0.25 * x.shape[0]
        sizes.append(x.shape[0])

    mon = cls(budget=0.125, **kwargs)
    mon.clock = clock
    monkeypatch.setattr(mon, "explain", explain)
    train, val = image_loaders()
    trainer(tmp_path, [Ticks(clock, 1.0), mon], max_epochs=6, logger=False).fit(lit(), train, val)
    n = mon.probe_size
    assert mon.budget_log == _paper(0.125, 6, 6.0, 0.25, n, scales)
    assert [k for _, k in mon.budget_log] == sizes
    if not scales:
        assert set(sizes) == {n}
    assert mon._spent <= 0.125 * 36 + 0.25 * (1 if scales else n)  # within the budget, up to the measuring piece


def test_masker_trains_on_the_batches_the_budget_allows(tmp_path, monkeypatch):
    """A masker step costing 2 fake s against 1 s training batches under budget 1/4: a step when
    budget × training − spent covers one more (after the first, which measures), as the rule says."""
    clock = FakeClock()
    steps: list[float] = []
    mon = SaliencyMasker(budget=0.25, log_images=False)
    mon.clock = clock

    def step(pl_module, batch):
        clock.now += 2.0
        steps.append(clock.now)

    monkeypatch.setattr(mon, "_train_step", step)
    train, val = image_loaders()
    trainer(tmp_path, [Ticks(clock, 1.0), mon], max_epochs=4, logger=False).fit(lit(), train, val)
    expected, spent = [], 0.0
    for batch in range(1, 25):  # 4 epochs of 6 batches; the tick comes before the masker's decision
        allowed = 0.25 * batch - spent
        if allowed > 0 and (not expected or allowed >= 2.0):
            spent += 2.0
            expected.append(batch)
    assert len(steps) == len(expected) == 3 and expected == [1, 16, 24]
    free = SaliencyMasker(budget=None, log_images=False)
    count: list[int] = []
    monkeypatch.setattr(free, "_train_step", lambda m, b: count.append(1))
    trainer(tmp_path / "free", [free], max_epochs=2, logger=False).fit(lit(), *image_loaders())
    assert len(count) == 12  # the paper's schedule: every batch


_TEACHER_PASS = Distiller._forward


def _distill(tmp_path, monkeypatch, budget, cost=1 / 64, epochs=6, clock=None, ckpt=None, callbacks=()):
    clock = clock or FakeClock()
    mon = Distiller(students="tree", budget=budget, export=False, log_students=False)
    mon.clock = clock
    rows: list[int] = []

    def forward(self, pl_module, x):  # the teacher pass over the fit's rows: cost fake seconds per row
        clock.now += cost * x.shape[0]
        rows.append(x.shape[0])
        return _TEACHER_PASS(self, pl_module, x)

    monkeypatch.setattr(Distiller, "_forward", forward)
    train, val = image_loaders()
    t = trainer(tmp_path, [Ticks(clock, 1.0), mon, *callbacks], max_epochs=epochs, logger=False)
    t.fit(lit(), train, val, ckpt_path=ckpt)
    return mon, rows


def test_distiller_fits_on_the_rows_the_budget_allows(tmp_path, monkeypatch):
    """96 training rows a (6 s) epoch accumulate in the buffer, 48 validation rows; a row costs 1/64 fake s. Under
    budget 1/8 the first fit measures on budget_rows=16 rows, later fits take floor(A / cost) rows, at most twice the
    largest fit so far, when that is at least 16 (else skip), the newest training rows and the validation rows in
    proportion."""
    mon, rows = _distill(tmp_path, monkeypatch, budget=0.125)
    expected = [(0, 16), (1, 32), (2, 64), (3, 80), (4, 48), (5, 48)]
    assert mon.budget_log == _distill_paper(0.125, 6, 6.0, 1 / 64) == expected
    assert rows == [k for _, k in expected]
    assert [r["epoch"] for r in mon.history] == [e for e, _ in expected]
    assert mon.students["tree"].fitted
    free, rows = _distill(tmp_path / "free", monkeypatch, budget=None, epochs=3)
    assert rows == [144, 240, 336] and len(free.history) == 3  # every epoch on every row


def test_budget_state_survives_a_resume(tmp_path, monkeypatch):
    """A fit stopped after 3 epochs and resumed from its checkpoint to 6 makes the decisions of one 6-epoch fit:
    the spent seconds, the training time so far and the cost per row come back with the checkpoint."""
    whole, _ = _distill(tmp_path / "whole", monkeypatch, budget=0.125)
    clock = FakeClock()
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    first, _ = _distill(tmp_path / "a", monkeypatch, budget=0.125, epochs=3, clock=clock, callbacks=[ck])
    last = str(tmp_path / "ck" / "last.ckpt")
    resumed, _ = _distill(tmp_path / "b", monkeypatch, budget=0.125, clock=clock, ckpt=last)
    assert first.budget_log + resumed.budget_log == whole.budget_log
    assert resumed._spent == pytest.approx(whole._spent)
    fresh, _ = _distill(tmp_path / "c", monkeypatch, budget=0.125, epochs=3)
    assert fresh.budget_log == [(0, 16), (1, 32), (2, 64)]  # without a checkpoint: a fresh budget, measured again


def _counting_clock():
    """A clock that advances one fake second per loss evaluation of the landscape (its loss function ticks it)."""
    state = {"now": 0.0}

    def loss(out, y):
        state["now"] += 1.0
        return torch.nn.functional.cross_entropy(out, y)

    return state, loss


def _mlp():
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).long()
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)), x, y


def test_basin_hopping_stops_at_its_time_limit():
    """max_seconds: a hop begins only while the time so far plus the mean minimisation fits; the start always."""
    model, x, y = _mlp()
    state, loss = _counting_clock()

    def run(limit):
        state["now"] = 0.0
        sample = basin_hopping(model, x, y, loss, n_hops=6, seed=0, max_seconds=limit, clock=lambda: state["now"])
        return sample, state["now"]

    full, total = run(None)
    assert full.n_minimisations == 7 and not full.time_limited
    only, start = run(0.0)
    assert only.n_minimisations == 1 and only.time_limited  # the quenched start, whatever the limit
    limit = (start + total) / 2  # the start and at least one hop fit (the mean after the start is the start's cost)
    part, _ = run(limit)
    assert part.time_limited and 2 <= part.n_minimisations <= 6
    assert torch.equal(part.minima, full.minima[: part.n_minimisations])  # the same chain, cut short
    state["now"] = 0.0
    res = landscape_analysis(model, x, y, loss, n_hops=6, max_seconds=limit, clock=lambda: state["now"])
    assert any("time limit" in n for n in res.notes)


def test_landscape_monitor_hops_for_the_seconds_the_budget_leaves(tmp_path, monkeypatch):
    """At the end of fit the analysis gets budget × training − spent seconds (read on the monitor's clock)."""
    import explain_callbacks.callbacks.landscape_monitor as lm

    clock = FakeClock()
    seen: dict = {}
    original = lm.landscape_analysis

    def analysis(*args, max_seconds=None, clock=None, **kw):
        seen["limit"] = max_seconds
        return original(*args, max_seconds=max_seconds, clock=clock, **kw)

    monkeypatch.setattr(lm, "landscape_analysis", analysis)
    mon = LandscapeMonitor(budget=0.125, n_hops=2, num_train=32, align=False, compare_with=None)
    mon.clock = clock
    train, val = image_loaders()
    trainer(tmp_path, [Ticks(clock, 1.0), mon], max_epochs=2, logger=False).fit(lit(), train, val)
    assert seen["limit"] == pytest.approx(0.125 * 12)
    assert mon.result is not None
    free = LandscapeMonitor(budget=None, n_hops=2, num_train=32, align=False, compare_with=None)
    trainer(tmp_path / "free", [free], max_epochs=1, logger=False).fit(lit(), *image_loaders())
    assert seen["limit"] is None and free.result.sample.n_minimisations == 3


def _distill_paper(budget: float, epochs: int, per_epoch: float, cost: float) -> list[tuple[int, int]]:
    """The Distiller's rule on paper for image_loaders (96 training rows an epoch, 48 validation rows): the first fit on
    budget_rows=16 rows, then floor(A / cost) rows capped at twice the largest fit so far, skipped below 16."""
    log, spent, largest = [], 0.0, 0
    for e in range(epochs):
        n = 96 * (e + 1) + 48
        allowed = budget * per_epoch * (e + 1) - spent
        k = min(n, 16) if not log else int(min(n, allowed // cost, max(16, 2 * largest)))
        if allowed <= 0 or k < min(n, 16):
            continue
        log.append((e, k))
        spent += k * cost
        largest = max(largest, k)
    return log


@pytest.mark.ddp
def test_distiller_budget_decisions_agree_under_ddp():
    """Rank 1's teacher pass is 4x slower per row: deciding alone, the ranks would fit different rows (their gathers
    and student fits are collectives: a hang or different students). Agreed on the maximum times, both follow the
    slow rank's cost. The Interaction and Influence monitors' pieces likewise, in the same run."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONWARNINGS="ignore", PL_DISABLE_FORK="1")
    out = subprocess.run([sys.executable, str(root / "tests" / "scripts" / "ddp_distill_budget.py")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=root)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    logs = dict(re.findall(r"RANK(\d) LOG (\[[^\]]*\])", out.stdout))
    assert set(logs) == {"0", "1"}, out.stdout[-2000:]
    slow = _distill_paper(0.25, 4, 3.0, 1 / 16)
    assert logs["0"] == logs["1"] == str(slow)
    assert slow != _distill_paper(0.25, 4, 3.0, 1 / 64)  # what rank 0 alone would have done
    # the budget's pieces (tests/test_budget_pieces.py), in the same processes: CD decompositions and TracIn rows
    inter = dict(re.findall(r"RANK(\d) INTER (.*)", out.stdout))
    infl = dict(re.findall(r"RANK(\d) INFL (.*)", out.stdout))
    assert set(inter) == set(infl) == {"0", "1"}, out.stdout[-2000:]
    assert inter["0"] == inter["1"] and infl["0"] == infl["1"]
    assert inter["0"].startswith("[(1, 2), (1, 3)")  # the first pair, then growing
