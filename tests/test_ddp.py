"""AttributionMonitor under 2-process DDP (gloo, CPU): no hang, scalars reduced, images logged once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers_lightning import event_tags

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ddp
def test_monitor_under_ddp(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PL_DISABLE_FORK="1")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "ddp_monitor.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "DDP_OK" in out.stdout
    event_files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files  # only rank zero writes
    tags = event_tags(tmp_path)
    assert "maps/attributions" in tags["images"]
    assert "maps/sparseness/ig" in tags["scalars"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_files[0]), size_guidance={"images": 0})
    acc.Reload()
    steps = [e.step for e in acc.Images("maps/attributions")]
    assert steps and len(steps) == len(set(steps))  # one figure per explanation, written once
