"""Explain a whole data set with a trained checkpoint, through Lightning's predict loop (any number of devices).

python -m explain_callbacks.explain ckpt_path=logs/runs/<time>/tensorboard/checkpoints/last.ckpt
python -m explain_callbacks.explain ckpt_path=model.ckpt data=digits 'methods=[saliency,ig,occlusion]' \
    'metrics=[deletion,insertion]' split=test
python -m explain_callbacks.explain ckpt_path=model.ckpt trainer=ddp       # 2 processes, each writes its shards
python -m explain_callbacks.explain ckpt_path=model.ckpt hydra.run.dir=logs/explain/run1   # run again: resumes

The model and data configs are the training run's (its ``.hydra/config.yaml``, found above the checkpoint) unless
``model=`` / ``data=`` are given; the weights are read with ``weights_only=True`` (nothing in the checkpoint
executes). Maps and per-sample scores go to ``<run dir>`` (shards, ``index.json``, ``summary.json``), the means to
TensorBoard under ``<run dir>/tensorboard``. See docs/predict.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ._internal.hydra_job import build_list, fit_net_to_data, hydra_config, instantiate_part
from .predict import ExplainWriter, SplitData

__all__ = ["find_run_config", "load_checkpoint", "main", "run"]


def _group_overridden(group: str) -> bool:
    """Whether the command line chose or changed the config group ``group`` (``model=mlp``, ``model.lr=...``)."""
    hc = hydra_config()
    if hc is None:
        return False
    return any(o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == group for o in hc.overrides.task)


def find_run_config(ckpt_path: str | os.PathLike, levels: int = 4) -> Path | None:
    """The ``.hydra/config.yaml`` of the training run a checkpoint was written in (the checkpoint's folder or one
    of the ``levels`` above it: ``<run>/tensorboard/checkpoints/x.ckpt``), or None."""
    here = Path(ckpt_path).resolve().parent
    for folder in [here, *list(here.parents)[:levels]]:
        cfg = folder / ".hydra" / "config.yaml"
        if cfg.is_file():
            return cfg
    return None


def load_checkpoint(ckpt_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights (``state_dict``) of a Lightning checkpoint, or of a file holding a state dict, read with
    ``weights_only=True``: tensors and plain values only, nothing that executes code."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={str(ckpt_path)!r} is not a file; pass the checkpoint of the trained model, e.g. "
            "ckpt_path=logs/runs/<time>/tensorboard/checkpoints/last.ckpt."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path} cannot be read as tensors and plain values ({type(err).__name__}: {str(err)[:300]}). The explain "
            "job loads checkpoints with weights_only=True so that nothing in them executes: save the weights alone "
            "(torch.save({'state_dict': module.state_dict()}, path)) or a Lightning checkpoint whose hyperparameters "
            "are plain values."
        ) from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        held = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"{path} holds no state_dict of tensors (it holds {held}); "
            "pass a Lightning checkpoint (trainer.save_checkpoint / ModelCheckpoint) or a saved state_dict."
        )
    return state


def _build_model(cfg: DictConfig, state: dict[str, torch.Tensor]) -> pl.LightningModule:
    """The model config instantiated, with the checkpoint's weights; errors name the config to fix."""
    target = str(cfg.model.get("_target_", "?"))
    try:
        model = instantiate_part(cfg, "model")
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, (ImportError, AttributeError)) or "Error locating target" in str(err):
            raise ValueError(
                f"The model class {target!r} cannot be imported ({type(cause).__name__}: {cause}). The checkpoint's "
                "LightningModule must be importable: install the package that defines it (or add its folder to "
                "PYTHONPATH), or choose the model config it was trained with (model=cnn, model=mlp, or "
                "'~model' +model._target_=my_pkg.MyModule)."
            ) from err
        raise
    if not isinstance(model, pl.LightningModule):
        raise TypeError(f"model._target_={target!r} built a {type(model).__name__}, not a LightningModule.")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = "; ".join(line.strip() for line in str(err).splitlines()[1:4])
        raise ValueError(
            f"The checkpoint's weights do not fit the model config ({target}: {lines} ...). Choose the model and data "
            "configs the checkpoint was trained with (the training run's .hydra/config.yaml says which), e.g. "
            "model=mlp data=breast_cancer."
        ) from err
    return model


def _take_run_config(cfg: DictConfig) -> str | None:
    """Use the training run's ``model`` and ``data`` configs where the command line chose none; says what."""
    path = find_run_config(cfg.ckpt_path)
    if path is None:
        return None
    saved = OmegaConf.load(path)
    taken = []
    with open_dict(cfg):
        for group in ("model", "data"):
            if group in saved and not _group_overridden(group):
                cfg[group] = saved[group]
                taken.append(group)
    return f"{', '.join(taken)} from {path}" if taken else None


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """The explain job: the checkpoint's model over a data module's split, through ``trainer.predict`` with an
    :class:`~explain_callbacks.predict.ExplainWriter`; returns the summary (on rank zero; None elsewhere)."""
    if not cfg.get("ckpt_path"):
        raise ValueError(
            "ckpt_path is not set: pass the checkpoint of the trained model, e.g. "
            "python -m explain_callbacks.explain ckpt_path=logs/runs/<time>/tensorboard/checkpoints/last.ckpt"
        )
    state = load_checkpoint(cfg.ckpt_path)
    note = _take_run_config(cfg)
    if cfg.get("data") is None or "_target_" not in cfg.data:
        raise ValueError(
            "No data config: choose the data set to explain with data=<name> (conf/data/: shapes, digits, "
            "breast_cancer, ...) or '+data._target_=my_pkg.MyDataModule'."
        )
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate_part(cfg, "data")
    fit_net_to_data(cfg.model, datamodule)
    model = _build_model(cfg, state)
    data = SplitData(datamodule, split=cfg.split, batch_size=cfg.get("batch_size"))
    writer = ExplainWriter(
        output_dir=cfg.output_dir, methods=cfg.methods, metrics=cfg.get("metrics") or [], target=cfg.target,
        batch_size=cfg.method_batch_size, shard_size=cfg.shard_size, map_dtype=cfg.map_dtype,
        save_maps=cfg.save_maps, model_attr=cfg.get("model_attr"),
        fingerprint={"ckpt_path": str(Path(cfg.ckpt_path).resolve()), "split": cfg.split,
                     "data": str(cfg.data.get("_target_"))},
    )  # fmt: skip
    loggers = build_list(cfg.get("logger"))
    # the batches are dealt to the processes whole by SplitData: Lightning must not re-sample them
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=[writer], logger=loggers or False, use_distributed_sampler=False
    )
    if note and trainer.is_global_zero:
        print(f"Configs of the training run: {note}")
    trainer.predict(model, datamodule=data, return_predictions=False)
    if trainer.is_global_zero:
        s = writer.summary or {}
        print(f"\nExplained {s.get('n_samples')} samples into {cfg.output_dir} (index.json, summary.json, shards/).")
        for metric, by in (s.get("means") or {}).items():
            print(f"  {metric}: " + ", ".join(f"{m} {v:.4g}" for m, v in by.items() if v is not None))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return writer.summary


@hydra.main(version_base="1.3", config_path="conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.exit(main())
