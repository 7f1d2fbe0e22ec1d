"""CDEP's served forward (``AttributionRegularizer("cdep", serve_forward=True)``) under 2-process DDP (gloo, CPU):
no hang, the same training as the unserved regularizer, parameters identical across ranks, BatchNorm running
statistics updated once per step, and the step's forward really served from the CD pass. With SyncBatchNorm
(DDP's sync_batchnorm=True) the forward is not served."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from explain_callbacks.callbacks import AttributionRegularizer
from explain_callbacks.callbacks import regularizer as R

from .test_regularize_callback import Tiny, dataset, trainer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3  # tests/scripts/ddp_cdep_serve.py: 3 batches per rank, one epoch

# float64 (the script's model and data): the CD pass computes the logits on stacked (z, β) streams, in another order
# of operations than the network's own forward, so the two runs differ by rounding: 1.6e-14 at most over the 3 SGD
# steps here. In float32 that rounding is amplified by the kinks of CDEP's rules (test_cdep_fast.py: 1e-3 relative
# gradient error) to a few 1e-6..1e-5 in the weights, too close to a real defect's size to be a safe bound. The bound
# is 1e-10 (+ 1e-8 relative), over 1e7 times below how far every parameter tensor moved (>= 5.7e-3), so a missing or
# doubled penalty, a second BatchNorm update or a different batch fails it.
TOL = {"atol": 1e-10, "rtol": 1e-8}


@pytest.mark.ddp
def test_cdep_serve_forward_under_ddp(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PL_DISABLE_FORK="1")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "ddp_cdep_serve.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    run = {
        (mode, rank): torch.load(tmp_path / f"{mode}_rank{rank}.pt", weights_only=True)
        for mode in ("served", "plain")
        for rank in (0, 1)
    }
    for rank in (0, 1):
        served, plain = run["served", rank], run["plain", rank]
        assert served["steps"] == plain["steps"] == STEPS
        # the step called net(x) once per step in both runs; the network itself ran only in the unserved one
        assert served["net_calls"] == plain["net_calls"] == STEPS
        assert plain["bn_runs"] == STEPS and served["bn_runs"] == 0
        assert not served["wrapped_after"] and not plain["wrapped_after"]  # training_step and forward restored
        # the same penalty on the same batches (rank-local data; logged in float32), and not a vacuous one
        torch.testing.assert_close(served["penalties"], plain["penalties"], atol=1e-6, rtol=1e-6)
        assert served["penalties"].shape == (STEPS,) and bool((served["penalties"] > 0.1).all())
        for name, p in plain["params"].items():
            assert (p - plain["init"][name]).abs().max() > 1e-3, name  # the weights moved
            torch.testing.assert_close(served["params"][name], p, **TOL, msg=name)
        for name, b in plain["buffers"].items():
            # running statistics: moved once per step, as by the unserved run's forward (num_batches_tracked exact)
            if name.endswith("num_batches_tracked"):
                assert int(served["buffers"][name]) == int(b) == STEPS, name
            else:
                torch.testing.assert_close(served["buffers"][name], b, **TOL, msg=name)
    for mode in ("served", "plain"):
        # DDP averages the gradients: every rank holds bit-identical parameters ...
        for name, p in run[mode, 0]["params"].items():
            assert torch.equal(p, run[mode, 1]["params"][name]), (mode, name)
        # ... while the last step's BatchNorm statistics are each rank's own batch (DDP broadcasts rank 0's buffers
        # at the start of the next forward): they differ, so the per-rank comparison above is a real one
        mean = "net.features.1.running_mean"
        assert not torch.allclose(run[mode, 0]["buffers"][mean], run[mode, 1]["buffers"][mean], **TOL)


@pytest.mark.parametrize("processes", [1, 2])
def test_synchronised_batchnorm_is_not_served(monkeypatch, processes):
    """A SyncBatchNorm in training mode normalises with the statistics of every process's batch, the CD pass with
    this process's alone: served, the task's logits and running statistics would be a plain BatchNorm's. DDP accepts
    SyncBatchNorm only on GPU modules, so the group of several processes is simulated here (the layers, not
    synchronising in one process, compute as BatchNorm): where they would synchronise, the forward runs and the
    step trains bit-identically to serve_forward=False."""
    monkeypatch.setattr(R, "_world_size", lambda group: processes, raising=False)
    models = []
    for serve in (True, False):
        torch.manual_seed(0)
        model = Tiny()
        model.net = nn.SyncBatchNorm.convert_sync_batchnorm(model.net)
        runs: list[int] = []
        model.net[1].register_forward_pre_hook(lambda *_, runs=runs: runs.append(1))
        cb = AttributionRegularizer("cdep", weight=3.0, mask=2, model_attr="net", serve_forward=serve)
        if serve and processes > 1:
            with pytest.warns(UserWarning, match="SyncBatchNorm"):
                trainer([cb], limit_train_batches=2).fit(model, DataLoader(dataset(8), batch_size=4))
        else:
            trainer([cb], limit_train_batches=2).fit(model, DataLoader(dataset(8), batch_size=4))
        # the SyncBatchNorm module runs only in the network's own forward (the CD pass applies its rule)
        assert len(runs) == (0 if serve and processes == 1 else 2)
        models.append(model)
    served, plain = models
    if processes > 1:
        for (n, a), (_, b) in zip(served.state_dict().items(), plain.state_dict().items()):
            assert torch.equal(a, b), n
