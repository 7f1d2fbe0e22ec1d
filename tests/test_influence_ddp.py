"""InfluenceMonitor under 2-process DDP (gloo, CPU): ranks split the subset, results equal the functional twin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers_lightning import event_tags

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ddp
def test_influence_monitor_under_ddp(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PL_DISABLE_FORK="1")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "ddp_influence.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "DDP_OK" in out.stdout
    assert len(list(tmp_path.rglob("events.out.tfevents.*"))) == 1  # only rank zero writes
    tags = event_tags(tmp_path)
    assert {"influence/probe_0", "influence/self_influence/top"} <= tags["images"]
