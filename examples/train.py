"""Main job: train an example model with explaining callbacks, configured by Hydra, logged to TensorBoard.

python examples/train.py                                   # the main job: shapes, the example CNN, the default monitors
python examples/train.py data=digits                       # another data set
python examples/train.py 'callbacks.attribution.methods=[ig,smoothgrad]' trainer.max_epochs=5
python examples/train.py data=breast_cancer model=mlp
python examples/train.py data=shapes                       # the example nets take their sizes from the data
python examples/train.py '~model' +model._target_=my_pkg.MyModule   # your own LightningModule
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from explain_callbacks._internal.hydra_job import build_list, fit_net_to_data, instantiate_part
from explain_callbacks._internal.hydra_job import hydra_config as _hydra_config
from explain_callbacks.callbacks.attribution_monitor import best_methods

# The repository's conf/; a copy of this script outside the repository uses the configs installed with the package.
_REPO_CONF = Path(__file__).resolve().parents[1] / "conf"
CONF = str(_REPO_CONF) if (_REPO_CONF / "train.yaml").is_file() else "pkg://explain_callbacks.conf"

# Hydra flags that take no value: argparse rejects them between overrides ("train.py experiment=x -m seed=0,1"
# gives "unrecognized arguments: seed=0,1"), so they are moved in front of the overrides.
_FLAGS = ("-m", "--multirun", "-r", "--run", "--resolve")


def flags_first(argv: list[str]) -> list[str]:
    """``argv`` with Hydra's value-less flags (``-m``, ``--multirun``, ...) moved before the overrides."""
    flags = [a for a in argv[1:] if a in _FLAGS]
    return argv[:1] + flags + [a for a in argv[1:] if a not in _FLAGS]


def _shown_path(path: str) -> str:
    """``path`` relative to the directory the command was started in (Hydra may have changed into the run's),
    or absolute when it lies outside that directory (``hydra.run.dir=/elsewhere``)."""
    hc = _hydra_config()
    start = hc.runtime.cwd if hc is not None else os.getcwd()
    full = os.path.abspath(os.path.join(os.getcwd(), path))
    try:
        shown = os.path.relpath(full, start)
    except ValueError:  # another drive (Windows)
        return full
    return full if shown.startswith(os.pardir) else shown


def can_test(model: pl.LightningModule, datamodule: Any) -> str | None:
    """``None`` when ``trainer.test`` can run, else why not (a module without ``test_step``, data without a
    ``test_dataloader``: the run then ends after ``fit`` instead of failing there)."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not is_overridden("test_step", model, pl.LightningModule):
        return f"{type(model).__name__} has no test_step"
    if isinstance(datamodule, pl.LightningDataModule) and not is_overridden(
        "test_dataloader", datamodule, pl.LightningDataModule
    ):
        return f"{type(datamodule).__name__} has no test_dataloader"
    return None


#: the AttributionMonitor's sections and the question each answers; the metrics named after it are the run's own
_METRIC_QUESTIONS = {
    "faithfulness": "which method to trust?",
    "sanity": "do the maps depend on the weights?",
    "robustness": "do the maps hold under small input changes?",
    "localisation": "the right evidence? against the ground-truth masks:",
    "metrics": "other scores:",
}

#: (callback class name, TensorBoard section, the question it answers)
_SECTIONS = [
    ("AttributionMonitor", "maps", "where does the model look? input | one map per method, per probe sample; "
                                   "maps/drift: how the maps changed since the last explanation (1 = unchanged)"),
    ("InteractionMonitor", "interactions", "which patches or features act together (CD, top pairs)?"),
    ("SpRAyMonitor", "concepts", "how many prediction strategies per class (SpRAy)?"),
    ("ConceptMonitor", "concepts", "what does the model use? top concepts (channels) per sample and class (CRP)"),
    ("InfluenceMonitor", "influence", "which training samples helped or hurt each probe; likely mislabelled ones"),
    ("LandscapeMonitor", "landscape", "which inputs the low minima of the loss conserve weights for"),
    ("Distiller", "distillation", "how well does a readable student mimic the network (fidelity)?"),
    ("AttributionRegularizer", "regularizers", "task loss and each penalty, apart"),
    ("SaliencyMasker", "masker", "the learned masker's maps"),
]


def _metric_lines(monitor: Any) -> list[str]:
    """One line per section the AttributionMonitor's metrics log to: its question, each metric and its direction."""
    from explain_callbacks.callbacks._logging import metric_section

    by_section: dict[str, list[str]] = {}
    scored = monitor.last_scores or {}
    for name in monitor.metric_names:
        if scored and not any(name in s for s in scored.values()):
            continue  # configured but never computed (the pointing games on data without masks)
        section = monitor._sections.get(name) or metric_section(name)
        hib = monitor._higher_is_better(name)
        side = "" if hib is None else f" ({'higher' if hib else 'lower'} is better)"
        by_section.setdefault(section, []).append(name + side)
    lines = []
    for section, question in _METRIC_QUESTIONS.items():
        if section in by_section:
            tail = "; faithfulness/ranking ranks every method on every score" if section == "faithfulness" else ""
            lines.append(f"  {section:<13} {question} {', '.join(by_section[section])}{tail}")
    if "faithfulness" not in by_section:
        lines.append(f"  {'faithfulness':<13} faithfulness/ranking: every method on every score")
    return lines


def what_to_look_at(callbacks: list) -> str:
    """What the chosen callbacks show in TensorBoard and which question each part answers, and the methods
    ranked by the last explanation's scores (after ``test``: the final model on the probe set kept from validation)."""
    names = {type(cb).__name__ for cb in callbacks}
    lines = []
    for cls, section, question in _SECTIONS:
        if cls not in names:
            continue
        lines.append(f"  {section:<13} {question}")
        if section == "maps":  # the sections of the metrics this run computes (was: a fixed list, printed for
            # localisation and randomisation where the run computed neither)
            for cb in callbacks:
                if type(cb).__name__ == "AttributionMonitor":
                    lines += _metric_lines(cb)
    if not lines:
        return ""
    head = ("\nWhat to look at (TensorBoard's SCALARS, IMAGES and TEXT tabs, tags by section; CUSTOM SCALARS: "
            "one chart per metric, every method a line):")
    out = [head, *lines]
    for cb in callbacks:
        scores = getattr(cb, "last_scores", None)
        better = getattr(cb, "_higher_is_better", None)
        if type(cb).__name__ != "AttributionMonitor" or not scores or better is None:
            continue
        for metric in ("deletion", "insertion", "randomisation", "pointing_game"):
            vals = {m: s[metric] for m, s in scores.items() if metric in s}
            hib = better(metric)
            if len(vals) < 2 or hib is None:
                continue
            ranked = sorted(vals, key=vals.get, reverse=hib)
            shown = ", ".join(f"{m} {vals[m]:.3f}" for m in ranked)
            side = "higher" if hib else "lower"
            picks = best_methods(vals, hib)
            if len(picks) == len(vals):  # "best on pointing_game: saliency" read as a winner
                out.append(f"  {metric} ({side} is better): every method {vals[ranked[0]]:.3f}, a tie")
            else:
                tie = f" ({' and '.join(picks)} tie)" if len(picks) > 1 else ""
                out.append(f"  best on {metric} ({side} is better): {shown}{tie}")
    return "\n".join(out)


def run(cfg: DictConfig) -> dict[str, float]:
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate_part(cfg, "data")
    changed = fit_net_to_data(cfg.model, datamodule)
    if changed and rank_zero_only.rank == 0:
        print(f"Example net fitted to the data: {' '.join(changed)}")
    model = instantiate_part(cfg, "model")
    callbacks = build_list(cfg.get("callbacks"))
    loggers = build_list(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(model, datamodule=datamodule)
    if cfg.get("test"):
        reason = can_test(model, datamodule)
        if reason is None:
            trainer.test(model, datamodule=datamodule)
        elif trainer.is_global_zero:
            print(f"Test skipped: {reason} (test=false turns the test off).")
    if trainer.is_global_zero and not trainer.fast_dev_run:  # fast_dev_run logs nothing (Lightning's DummyLogger)
        for logger in trainer.loggers:
            log_dir = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
            if not log_dir:
                continue
            log_dir = _shown_path(log_dir)
            if isinstance(logger, pl.loggers.TensorBoardLogger):
                print(f"\nTensorBoard logs written to: {log_dir}")
                print(f"Open them with:  tensorboard --logdir {log_dir}   (then browse http://localhost:6006)")
            else:  # CSVLogger, ...: not for TensorBoard
                print(f"\n{type(logger).__name__} logs written to: {log_dir}")
        guide = what_to_look_at(callbacks)
        if guide:
            print(guide)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    # Under DDP Lightning leaves the process group alive; gloo torn down at interpreter exit can abort
    # the process after a finished run ("terminate called without an active exception").
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return metrics


@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg)


class _NoTips(logging.Filter):
    """Drops Lightning's advertising lines ("💡 Tip: ... install litlogger"): noise in every run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def quiet() -> None:
    """No warning floods in the example's output: Lightning's tips, its own deprecation of ``LeafSpec`` (a
    Lightning/torch version mismatch, nothing a user can act on) and the advice to add data-loader workers
    (the in-memory example data sets load faster without them), and the advice on the logging interval of a
    shortened run (``+trainer.limit_train_batches=3``)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")  # shortened runs


def _fast_dev_run(argv: list[str]) -> bool:
    """Whether the command line asks for ``trainer.fast_dev_run`` (``+trainer.fast_dev_run=true`` or a count)."""
    for a in argv[1:]:
        key, _, value = a.lstrip("+").partition("=")
        if key == "trainer.fast_dev_run":
            return value.strip().lower() not in ("false", "0", "null", "none", "")
    return False


def no_run_dir_for_fast_dev_run(argv: list[str]) -> tuple[list[str], str | None]:
    """A smoke test (``fast_dev_run``) leaves no run directory: Hydra's run directory (its ``.hydra`` copy
    and ``train.log``) goes to a temporary directory removed at the end (Lightning logs nothing then)."""
    if not _fast_dev_run(argv) or any(a.startswith(("hydra.run.dir=", "-m", "--multirun")) for a in argv[1:]):
        return argv, None
    tmp = tempfile.mkdtemp(prefix="explain_callbacks_fast_dev_run_")
    return [*argv, f"hydra.run.dir={tmp}", "hydra.output_subdir=null"], tmp


if __name__ == "__main__":
    quiet()
    sys.argv, _tmp = no_run_dir_for_fast_dev_run(flags_first(sys.argv))
    try:
        main()
    finally:
        if _tmp is not None:
            logging.shutdown()  # train.log is open in it
            shutil.rmtree(_tmp, ignore_errors=True)
