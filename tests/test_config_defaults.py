"""Same defaults in Python and Hydra: each conf/callbacks/<name>.yaml sets every argument it lists to the
constructor's default (``AttributionMonitor()`` in a notebook and ``callbacks=attribution`` on the command line
explain the same probes on the same epochs), apart from the few choices listed here with their reason."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from explain_callbacks.callbacks import AttributionMonitor, InteractionMonitor
from explain_callbacks.callbacks.distiller import Distiller

CONF = Path(__file__).resolve().parents[1] / "conf"

#: (config, key): why the config's value is not the constructor's default
CHOSEN = {
    # a regularizer's weight and mask are what the config is about: λ tuned per penalty (bench_regularizers), the
    # mask at batch index 2 of the shipped (x, y, mask) data sets; Python has no default mask to guess
    **{
        (c, k): "tuned per penalty"
        for c in ("cdep", "rrr", "eg_prior", "robust_maps")
        for k in ("penalty", "weight", "mask", "name")
    },
    ("robust_maps", "start_epochs"): "the map-stability defence costs less accuracy switched on after the fit "
    "(bench_robustness); other penalties start at once",
    ("distiller", "seed"): "the run's seed (${seed})",
    ("saliency_masker", "objective"): "None in Python stands for MaskerObjective(), which the config spells out",
}


def _leaf_configs() -> list[str]:
    # default.yaml composes the others with the main job's choices (its own comments say which)
    return sorted(p.stem for p in (CONF / "callbacks").glob("*.yaml") if p.stem not in ("default", "none"))


def _constructor_defaults(cls: type) -> dict:
    out: dict = {}
    for klass in reversed(cls.__mro__):  # a subclass's default wins; **kwargs reach the base's
        try:
            params = inspect.signature(klass.__init__).parameters.values()
        except (TypeError, ValueError):
            continue
        out.update({p.name: p.default for p in params if p.default is not inspect.Parameter.empty})
    # kwargs.setdefault(...) in a subclass's __init__ (SpRAyMonitor's every_n_epochs): read from an instance
    return out


def _instance_value(obj, key):
    for attr in (key, f"_{key}"):
        if hasattr(obj, attr):
            return getattr(obj, attr)
    raise AttributeError(key)


@pytest.mark.parametrize("name", _leaf_configs())
def test_config_values_are_the_python_defaults(name):
    with initialize_config_dir(config_dir=str(CONF / "callbacks"), version_base="1.3"):
        cfg = compose(name, overrides=["+seed=0"])
    (node,) = [v for v in cfg.values() if OmegaConf.is_dict(v) and "_target_" in v]
    cls = get_class(node._target_)
    defaults = _constructor_defaults(cls)
    plain = OmegaConf.to_container(node, resolve=True)
    checked, differ = 0, {}
    for key, value in plain.items():
        if key.startswith("_") or (name, key) in CHOSEN:
            continue
        assert key in defaults or key in inspect.signature(cls.__init__).parameters, f"{name}.{key} is no argument"
        default = defaults.get(key, inspect.Parameter.empty)
        if default is inspect.Parameter.empty:  # set through **kwargs.setdefault: the instance's value
            default = _instance_value(cls(), key)
        if isinstance(default, tuple):
            default = list(default)
        checked += 1
        if _normal(value) != _normal(default):
            differ[key] = (value, default)
    assert not differ, f"conf/callbacks/{name}.yaml differs from {cls.__name__}()'s defaults: {differ}"
    assert checked >= 3


def _normal(v):
    """Mappings and sequences compared as plain containers (a MappingProxy default as a dict)."""
    if hasattr(v, "items"):
        return {k: _normal(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_normal(x) for x in v]
    return v


def test_saliency_masker_objective_is_the_default_objective():
    from explain_callbacks.callbacks import SaliencyMasker

    with initialize_config_dir(config_dir=str(CONF / "callbacks"), version_base="1.3"):
        cfg = compose("saliency_masker")
    spelled = OmegaConf.to_container(cfg.saliency_masker.objective)
    default = SaliencyMasker().objective
    assert spelled == {k: getattr(default, k) for k in spelled}


def test_python_defaults_explain_in_a_three_epoch_run():
    """The README's snippets train 3 epochs: every monitor explains within them by default."""
    assert AttributionMonitor().every_n_epochs <= 3
    assert InteractionMonitor().every_n_epochs <= 3
    assert Distiller().every_n_epochs <= 3
    # the Distiller's default sparse student has a non-zero limit ("386 non-zero weights on 356 features")
    assert Distiller().students["sparse_logistic"].max_nonzeros == 10


def test_robust_maps_penalty_spells_the_penalty_defaults():
    """conf/callbacks/robust_maps.yaml's penalty node is MapStabilityPenalty()'s defaults (the benchmarked defence:
    benchmarks/bench_robustness.py), so the config and ``AttributionRegularizer("map_stability")`` agree."""
    from explain_callbacks.regularize import MapStabilityPenalty

    with initialize_config_dir(config_dir=str(CONF / "callbacks"), version_base="1.3"):
        cfg = compose("robust_maps", overrides=["+seed=0"])
    node = OmegaConf.to_container(cfg.robust_maps.penalty, resolve=True)
    params = inspect.signature(MapStabilityPenalty.__init__).parameters
    spelled = {k: v for k, v in node.items() if k not in ("name", "seed")}
    assert set(spelled) == {k for k in params if k not in ("self", "seed", "keep_norm_stats")}
    for key, value in spelled.items():
        default = params[key].default
        assert value == (pytest.approx(default, rel=1e-6) if isinstance(default, float) else default), key
