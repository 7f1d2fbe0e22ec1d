"""The regularizer callback configs and the experiment rows compose and instantiate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from explain_callbacks.callbacks.regularizer import AttributionRegularizer
from explain_callbacks.datasets.decoy import ColorDigitsDataModule, DecoyDigitsDataModule, RandomPixelGroups
from explain_callbacks.regularize import CDEPPenalty, EGPrior, RRRPenalty

CONF = Path(__file__).resolve().parents[1] / "conf"
ROWS = ["clean", "vanilla", "cdep", "cdep_l1", "rrr", "eg"]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[*overrides, "paths.output_dir=/tmp/x"])


@pytest.mark.parametrize("name,kind", [("cdep", CDEPPenalty), ("rrr", RRRPenalty), ("eg_prior", EGPrior)])
def test_callback_configs_instantiate(name, kind):
    cfg = _compose([f"callbacks={name}", "data=decoy_digits"])
    (entry,) = cfg.callbacks.values()
    cb = instantiate(entry)
    assert isinstance(cb, AttributionRegularizer) and isinstance(cb.penalty, kind)
    assert cb.weight > 0 and cb.mask == 2


@pytest.mark.parametrize("data", ["decoy", "color"])
@pytest.mark.parametrize("row", ROWS)
def test_experiment_rows_instantiate(data, row):
    cfg = _compose([f"experiment={data}_{row}", "seed=3"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, DecoyDigitsDataModule if data == "decoy" else ColorDigitsDataModule)
    assert dm.seed == 3
    model = instantiate(cfg.model)
    c = 1 if data == "decoy" else 3
    assert model(torch.zeros(2, c, 32, 32)).shape == (2, 10)
    cbs = [instantiate(v) for v in (cfg.callbacks or {}).values()]
    if row in ("clean", "vanilla"):
        assert not cbs
        assert (getattr(dm, "decoy", None) or getattr(dm, "color", None)) == ("random" if row == "clean" else "label")
    else:
        (cb,) = cbs
        assert isinstance(cb, AttributionRegularizer)
        if row == "cdep_l1":
            assert cb.penalty.form == "l1"
        if data == "color":
            assert isinstance(cb.mask, RandomPixelGroups) and cb.mask.grouped == row.startswith("cdep")
