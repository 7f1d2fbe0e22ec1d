"""The held-out benchmark's own machinery (benchmarks/bench_heldout.py): what it replays as bare passes,
and how ``--update`` merges rows into an existing table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from explain_callbacks._internal.batching import forget_rows
from explain_callbacks.attribution import Saliency
from explain_callbacks.metrics import functional as MF

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_heldout", BENCH / "bench_heldout.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def test_calls_are_counted_after_the_auto_rows_measurement(bench):
    """Was: the first run of a row measured batch_size='auto' (timed candidate calls), and the counting
    run was that first run, so the bare replay held thousands of rows ours never sends again."""
    model, x = _mlp(), torch.randn(8, 6)
    y = torch.randint(0, 3, (8,))
    forget_rows()  # the next "auto" call measures
    run = lambda: MF.insertion(model, x, torch.randn(8, 6), y, n_steps=4)  # noqa: E731
    calls = bench.Calls(model, run)
    assert calls.rows == (0, 0, 4 * 8)  # 6 features 2 a step: 3 steps + the substrate point, 8 rows each


def test_double_backward_calls_are_replayed_as_such(bench):
    """The fragility attack's steps differentiate the map (create_graph, under ReLU -> softplus): counted
    and replayed as double-backward passes with the same softplus, the others as forward+backward."""
    model, x = _mlp(), torch.randn(8, 6)
    y = model(x).argmax(1)
    calls = bench.Calls(model, lambda: MF.fragility(model, x, y, Saliency(), steps=2, epsilon=0.1))
    d, g, f = calls.rows
    assert d == 2 * 8 and g == 3 * 8 and f >= 8  # g: the map of x and each candidate's scored map
    assert {c[2] for c in calls.calls if c[1] == "double"} == {10.0}  # the attack's default softplus beta
    assert {c[2] for c in calls.calls if c[1] != "double"} == {None}
    seen: list[bool] = []
    grad, depth = torch.autograd.grad, [0]

    def spy(*args, **kwargs):  # the calls made by the replay (torch.autograd.grad may call itself)
        if not depth[0]:
            seen.append(bool(kwargs.get("create_graph")))
        depth[0] += 1
        try:
            return grad(*args, **kwargs)
        finally:
            depth[0] -= 1

    torch.autograd.grad = spy
    try:
        calls.bare(model, 8, x.device)()
    finally:
        torch.autograd.grad = grad
    assert seen.count(True) == 2 and len(seen) == 2 * 2 + 3  # each double: two grads; each grad: one


def test_update_replaces_rows_of_the_same_model_and_name_and_keeps_the_others(bench):
    head = "header\n\n| model | method / metric | x |\n|---|---|---|\n"
    old = head + "| mlp | a | 1 |\n| mlp | b | 2 |\n| lstm | a | 3 |\n"
    new = "other header\n\n| model | method / metric | x |\n|---|---|---|\n| mlp | b | 20 |\n| mlp | c | 30 |\n"
    merged = head + "| mlp | a | 1 |\n| mlp | b | 20 |\n| mlp | c | 30 |\n| lstm | a | 3 |\n"
    assert bench.merge_table(old, new) == merged
    fresh = "h\n\n| model | method / metric | x |\n|---|---|---|\n| resnet | a | 9 |\n"
    assert bench.merge_table(old, fresh).endswith("| lstm | a | 3 |\n| resnet | a | 9 |\n")
    with pytest.raises(ValueError, match="no results table"):
        bench.merge_table("no table here", new)
