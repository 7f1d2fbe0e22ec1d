"""Failures on one rank, and per-rank state through a checkpoint, under 2-process DDP (gloo, CPU).

Broke before (issue 16): a rank without a probe set returned early while rank 0 waited in ``run_explain``'s
all-gather forever (the hard timeout here); the warnings of rank 1 were hidden by ``rank_zero_warn`` and rank 0
said "another rank failed" without the cause; a DDP resume gave every rank rank 0's probe set and Distiller
buffer (rank 1's rows lost, rank 0's twice).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"


def _run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", PL_DISABLE_FORK="1", OMP_NUM_THREADS="1")
    try:
        out = subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired as err:  # a rank waiting in a collective the other never reaches
        pytest.fail(f"DDP run hung (killed after {timeout} s): {str(err.stdout)[-1000:]} {str(err.stderr)[-3000:]}")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "DDP_OK" in out.stdout
    return out


@pytest.mark.ddp
def test_failures_on_rank_one_alone_do_not_hang_and_are_named(tmp_path):
    _run(str(SCRIPTS / "ddp_rank_failures.py"), str(tmp_path))
    w0 = json.loads((tmp_path / "warnings_0.json").read_text())
    w1 = json.loads((tmp_path / "warnings_1.json").read_text())
    m0 = json.loads((tmp_path / "metrics_0.json").read_text())
    m1 = json.loads((tmp_path / "metrics_1.json").read_text())
    assert m0["epoch"] == m1["epoch"] == 2  # training finished on both ranks

    def has(messages: list[str], *parts: str) -> bool:
        return any(all(p in m for p in parts) for m in messages)

    # rank 1 says what happened to it, under its name (was hidden by rank_zero_warn)
    assert has(w1, "[rank 1]", "NaN/Inf and are skipped from the probe set"), w1
    assert has(w1, "[rank 1]", "could not take its probe set", "KeyError", "no 'image' in the batches of rank 1"), w1
    assert has(w1, "[rank 1]", "rank 1 failed: failed: RuntimeError: only rank 1 fails"), w1
    assert has(w1, "[rank 1]", "student 'flaky'", "the student ran out of memory on rank 1"), w1
    # rank 0 names the failing rank and its error (was "another rank failed")
    assert has(w0, "[rank 0]", "not every rank has a probe set", "rank 1 failed: no probe set: every validation"), w0
    assert has(w0, "[rank 0]", "rank 1 failed: no probe set: its batches could not be read (KeyError"), w0
    assert has(w0, "method 'flaky'", "rank 1 failed: failed: RuntimeError: only rank 1 fails"), w0
    assert has(w0, "student 'flaky'", "rank 1 failed: RuntimeError: the student ran out of memory on rank 1"), w0
    for m in (m0, m1):  # what worked on every rank is logged on every rank; the rest on none
        assert "maps/sparseness/input_x_gradient" in m["metrics"] and "cost/seconds/flaky" not in m["metrics"]
        assert "maps/sparseness/saliency" not in m["metrics"] and "maps/sparseness/ig" not in m["metrics"]
        assert "distillation/fidelity/tree" in m["metrics"]
        assert not any(k.startswith("distillation/") and k.endswith("/flaky") for k in m["metrics"])
    assert m0["exported"] == ["tree"] and m1["exported"] == []  # the failed student is not exported


@pytest.mark.ddp
def test_per_rank_state_survives_a_ddp_resume_and_a_world_size_change(tmp_path):
    _run(str(SCRIPTS / "ddp_resume.py"), "first", str(tmp_path))
    _run(str(SCRIPTS / "ddp_resume.py"), "resume", str(tmp_path))
    before = [torch.load(tmp_path / f"before_{r}.pt", weights_only=True) for r in (0, 1)]
    after = [torch.load(tmp_path / f"after_{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(before[0]["probe_x"], before[1]["probe_x"])  # two shards
    assert not torch.equal(before[0]["buffer"]["x"], before[1]["buffer"]["x"])
    for r in (0, 1):  # each rank got its own state back (was: rank 0's on every rank)
        assert torch.equal(after[r]["probe_x"], before[r]["probe_x"]), r
        assert torch.equal(after[r]["probe_y"], before[r]["probe_y"]), r
        assert set(after[r]["previous"]) == {"saliency"}
        assert torch.equal(after[r]["previous"]["saliency"], before[r]["previous"]["saliency"]), r
        for name in ("buffer", "val"):
            assert before[r][name].keys() == after[r][name].keys()
            for k in before[r][name]:
                assert torch.equal(after[r][name][k], before[r][name][k]), (r, name, k)
        assert torch.equal(after[r]["generator"], before[r]["generator"])

    # the same checkpoint in one process: the rows of both ranks (none lost, none twice), the probe re-captured
    import lightning.pytorch as pl

    sys.path.insert(0, str(SCRIPTS.parent.parent))
    from tests.helpers_lightning import image_loaders, lit
    from tests.scripts.ddp_resume import callbacks, snapshot

    mon, dist = callbacks()
    seen = {}

    class Recorder(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            seen.update(snapshot(mon, dist))

    tr = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, callbacks=[mon, dist, Recorder()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tr.fit(lit(), *image_loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    messages = [str(w.message) for w in record]
    assert any("holds the state of 2 rank(s), this run has 1" in m and "re-captures its probe set" in m
               for m in messages), messages  # fmt: skip
    assert any("Distiller" in m and "dealt out to the 1 ranks" in m for m in messages), messages
    assert seen["probe_x"] is None and seen["previous"] == {}  # re-captured at the next validation:
    assert mon.probe_size == 5 and torch.equal(mon.probe_x, image_loaders()[1].dataset.tensors[0][:5])
    for name in ("buffer", "val"):
        assert seen[name].keys() == before[0][name].keys()
        union = {k: torch.cat([before[0][name][k], before[1][name][k]]) for k in before[0][name]}
        assert seen[name]["x"].shape == union["x"].shape  # every row once
        key = lambda rows: sorted(zip(rows["x"].flatten(1).tolist(), rows["y"].tolist()))  # noqa: E731
        assert key(seen[name]) == key(union), name


def _agree_worker(rank: int, store: str, results: str) -> None:
    import torch.distributed as dist

    from explain_callbacks._internal.distributed import agree, gather_objects

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        out = {}
        ok = agree(True)
        out["all_ok"] = (ok.ok, ok.failures, ok.reports)
        long = "é" * 400 + "tail"  # longer than the carried text: cut, still valid UTF-8
        a = agree(rank == 0, None if rank == 0 else ValueError(f"rank one's own error {long}"))
        out["one"] = (a.ok, a.local_ok, a.failures, a.why, a.reports)
        b = agree(False, f"reason {rank}")
        out["both"] = (b.ok, b.why, b.reports)
        out["objects"] = gather_objects({"rank": rank, "t": torch.full((rank + 1,), float(rank))})
        torch.save(out, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_agree_carries_each_failing_ranks_error_in_one_fixed_size_gather(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_agree_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"out.{r}", weights_only=False) for r in (0, 1))
    assert r0["all_ok"] == r1["all_ok"] == (True, {}, False)
    for r, res in ((0, r0), (1, r1)):
        ok, local_ok, failures, why, reports = res["one"]
        assert not ok and local_ok == (r == 0) and set(failures) == {1}
        assert failures[1].startswith("ValueError: rank one's own error éé") and failures[1].endswith("é…")
        assert len(failures[1].encode()) <= 480 and why == f"rank 1 failed: {failures[1]}"
        assert reports  # rank 0 names the failing rank; the failing rank says it too
        assert res["both"] == (False, "rank 0 failed: reason 0; rank 1 failed: reason 1", True)
        assert [o["rank"] for o in res["objects"]] == [0, 1] and res["objects"][1]["t"].tolist() == [1.0, 1.0]
