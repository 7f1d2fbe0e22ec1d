"""ExplainWriter and the explain entry point: a whole data set through trainer.predict.

One process and two (DDP, gloo) give the same ids, maps and scores sample by sample; a run that crashed resumes
without losing or recomputing a finished shard; the model is left as found; the reader, the summary and the
entry point's errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from explain_callbacks.predict import BlockBatchSampler, ExplainReader, ExplainWriter, SplitData, read_maps
from explain_callbacks.predict.store import ShardWriter, run_ids

from .helpers_lightning import event_tags, lit
from .scripts.ddp_predict import BATCH, METHODS, METRICS, Data, N, explain

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The script's data set explained in one process."""
    out = tmp_path_factory.mktemp("single")
    explain(str(out), 1)
    return out


def _same_results(a: ExplainReader, b: ExplainReader) -> None:
    assert a.ids == b.ids == list(range(N))
    for method in a.methods:
        assert torch.equal(a.maps(a.ids, method), b.maps(b.ids, method)), method
    for metric in a.metrics:
        for method in a.methods:
            assert torch.equal(a.scores(metric, method)[1], b.scores(metric, method)[1]), (metric, method)
    for col in ("label", "target", "pred", "output"):
        assert torch.equal(a.column(col), b.column(col)), col
    for part in ("means", "per_class"):  # sums over other shards: equal up to the order of the additions
        assert _flat(a.summary()[part]) == pytest.approx(_flat(b.summary()[part]), rel=1e-12), part


def _flat(tree: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.ddp
def test_two_processes_equal_one_sample_by_sample(single, tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PL_DISABLE_FORK="1")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "ddp_predict.py"), str(tmp_path), "2"],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "DDP_OK" in out.stdout
    # each process wrote its own shards and index; rank zero merged them
    assert {p.name[:3] for p in (tmp_path / "shards").iterdir()} == {"r0-", "r1-"}
    assert (tmp_path / "index.rank0.json").is_file() and (tmp_path / "index.rank1.json").is_file()
    two, one = ExplainReader(tmp_path), ExplainReader(single)
    assert two.complete and two.index["world_size"] == 2
    _same_results(one, two)  # smoothgrad too: batches are dealt whole, so its noise is drawn per the same rows


class _Counting:
    """A method that counts the samples it explains."""

    def __init__(self, method) -> None:
        self.method, self.rows = method, 0

    def __call__(self, model, inputs, target=None, **kw):
        self.rows += inputs.shape[0]
        return self.method(model, inputs, target, **kw)


class _Crash(Callback):
    def __init__(self, after: int) -> None:
        self.after = after

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx + 1 == self.after:
            raise RuntimeError("simulated crash")


def _counted_run(out: Path, crash_after: int | None = None) -> dict[str, int]:
    writer = ExplainWriter(out, methods=METHODS, metrics=METRICS, shard_size=8)
    writer.methods = {k: _Counting(m) for k, m in writer.methods.items()}  # settings (the resume check) unchanged
    callbacks = [writer] + ([_Crash(crash_after)] if crash_after else [])
    trainer = pl.Trainer(accelerator="cpu", devices=1, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)  # fmt: skip
    trainer.predict(lit(), datamodule=SplitData(Data()), return_predictions=False)
    return {k: m.rows for k, m in writer.methods.items()}


def test_crash_and_restart_lose_nothing_and_recompute_nothing_finished(single, tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _counted_run(tmp_path, crash_after=5)
    # shards of 8 rows = 2 batches: 4 batches written, the 5th was in memory and is lost
    assert not (tmp_path / "index.json").exists()
    partial = ExplainReader(tmp_path)
    assert not partial.complete and partial.ids == list(range(16))
    # a shard renamed into place whose index update was lost, and a temporary file of a write cut short
    shard = tmp_path / partial.where(0)[0]
    shutil.copy(shard, tmp_path / "shards" / "r0-000007.safetensors")
    (tmp_path / "shards" / ".r0-000008.safetensors.x.tmp").write_bytes(b"cut")
    calls = _counted_run(tmp_path)
    assert calls == {name: N - 16 for name in calls}  # nothing finished is computed again
    done = ExplainReader(tmp_path)
    assert done.complete
    assert max(int(s["file"][-17:-12]) for s in done.index["shards"]) > 7  # the orphan's name is never reused
    _same_results(single and ExplainReader(single), done)


def test_restart_with_other_settings_is_refused(single):
    writer = ExplainWriter(single, methods=["saliency"], metrics=METRICS, shard_size=8)
    trainer = pl.Trainer(accelerator="cpu", devices=1, callbacks=[writer], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"other settings .*methods.*another output directory"):
        trainer.predict(lit(), datamodule=SplitData(Data()), return_predictions=False)


def test_a_finished_run_skips_every_batch(single, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(single, out)
    assert _counted_run(out) == {"saliency": 0, "ig": 0, "smoothgrad": 0}
    _same_results(ExplainReader(single), ExplainReader(out))


class _RngAround(Callback):
    """The global RNG state before the writer's batch hook (this callback) and after it (``self.after``)."""

    def __init__(self) -> None:
        self.state, self.checked, self.same = None, 0, True
        outer = self

        class After(Callback):
            def on_predict_batch_end(self, *args, **kw):
                outer.checked += 1
                outer.same &= torch.equal(torch.get_rng_state(), outer.state)

        self.after = After()

    def on_predict_batch_end(self, *args, **kw):
        self.state = torch.get_rng_state()


def test_model_left_as_found_and_summary_logged(tmp_path):
    model = lit()
    model.train()
    model.net.features[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    writer = ExplainWriter(tmp_path, methods=["saliency", {"name": "smoothgrad", "n_samples": 2}],
                           metrics=["sparseness"], shard_size=100)  # fmt: skip
    rng = _RngAround()
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, callbacks=[rng, writer, rng.after], logger=logger, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.predict(model, datamodule=SplitData(Data(), batch_size=16), return_predictions=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included
    assert all(p.grad is None for p in model.parameters())
    assert not model.net.features[0].weight.requires_grad and model.net.features[1].weight.requires_grad
    assert rng.checked == 3 and rng.same  # the global RNG as the writer found it, at every batch
    assert "predict_step" not in model.__dict__  # the no-op predict step is gone
    # one shard (100 rows > 45), the summary per class with the data module's names, TensorBoard scalars and tables
    assert len(list((tmp_path / "shards").iterdir())) == 1
    summary = ExplainReader(tmp_path).summary()
    assert summary["class_key"] == "label" and set(summary["per_class"]["sparseness"]["saliency"]) <= {"a", "b", "c"}
    tags = event_tags(tmp_path)
    assert "maps/sparseness/saliency" in tags["scalars"]
    assert {"summary/means/text_summary", "summary/per_class/sparseness/text_summary"} <= tags["text"]


def test_reader_returns_maps_in_the_order_asked(single):
    reader = ExplainReader(single)
    ids = [44, 0, 17, 17, 3]
    maps = reader.maps(ids, "saliency")
    assert maps.shape == (5, 1, 8, 8)
    for row, i in enumerate(ids):
        assert torch.equal(maps[row], reader.maps([i], "saliency")[0])
    assert torch.equal(read_maps(single, torch.tensor(ids), "ig"), reader.maps(ids, "ig"))
    # an index says where each sample is: id -> (shard, row)
    shard, row = reader.where(17)
    assert shard.startswith("shards/r0-") and 0 <= row < 8
    with pytest.raises(KeyError, match=r"sample id 45 is not in .*ids run from 0 to 44"):
        reader.maps([45], "ig")
    with pytest.raises(KeyError, match="method 'gradcam' was not computed"):
        reader.maps([0], "gradcam")


def test_batch_size_reaches_the_methods_and_metrics(tmp_path):
    writer = ExplainWriter(tmp_path, methods=["saliency", {"name": "ig", "batch_size": 7}],
                           metrics=["deletion", {"name": "insertion", "batch_size": 5}], batch_size=3)  # fmt: skip
    assert writer.methods["saliency"].batch_size == 3 and writer.methods["ig"].batch_size == 7
    assert writer.metrics["deletion"].batch_size == 3 and writer.metrics["insertion"].batch_size == 5
    with pytest.raises(ValueError, match="compares maps across training epochs"):
        ExplainWriter(tmp_path, metrics=["drift"])


def test_block_batch_sampler_deals_whole_batches():
    one = list(BlockBatchSampler(N, BATCH))
    parts = [list(BlockBatchSampler(N, BATCH, r, 3)) for r in range(3)]
    assert sum(len(p) for p in parts) == len(one) and [len(p) for p in parts] == [len(s) for s in
                                                                                   (BlockBatchSampler(N, BATCH, r, 3)
                                                                                    for r in range(3))]  # fmt: skip
    assert sorted(b[0] for p in parts for b in p) == [b[0] for b in one]
    assert all(b in one for p in parts for b in p)


def test_shard_writer_writes_atomically_and_lists_after(tmp_path):
    w = ShardWriter(tmp_path, 0, {"methods": {}})
    w.write({"ids": torch.tensor([4, 5, 6, 0, 9, 10])}, {"seconds": {}})
    shards = ShardWriter(tmp_path, 0, {}).shards
    assert [s["ids"] for s in shards] == [[[4, 3], [0, 1], [9, 2]]]  # runs of consecutive ids, in row order
    assert run_ids(shards[0]["ids"]) == [4, 5, 6, 0, 9, 10]
    assert not list(tmp_path.rglob("*.tmp"))
    assert ShardWriter(tmp_path, 0, {})._next == 1 and ShardWriter(tmp_path, 1, {})._next == 0


# ---------------------------------------------------------------- the entry point
def _cfg(tmp_path: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    own_data = any(o == "~data" or o.startswith("data=") for o in overrides)
    tiny = [] if own_data else ["data.n_train=8", "data.n_val=8", "data.n_test=12", "data.batch_size=6"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("explain", overrides=[
            f"paths.output_dir={tmp_path}", *tiny, "trainer.enable_progress_bar=false", *overrides,
        ])  # fmt: skip


@pytest.fixture(scope="module")
def cnn_ckpt(tmp_path_factory) -> Path:
    """Weights of the shapes CNN (conf/model/cnn.yaml fitted to data=shapes), as a state dict."""
    from explain_callbacks.models import LitClassifier, SmallCNN

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save({"state_dict": LitClassifier(SmallCNN(3, 4, width=16)).state_dict()}, path)
    return path


def test_entry_point_explains_the_split(cnn_ckpt, tmp_path):
    from explain_callbacks.explain import run

    summary = run(_cfg(tmp_path, f"ckpt_path={cnn_ckpt}", "methods=[saliency]", "metrics=[sparseness]"))
    assert summary["n_samples"] == 12 and summary["means"]["sparseness"]["saliency"] > 0
    reader = ExplainReader(tmp_path)
    assert reader.ids == list(range(12)) and reader.maps([0], "saliency").shape == (1, 3, 32, 32)
    assert reader.settings["ckpt_path"] == str(cnn_ckpt.resolve()) and reader.settings["split"] == "test"
    assert "maps/sparseness/saliency" in event_tags(tmp_path / "tensorboard")["scalars"]


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ([], ValueError, "ckpt_path is not set"),
        (["ckpt_path=/no/such.ckpt"], FileNotFoundError, "is not a file"),
        (["CKPT", "~model", "+model._target_=no_such_pkg.Module"], ValueError,
         "(?s)'no_such_pkg.Module' cannot be imported.*install the package"),
        (["CKPT", "model=mlp"], ValueError, "weights do not fit the model config.*trained with"),
        (["CKPT", "~data"], ValueError, "No data config: choose"),
        (["CKPT", "split=predict"], ValueError, "no DataLoader for split='predict'.*choose another split"),
    ],
    ids=["no-ckpt", "missing-ckpt", "class-not-importable", "other-model", "no-data", "no-split"],
)
def test_entry_point_errors_name_the_fix(cnn_ckpt, tmp_path, overrides, error, match):
    from explain_callbacks.explain import run

    overrides = [f"ckpt_path={cnn_ckpt}" if o == "CKPT" else o for o in overrides]
    with pytest.raises(error, match=match):
        run(_cfg(tmp_path, *overrides))


def test_entry_point_refuses_a_pickled_object(tmp_path):
    from explain_callbacks.explain import load_checkpoint

    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "obj": _Crash(1)}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint(path)


def test_entry_point_takes_the_training_runs_configs(tmp_path):
    """A checkpoint inside a training run (``<run>/tensorboard/checkpoints/``) is explained with that run's model and
    data configs (its ``.hydra/config.yaml``) unless the command line chooses others."""
    from omegaconf import OmegaConf

    from explain_callbacks.explain import run
    from explain_callbacks.models import LitClassifier, SmallCNN

    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save({"model": {"_target_": "explain_callbacks.models.LitClassifier",
                              "net": {"_target_": "explain_callbacks.models.SmallCNN", "in_channels": 1,
                                      "num_classes": 10, "width": 8}},
                    "data": {"_target_": "explain_callbacks.datasets.shapes.ShapesDataModule", "n_train": 8,
                             "n_val": 8, "n_test": 5, "batch_size": 5, "seed": "${seed}"}},
                   run_dir / ".hydra" / "config.yaml")  # fmt: skip
    ckpt = run_dir / "tensorboard" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": LitClassifier(SmallCNN(3, 4, width=8)).state_dict()}, ckpt)  # fitted to the shapes
    summary = run(_cfg(tmp_path / "out", f"ckpt_path={ckpt}", "methods=[saliency]", "metrics=[]"))
    assert summary["n_samples"] == 5  # the run's data (n_test=5), not the default's; width 8 weights fit


def _documented_commands() -> list[list[str]]:
    """Every ``python -m explain_callbacks.explain ...`` line of docs/, the config and the module's docstring."""
    import re
    import shlex

    texts = [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]
    texts += [(ROOT / "conf" / "explain.yaml").read_text()]
    texts += [(ROOT / "explain_callbacks" / "explain.py").read_text().split('"""')[1]]  # the module's docstring
    found = []
    for text in texts:
        for m in re.finditer(r"python -m explain_callbacks\.explain([^\n`]*)", text.replace("\\\n", " ")):
            found.append(shlex.split(m.group(1).split("  #")[0].split(" # ")[0]))
    return found


@pytest.mark.parametrize("args", sorted({tuple(c) for c in _documented_commands()}), ids=lambda a: " ".join(a)[:60])
def test_documented_commands_compose(args, tmp_path):
    """Each documented command composes (its overrides name existing keys and groups)."""
    args = [a.replace("<time>", "2026-01-01_12-00-00") for a in args if not a.startswith("hydra.")]
    cfg = _cfg(tmp_path, *args)
    assert cfg.ckpt_path and cfg.methods and cfg.trainer._target_.endswith("Trainer")
