"""The main job (``python examples/train.py``): what it shows by default, what it prints, quiet output, and a
``fast_dev_run`` that leaves nothing behind."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from explain_callbacks.callbacks import AttributionMonitor, InteractionMonitor

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _train_module():
    spec = importlib.util.spec_from_file_location("explain_callbacks_train_main", ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN = _train_module()


def test_default_main_job_shows_the_product():
    """Methods of three families, faithfulness, a sanity check, localisation on data with masks, drift (built in)
    and an interaction view."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp/unused"])
    assert cfg.data._target_.endswith("ShapesDataModule")
    callbacks = TRAIN.build_list(cfg.callbacks)
    (mon,) = [c for c in callbacks if isinstance(c, AttributionMonitor)]
    (inter,) = [c for c in callbacks if isinstance(c, InteractionMonitor)]
    assert list(mon.methods) == ["saliency", "ig", "occlusion"]  # gradient, path, black box
    assert {"deletion", "insertion", "randomisation", "pointing_game", "energy_pointing_game"} <= set(mon.metric_names)
    assert list(inter.methods) == ["cd"]
    data = instantiate(cfg.data)
    data.setup("fit")
    assert len(data.train_set[0]) == 3  # (x, y, mask): localisation has ground truth


def test_what_to_look_at_names_sections_and_ranks_the_methods():
    mon = AttributionMonitor(budget=None, methods=["saliency", "ig"], metrics=["deletion", "insertion"])
    mon._higher = {"deletion": False, "insertion": True, "pointing_game": True}
    mon.last_scores = {"saliency": {"deletion": 0.3, "insertion": 0.5, "pointing_game": 1.0},
                       "ig": {"deletion": 0.2, "insertion": 0.4, "pointing_game": 1.0}}  # fmt: skip
    text = TRAIN.what_to_look_at([mon, InteractionMonitor()])
    assert "which method to trust?" in text and "interactions" in text
    assert "best on deletion (lower is better): ig 0.200, saliency 0.300" in text
    assert "best on insertion (higher is better): saliency 0.500, ig 0.400" in text
    # every method at 1.0 is a tie, not a win for the first one listed (was "best on pointing_game: saliency 1.000")
    assert "pointing_game (higher is better): every method 1.000, a tie" in text and "best on pointing_game" not in text
    assert TRAIN.what_to_look_at([]) == ""
    # the sections printed are those of the run's metrics (was: localisation and randomisation whatever was chosen)
    assert "faithfulness  which method to trust? deletion (lower is better), insertion (higher is better)" in text
    assert "localisation" not in text and "randomisation" not in text
    mon.metric_names += ["pointing_game", "energy_pointing_game"]  # the second never scored: data without masks
    mon.last_scores["occlusion"] = {"pointing_game": 0.5}
    text = TRAIN.what_to_look_at([mon])
    assert "energy_pointing_game" not in text
    assert "localisation  the right evidence? against the ground-truth masks: pointing_game (higher is better)" in text
    tie = "best on pointing_game (higher is better): saliency 1.000, ig 1.000, occlusion 0.500 (saliency and ig tie)"
    assert tie in text


def test_fast_dev_run_writes_no_run_directory_and_runs_quietly(tmp_path):
    """A smoke test used to leave logs/runs/<date>/ (.hydra, train.log) behind; Lightning's tips and a LeafSpec
    deprecation warning filled the output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    cmd = [sys.executable, str(ROOT / "examples" / "train.py"), "+trainer.fast_dev_run=true",
           "trainer.enable_progress_bar=false"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))[:10]
    text = out.stdout + out.stderr
    assert "💡 Tip" not in text and "LeafSpec" not in text and "many workers" not in text
    assert "TensorBoard logs written" not in text  # nothing was written
    assert text.count("Warning") <= 2, text[-3000:]


def test_fast_dev_run_detection():
    assert TRAIN._fast_dev_run(["t", "+trainer.fast_dev_run=true"])
    assert TRAIN._fast_dev_run(["t", "++trainer.fast_dev_run=3"])
    assert not TRAIN._fast_dev_run(["t", "+trainer.fast_dev_run=false"])
    assert not TRAIN._fast_dev_run(["t", "trainer.max_epochs=1"])
    argv, tmp = TRAIN.no_run_dir_for_fast_dev_run(["t", "hydra.run.dir=mine", "+trainer.fast_dev_run=true"])
    assert tmp is None and argv[-1] == "+trainer.fast_dev_run=true"  # the user's own run directory is kept


def test_quiet_drops_the_logging_interval_advice_of_shortened_runs():
    """``+trainer.limit_train_batches=3`` printed Lightning's advice to lower log_every_n_steps in every shortened run
    of the docs' commands; real warnings still show."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TRAIN.quiet()
        warnings.warn("The number of training batches (3) is smaller than the logging interval", UserWarning, 1)
        warnings.warn("AttributionMonitor explained nothing", UserWarning, 1)
    assert [str(w.message) for w in caught] == ["AttributionMonitor explained nothing"]
