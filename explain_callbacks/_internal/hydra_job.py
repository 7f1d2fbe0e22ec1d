"""Pieces of the Hydra jobs (``examples/train.py``, ``python -m explain_callbacks.explain``): the example nets fitted
to the data module, parts of a config instantiated with errors that name the fix, config groups as lists."""

from __future__ import annotations

import math
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

__all__ = ["build_list", "fit_net_to_data", "hydra_config", "instantiate_part", "overridden"]


def hydra_config() -> DictConfig | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def overridden(key: str) -> bool:
    """Whether ``key`` was set on the command line (``model.net.in_channels=3``, ``+key=...``, ``++key=...``)."""
    hc = hydra_config()
    if hc is None:
        return False
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in hc.overrides.task)


def fit_net_to_data(model_cfg: DictConfig, datamodule: Any) -> list[str]:
    """Set the example nets' input size and class count (``model.net.in_channels`` / ``in_features`` /
    ``num_classes``) from the data module's ``input_shape`` and ``num_classes``, so ``data=shapes`` (3 channels,
    4 classes) runs on ``model=cnn`` (written for 1-channel digits). Keys set on the command line are kept.
    Returns the settings changed, as overrides."""
    net = model_cfg.get("net") if isinstance(model_cfg, DictConfig) else None
    shape = getattr(datamodule, "input_shape", None)
    classes = getattr(datamodule, "num_classes", None)
    if not isinstance(net, DictConfig) or shape is None:
        return []
    if "in_channels" in net and len(shape) < 2:
        raise ValueError(
            f"model.net ({net.get('_target_', '?')}) takes inputs with a channel axis, but the data module gives "
            f"flat {tuple(shape)} features: choose a network for tabular data, e.g. model=mlp."
        )
    task = model_cfg.get("task")
    if task is None and str(model_cfg.get("_target_", "")).endswith("LitClassifier"):
        task = "classification"  # LitClassifier's default
    if classes is not None and int(classes) == 1 and task is not None and task != "regression":
        raise ValueError(
            f"The data module has one real-valued target (a regression), but the model's task is {task!r}: add "
            "++model.task=regression, or use model=nid_mlp."
        )
    want: dict[str, int] = {}
    if "in_channels" in net:
        want["in_channels"] = int(shape[0])
    if "in_features" in net:
        want["in_features"] = math.prod(int(s) for s in shape)
    if "num_classes" in net and classes is not None and int(classes) >= 1:
        want["num_classes"] = int(classes)
    changed = []
    for key, value in want.items():
        if net[key] != value and not overridden(f"model.net.{key}"):
            net[key] = value
            changed.append(f"model.net.{key}={value}")
    return changed


def instantiate_part(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``instantiate(cfg[key])``; a class that does not take a key of the config gets an error naming the fix
    (replacing only ``_target_`` keeps the other keys of the shipped config)."""
    try:
        return instantiate(cfg[key], **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if not (isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause)):
            raise
        node = cfg[key]
        target = node.get("_target_", "?")
        keys = [k for k in node if not str(k).startswith("_")]
        hc = hydra_config()
        choice = hc.runtime.choices.get(key) if hc is not None else None
        shipped = f" (from conf/{key}/{choice}.yaml)" if choice else ""
        raise ValueError(
            f"{key}: {cause}. The {key} config passes {keys}{shipped} to {target}. Setting only "
            f"{key}._target_ keeps the other keys of the shipped config: start from an empty one instead, "
            f"\"'~{key}' +{key}._target_={target} +{key}.<argument>=<value>\", or select your own config file "
            f"with --config-dir (README, 'Configure with Hydra')."
        ) from None


def build_list(group: DictConfig | None) -> list:
    """Instantiate every entry with a ``_target_`` of a config group (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(cfg) for cfg in group.values() if isinstance(cfg, DictConfig) and "_target_" in cfg]
