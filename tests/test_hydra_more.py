"""A new user's Hydra runs: every data and callback config trains for one tiny epoch, the README's commands and
overrides work as written, own modules via ``_target_``, sweeps, run directories, the packaged configs, and the
data sets (deterministic by seed, shapes masks matching the images)."""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from explain_callbacks.datasets import (
    BreastCancerDataModule,
    ColorDigitsDataModule,
    DecoyDigitsDataModule,
    DigitsDataModule,
    NIDDataModule,
    ShapesDataModule,
    SignalDataModule,
    make_shapes,
)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = [
    "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
    "+trainer.enable_checkpointing=false",
]  # fmt: skip


def _train_module():
    spec = importlib.util.spec_from_file_location("explain_callbacks_train_example", ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN = _train_module()


# ---------------------------------------------------------------- a user's own model and data (importable)
class MyModule(pl.LightningModule):
    """Not an example net: a LightningModule with its own arguments."""

    def __init__(self, n_in: int = 8, n_out: int = 3, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, 16), nn.ReLU(), nn.Linear(16, n_out))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class MyData(pl.LightningDataModule):
    def __init__(self, n: int = 48, n_in: int = 8, n_out: int = 3, batch_size: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ds = TensorDataset(torch.randn(n, n_in, generator=g), torch.randint(0, n_out, (n,), generator=g))
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=self.batch_size)

    val_dataloader = test_dataloader = train_dataloader


class MyDictImages(pl.LightningDataModule):
    """Dict batches {"image", "label"} (as from Hugging Face data sets), declaring input_shape and num_classes."""

    input_shape = (3, 16, 16)
    num_classes = 5

    def __init__(self, n: int = 40) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.x = torch.rand(n, *self.input_shape, generator=g)
        self.y = torch.randint(0, self.num_classes, (n,), generator=g)

    def train_dataloader(self):
        rows = [{"image": x, "label": y} for x, y in zip(self.x, self.y, strict=True)]
        return DataLoader(rows, batch_size=8)

    val_dataloader = test_dataloader = train_dataloader


class MyTrainOnly(MyModule):
    """A module with training and validation steps only (many are)."""

    test_step = pl.LightningModule.test_step


class MyTrainValData(MyData):
    test_dataloader = pl.LightningDataModule.test_dataloader


# ---------------------------------------------------------------- helpers
@pytest.fixture
def clean_process():
    """``run`` seeds globally, sets environment variables and deterministic algorithms: put them back."""
    env, rng = dict(os.environ), torch.get_rng_state()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    os.environ.clear()
    os.environ.update(env)
    torch.set_rng_state(rng)
    torch.use_deterministic_algorithms(det, warn_only=warn_only)
    HydraConfig.instance().cfg = None


def _compose(overrides, out: Path | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={out or '/tmp/unused'}"],
                      return_hydra_config=True)  # fmt: skip
    HydraConfig.instance().set_config(cfg)
    return cfg


def _run(overrides, tmp_path: Path, probes: dict[str, int] | None = None) -> dict[str, float]:
    """A tiny run; ``probes``: the probe-set size of these monitors where the overrides do not set one."""
    cfg = _compose([*TINY, *overrides], tmp_path)
    probes = {"interaction": 2, **(probes or {})}  # the default monitor's CD at the test: a third of a tiny run
    for name, n in probes.items():
        monitor = (cfg.get("callbacks") or {}).get(name)
        if monitor is not None and "num_samples" in monitor and not any(f"{name}.num_samples" in o for o in overrides):
            monitor.num_samples = n
    return TRAIN.run(cfg)


def _tags(metrics: dict[str, float]) -> set[str]:
    """The explanation tags of a run, whether from fit or from trainer.test (which logs them under test/)."""
    return {k.removeprefix("test/") for k in metrics}


# ---------------------------------------------------------------- every data and callback config, one tiny epoch
@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["data=breast_cancer", "model=mlp"],
        ["data=digits", "model=mlp"],
        ["data=decoy_digits"],
        ["data=color_digits"],
        ["data=shapes"],
        ["experiment=nid", "data.n_samples=300"],
        ["data=signals", "model=mlp", "data.n_samples=300"],
    ],
    ids=lambda o: " ".join(o) or "default",
)
def test_every_data_config_trains_with_the_default_monitor(overrides, tmp_path, clean_process, capsys):
    """data=shapes / color_digits (3 channels) and data=digits model=mlp crashed on the example nets' sizes;
    data=nid skipped every map with target=label (now experiment=nid)."""
    # strict: a method or metric that fails raises instead of skipping the epoch with a warning
    shapes = "data=shapes" in overrides  # masks in the batches: the localisation metrics run too
    metrics = ["deletion", "pointing_game"] if shapes else ["deletion"]
    metrics = _run([*overrides, f"callbacks.attribution.metrics=[{','.join(metrics)}]",
                    "callbacks.attribution.strict=true"], tmp_path)  # fmt: skip
    assert "faithfulness/deletion/saliency" in _tags(metrics) and "maps/sparseness/ig" in _tags(metrics)
    assert ("localisation/pointing_game/ig" in _tags(metrics)) == shapes
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert "TensorBoard logs written to" in capsys.readouterr().out


def test_runs_repeat_exactly_with_a_seed(tmp_path, clean_process):
    """Same seed, same numbers (losses and every explanation score); timings excluded."""
    over = ["data=shapes", "data.n_train=128", "callbacks.attribution.every_n_epochs=1"]
    a, b = (_run(over, tmp_path / str(i)) for i in range(2))
    keep = [k for k in a if "cost/seconds/" not in k]
    assert keep and {k: a[k] for k in keep} == {k: b[k] for k in keep}


def test_example_nets_fitted_to_the_data_but_explicit_values_kept(clean_process):
    cfg = _compose(["data=shapes", "model.net.num_classes=6"])
    changed = TRAIN.fit_net_to_data(cfg.model, instantiate(cfg.data))
    assert changed == ["model.net.in_channels=3"]
    assert cfg.model.net.in_channels == 3 and cfg.model.net.num_classes == 6
    cfg = _compose(["data=breast_cancer", "model=mlp"])
    assert TRAIN.fit_net_to_data(cfg.model, instantiate(cfg.data)) == []  # already right: nothing printed
    cfg = _compose(["data=nid", "model=mlp"])  # a classifier on regression targets: cross-entropy's dtype error
    with pytest.raises(ValueError, match=r"\+\+model\.task=regression"):
        TRAIN.fit_net_to_data(cfg.model, instantiate(cfg.data))
    cfg = _compose(["data=nid", "model=mlp", "++model.task=regression"])
    changed = TRAIN.fit_net_to_data(cfg.model, instantiate(cfg.data))
    assert changed == ["model.net.in_features=10", "model.net.num_classes=1"]
    cfg = _compose(["data=breast_cancer"])  # the CNN on 30 features: conv2d's shape error deep in fit before
    with pytest.raises(ValueError, match="model=mlp"):
        TRAIN.fit_net_to_data(cfg.model, instantiate(cfg.data))


@pytest.mark.parametrize(
    "overrides",
    [
        # interaction, distiller, cdep, rrr and eg_prior run in the README's commands (test_readme_command_runs)
        ["callbacks=spray", "callbacks.spray.min_per_class=1", "callbacks.spray.every_n_epochs=1"],
        ["callbacks=[default,saliency_masker]"],
        ["callbacks=[default,concepts]", "callbacks.concepts.num_reference=16", "callbacks.concepts.strict=true"],
        ["callbacks=distiller", "data=breast_cancer", "model=mlp", "callbacks.distiller.every_n_epochs=1"],
        ["callbacks=none"],
    ],
    ids=lambda o: " ".join(o),
)
def test_every_callback_config_trains(overrides, tmp_path, clean_process):
    metrics = _run(overrides, tmp_path)
    assert "test/loss" in metrics


# ---------------------------------------------------------------- the README's commands, as written
def _readme_train_commands() -> list[list[str]]:
    """Every ``python examples/train.py ...`` command of the README, of docs/ and of the configs' comments, as
    overrides."""
    texts = [(ROOT / "README.md").read_text()] + [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]
    texts += [p.read_text() for p in sorted(CONF.rglob("*.yaml"))]
    found = []
    for text in texts:
        text = text.replace("\\\n", " ")
        for m in re.finditer(r"python examples/train\.py([^\n`]*)", text):
            line = m.group(1).split("  #")[0].split(" # ")[0]
            try:
                args = shlex.split(line)
            except ValueError:
                continue
            found.append(args)
    return found


README_COMMANDS = _readme_train_commands()


def test_readme_lists_the_commands_checked_here():
    assert len(README_COMMANDS) > 20
    assert ["callbacks.attribution.metrics=[deletion,insertion,mufidelity]"] in README_COMMANDS
    assert any("-m" in c for c in README_COMMANDS) and any("--config-dir" in c for c in README_COMMANDS)


def _as_tiny_run(args: list[str]) -> list[str] | None:
    """A documented command as overrides of a tiny in-process run: sweeps at their first value, user modules
    (my_pkg) as this file's classes, DDP on one process; None for what needs the user's files (--config-dir)."""
    args = [a for a in TRAIN.flags_first(["x", *args])[1:] if a not in ("-m", "--multirun")]
    if "--config-dir" in args:
        return None  # test_own_config_dir
    args = [a.replace("my_pkg.MyModule", f"{__name__}.MyModule").replace("my_pkg.MyDataModule", f"{__name__}.MyData")
            for a in args]  # fmt: skip
    args = [a.split(",")[0] if re.fullmatch(r"[\w.]+=[\w.-]+(,[\w.-]+)+", a) else a for a in args]  # sweep: first
    args = [a for a in args if a != "trainer=ddp"]  # 2 processes: tests/test_ddp.py and the main-job test
    tiny_keys = {t.lstrip("+").split("=")[0] for t in TINY}
    args = [a for a in args if a.lstrip("+").split("=")[0] not in tiny_keys]
    return args


@pytest.mark.parametrize("args", sorted({tuple(c) for c in README_COMMANDS}), ids=lambda a: " ".join(a)[:80] or "plain")
def test_readme_command_runs(args, tmp_path, clean_process):
    """Each documented command (README and the configs' comments) trains one tiny epoch and tests, as written
    (train.yaml's comment 'callbacks=[default,cdep]' failed: the digits have no mask for the penalty)."""
    over = _as_tiny_run(list(args))
    if over is None:
        return
    assert "test/loss" in _run(over, tmp_path, probes={"attribution": 4})  # the commands compose and run


def test_own_modules_by_target(tmp_path, clean_process):
    """As the README writes it: start from empty model and data configs."""
    metrics = _run(["~model", f"+model._target_={__name__}.MyModule", "+model.lr=0.01",
                    "~data", f"+data._target_={__name__}.MyData", "+data.batch_size=8"], tmp_path)  # fmt: skip
    assert "maps/sparseness/saliency" in _tags(metrics) and "test/loss" in metrics


@pytest.mark.parametrize("model,data", [("MyTrainOnly", "MyData"), ("MyModule", "MyTrainValData")])
def test_own_modules_without_test_step_or_test_data(model, data, tmp_path, clean_process, capsys):
    """test=true (the default) ran trainer.test after fit and failed there: 'No test_step() method defined'."""
    metrics = _run(["~model", f"+model._target_={__name__}.{model}", "~data", f"+data._target_={__name__}.{data}",
                    "callbacks.attribution.every_n_epochs=1"], tmp_path)  # fmt: skip
    assert "maps/sparseness/saliency" in metrics and "test/loss" not in metrics
    out = capsys.readouterr().out
    assert "Test skipped" in out and "TensorBoard logs written to" in out


def test_own_dict_batch_data_on_the_example_cnn(tmp_path, clean_process, capsys):
    """LitClassifier read dict batches only as {'x', 'y'}: KeyError 'x' on {'image', 'label'} batches."""
    metrics = _run(["~data", f"+data._target_={__name__}.MyDictImages", "callbacks.attribution.strict=true",
                    "callbacks.attribution.every_n_epochs=1"], tmp_path)  # fmt: skip
    assert "maps/sparseness/ig" in _tags(metrics) and "test/acc" in metrics
    assert "model.net.in_channels=3 model.net.num_classes=5" in capsys.readouterr().out


def test_replacing_only_target_names_the_fix(clean_process):
    """model._target_=my_pkg.MyModule kept lr_schedule and net of conf/model/cnn.yaml: a bare TypeError before."""
    cfg = _compose([f"model._target_={__name__}.MyModule"])
    with pytest.raises(ValueError, match=r"lr_schedule.*conf/model/cnn\.yaml.*'~model' \+model\._target_="):
        TRAIN.instantiate_part(cfg, "model")


def test_own_config_dir(tmp_path, clean_process):
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "model" / "my_model.yaml").write_text(f"_target_: {__name__}.MyModule\nn_in: 8\nlr: 0.02\n")
    (tmp_path / "data" / "my_data.yaml").write_text(f"_target_: {__name__}.MyData\nbatch_size: 8\n")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["model=my_model", "data=my_data", "hydra.searchpath=[file://" +
                                          str(tmp_path) + "]", "paths.output_dir=/tmp/unused"])  # fmt: skip
    assert isinstance(instantiate(cfg.model), MyModule) and isinstance(instantiate(cfg.data), MyData)


def test_own_hydra_project_with_the_packaged_configs(tmp_path):
    """The README's snippet: a primary config of one's own, the package's groups through the search path."""
    (tmp_path / "config.yaml").write_text(
        "defaults:\n  - data: digits\n  - model: cnn\n  - callbacks: default\n  - _self_\nseed: 0\n"
        "hydra:\n  searchpath:\n    - pkg://explain_callbacks.conf\n"
    )
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("config", overrides=["data=shapes", "callbacks.attribution.metrics=[pointing_game]"])
    assert instantiate(cfg.data).input_shape == (3, 32, 32)
    assert instantiate(cfg.callbacks.attribution).metric_names == ["pointing_game"]


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["callbacks.attribution.methods=[saliencyy]"], r"Unknown attribution 'saliencyy'.*saliency, smoothgrad"),
        (["callbacks.attribution.metrics=[deletoin]"], r"Unknown metric 'deletoin'.*deletion"),
        (["callbacks.interaction.methods=[cdd]", "callbacks=interaction"], r"Unknown interaction 'cdd'.*\bcd\b"),
    ],
)
def test_typos_in_short_names_list_the_valid_ones(overrides, match, clean_process):
    cfg = _compose(overrides)
    with pytest.raises(Exception, match=match):
        TRAIN.build_list(cfg.callbacks)


def test_one_metric_without_brackets(clean_process):
    """callbacks.attribution.metrics=deletion (a string) was split into letters: "Unknown metric 'd'"."""
    cfg = _compose(["callbacks.attribution.metrics=deletion", "callbacks.attribution.methods=ig"])
    mon, _ = TRAIN.build_list(cfg.callbacks)  # the default: the attribution and interaction monitors
    assert mon.metric_names == ["deletion"] and list(mon.methods) == ["ig"]


def test_attribution_and_metric_group_configs_in_the_lists(clean_process):
    cfg = _compose(["+attribution@rise=rise", "+attribution@hsic=hsic", "rise.n_masks=50",
                    "callbacks.attribution.methods=[${rise},${hsic}]", "+metric=deletion", "metric.n_steps=8",
                    "callbacks.attribution.metrics=[${metric}]"])  # fmt: skip
    mon, _ = TRAIN.build_list(cfg.callbacks)  # the default: the attribution and interaction monitors
    assert list(mon.methods) == ["rise", "hsic"] and mon.methods["rise"].n_masks == 50


@pytest.mark.parametrize("group", ["attribution", "metric", "interaction"])
def test_every_attribution_and_metric_config_in_one_tiny_run(group, tmp_path, clean_process):
    """Each conf/attribution, conf/metric and conf/interaction config, as the README puts them in the monitors'
    lists, on 2 probes."""
    names = sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem != "acd")
    key = "methods" if group != "metric" else "metrics"
    cb = "interaction" if group == "interaction" else "attribution"
    listed = ",".join("${g_" + n + "}" for n in names)
    over = [f"+{group}@g_{n}={n}" for n in names]
    over += [f"callbacks.{cb}.{key}=[{listed}]", f"callbacks.{cb}.num_samples=2", "data=shapes",
             f"callbacks.{cb}.strict=true"]  # fmt: skip
    if group == "interaction":  # budgets cut: 15 s to 50 s at the configs' settings on 3-channel images
        over = [o.replace("data=shapes", "data=digits") for o in over]
        over += ["callbacks=interaction", "callbacks.interaction.every_n_epochs=5", "g_integrated_hessians.n_steps=2",
                 "g_sobol.n_designs=8", "g_hsic.n_designs=64"]  # fmt: skip
    metrics = _run(over, tmp_path)
    if group == "interaction":
        assert {k.split("/")[2] for k in _tags(metrics) if k.startswith("cost/seconds/")} == set(names)
        # ACD settings as the config's comment writes them (composed only: ACD takes ~20 s per sample here)
        cfg = _compose(["callbacks=interaction", "callbacks.interaction.acd={tile:1,percentile:99}"])
        (mon,) = TRAIN.build_list(cfg.callbacks)
        assert mon.acd_kwargs == {"tile": 1, "percentile": 99}
    elif group == "attribution":
        assert {k.split("/")[2] for k in _tags(metrics) if k.startswith("cost/seconds/")} >= set(names) - {"neflag"}
    else:  # the monitor logs completeness_error, drift and sparseness itself (the configs are dropped with a warning)
        done = {k.split("/")[1] for k in _tags(metrics) if k.endswith("/saliency") and k.count("/") == 2}
        assert set(names) - {"completeness_error", "drift"} <= done


@pytest.mark.parametrize("name", ["attribution", "interaction", "spray", "saliency_masker", "distiller", "rrr"])
def test_batch_and_model_keys_settable_without_plus(name, clean_process):
    """The README's input_key / label_key / mask_key / model_attr / output_key needed '+callbacks...' (the
    configs did not list them: 'Key mask_key is not in struct')."""
    keys = {"input_key": 0, "label_key": 1, "model_attr": "net", "output_key": 0}
    if name not in ("distiller", "rrr"):
        keys["mask_key"] = 2
    cfg = _compose([f"callbacks={name}", *(f"callbacks.{name}.{k}={v}" for k, v in keys.items())])
    (cb,) = TRAIN.build_list(cfg.callbacks)
    assert cb.model_attr == "net"


def test_flags_first():
    assert TRAIN.flags_first(["t.py", "experiment=x", "-m", "seed=0,1"]) == ["t.py", "-m", "experiment=x", "seed=0,1"]
    assert TRAIN.flags_first(["t.py", "a=1"]) == ["t.py", "a=1"]


# ---------------------------------------------------------------- processes: sweeps, run directories, packaged conf
def test_sweep_written_as_in_the_readme_from_another_directory(tmp_path):
    """'train.py experiment=decoy_rrr -m seed=0,1' failed in argparse; under hydra.job.chdir=true the printed
    TensorBoard directory was relative to the run directory, not to where the command was started."""
    cmd = [sys.executable, str(ROOT / "examples" / "train.py"), "experiment=decoy_rrr", *TINY,
           "hydra.job.chdir=true", "hydra.sweep.dir=sweep", "-m", "seed=0,1"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    shown = re.findall(r"TensorBoard logs written to: (\S+)", out.stdout)
    assert len(shown) == 2
    for path in shown:
        assert list((tmp_path / path).glob("events.out.tfevents.*")), path


def test_shown_log_directory(tmp_path, monkeypatch, clean_process):
    cfg = _compose([])
    start = Path(cfg.hydra.runtime.cwd)
    assert TRAIN._shown_path(str(start / "logs" / "x")) == os.path.join("logs", "x")
    monkeypatch.chdir(tmp_path)  # hydra.job.chdir=true: the process runs in the run directory
    assert TRAIN._shown_path("tensorboard") == str(tmp_path / "tensorboard")  # outside the start: absolute
    assert Path(start, TRAIN._shown_path(str(tmp_path / "tb"))).resolve() == (tmp_path / "tb").resolve()


def test_other_loggers_are_not_announced_as_tensorboard(tmp_path, clean_process, capsys):
    _run(["+logger.csv._target_=lightning.pytorch.loggers.CSVLogger", f"+logger.csv.save_dir={tmp_path}/csv"], tmp_path)
    out = capsys.readouterr().out
    assert "TensorBoard logs written to" in out and "CSVLogger logs written to" in out
    assert not re.search(r"TensorBoard logs written to: \S*csv", out)


def test_copied_script_uses_the_packaged_configs(tmp_path):
    shutil.copy(ROOT / "examples" / "train.py", tmp_path / "train.py")
    out = subprocess.run([sys.executable, "train.py", "data=shapes", "--cfg", "job"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "explain_callbacks.datasets.shapes.ShapesDataModule" in out.stdout


# ---------------------------------------------------------------- data sets: determinism by seed, shapes masks
DATA = [
    (DigitsDataModule, {}),
    (BreastCancerDataModule, {}),
    (DecoyDigitsDataModule, {}),
    (ColorDigitsDataModule, {}),
    (ShapesDataModule, {"n_train": 40, "n_val": 8, "n_test": 8, "watermark": 0.5}),
    (NIDDataModule, {"function": 3, "n_samples": 200}),
    (SignalDataModule, {"n_samples": 100, "length": 32}),
]


def _splits_and_order(cls, kwargs, seed):
    dm = cls(seed=seed, batch_size=16, **kwargs)
    dm.setup("fit")
    splits = [torch.cat([b[0] for b in loader()]) for loader in (dm.val_dataloader, dm.test_dataloader)]
    order = torch.cat([b[0] for b in dm.train_dataloader()])
    return [*splits, order]


@pytest.mark.parametrize("cls,kwargs", DATA, ids=lambda v: getattr(v, "__name__", ""))
def test_data_sets_deterministic_by_seed_and_global_rng_untouched(cls, kwargs):
    a = _splits_and_order(cls, kwargs, 3)
    torch.manual_seed(1234)
    b = _splits_and_order(cls, kwargs, 3)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    c = _splits_and_order(cls, kwargs, 4)
    assert not torch.equal(a[-1], c[-1])  # another seed: another split or order


def test_data_sets_do_not_read_the_global_rng():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    for cls, kwargs in DATA:
        _splits_and_order(cls, kwargs, 0)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("size", [16, 24, 33, 64])
@pytest.mark.parametrize("watermark", [0.0, 0.5, 1.0])
def test_shapes_masks_match_the_images(size, watermark):
    """Without noise the object's pixels (colour >= 0.55 in every channel) are exactly the mask, the watermark
    (pure white, outside the mask) is the only other bright thing, and the background stays below 0.46."""
    d = make_shapes(24, size=size, seed=size, watermark=watermark, noise=0.0)
    assert d.x.shape == (24, 3, size, size) and d.mask.shape == d.watermark.shape == (24, 1, size, size)
    obj = d.mask.bool()
    wm = d.watermark.bool()
    assert not (obj & wm).any()
    bright = (d.x >= 0.55).all(1, keepdim=True)
    assert torch.equal(bright & ~wm, obj)
    assert (d.x.masked_select(wm.expand_as(d.x)) == 1).all()
    assert (d.x.masked_select((~obj & ~wm).expand_as(d.x)) < 0.46).all()
    assert obj.flatten(1).any(1).all()  # every image has its object
    has_mark = wm.flatten(1).any(1)
    if watermark == 0.0:
        assert not has_mark.any()
    elif watermark == 1.0:
        assert has_mark.all()


def test_shapes_batches_keep_images_and_masks_together():
    dm = ShapesDataModule(n_train=64, n_val=16, n_test=16, size=24, noise=0.0, batch_size=16, seed=1)
    dm.setup("fit")
    for x, y, mask in dm.train_dataloader():
        assert mask.shape == (x.shape[0], 1, 24, 24) and y.shape == (x.shape[0],)
        assert torch.equal((x >= 0.55).all(1, keepdim=True), mask.bool())


def test_loaders_rebuilt_every_epoch_do_not_repeat_the_first_order():
    """reload_dataloaders_every_n_epochs=1 rebuilt the training loader from the same seed: one order every epoch."""
    from types import SimpleNamespace

    dm = DigitsDataModule(seed=5, batch_size=64)
    dm.setup("fit")
    first = torch.cat([b[1] for b in dm.train_dataloader()])
    before = DataLoader(dm.train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, torch.cat([b[1] for b in before]))  # epoch 0: the order it always had
    dm.trainer = SimpleNamespace(current_epoch=1)
    again = torch.cat([b[1] for b in dm.train_dataloader()])
    assert not torch.equal(first, again)
    assert torch.equal(again, torch.cat([b[1] for b in dm.train_dataloader()]))  # still determined by the seed


@pytest.mark.parametrize("fractions", [(0.5, 0.3, 0.3), (0.7, -0.1, 0.4), (0.0, 0.5, 0.5), (0.4, 0.6, 0.6)])
def test_split_fractions_checked(fractions):
    """data.fractions=[0.4,0.6,0.6] gave a negative training size and overlapping splits without a word;
    [0.5,0.3,0.3] silently trained on 40 %."""
    with pytest.raises(ValueError, match="fractions"):
        DigitsDataModule(fractions=fractions).setup("fit")


@pytest.mark.parametrize("limits", [{"max_epochs": 3}, {"max_epochs": -1, "max_steps": 12}, {"max_steps": 12}])
def test_cosine_schedule_anneals_once_over_the_run(limits):
    """trainer.max_steps=12 trainer.max_epochs=-1 (or null) gave T_max=1 epoch: the rate swung between lr and 0."""
    from explain_callbacks.models import MLP, LitClassifier

    model = LitClassifier(MLP(4, 2, hidden=[8]), lr=1.0, lr_schedule="cosine")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, **limits)
    model.trainer = trainer
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    periods = limits.get("max_epochs", -1) if limits.get("max_epochs", -1) > 0 else limits["max_steps"]
    assert conf["lr_scheduler"]["interval"] == ("epoch" if "max_steps" not in limits else "step")
    rates = []
    for _ in range(periods):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == 1.0 and all(a > b for a, b in itertools.pairwise(rates))  # one monotone decay over the run
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_cosine_schedule_refuses_an_unbounded_run():
    from explain_callbacks.models import MLP, LitClassifier

    model = LitClassifier(MLP(4, 2, hidden=[8]), lr_schedule="cosine")
    model.trainer = pl.Trainer(logger=False, max_epochs=-1, enable_progress_bar=False)
    with pytest.raises(ValueError, match="max_steps"):
        model.configure_optimizers()


def test_validation_schedule_does_not_move_training(clean_process):
    """Evaluation loaders drew their iterator seed from the global RNG, so validating every epoch or every second
    one gave different dropout masks and different weights."""
    from explain_callbacks.models import LitClassifier, SmallCNN

    def weights(every: int) -> torch.Tensor:
        pl.seed_everything(0, verbose=False)
        dm = DigitsDataModule(seed=0, batch_size=32)
        model = LitClassifier(SmallCNN(width=4, dropout=0.5))
        pl.Trainer(max_epochs=2, check_val_every_n_epoch=every, limit_train_batches=2, limit_val_batches=1,
                   logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0).fit(model, dm)  # fmt: skip
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(weights(1), weights(2))
