"""Where results go: the tag layout, the test prefix, one step axis, the custom-scalars layout, every logger
(TensorBoard, CSV files, MLflow file store, W&B offline: the real packages), the fallback without matplotlib,
and quiet runs."""

from __future__ import annotations

import glob
import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from explain_callbacks.callbacks import AttributionMonitor, InteractionMonitor
from explain_callbacks.callbacks._logging import metric_section, png_bytes

from .helpers_lightning import image_loaders, lit

PNG = b"\x89PNG\r\n\x1a\n"


def _monitor(**kw):
    return AttributionMonitor(budget=None, methods=["saliency", {"name": "ig", "n_steps": 4}], metrics=["deletion"],
                              num_samples=4, max_images=4, strict=True, **kw)  # fmt: skip


def _fit(logger, callbacks, max_epochs: int = 2, test: bool = False, root: Path | None = None) -> pl.Trainer:
    train, val = image_loaders()
    tr = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=logger,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    log_every_n_steps=1, default_root_dir=str(root) if root else None)  # fmt: skip
    tr.fit(lit(), train, val)
    if test:
        tr.test(tr.lightning_module, val, verbose=False)
    return tr


def _events(root: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # one run folder; fit and test may write one event file each (the writer is reopened for test)
    (folder,) = {os.path.dirname(f) for f in glob.glob(str(root / "**" / "events.out.tfevents.*"), recursive=True)}
    acc = EventAccumulator(folder, size_guidance={"images": 0, "tensors": 0, "scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def _tb(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(str(tmp_path), name="tb")


#: every tag an AttributionMonitor(budget=None, saliency, ig; deletion) writes in a fit (the documented layout)
FIT_SCALARS = {
    "cost/seconds/saliency", "cost/seconds/ig", "maps/sparseness/saliency", "maps/sparseness/ig",
    "maps/drift/saliency", "maps/drift/ig", "sanity/completeness_error/ig", "faithfulness/deletion/saliency",
    "faithfulness/deletion/ig",
}  # fmt: skip
FIT_IMAGES = {"maps/attributions", "faithfulness/deletion_curve"}
FIT_HISTOGRAMS = {"maps/values/saliency", "maps/values/ig"}


def test_tag_layout_test_prefix_and_one_step_axis(tmp_path):
    tr = _fit(_tb(tmp_path), [_monitor()], test=True)
    acc = _events(tmp_path)
    tags = acc.Tags()
    ours = {t for t in tags["scalars"] if not t.startswith(("train/", "val/", "test/loss", "test/acc"))}
    ours -= {"epoch", "hp_metric"}
    test_drift = {"test/maps/drift/saliency", "test/maps/drift/ig"}  # drift compares validation epochs only
    assert ours == FIT_SCALARS | {"test/" + t for t in FIT_SCALARS} - test_drift
    assert set(tags["images"]) == FIT_IMAGES | {"test/" + t for t in FIT_IMAGES}
    assert set(tags["histograms"]) == FIT_HISTOGRAMS | {"test/" + t for t in FIT_HISTOGRAMS}
    text = {t.removesuffix("/text_summary") for t in tags["tensors"] if t.endswith("text_summary")}
    assert text == {"faithfulness/ranking", "test/faithfulness/ranking"}
    # the validation curves hold the validation epochs only: the test values did not land in them
    drift = acc.Scalars("maps/drift/ig")
    assert len(drift) == 1 and drift[0].value < 1.0  # epoch 1 vs epoch 0 (a point at 1.0 was the test's)
    assert len(acc.Scalars("faithfulness/deletion/ig")) == 2
    # images and scalars on one step axis, the one Lightning logs the scalars at
    for image_tag, scalar_tag in [("maps/attributions", "maps/sparseness/ig"),
                                  ("faithfulness/deletion_curve", "faithfulness/deletion/ig"),
                                  ("test/maps/attributions", "test/maps/sparseness/ig")]:  # fmt: skip
        assert [e.step for e in acc.Images(image_tag)] == [e.step for e in acc.Scalars(scalar_tag)], image_tag
    steps = [e.step for e in acc.Images("maps/attributions")]
    assert steps[0] > 0 and steps != [0, 1]  # was the epoch index
    assert acc.Images("test/maps/attributions")[0].step == tr.global_step


def test_custom_scalars_layout_one_chart_per_metric_every_method_a_line(tmp_path):
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util

    from explain_callbacks.callbacks import AttributionRegularizer

    inter = InteractionMonitor(budget=None, methods=["cd"], num_samples=4, strict=True)
    reg = AttributionRegularizer("rrr", weight=0.1, mask=lambda b: torch.ones_like(b[0]))
    _fit(_tb(tmp_path), [_monitor(), inter, reg], max_epochs=1, test=True)
    acc = _events(tmp_path)
    (event, *_) = acc.Tensors("custom_scalars__config__")[::-1]  # TensorBoard shows the latest layout
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensor_util.make_ndarray(event.tensor_proto).item())
    cats = {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}
    assert list(cats) == ["maps", "faithfulness", "sanity", "interactions", "regularizers", "cost"]  # all, in order
    assert cats["regularizers"] == {"penalty": ["^regularizers/penalty/[^/]+_step$"],
                                    "task_loss": ["^regularizers/task_loss_step$"]}  # fmt: skip
    assert set(cats["faithfulness"]) == {"deletion"} and set(cats["maps"]) == {"sparseness"}  # no drift in 1 epoch
    assert set(cats["interactions"]) == {"mean_abs", "top_pair", "consistency"}
    scalars = acc.Tags()["scalars"]
    for charts in cats.values():
        for chart, (regex,) in charts.items():
            matched = {t for t in scalars if re.search(regex, t)}
            assert matched and all(t.split("/")[1].removesuffix("_step") == chart for t in matched), (chart, matched)
            assert not any(t.startswith("test/") for t in matched)
    (deletion,) = cats["faithfulness"]["deletion"]
    assert {t for t in scalars if re.search(deletion, t)} == {
        "faithfulness/deletion/saliency", "faithfulness/deletion/ig"
    }  # fmt: skip
    assert {t for t in scalars if re.search(cats["cost"]["seconds"][0], t)} == {
        "cost/seconds/saliency", "cost/seconds/ig", "cost/seconds/cd"
    }  # fmt: skip


def test_metric_sections():
    assert metric_section("deletion") == "faithfulness" and metric_section("insertion_2") == "faithfulness"
    assert metric_section("randomisation") == "sanity" and metric_section("max_sensitivity") == "robustness"
    assert metric_section("pointing_game") == "localisation" and metric_section("my_metric") == "metrics"

    class Own:
        section = "calibration"

    assert metric_section("ece", Own()) == "calibration"


def _png_ok(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG)
    import matplotlib.image

    arr = matplotlib.image.imread(str(path))
    return arr.shape[0], arr.shape[1]


def test_png_encoder_round_trip(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image
    import numpy as np

    rgb = np.random.default_rng(0).integers(0, 255, (7, 5, 3), dtype=np.uint8)
    (tmp_path / "a.png").write_bytes(png_bytes(rgb))
    back = matplotlib.image.imread(str(tmp_path / "a.png"))
    assert np.array_equal((back[..., :3] * 255).round().astype(np.uint8), rgb)


def test_csv_logger_gets_figures_and_tables_as_files_beside_metrics(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="csv")
    tr = _fit(logger, [_monitor()], test=True)
    log_dir = Path(logger.log_dir)
    assert (log_dir / "metrics.csv").is_file()
    maps = sorted((log_dir / "media" / "maps" / "attributions").glob("step_*.png"))
    assert len(maps) == 2
    h, w = _png_ok(maps[-1])
    assert h > 300 and w > 300
    assert len(list((log_dir / "media" / "faithfulness" / "deletion_curve").glob("*.png"))) == 2
    ranking = sorted((log_dir / "media" / "faithfulness" / "ranking").glob("step_*.csv"))
    assert len(ranking) == 2
    rows = ranking[-1].read_text().splitlines()
    assert rows[0].startswith("method,") and {r.split(",")[0] for r in rows[1:]} == {"saliency", "ig"}
    assert ranking[-1].with_suffix(".md").read_text().startswith("| method |")
    assert list((log_dir / "media" / "test" / "maps" / "attributions").glob(f"step_{tr.global_step:07d}.png"))
    header = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "faithfulness/deletion/ig" in header and "test/faithfulness/deletion/ig" in header
    written = glob.glob(str(tmp_path / "**"), recursive=True)
    assert all(Path(p).resolve().is_relative_to(tmp_path.resolve()) for p in written)


def test_mlflow_logger_gets_artifacts_in_a_local_file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 asks file stores to opt in
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name="explain", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # mlflow's notice about the file store
        _fit(logger, [_monitor()], max_epochs=1)
    client = logger.experiment

    def files(path: str) -> list[str]:
        out = []
        for f in client.list_artifacts(logger.run_id, path):
            out += files(f.path) if f.is_dir else [f.path]
        return out

    got = files("media")
    assert any(p.startswith("media/maps/attributions/step_") and p.endswith(".png") for p in got), got
    assert any(p.startswith("media/faithfulness/deletion_curve/") for p in got)
    assert any(p.startswith("media/faithfulness/ranking/") and p.endswith(".csv") for p in got)
    local = client.download_artifacts(logger.run_id, next(p for p in got if p.startswith("media/maps/")), str(tmp_path))
    assert _png_ok(Path(local))[0] > 300
    metrics = client.get_run(logger.run_id).data.metrics
    assert "faithfulness/deletion/ig" in metrics


def test_wandb_logger_offline_gets_images_and_tables(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="explain")
    try:
        _fit(logger, [_monitor()], max_epochs=1)
    finally:
        logger.experiment.finish()
    (run,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    media = glob.glob(os.path.join(run, "files", "media", "**", "*"), recursive=True)
    pngs = [p for p in media if p.endswith(".png")]
    assert any("maps/attributions" in p.replace(os.sep, "/") for p in pngs), media
    assert any("faithfulness/deletion_curve" in p.replace(os.sep, "/") for p in pngs)
    assert any("faithfulness/ranking" in p.replace(os.sep, "/") and p.endswith("table.json") for p in media), media
    assert _png_ok(Path(next(p for p in pngs if "attributions" in p)))[0] > 300


def test_without_matplotlib_pictures_are_plain_grids_and_curves_tables(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    for name in [m for m in sys.modules if m.startswith("matplotlib")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    logger = CSVLogger(str(tmp_path), name="csv")
    _fit(logger, [_monitor()], max_epochs=1)
    media = Path(logger.log_dir) / "media"
    (grid,) = (media / "maps" / "attributions").glob("*.png")
    assert grid.read_bytes().startswith(PNG)
    assert not list((media / "faithfulness" / "deletion_curve").glob("*.png"))
    (curve,) = (media / "faithfulness" / "deletion_curve").glob("*.csv")
    assert curve.read_text().splitlines()[0] == "fraction,saliency,ig"


def test_runs_are_quiet(tmp_path):
    """Logging figures, tables and the layout raises no warning (matplotlib, TensorBoard, our own)."""
    inter = InteractionMonitor(budget=None, methods=["cd"], num_samples=4, strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(_tb(tmp_path), [_monitor(), inter], max_epochs=1, test=True)
    sources = ("matplotlib", "tensorboard", "explain_callbacks")
    ours = [w for w in caught if any(k in (w.filename or "") for k in sources)]
    assert not ours, [f"{w.filename}: {w.message}" for w in ours]


def test_no_other_rank_writes_media(tmp_path, monkeypatch):
    """Pictures and tables are written on global rank zero only (the same code path DDP takes)."""
    from explain_callbacks.callbacks import _logging

    logger = _tb(tmp_path)
    tr = pl.Trainer(logger=logger, accelerator="cpu", devices=1)
    assert _logging.media_loggers(tr) == [logger]
    monkeypatch.setattr(type(tr), "global_rank", property(lambda self: 1))
    assert _logging.media_loggers(tr) == [] and _logging.tensorboard_writers(tr) == []
    _logging.log_figure(tr, "maps/x", torch.rand(3, 4, 4))
    _logging.log_table(tr, "maps/t", ["a"], [[1]])
    logger.experiment.flush()
    tags = _events(tmp_path).Tags()
    assert not tags["images"] and not tags["tensors"]


def test_captions_name_true_class_prediction_and_probability():
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, TensorDataset

    from explain_callbacks.callbacks.attribution_monitor import find_class_names

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x[:, :3] * 10  # logits: the first three inputs

    mon = AttributionMonitor(budget=None, methods=["saliency"], class_names=["cat", "dog", "cow"])
    x = torch.tensor([[1.0, 0.0, 0.0, 5.0], [0.0, 0.0, 1.0, 5.0]])
    captions, wrong = mon._captions(Fixed(), x, torch.tensor([0, 1]), torch.tensor([0, 1]))
    p = float(torch.softmax(torch.tensor([0.0, 0.0, 10.0]), 0)[2])
    # a wrong prediction says which class the maps explain (target="label": the true one)
    assert captions == ["true cat · pred cat (1.00)", f"true dog · pred cow ({p:.2f}) · explains dog"]
    assert wrong == [False, True]
    captions, _ = mon._captions(Fixed(), x, torch.tensor([0, 1]), torch.tensor([1, 2]))  # target= other classes
    assert captions == ["true cat · pred cat (1.00) · explains dog", f"true dog · pred cow ({p:.2f})"]
    # one output with class targets: sigmoid; regression (no target): the value
    one = torch.nn.Linear(4, 1)
    with torch.no_grad():
        one.weight.zero_()
        one.bias.fill_(2.0)
    captions, wrong = mon._captions(one, x, torch.tensor([1, 0]), torch.tensor([0, 0]))
    assert captions[0] == "true dog · pred dog (0.88)" and wrong == [False, True]
    regression = AttributionMonitor(budget=None, methods=["saliency"], target=None)
    captions, _ = regression._captions(one, x, torch.tensor([1.5, 2.0]), None)
    assert captions == ["y 1.5 · ŷ 2", "y 2 · ŷ 2"]
    # class names found on the data module, else on the validation dataset (or the one a Subset wraps)
    assert find_class_names(SimpleNamespace(datamodule=SimpleNamespace(class_names=["a", "b"]))) == ["a", "b"]
    ds = TensorDataset(torch.zeros(2, 1))
    ds.classes = ["x", "y"]
    loader = DataLoader(torch.utils.data.Subset(ds, [0]))
    assert find_class_names(SimpleNamespace(datamodule=None, val_dataloaders=loader)) == ["x", "y"]
    assert find_class_names(SimpleNamespace(datamodule=None, val_dataloaders=None)) is None


def test_ranking_names_ties_instead_of_a_winner():
    """A score every method shares (the pointing game at 1.0 for all three in the main job) is a tie, not a win for
    the first method listed; a tie for the best names every tied method; NaN scores rank nothing."""
    mon = AttributionMonitor(budget=None, methods=["saliency"])
    mon._higher = {"pointing_game": True, "deletion": False, "insertion": True}
    mon.last_scores = {
        "saliency": {"pointing_game": 1.0, "deletion": 0.2, "insertion": 0.3},
        "ig": {"pointing_game": 1.0, "deletion": 0.2, "insertion": float("nan")},
        "occlusion": {"pointing_game": 1.0, "deletion": 0.3, "insertion": 0.8},
    }
    _, note = mon.ranking_rows()
    lines = note.splitlines()
    assert "- **pointing_game** (higher is better): every method scores 1, a tie" in lines
    assert "- best on **deletion** (lower is better): `saliency`, `ig` (tie)" in lines
    assert "- best on **insertion** (higher is better): `occlusion`" in lines
    assert not any("best on **pointing_game**" in line for line in lines)
    table = mon.ranking_table()  # a missing score is a dash (was "nan")
    assert "| ig | 0.2 | – | 1 |" in table and "nan" not in table
