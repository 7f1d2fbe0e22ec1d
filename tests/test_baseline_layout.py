"""Layout-dependent baselines: IG's ``"mean"``/``"blur"`` on (B, T, D) sequences run over time, as the
metrics' substrates do (issue 16, item 16)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain_callbacks._internal.ops import gaussian_blur
from explain_callbacks.attribution import IntegratedGradients, make_baseline
from explain_callbacks.metrics.functional._utils import make_substrate as metric_substrate
from explain_callbacks.metrics.functional._utils import steps_last


class _StepLinear(nn.Module):
    """A (B, T, D) model, linear in its input: f(x) = Σ_t Σ_d w_d x_td (the Linear reads the last dim)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 1, bias=False)

    def forward(self, x):
        return self.lin(x).sum(1)


def _ig_baseline(model: nn.Module, x: torch.Tensor, w: torch.Tensor, **kw) -> torch.Tensor:
    """x' recovered from IG of a model linear in x: IG = (x − x')·w exactly."""
    a = IntegratedGradients(n_steps=4, completeness=False, **kw)(model, x, None)
    return x - a / w


def test_ig_mean_baseline_of_a_sequence_is_each_features_mean_over_time():
    torch.manual_seed(0)
    model = _StepLinear(3)
    x = torch.randn(4, 9, 3, dtype=torch.float64)
    model.double()
    w = model.lin.weight.detach().view(1, 1, 3)
    base = _ig_baseline(model, x, w, baseline="mean")
    torch.testing.assert_close(base, x.mean(1, keepdim=True).expand_as(x))
    # the metrics' "mean" substrate for the same model and inputs
    assert steps_last(model, x, None, True)
    torch.testing.assert_close(base, metric_substrate("mean", x.transpose(1, 2)).transpose(1, 2))
    # an explicit channels_first=True reads (B, C, L): the mean over the last dim, per step
    forced = _ig_baseline(model, x, w, baseline="mean", channels_first=True)
    torch.testing.assert_close(forced, x.mean(2, keepdim=True).expand_as(x))


def test_blur_baseline_of_a_sequence_runs_over_time_and_signals_are_unchanged():
    torch.manual_seed(1)
    x = torch.randn(2, 20, 4)
    seq_model = nn.Sequential(nn.Linear(4, 1))
    got = make_baseline("blur", x, sigma=2.0, model=seq_model)
    torch.testing.assert_close(got, gaussian_blur(x.transpose(1, 2), 2.0).transpose(1, 2))
    conv = nn.Sequential(nn.Conv1d(20, 2, 3))  # reads (B, C, L): positions last, as before
    torch.testing.assert_close(make_baseline("mean", x, model=conv), x.mean(2, keepdim=True).expand_as(x))
    torch.testing.assert_close(make_baseline("mean", x), x.mean(2, keepdim=True).expand_as(x))  # no model


def test_channels_first_is_validated():
    with pytest.raises(ValueError, match="channels_first"):
        IntegratedGradients(channels_first="yes")
