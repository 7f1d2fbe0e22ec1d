"""Hydra configs compose, instantiate, and the main job runs end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.utils import instantiate

from explain_callbacks.attribution import Attributor
from explain_callbacks.callbacks import AttributionMonitor

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_default_config_instantiates():
    from hydra.core.hydra_config import HydraConfig

    cfg = _compose(["callbacks.attribution.methods=[ig,smoothgrad]", "trainer.max_epochs=5"])
    HydraConfig.instance().set_config(cfg)
    cb = instantiate(cfg.callbacks.attribution)
    assert isinstance(cb, AttributionMonitor)
    assert list(cb.methods) == ["ig", "smoothgrad"]
    assert cfg.trainer.max_epochs == 5
    dm = instantiate(cfg.data)  # the main job's data: shapes with masks
    assert dm.batch_size == 64 and dm.input_shape == (3, 32, 32)
    instantiate(cfg.model)


def test_method_mapping_and_metrics_override():
    cfg = _compose(["callbacks.attribution.methods=[{name:ig,n_steps:8},gradcam]"])
    cb = instantiate(cfg.callbacks.attribution)
    assert cb.methods["ig"].n_steps == 8 and "gradcam" in cb.methods


@pytest.mark.parametrize("path", sorted((CONF / "attribution").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_attribution_config_instantiates(path):
    with initialize_config_dir(config_dir=str(CONF / "attribution"), version_base="1.3"):
        cfg = compose(path.stem)
    method = instantiate(cfg)
    assert isinstance(method, Attributor)


def test_configs_reachable_from_installed_package():
    with initialize_config_module(config_module="explain_callbacks.conf", version_base="1.3"):
        cfg = compose("train", overrides=["data=breast_cancer", "model=mlp"])
    assert cfg.model.net.in_features == 30


def test_main_job_runs_and_prints_where_logs_are(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(ROOT / "examples" / "train.py"), "trainer.max_epochs=2",
           "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=1",
           "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}/run"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tensorboard --logdir" in out.stdout
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"


@pytest.mark.parametrize("path", sorted((CONF / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_experiment_composes_and_instantiates(path):
    from hydra.core.hydra_config import HydraConfig

    cfg = _compose([f"experiment={path.stem}"])
    HydraConfig.instance().set_config(cfg)
    instantiate(cfg.data)
    instantiate(cfg.model)
    for c in (cfg.get("callbacks") or {}).values():
        if c is not None and "_target_" in c:
            instantiate(c)


@pytest.mark.parametrize("path", sorted((CONF / "callbacks").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_callback_config_instantiates(path):
    cfg = _compose([f"callbacks={path.stem}"])
    for c in (cfg.get("callbacks") or {}).values():
        if c is not None and "_target_" in c:
            instantiate(c)
