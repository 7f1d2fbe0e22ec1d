"""AttributionMonitor end to end: no side effects, resume, validate(), robustness, logging."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from explain_callbacks.callbacks import AttributionMonitor

from .helpers_lightning import event_tags, image_loaders, lit, trainer


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_bit_identical_weights_with_and_without_monitor(tmp_path):
    train, val = image_loaders()
    m0 = lit()
    trainer(tmp_path / "a", max_epochs=2).fit(m0, train, val)
    train, val = image_loaders()
    m1 = lit()
    mon = AttributionMonitor(budget=None, methods=["ig", "smoothgrad", "gradcam"], num_samples=8, strict=True)
    trainer(tmp_path / "b", callbacks=[mon], max_epochs=2).fit(m1, train, val)
    w0, w1 = _weights(m0), _weights(m1)
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k  # BatchNorm buffers included
    assert mon.last_scores["ig"]["completeness_error"] < 0.5


def test_logs_images_histograms_scalars_and_ranking(tmp_path):
    train, val = image_loaders()
    mon = AttributionMonitor(
        budget=None, methods=["saliency", {"name": "ig", "n_steps": 8}], num_samples=6, strict=True)
    tr = trainer(tmp_path, callbacks=[mon], max_epochs=2)
    tr.fit(lit(), train, val)
    tags = event_tags(tmp_path)
    assert "maps/attributions" in tags["images"]
    assert {"sanity/completeness_error/ig", "maps/sparseness/ig", "maps/drift/ig"} <= tags["scalars"]
    assert "maps/values/saliency" in tags["histograms"]
    assert mon.probe_size == 6
    assert "| method |" in mon.ranking_table()


def test_every_n_epochs_and_sanity_check_skipped(tmp_path):
    train, val = image_loaders()
    calls = []

    class Counting(AttributionMonitor):
        def explain(self, trainer, pl_module, x, y, target):
            calls.append(trainer.current_epoch)

    tr = trainer(tmp_path, callbacks=[Counting(budget=None, methods=["saliency"], every_n_epochs=2)], max_epochs=4,
                 num_sanity_val_steps=2)  # fmt: skip
    tr.fit(lit(), train, val)
    assert calls == [1, 3]


def test_resume_restores_probe(tmp_path):
    train, val = image_loaders()
    mon = AttributionMonitor(budget=None, methods=["saliency"], num_samples=5)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    tr = trainer(tmp_path, callbacks=[mon, ckpt], max_epochs=1)
    tr.fit(lit(), train, val)
    probe = mon.probe_x.clone()
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    # resume with a validation set whose first samples differ: the probe must come from the checkpoint
    _, other_val = image_loaders(seed=5)
    mon2 = AttributionMonitor(budget=None, methods=["saliency"], num_samples=5)
    tr2 = trainer(tmp_path / "r", callbacks=[mon2, ModelCheckpoint(dirpath=tmp_path / "ck2")], max_epochs=2)
    tr2.fit(lit(), train, other_val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(mon2.probe_x, probe)
    assert "saliency" in mon2.previous


def test_works_inside_validate_inference_mode(tmp_path):
    _, val = image_loaders()
    mon = AttributionMonitor(budget=None, methods=["ig", "saliency"], num_samples=4, strict=True)
    out = trainer(tmp_path, callbacks=[mon]).validate(lit(), val)
    assert "maps/sparseness/ig" in out[0]
    assert mon.last_scores["ig"]["completeness_error"] < 1.0


def test_nan_probe_sample_is_skipped_with_warning(tmp_path):
    _, val = image_loaders(nan_at=1)
    mon = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4, strict=True)
    with pytest.warns(UserWarning, match="NaN/Inf and are skipped"):
        trainer(tmp_path, callbacks=[mon]).validate(lit(), val)
    assert mon.probe_size == 4 and torch.isfinite(mon.probe_x).all()


def test_failing_method_warns_and_training_continues_unless_strict(tmp_path):
    class Boom:
        name = "boom"

        def __call__(self, model, x, target, create_graph=False):
            raise RuntimeError("kaput")

    train, val = image_loaders()
    m = lit()
    mon = AttributionMonitor(budget=None, methods=[Boom(), "saliency"], num_samples=4)
    with pytest.warns(UserWarning, match="method 'boom' failed: RuntimeError: kaput"):
        trainer(tmp_path, callbacks=[mon], max_epochs=1).fit(m, train, val)
    assert "saliency" in mon.last_scores
    with pytest.raises(RuntimeError, match="kaput"):
        trainer(tmp_path, callbacks=[AttributionMonitor(budget=None, methods=[Boom()], strict=True)], max_epochs=1).fit(
            lit(), train, val
        )


def test_target_out_of_range_is_reported(tmp_path):
    _, val = image_loaders()
    mon = AttributionMonitor(budget=None, methods=["saliency"], target=7, num_samples=4)
    with pytest.warns(UserWarning, match=r"target values must lie in \[0, 2\]"):
        trainer(tmp_path, callbacks=[mon]).validate(lit(), val)
    with pytest.raises(ValueError, match="target values must lie"):
        trainer(tmp_path, callbacks=[AttributionMonitor(
            budget=None, methods=["saliency"], target=7, strict=True)]).validate(
            lit(), val
        )


def test_wrong_input_rank_is_reported(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from explain_callbacks.models import LitClassifier

    class Flat(torch.nn.Module):  # accepts unbatched 1-D inputs, which attributions cannot explain
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 2)

        def forward(self, x):
            return self.lin(x.view(-1, 1))

    model = LitClassifier(Flat())
    val = DataLoader(TensorDataset(torch.randn(8), torch.zeros(8, dtype=torch.long)), batch_size=4)
    mon = AttributionMonitor(budget=None, methods=["saliency"], strict=True, num_samples=4)
    with pytest.raises(ValueError, match="must be batched"):
        trainer(tmp_path, callbacks=[mon]).validate(model, val)


def test_tabular_and_sequence_inputs(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from explain_callbacks.models import MLP, LitClassifier

    x, y = torch.randn(40, 5), torch.randint(0, 2, (40,))
    tab = LitClassifier(MLP(5, 2, hidden=(8,)))
    mon = AttributionMonitor(budget=None, methods=["ig"], feature_names=list("abcde"), num_samples=8, strict=True)
    tr = trainer(tmp_path / "tab", callbacks=[mon])
    tr.validate(tab, DataLoader(TensorDataset(x, y), batch_size=10))
    tags = event_tags(tmp_path / "tab")
    assert "maps/attributions" in tags["images"] and "maps/top_features/ig/text_summary" in tags["text"]
    headers, rows = mon._top_features(mon.previous["ig"])
    assert headers[:2] == ["rank", "feature"] and {r[1] for r in rows} == set("abcde")

    seq = LitClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)))
    xs = torch.randn(20, 4, 3)
    mon2 = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4, strict=True)
    trainer(tmp_path / "seq", callbacks=[mon2]).validate(seq, DataLoader(TensorDataset(xs, y[:20]), batch_size=10))
    assert "maps/attributions" in event_tags(tmp_path / "seq")["images"]


def test_per_class_probe(tmp_path):
    _, val = image_loaders()
    mon = AttributionMonitor(budget=None, methods=["saliency"], num_samples=6, per_class=2)
    trainer(tmp_path, callbacks=[mon]).validate(lit(), val)
    assert torch.bincount(mon.probe_y, minlength=3).tolist() == [2, 2, 2]


def test_unknown_method_fails_fast():
    with pytest.raises(KeyError, match="Available:"):
        AttributionMonitor(budget=None, methods=["not_a_method"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AttributionMonitor(budget=None, methods="saliency")


def test_metrics_on_shapes_with_masks(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from explain_callbacks.datasets import make_shapes
    from explain_callbacks.models import LitClassifier, SmallCNN

    data = make_shapes(24, seed=0)
    val = DataLoader(TensorDataset(data.x, data.y, data.mask), batch_size=12)
    torch.manual_seed(0)
    model = LitClassifier(SmallCNN(3, 4, width=4))
    with pytest.warns(UserWarning, match="metric 'drift' dropped"):
        mon = AttributionMonitor(
            budget=None, methods=["saliency", "gradcam"], metrics=["deletion", "pointing_game", "drift"],
                                 num_samples=6, strict=True)  # fmt: skip
    trainer(tmp_path, callbacks=[mon]).validate(model, val)
    assert mon.probe_mask is not None and mon.probe_mask.shape[0] == 6  # masks found in (x, y, mask) batches
    for m in ("saliency", "gradcam"):
        assert 0.0 <= mon.last_scores[m]["deletion"] <= 1.0
        assert 0.0 <= mon.last_scores[m]["pointing_game"] <= 1.0
    tags = event_tags(tmp_path)
    assert "faithfulness/deletion_curve" in tags["images"]
    assert "localisation/pointing_game/gradcam" in tags["scalars"]
    assert "best on **deletion**" in mon.ranking_table()


def test_two_monitors_share_a_checkpoint(tmp_path):
    """Same methods and probe size, different target and metrics: two state keys, two probes restored."""
    train, val = image_loaders()

    def monitors():
        return (
            AttributionMonitor(budget=None, methods=["saliency"], num_samples=4, per_class=1),
            AttributionMonitor(
                budget=None, methods=["saliency"], num_samples=4, target="prediction", metrics=["deletion"]),
        )

    a, b = monitors()
    assert a.state_key != b.state_key
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, callbacks=[a, b, ckpt], max_epochs=1).fit(lit(), train, val)
    assert a.probe_size == 3 and b.probe_size == 4  # one per class (3 classes)
    a2, b2 = monitors()
    _, other_val = image_loaders(seed=5)
    tr = trainer(tmp_path / "r", callbacks=[a2, b2], max_epochs=2)
    tr.fit(lit(), train, other_val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(a2.probe_x, a.probe_x) and torch.equal(b2.probe_x, b.probe_x)


def test_other_loggers_get_the_scalars(tmp_path):
    """Without TensorBoard the pictures are skipped and the scalars still reach the logger."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    train, val = image_loaders()
    mon = AttributionMonitor(
        budget=None, methods=["saliency", {"name": "ig", "n_steps": 4}], metrics=["deletion"], num_samples=4,
                             strict=True)  # fmt: skip
    tr = trainer(tmp_path, callbacks=[mon], max_epochs=1, logger=False)
    tr.loggers = [CSVLogger(str(tmp_path), name="csv")]
    tr.fit(lit(), train, val)
    (path,) = tmp_path.rglob("metrics.csv")
    with open(path) as f:
        columns = set(next(csv.reader(f)))
    assert {"faithfulness/deletion/ig", "maps/sparseness/saliency", "sanity/completeness_error/ig"} <= columns
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
