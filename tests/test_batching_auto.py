"""``batch_size="auto"``: rows per model call measured on the model's own passes, from the candidates
of an activation-count rule (the rule alone with measurement off)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain_callbacks._internal.batching import (
    AUTO_ROWS_MAX,
    AUTO_ROWS_MIN,
    CPU_ELEMENTS_PER_CALL,
    activation_elements,
    auto_rows,
    check_batch_size,
    resolve_batch_size,
)
from explain_callbacks.attribution import IntegratedGradients, Saliency
from explain_callbacks.interaction import IntegratedHessians
from explain_callbacks.metrics.functional import deletion, insertion, mufidelity
from tests.test_blackbox_core import CountingModel as Counting


def wide_cnn(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )  # fmt: skip


def test_activation_elements_counts_leaf_outputs():
    net = wide_cnn(8)
    # conv, BN, ReLU, dropout: 8x16x16 each; pool 8, flatten 8, linear 10
    assert activation_elements(net, torch.rand(1, 3, 16, 16)) == 4 * 8 * 16 * 16 + 8 + 8 + 10


@auto_rows(measure=False)
def test_auto_rows_follow_activation_size_within_bounds():
    small, big = wide_cnn(4), wide_cnn(64)
    x_small, x_big = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 64, 64)
    assert resolve_batch_size("auto", small, x_small) == AUTO_ROWS_MAX  # 1 k elements per row
    per_row = activation_elements(big, x_big[:1])  # 4 x 64 x 64 x 64 ≈ 1 M elements per row
    assert resolve_batch_size("auto", big, x_big) == max(AUTO_ROWS_MIN, CPU_ELEMENTS_PER_CALL // per_row)
    mid = wide_cnn(16)
    rows_mid = resolve_batch_size("auto", mid, torch.rand(2, 3, 32, 32))
    assert AUTO_ROWS_MIN < rows_mid < AUTO_ROWS_MAX
    assert rows_mid == CPU_ELEMENTS_PER_CALL // activation_elements(mid, torch.rand(1, 3, 32, 32))
    # ints and None as given; callables that are not modules get the GPU/default choice
    assert resolve_batch_size(7, big, x_big) == 7
    assert resolve_batch_size(None, big, x_big) is None
    assert resolve_batch_size("auto", lambda t: t.sum(1), x_big) == AUTO_ROWS_MAX
    # inputs the caller will reject: no probe, the caller's checks give the error
    assert resolve_batch_size("auto", big, [[1.0]]) == AUTO_ROWS_MAX
    with pytest.raises(TypeError, match="inputs must be a torch"):
        deletion(big, [[1.0]], torch.rand(1, 1), None)


def test_probe_leaves_the_model_exactly_as_found():
    torch.manual_seed(0)
    net = wide_cnn(6).train()
    net[3].eval()  # a mixed mode must come back as it was
    bn = net[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    x = torch.rand(3, 3, 16, 16)
    rng = torch.get_rng_state()
    modes = [m.training for m in net.modules()]
    resolve_batch_size("auto", net, x)
    assert [m.training for m in net.modules()] == modes
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
    assert all(not m._forward_hooks for m in net.modules())
    assert torch.equal(torch.get_rng_state(), rng)


@auto_rows(measure=True)
def test_probe_forks_the_rng_of_a_noisy_forward():
    class Noisy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1) + torch.rand_like(x.flatten(1))

    x = torch.rand(2, 4)
    rng = torch.get_rng_state()
    for kind in ("forward", "grad", "double"):  # the probe and the timed calls of every kind
        assert resolve_batch_size("auto", Noisy(), x, kind=kind) >= AUTO_ROWS_MIN
    assert torch.equal(torch.get_rng_state(), rng)


@auto_rows(measure=False)
def test_methods_and_metrics_chunk_by_the_resolved_rows_and_agree_with_ints():
    torch.manual_seed(0)
    net = Counting(wide_cnn(64).eval())
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([1, 2, 3])
    rows = resolve_batch_size("auto", net, x)
    assert AUTO_ROWS_MIN <= rows < 3 * 16  # IG's 16 steps x 3 samples do not fit one call
    ig = IntegratedGradients(n_steps=16, completeness=False)
    net.calls.clear()
    a = ig(net, x, y)
    assert ig.batch_size == rows  # inside (and after) a call the attribute reads as the resolved int
    assert max(net.calls) <= rows and sum(net.calls) == 3 * 16  # the probe (output width) ran in resolve_batch_size
    assert f"batch_size=auto -> {rows} rows/call (activation rule, measurement off)" in repr(ig)
    ref = IntegratedGradients(n_steps=16, completeness=False, batch_size=256)(net, x, y)
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)
    sal = Saliency()(net, x, y)
    net.calls.clear()
    d = deletion(net, x, sal, y, step=64)
    assert max(net.calls) <= rows
    torch.testing.assert_close(d, deletion(net, x, sal, y, step=64, batch_size=256))
    mu = mufidelity(net, x, sal, y, n_subsets=20, subset_size=30)
    # f(x) is scored inside the first call, beside other rows: float32 kernels round by call size (~1e-6)
    mu7 = mufidelity(net, x, sal, y, n_subsets=20, subset_size=30, batch_size=7)
    torch.testing.assert_close(mu, mu7, rtol=1e-4, atol=1e-5)


@auto_rows(measure=False)
def test_interaction_methods_resolve_too():
    torch.manual_seed(0)
    net = Counting(nn.Sequential(nn.Linear(6, 32), nn.Softplus(), nn.Linear(32, 1)))
    ih = IntegratedHessians(n_steps=4)
    ih(net, torch.rand(2, 6))
    assert ih.batch_size == AUTO_ROWS_MAX  # a small MLP: the upper bound


@pytest.mark.parametrize("bad", [0, -3, "big", 2.5, True])
def test_bad_batch_size_is_named(bad):
    with pytest.raises(ValueError, match="positive int, 'auto' or None"):
        check_batch_size(bad)
    with pytest.raises(ValueError, match="batch_size"):
        Saliency(batch_size=bad)


def test_target_check_probes_once_in_eval_mode_and_follows_a_replaced_head():
    """The output width behind the target check comes from one cached eval-mode probe: a training-mode
    BatchNorm is updated by the method's own forward only (not by a one-row probe batch, which a
    BatchNorm1d would refuse), later calls make no probe, and a replaced head is seen."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    model = Counting(net)
    x, y = torch.randn(8, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    ref = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    ref.load_state_dict(net.state_dict())
    ref(x)  # what one training-mode forward of the batch does to the statistics
    Saliency(batch_size=None)(model, x, y)
    torch.testing.assert_close(net[1].running_mean, ref[1].running_mean, rtol=0, atol=0)
    assert int(net[1].num_batches_tracked) == 1 and net.training
    Saliency(batch_size=None)(model, x, y)
    assert model.calls == [1, 8, 8]  # one probe, then the method's calls only
    with pytest.raises(ValueError, match=r"lie in \[0, 2\]"):
        Saliency(batch_size=None)(model, x, y + 1)
    assert model.calls[3:] == [1]  # a fresh probe before the error: a stale cache cannot reject
    net[3] = nn.Linear(6, 4)  # a new head: the structure changed, so it is probed again
    Saliency(batch_size=None)(model, x, y + 1)
    assert model.calls[4:] == [1, 8]


def test_deletion_and_insertion_calls_cut_across_steps():
    """The S x B perturbed rows go in calls of exactly batch_size rows (the last one shorter), a call
    ending one step and starting the next, with the curves of one call for everything."""
    torch.manual_seed(0)
    model = Counting(wide_cnn(4).eval())
    x, y = torch.rand(3, 3, 8, 8), torch.tensor([0, 4, 9])
    a = torch.randn(3, 1, 8, 8)
    for fn in (deletion, insertion):
        _, whole, _ = fn(model, x, a, y, n_steps=4, batch_size=None, return_curve=True)
        model.calls.clear()
        _, cut, _ = fn(model, x, a, y, n_steps=4, batch_size=7, return_curve=True)
        assert model.calls == [7, 7, 1]  # 5 points x 3 samples
        torch.testing.assert_close(cut, whole, rtol=1e-6, atol=1e-7)


def test_interaction_target_check_uses_the_cached_probe():
    """As for attributions: no one-row forward per call in the model's own mode (a training-mode
    BatchNorm1d refuses one row), targets out of range named."""
    from explain_callbacks.interaction import HSICInteraction

    torch.manual_seed(0)
    model = Counting(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).train())
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    method = HSICInteraction(n_designs=16, batch_size=None)
    scores = method(model, x, y)
    assert scores.shape == (5, 4, 4) and model.calls[0] == 1 and 1 not in model.calls[1:]
    with pytest.raises(ValueError, match=r"lie in \[0, 2\]"):
        method(model, x, y + 1)


def test_scripted_and_traced_models_are_probed_without_hooks():
    """ScriptModules refuse forward hooks: the probe falls back to the output size, leaves their modes
    as found, and the target check and "auto" still work."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    for model in (torch.jit.script(net.train()), torch.jit.trace(net.eval(), x)):
        training = [m.training for m in model.modules()]
        with auto_rows(measure=False):
            assert resolve_batch_size("auto", model, x) == AUTO_ROWS_MAX  # 3 + 4 elements per row
        with auto_rows(measure=True):
            assert resolve_batch_size("auto", model, x, kind="grad") >= AUTO_ROWS_MIN  # measured, modes restored
        assert Saliency()(model, x, y).shape == x.shape
        assert [m.training for m in model.modules()] == training
        with pytest.raises(ValueError, match=r"lie in \[0, 2\]"):
            Saliency()(model, x, y + 1)


def test_target_check_survives_replaced_heads():
    """A freed head's id can be reused by its replacement: the cache key holds parameter shapes, and a
    target found out of range is checked against a fresh probe before the error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 5))
    x = torch.randn(4, 8)
    for i in range(60):
        width = 3 + (i * 7) % 11
        model[2] = nn.Linear(8, width)
        Saliency(batch_size=None)(model, x, width - 1)  # valid: never rejected by a stale width
        with pytest.raises(ValueError, match="outputs"):
            Saliency(batch_size=None)(model, x, width)


def test_one_probe_cache_lookup_per_method_call(monkeypatch):
    """A method call resolving ``"auto"`` rows and checking a target looks the probe cache up at most once;
    so does a call with fixed rows (for the target); a repeated call with the same model, input kind and
    setting finds its remembered plan (``call_plan``) and looks nothing up but a fresh probe before an error."""
    import explain_callbacks._internal.batching as batching

    lookups = []
    real = batching.model_facts

    def counting(*args, **kwargs):
        lookups.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(batching, "model_facts", counting)
    model, x, y = wide_cnn(8).eval(), torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    Saliency()(model, x, y)
    assert len(lookups) == 1
    IntegratedHessians(n_steps=2)(model, x, y)
    assert len(lookups) == 2
    Saliency(batch_size=4)(model, x, y)
    assert len(lookups) == 3
    with pytest.raises(ValueError, match=r"lie in \[0, 9\]"):
        Saliency()(model, x, y + 7)  # out of range: the planned width, then a fresh probe before the error
    assert len(lookups) == 4
    Saliency(batch_size=4)(model, x, y)  # the plan of the third call
    assert len(lookups) == 4


def test_reported_method_seconds_leave_out_the_one_off_rows_measurement(monkeypatch):
    """cost/seconds (and the faithfulness ranking's cost column) is what the method costs: the first call's
    batch_size="auto" timing, 0.3 s here, is not charged to the method that happened to trigger it."""
    import time

    import lightning.pytorch as pl

    from explain_callbacks._internal import batching
    from explain_callbacks.callbacks import AttributionMonitor

    real = batching._measure

    def slow_measure(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(batching, "_measure", slow_measure)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    mon = AttributionMonitor(methods=["saliency"], metrics=[], budget=None)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    with batching.auto_rows(measure=True, budget_s=0.05):
        before = batching.measuring_seconds()
        out = mon.run_agreed(trainer, "method 'saliency'", lambda: Saliency()(net, x, y), "non-finite")
        assert batching.measuring_seconds() - before >= 0.3  # it did measure, inside the timed call
    assert out is not None and out[1] < 0.25
