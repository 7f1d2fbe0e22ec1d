"""Metrics under 2-process DDP (gloo, CPU): each rank scores its shard, ``compute`` reduces the states
by sum, and the result equals one process scoring the whole batch."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from explain_callbacks.attribution import Saliency
from explain_callbacks.metrics import METRICS

NAMES = ("deletion", "insertion", "sparseness", "pointing_game", "completeness_error", "randomisation")
KW = {"deletion": {"n_steps": 6}, "insertion": {"n_steps": 6}}


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    m = torch.zeros(6, 1, 6, 6)
    m[:, :, 1:4, 1:4] = 1
    m[4] = 0  # an empty mask on rank 1: NaN, left out of the count
    return model, x, y, m


def _update(metric, model, x, y, m):
    method = Saliency()
    if metric.kind == "explainer":
        metric.update(model, x, y, method, attributions=method(model, x, y), masks=m)
    else:
        metric.update(model, x, method(model, x, y), y, masks=m)


def _worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, x, y, m = _setup()
        sl = slice(0, 3) if rank == 0 else slice(3, 6)
        results = {}
        for name in NAMES:
            metric = METRICS.build(name, **KW.get(name, {}))
            _update(metric, model, x[sl], y[sl], m[sl])
            value = float(metric.compute())  # synchronised: sum of the states of both ranks
            results[name] = (value, float(metric.count))  # the local state is restored after compute
        out[rank] = results
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_two_process_reduction_equals_one_process():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        results = dict(out)
    model, x, y, m = _setup()
    for name in NAMES:
        single = METRICS.build(name, **KW.get(name, {}))
        _update(single, model, x, y, m)
        local_counts = [results[rank][name][1] for rank in (0, 1)]
        assert sum(local_counts) == float(single.count), name
        if name == "pointing_game":
            assert local_counts == [3.0, 2.0]  # the empty mask's NaN is left out on rank 1
        for rank in (0, 1):
            assert results[rank][name][0] == pytest.approx(float(single.compute()), abs=1e-6), name
