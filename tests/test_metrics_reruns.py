"""Explainer metrics re-run the method without repeating its checks, and give the same values.

Randomisation, sensitivity / local Lipschitz and completeness / soundness run the attribution method many
times in one call, on one model and inputs of one row shape (``MethodRuns``): the first run goes through
the method's public entry (inputs, target range, rows per call), the later ones of an unmodified
``Attributor`` straight through ``attribute``. The references below call the public entry every time
(a deep copy per randomisation step, a loop over the draws), and the values must be equal.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from explain_callbacks._internal import batching
from explain_callbacks._internal.ops import pearson, rankdata
from explain_callbacks.attribution import IntegratedGradients, Saliency
from explain_callbacks.attribution.base import Attributor
from explain_callbacks.metrics import functional as MF
from explain_callbacks.metrics.functional._utils import MethodRuns, ScoreRows, scores_chunked, tile_rows
from explain_callbacks.metrics.functional.randomisation import (
    layer_generator,
    randomisable_layers,
    randomise_layer,
    randomised_view,
)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    ).eval()


class _Seq(nn.Module):
    """An LSTM (weights also listed in ``_flat_weights``, swapped through its own ``__setattr__``) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def _data(model: nn.Module) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (8, 5, 4) if isinstance(model, _Seq) else (8, 6)
    return torch.randn(*shape, generator=g), torch.randint(0, 3, (8,), generator=g)


def _methods() -> dict[str, Attributor]:
    return {
        "saliency": Saliency(),
        "saliency_beta": Saliency(beta=5.0),  # the smoothed context must wrap the direct re-runs too
        "ig": IntegratedGradients(n_steps=4),  # last_info reset on each run
    }


class _Counting:
    """Counts the runs that went through the public entry's checks (``Attributor._prepare``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        prepare = Attributor._prepare

        def counted(method, *args, **kwargs):
            self.n += 1
            return prepare(method, *args, **kwargs)

        monkeypatch.setattr(Attributor, "_prepare", counted)


def _reference_cascade(model, x, y, method, a0, names) -> Tensor:
    """Randomisation by the book: a deep copy re-drawn layer by layer, the method's public entry each step."""
    index = {n: i for i, (n, _) in enumerate(randomisable_layers(model))}
    rank = lambda a: rankdata(a.abs().reshape(a.shape[0], -1))  # noqa: E731
    r0, copy_, rows = rank(a0), copy.deepcopy(model), []
    for n in names:
        randomise_layer(dict(copy_.named_modules())[n], layer_generator(x.device, 0, index[n]))
        rows.append(pearson(r0, rank(method(copy_, x, y))))
    return torch.stack(rows)


@pytest.mark.parametrize("net", [_mlp, _Seq])
@pytest.mark.parametrize("name", ["saliency", "saliency_beta", "ig"])
def test_randomisation_reruns_equal_the_deep_copy_reference(net, name, monkeypatch) -> None:
    model = net().eval()
    x, y = _data(model)
    method = _methods()[name]
    a0 = method(model, x, y).detach()
    counting = _Counting(monkeypatch)
    names, rows = MF.model_randomisation(model, x, y, method, a0, return_cascade=True)
    assert counting.n == 1  # one checked run, the other steps re-run directly
    info = dict(method.last_info)
    torch.testing.assert_close(rows, _reference_cascade(model, x, y, method, a0, names), rtol=0, atol=1e-12)
    # the last run's side results: those of the public entry on the fully randomised model (the reference's last)
    assert info.keys() == method.last_info.keys() and (name != "ig" or info)
    for k, v in info.items():
        torch.testing.assert_close(v, method.last_info[k], rtol=0, atol=1e-12)


@pytest.mark.parametrize("net", [_mlp, _Seq])
def test_local_lipschitz_reruns_equal_a_loop_over_the_draws(net, monkeypatch) -> None:
    model = net()
    x, y = _data(model)
    method = Saliency(batch_size=8)  # one draw per call: three runs, two of them direct
    noise = torch.randn(8, 3, *x.shape[1:], generator=torch.Generator().manual_seed(2)) * 0.1
    counting = _Counting(monkeypatch)
    ours = MF.local_lipschitz(model, x, y, method, perturbations=noise, batch_size=8)
    assert counting.n == 1
    flat = lambda t: t.reshape(8, -1).double()  # noqa: E731
    a0 = flat(method(model, x, y))
    ratios = [(flat(method(model, x + d, y)) - a0).norm(dim=1) / flat(d).norm(dim=1) for d in noise.unbind(1)]
    ref = torch.stack(ratios).max(0).values
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch_size", [4, None])  # blocks of part of a label's rows / of whole labels
@pytest.mark.parametrize("given", [False, True])
def test_soundness_reruns_equal_the_public_entry_every_time(monkeypatch, batch_size, given) -> None:
    model = _mlp()
    x, y = _data(model)
    method = Saliency(batch_size=4)  # the other labels' rows in several calls
    public = lambda m, inp, t: method(m, inp, t)  # noqa: E731  (a function: the public entry every run)
    a = method(model, x, y) if given else None
    ref = MF.completeness_soundness(model, x, y, public, a, n_other=2, batch_size=batch_size)
    counting = _Counting(monkeypatch)
    ours = MF.completeness_soundness(model, x, y, method, a, n_other=2, batch_size=batch_size)
    assert counting.n == 1
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=0, atol=0)


def test_methods_with_their_own_entry_and_functions_always_run_through_it(monkeypatch) -> None:
    class OwnCall(Saliency):
        def _call(self, model, inputs, target, *, create_graph):  # e.g. extra per-call checks
            self.calls = getattr(self, "calls", 0) + 1
            return super()._call(model, inputs, target, create_graph=create_graph)

    model = _mlp()
    x, y = _data(model)
    own = OwnCall()
    runs = MethodRuns(own)
    for _ in range(3):
        runs(model, x, y)
    assert own.calls == 3
    seen = []
    runs = MethodRuns(lambda m, inp, t: seen.append(1) or inp.clone())
    for _ in range(3):
        runs(model, x, y)
    assert len(seen) == 3


def test_the_first_run_checks_the_target_and_bad_perturbations_are_named() -> None:
    model = _mlp()
    x, _ = _data(model)
    with pytest.raises(ValueError, match="target"):
        MethodRuns(Saliency())(model, x, torch.full((8,), 7))  # 3 classes
    noise = torch.zeros(8, 2, 6)
    noise[3, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="perturbations contain NaN"):
        MF.local_lipschitz(model, x, torch.zeros(8, dtype=torch.long), Saliency(), perturbations=noise)


def test_swaps_keep_the_structure_counter_but_user_hooks_see_them() -> None:
    model = _mlp()
    x, y = _data(model)
    Saliency()(model, x, y)  # installs the package's structure hook
    params = list(model.parameters())
    before = batching._structure_version[0]
    with randomised_view(model) as (_, randomise):
        for i, (n, _) in enumerate(randomisable_layers(model)):
            randomise(n, layer_generator(x.device, 0, i))
    assert batching._structure_version[0] == before  # no structure change: no walk on the next call
    assert all(p is q for p, q in zip(model.parameters(), params))
    seen = []
    handle = torch.nn.modules.module.register_module_parameter_registration_hook(lambda *a: seen.append(a[1]))
    try:
        with randomised_view(model) as (_, randomise):
            randomise("0", layer_generator(x.device, 0, 0))
    finally:
        handle.remove()
    assert seen.count("weight") == 2 and seen.count("bias") == 2  # swapped in and put back, through setattr
    assert all(p is q for p, q in zip(model.parameters(), params))


@pytest.mark.parametrize("output", ["probability", "logit", "sigmoid"])
def test_one_call_scores_equal_the_chunked_scores(output) -> None:
    torch.manual_seed(0)
    for model in (nn.Sequential(nn.Linear(6, 3)), nn.Sequential(nn.Linear(6, 1), nn.Flatten(0))):
        x = torch.randn(10, 6)
        t = torch.randint(0, 3, (10,)) if model[0].out_features == 3 else None
        one = scores_chunked(model, x, t, output, None)
        ref = ScoreRows(10, t, output, x.device)  # how every call's output is scored when there are several
        with torch.no_grad():
            ref.add(model(x))
        torch.testing.assert_close(one, ref.result(), rtol=0, atol=0)
        torch.testing.assert_close(one, scores_chunked(model, x, t, output, 3), rtol=0, atol=1e-6)  # other calls
        assert one.dtype == torch.float64
    with pytest.raises(ValueError, match="output must be one of"):
        scores_chunked(model, x, None, "softmax", None)


def test_tile_rows_is_repeat() -> None:
    t = torch.randn(3, 2, 4)
    for n in (1, 2, 5):
        assert torch.equal(tile_rows(t, n), t.repeat(n, 1, 1))
