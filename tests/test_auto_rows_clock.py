"""The clock of ``batch_size="auto"``'s measurement: with one torch thread on the CPU, the calling thread's
CPU time, so time the machine gives to other processes (here: a model that waits) is not counted."""

from __future__ import annotations

import time

import torch
from torch import nn

from explain_callbacks._internal.batching import auto_rows, choose_rows, measure_clock


class Waiting(nn.Module):
    """A linear model that waits 20 ms per call without using the CPU (as when another process runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return self.lin(x)


def test_one_thread_cpu_measurement_counts_this_threads_cpu_time_only():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert measure_clock(torch.device("cpu")) is time.thread_time
        with auto_rows(measure=True, budget_s=5.0, repeats=1, rows_max=32):
            choice = choose_rows("auto", Waiting(), torch.randn(4, 6))
    finally:
        torch.set_num_threads(threads)
    assert choice.how == "measured" and len(choice.timings) >= 2
    # per call: the 20 ms wait is not counted (a wall clock would give >= 20 ms / rows per row)
    assert all(t * r < 5e-3 for r, t in choice.timings), choice.timings


def test_several_threads_measure_wall_time():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert measure_clock(torch.device("cpu")) is time.perf_counter
    finally:
        torch.set_num_threads(threads)
