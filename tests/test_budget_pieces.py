"""The budget's first piece is the smallest unit of work, and pieces grow geometrically from it while the budget allows
(:class:`~explain_callbacks.callbacks.base.TimeBudget`): for contextual decomposition the unit is one decomposition
(the pairs among the first groups of a probe), for TracIn one row of the influence set; decisions on an injected
clock, so they are reproducible."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn

from explain_callbacks.callbacks import InfluenceMonitor, InteractionMonitor
from explain_callbacks.interaction import build_interaction

from .helpers_lightning import event_tags, image_loaders, lit, trainer
from .test_budget import FakeClock, Ticks


def _blocks_on_paper(budget: float, epochs: int, per_epoch: float, cost: float, probes: int, p: int):
    """The rule for decompositions: the first piece is 3 (the first pair of the first probe); then
    k = min(n, floor(A / cost), 2 × the largest piece), mapped to b probes of all p groups, or one probe's first g
    groups (g(g+1)/2 <= k); the piece spends its own decompositions."""
    per_probe = p * (p + 1) // 2
    log, spent, largest = [], 0.0, 0
    for e in range(epochs):
        allowed = budget * (e + 1) * per_epoch - spent
        if allowed <= 0:
            continue
        k = 3 if not largest else int(min(probes * per_probe, allowed // cost, max(3, 2 * largest)))
        if k < 3:
            continue
        if k >= per_probe:
            b, g = min(probes, k // per_probe), p
        else:
            b, g = 1, max(x for x in range(2, p + 1) if x * (x + 1) // 2 <= k)
        units = b * g * (g + 1) // 2
        log.append((e, b, g))
        spent += units * cost
        largest = max(largest, units)
    return log


def test_interaction_pieces_start_at_one_pair_and_grow_over_groups_then_probes(tmp_path):
    """CD (the default) under budget 1/8 on 6 s epochs, a decomposition costing 1/64 fake s: the first piece is the
    pair of the first two patches of the first probe, the next ones the pairs among more patches, as the rule says;
    within the budget up to that first piece."""
    clock = FakeClock()
    mon = InteractionMonitor(budget=0.125, log_images=False)
    mon.clock = clock
    method = mon.methods["cd"]
    original = method.interactions
    seen: list[tuple[int, int]] = []

    def interactions(model, inputs, target, groups):
        clock.now += inputs.shape[0] * groups.n * (groups.n + 1) // 2 / 64
        seen.append((inputs.shape[0], groups.n))
        return original(model, inputs, target, groups)

    method.interactions = interactions
    train, val = image_loaders()
    trainer(tmp_path, [Ticks(clock, 1.0), mon], max_epochs=6).fit(lit(), train, val)
    paper = _blocks_on_paper(0.125, 6, 6.0, 1 / 64, mon.probe_size, 16)
    assert [(b, g) for _, b, g in paper] == seen
    assert seen[0] == (1, 2) and seen[1] == (1, 3)  # one pair, then growing
    assert [e for e, _ in mon.budget_log] == [e for e, _, _ in paper]
    assert mon._spent <= 0.125 * 36 + 3 / 64
    tags = event_tags(tmp_path)
    assert "cost/budget/InteractionMonitor" in {t.split("/text_summary")[0] for t in tags.get("text", set())}


def test_a_piece_of_the_first_groups_is_the_block_of_the_full_matrix():
    """CD's pair score depends on the pair alone: the pairs among the first g groups equal the full matrix's block."""
    torch.manual_seed(0)
    model = lit().eval()
    x = torch.rand(2, 1, 8, 8)
    target = torch.tensor([0, 2])
    mon = InteractionMonitor()
    cd = build_interaction("cd")
    full = cd(model, x, target)
    for g in (2, 5, 16):
        groups, (axis, note) = mon.first_groups(model, x, g)
        block = cd(model, x, target, groups=groups)
        assert block.shape == (2, g, g)
        torch.testing.assert_close(block, full[:, :g, :g], rtol=1e-5, atol=1e-6)
        assert f"the first {g} of 16" in note
        assert axis == "patch (row, col) of the 4×4 grid"  # the full grid's label, not the subset's
    assert groups.names == [mon._label(cd.last_info["groups"], i) for i in range(16)]


def test_without_a_budget_the_whole_matrix_every_epoch(tmp_path):
    mon = InteractionMonitor(budget=None, log_images=False)
    seen: list[int] = []
    method = mon.methods["cd"]
    original = method.interactions
    method.interactions = lambda m, i, t, groups: (seen.append(groups.n), original(m, i, t, groups))[1]
    trainer(tmp_path, [mon], max_epochs=2, logger=False).fit(lit(), *image_loaders())
    assert seen == [16, 16]


def _budgeted(clock):
    mon = InteractionMonitor(budget=0.25)
    mon.clock = clock
    mon._budget_start()
    fake = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING), fast_dev_run=False, world_size=1)
    return mon, fake


def test_fixed_seconds_of_a_piece_are_not_charged_per_unit():
    """A first piece of 3 units costing 1 s of figures and 3/64 s of work: charged per unit, the figures would allow
    (A - 0) // (1.05 / 3) units next; measured apart, (A - 1) // (1/64), capped at twice the first piece."""
    clock = FakeClock()
    mon, fake = _budgeted(clock)
    clock.now = 16.0  # 4 s allowed
    assert mon.budget_units(fake, 1000, first=3, kind="d") == 3
    mon.budget_spend(1.0 + 3 / 64, 3, 0, kind="d", fixed=1.0)
    assert mon._per_units["d"] == pytest.approx(1 / 64) and mon._fixed["d"] == 1.0
    clock.now = 40.0
    allowed = 0.25 * (40.0 - mon._spent) - mon._spent
    mon.budget_growth = 1000.0
    assert mon.budget_units(fake, 1000, first=3, kind="d") == int((allowed - 1.0) // (1 / 64))
    mon.budget_growth = 2.0
    assert mon.budget_units(fake, 1000, first=3, kind="d") == 6  # geometric growth from the first piece
    lumped, _ = _budgeted(clock)
    lumped.budget_spend(1.0 + 3 / 64, 3, 0, kind="d")  # not measured apart: the whole piece per unit
    assert lumped._per_units["d"] == pytest.approx((1.0 + 3 / 64) / 3)


def test_piece_sizes_and_fixed_seconds_are_checkpointed():
    clock = FakeClock()
    mon, _ = _budgeted(clock)
    mon.budget_spend(2.0, 4, 0, kind="d", fixed=1.0)
    state = mon.budget_state()
    assert state["budget_piece_units"] == {"d": 4} and state["budget_fixed"] == {"d": 1.0}
    other, _ = _budgeted(clock)
    other.load_budget_state(state)
    other._budget_start()
    assert other._piece_units == {"d": 4} and other._fixed == {"d": 1.0} and other._per_units == {"d": 0.25}
    old = {k: v for k, v in state.items() if k not in ("budget_piece_units", "budget_fixed")}
    other.load_budget_state(old)  # a checkpoint from before the growth rule: the measured cost alone decides
    other._budget_start()
    assert other._piece_units["d"] >= 2**30 and other._fixed == {}


def _influence(tmp_path, monkeypatch, budget, cost, epochs):
    """InfluenceMonitor on 32 training rows and 4 probes, every gradient row costing ``cost`` fake seconds."""
    import explain_callbacks.callbacks.influence_monitor as im

    clock = FakeClock()
    original = im.per_sample_gradients
    pieces: list[int] = []

    def grads(model, x, *args, **kw):
        clock.now += cost * x.shape[0]
        pieces.append(x.shape[0])
        return original(model, x, *args, **kw)

    monkeypatch.setattr(im, "per_sample_gradients", grads)
    mon = InfluenceMonitor(budget=budget, num_train=32, num_samples=4, model_attr="net")
    mon.clock = clock
    trainer(tmp_path, [Ticks(clock, 1.0), mon], max_epochs=epochs, logger=False).fit(lit(), *image_loaders())
    return mon, pieces


def test_influence_measures_on_one_row_and_drops_a_step_the_budget_cannot_finish(tmp_path, monkeypatch):
    """Budget 1/8 of the training time, 1/16 s per gradient row: epoch 0 measures on the probe and
    one row; no step is in the sum yet, so it completes in growing pieces (a monitor that never completes a step
    shows nothing). Later steps that do not fit are dropped: the next is whole when budget x training - spent covers
    the probe's gradients (0.25 s) and 32 rows (2 s): epoch 5, exactly at the budget."""
    mon, pieces = _influence(tmp_path, monkeypatch, 0.125, 1 / 16, 6)
    assert pieces == [4, 1, 2, 4, 8, 16, 1, 4, 32]
    assert mon.epochs == [0, 5] and mon.budget_log == [(0, 32), (5, 32)]
    assert mon._spent == pytest.approx(0.25 + 1 / 16 + 31 / 16 + 0.25 + 2.0)
    assert mon._spent <= 0.125 * 36 + 1e-9


def test_influence_pieces_sum_to_the_whole_step(tmp_path, monkeypatch):
    """Cheap rows under a generous budget: the first step grows 1, 2, 4, 8, 16 rows and the last one, and its TracIn
    scores equal those of the whole step (budget=None) on the same epoch."""
    mon, pieces = _influence(tmp_path / "b", monkeypatch, 1.0, 1 / 1024, 1)
    assert pieces == [4, 1, 2, 4, 8, 16, 1]
    whole, _ = _influence(tmp_path / "w", monkeypatch, None, 0.0, 1)
    assert mon.epochs == whole.epochs == [0]
    torch.testing.assert_close(mon.scores, whole.scores, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(mon.self_influence, whole.self_influence, rtol=1e-6, atol=1e-9)



def test_a_partial_piece_says_which_probes_it_explained(tmp_path):
    """AttributionMonitor under a budget explaining 1, then 2 of 8 probes: the text cost/budget/AttributionMonitor
    says so beside the figures; with budget=None every probe is explained and no such text is written."""
    from explain_callbacks.callbacks import AttributionMonitor

    from .test_budget import SlowSaliency

    def run(path, budget):
        clock = FakeClock()
        method = SlowSaliency(clock, 0.25)
        mon = AttributionMonitor(methods=[method], num_samples=8, budget=budget, log_images=False,
                                 log_histograms=False)  # fmt: skip
        mon.clock = clock
        trainer(path, [Ticks(clock, 1.0), mon], max_epochs=2).fit(lit(), *image_loaders())
        texts = {t.split("/text_summary")[0] for t in event_tags(path).get("text", set())}
        return method.calls, texts

    calls, texts = run(tmp_path / "b", 0.125)
    assert calls == [1, 2]
    assert "cost/budget/AttributionMonitor" in texts
    calls, texts = run(tmp_path / "n", None)
    assert calls == [8, 8] and "cost/budget/AttributionMonitor" not in texts


def test_one_off_seconds_are_spent_but_not_expected_again():
    """The first call's measurement of rows per call (batch_size="auto") happens once: a piece's one-off seconds count
    in the time spent, not in the cost per unit or the fixed cost the next pieces are sized by; a test's clock sees
    no one-off seconds (the measurement is on the real clock)."""
    clock = FakeClock()
    mon, _ = _budgeted(clock)
    mon.budget_spend(1.0 + 0.25 + 3 / 64, 3, 0, kind="d", fixed=0.25, one_off=1.0)
    assert mon._spent == pytest.approx(1.0 + 0.25 + 3 / 64)
    assert mon._per_units["d"] == pytest.approx(1 / 64) and mon._fixed["d"] == 0.25
    assert mon.one_off_mark() == 0.0
    real = InteractionMonitor()
    assert real.one_off_mark() >= 0.0 and real.one_off_since(real.one_off_mark()) == 0.0
