"""The metrics' work besides model calls, made cheaper, gives the same values.

Perturbation metrics score every model call's output (softmax, gather at the target, cast, copy into
the result): on a cheap model these few small operations per call cost as much as the model. They are
now kept and scored together (``ScoreRows``); the references below score each call as it returns, as
the metrics did before, and the values must agree to 1e-6 (float64 models: to rounding).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from explain_callbacks.metrics import functional as MF
from explain_callbacks.metrics.functional import _utils as U
from explain_callbacks.metrics.functional._utils import (
    ScoreRows,
    expand_feature_mask,
    feature_relevance,
    flat_call_scores,
    flat_calls,
    make_substrate,
    n_steps_of,
    output_scores,
    rank_features,
    scores_chunked,
)


def _reference_flat_scores(model, x, target, n_runs, output, batch_size, fill) -> Tensor:
    """flat_call_scores as before: each call's output scored as it returns."""
    b = x.shape[0]
    tgt = None if target is None else target.repeat(n_runs)
    scores = torch.empty(n_runs * b, dtype=torch.float64)
    for call, pieces in flat_calls(n_runs, b, batch_size):
        n = call.stop - call.start
        buf = torch.empty((n, *x.shape[1:]), dtype=x.dtype)
        for run, samples, at in pieces:
            fill(run, samples, buf[at])
        scores[call] = output_scores(model, buf, None if tgt is None else tgt[call], output).double()
    return scores


class _Seg(nn.Module):
    """(B, D) -> (B, K, 3): an output with a trailing dim (scored call by call, summed after the gather)."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 3 * k)
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x).view(x.shape[0], self.k, 3)


def _models(d: int, k: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "classes": nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, k)).double().eval(),
        "one_output": nn.Sequential(nn.Linear(d, 1), nn.Flatten(0)).double().eval(),
        "segmentation": _Seg(d, k).double().eval(),
        "view_of_input": nn.Flatten().double().eval(),  # returns its input: the buffer refilled each call
    }


@pytest.mark.parametrize("name", ["classes", "one_output", "segmentation", "view_of_input"])
@pytest.mark.parametrize("output", ["probability", "sigmoid"])
@pytest.mark.parametrize("batch_size", [3, None])
def test_flat_call_scores_equal_per_call_scoring(name: str, output: str, batch_size: int | None) -> None:
    d, k, b, n_runs = 6, 6, 5, 4
    model = _models(d, k)[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    target = None if name == "one_output" else torch.randint(0, k, (b,), generator=g)
    noise = torch.randn(n_runs, b, d, generator=g, dtype=torch.float64)

    def fill(run: int, samples: slice, out: Tensor) -> None:
        out.copy_(x[samples] + noise[run, samples])

    ours = flat_call_scores(model, x, target, n_runs, output, batch_size, fill)
    ref = _reference_flat_scores(model, x, target, n_runs, output, batch_size, fill)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_outputs_are_scored_together_and_flushed_at_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _models(6, 4)["classes"]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    t = torch.randint(0, 4, (30,), generator=g)
    calls: list[int] = []
    score = U.score_outputs

    def counted(out: Tensor, target: Tensor | None, output: str) -> Tensor:
        calls.append(out.shape[0])
        return score(out, target, output)

    ref = torch.cat([output_scores(model, x[s : s + 4], t[s : s + 4], "probability").double() for s in range(0, 30, 4)])
    monkeypatch.setattr(U, "score_outputs", counted)
    torch.testing.assert_close(scores_chunked(model, x, t, "probability", 4), ref, rtol=0, atol=1e-12)
    assert calls == [30]  # 8 model calls, one scoring
    calls.clear()
    monkeypatch.setattr(ScoreRows, "CAP", 4 * 8)  # 8 rows of 4 classes: scored every second call
    torch.testing.assert_close(scores_chunked(model, x, t, "probability", 4), ref, rtol=0, atol=1e-12)
    assert calls == [8, 8, 8, 6]


def test_score_rows_refuses_missing_rows() -> None:
    s = ScoreRows(5, None, "logit", torch.device("cpu"))
    s.add(torch.zeros(3))
    with pytest.raises(RuntimeError, match="got 3 rows, expected 5"):
        s.result()


def _cnn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    ).double().eval()  # fmt: skip


def _data() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(4)
    x = torch.rand(4, 2, 6, 6, generator=g, dtype=torch.float64)
    a = torch.randn(4, 2, 6, 6, generator=g, dtype=torch.float64)
    return x, a, torch.randint(0, 5, (4,), generator=g)


@pytest.mark.parametrize("batch_size", [3, 10, 16, None])
@pytest.mark.parametrize("features", ["pixel", "element"])
def test_deletion_and_insertion_curves_equal_the_per_step_definition(batch_size: int | None, features: str) -> None:
    """Each point of the curve, built step by step from the ranking and scored on its own."""
    model, (x, a, y) = _cnn(), _data()
    for mode, fn, substrate in (("deletion", MF.deletion, "min"), ("insertion", MF.insertion, "blur")):
        _, curve, _ = fn(model, x, a, y, n_steps=7, features=features, substrate=substrate, batch_size=batch_size,
                         return_curve=True)  # fmt: skip
        rel, fmode = feature_relevance(a, x, features)
        n = rel.shape[1]
        step, n_st = n_steps_of(n, 7, None)
        ranks = rank_features(rel, "random", 0)
        sub = make_substrate(substrate, x)
        ref = []
        for k in range(n_st + 1):
            gone = expand_feature_mask(ranks < k * step, x.shape, fmode)
            kept, other = (x, sub) if mode == "deletion" else (sub, x)
            ref.append(output_scores(model, torch.where(gone, other, kept), y, "probability").double())
        torch.testing.assert_close(curve, torch.stack(ref, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch_size", [3, 8, 10, None])
def test_mufidelity_equals_per_subset_drops(batch_size: int | None) -> None:
    """Pearson correlation of Σ_subset A and f(x) − f(x with the subset at the baseline), per subset."""
    model, (x, a, y) = _cnn(), _data()
    g = torch.Generator().manual_seed(5)
    n = x[0].numel()
    subsets = torch.stack([torch.stack([torch.randperm(n, generator=g)[:9] for _ in range(6)]) for _ in range(4)])
    ours = MF.mufidelity(model, x, a, y, subsets=subsets, correlation="pearson", baseline="min", features="element",
                         output="logit", batch_size=batch_size)  # fmt: skip
    base = make_substrate("min", x)
    fx = output_scores(model, x, y, "logit").double()
    for i in range(4):
        drops, sums = [], []
        for r in range(6):
            m = torch.zeros(n, dtype=torch.bool)
            m[subsets[i, r]] = True
            xi = torch.where(m.view_as(x[i]), base[i], x[i])
            drops.append(fx[i] - output_scores(model, xi[None], y[i : i + 1], "logit").double()[0])
            sums.append(a[i].reshape(-1)[m].sum())
        ref = torch.corrcoef(torch.stack([torch.stack(sums), torch.stack(drops)]))[0, 1]
        assert abs(float(ours[i]) - float(ref)) < 1e-6


def test_completeness_error_equals_its_definition() -> None:
    model, (x, a, y) = _cnn(), _data()
    for bs in (3, None):
        ours = MF.completeness_error(model, x, a, y, batch_size=bs, relative=False)
        out = model(x).gather(1, y[:, None])[:, 0] - model(torch.zeros_like(x)).gather(1, y[:, None])[:, 0]
        torch.testing.assert_close(ours, (a.flatten(1).sum(1) - out).abs().detach(), rtol=0, atol=1e-9)
