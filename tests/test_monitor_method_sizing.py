"""AttributionMonitor sizes the sampling methods it builds by name to a forward-pass count per explanation
(issue 22, item 3): the papers' settings cost many training epochs per explanation inside a monitor."""

from __future__ import annotations

import pytest

from explain_callbacks.attribution import HSIC, RISE, Sobol
from explain_callbacks.callbacks import AttributionMonitor


@pytest.mark.parametrize("num_samples", [4, 8, 32])
def test_named_sampling_methods_fit_the_forward_count_per_explanation(num_samples):
    m = AttributionMonitor(methods=["rise", "sobol", "hsic", "saliency"], num_samples=num_samples)
    per_probe = 2048 // num_samples
    assert m.methods["rise"].n_masks == max(64, per_probe)
    assert m.methods["hsic"].n_designs == max(64, per_probe)
    sobol = m.methods["sobol"]
    assert sobol.n_designs & (sobol.n_designs - 1) == 0  # a power of two
    passes = sobol.n_forwards((1, 32, 32))
    assert passes <= max(per_probe, 2 * 66) and (passes * 2 > per_probe or sobol.n_designs == 2)
    for name in ("rise", "hsic"):
        assert m.methods[name].n_forwards((1, 32, 32)) * num_samples <= max(2048, 64 * num_samples)


def test_counts_and_budgets_the_user_gives_win_and_none_keeps_the_papers_settings():
    m = AttributionMonitor(
        methods=[{"name": "rise", "n_masks": 4000}, {"name": "hsic", "budget": 100}, {"name": "sobol", "n_designs": 32}]
    )
    assert m.methods["rise"].n_masks == 4000
    assert m.methods["hsic"].n_designs == HSIC().n_designs and m.methods["hsic"].budget == 100
    assert m.methods["sobol"].n_designs == 32
    paper = AttributionMonitor(methods=["rise", "sobol", "hsic"], method_forwards=None)
    assert paper.methods["rise"].n_masks == RISE().n_masks
    assert paper.methods["sobol"].n_designs == Sobol().n_designs
    assert paper.methods["hsic"].n_designs == HSIC().n_designs
    inst = RISE(n_masks=3000)
    assert AttributionMonitor(methods=[inst]).methods["rise"] is inst  # instances as given
    # the monitor's batch_size still reaches methods built from names
    assert AttributionMonitor(methods=["rise"], batch_size=16).methods["rise"]._batch_size == 16
    with pytest.raises(ValueError, match="method_forwards"):
        AttributionMonitor(method_forwards=0)
