"""conf/callbacks/influence.yaml in a real (tiny) Hydra training run of examples/train.py."""

from __future__ import annotations

from .helpers_lightning import event_tags
from .test_hydra_more import _run, clean_process  # noqa: F401 (the fixture is used by name)


def test_influence_config_trains(tmp_path, clean_process):  # noqa: F811
    """callbacks=[default,influence] on the digits: the monitor runs (strict: any failure would raise) and logs."""
    metrics = _run(
        ["callbacks=[default,influence]", "callbacks.influence.num_train=16", "callbacks.influence.num_samples=2",
         "callbacks.influence.strict=true"],
        tmp_path,
    )  # fmt: skip
    assert "test/loss" in metrics
    tags = event_tags(tmp_path)
    assert {"influence/probe_0", "influence/self_influence/top"} <= tags["images"], tags["images"]
