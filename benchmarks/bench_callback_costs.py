"""What each shipped callbacks config costs, as a fraction of the main job's training time.

    python benchmarks/bench_callback_costs.py                      # every conf/callbacks/*.yaml (~6 min, 2 cores)
    python benchmarks/bench_callback_costs.py default interaction  # some configs
    python benchmarks/bench_callback_costs.py --epochs 5           # shorter runs (fewer explanations, noisier)
    python benchmarks/bench_callback_costs.py --budget 0.05        # every monitor with budget=0.05
    python benchmarks/bench_callback_costs.py --resnet --repeats 3  # AttributionMonitor() on a small ResNet
    python benchmarks/bench_callback_costs.py interaction --epochs 5 --budget 0.05 --tag _ih \
        --override 'callbacks.interaction.methods=[cd,integrated_hessians]'   # a slow method under a budget
    python benchmarks/bench_callback_costs.py --heldout resnet mlp          # every callback's Python defaults
    python benchmarks/bench_callback_costs.py --heldout mlp --monitors interaction --variants default

Each config runs the main job (``python examples/train.py``: shapes, the example CNN, its epochs) with
``callbacks=<config>``, in this process, logging to TensorBoard in a temporary directory. Two numbers per config:

- ``hooks``: CPU seconds spent inside the config's callback hooks (every ``on_*``/``setup``/``teardown``
  method of every callback the config builds, timed by wrapping it), over the CPU seconds of the rest of
  ``fit``: what the monitors cost, precisely, whatever else runs on the machine;
- ``fit``: the CPU seconds of ``fit`` with the config over those of ``fit`` with ``callbacks=none``, minus 1:
  the whole overhead, including what a callback adds inside the training step (the regularizers' penalties,
  the saliency masker's training), which no hook timer sees. Noisier (two runs), so it is the median of
  ``--repeats`` pairs.

CPU time (``time.process_time``, all threads) rather than wall time: the machine is shared, and CPU time of
this process counts only its own work. Prints a Markdown table and writes it with the raw numbers to
``benchmarks/results/bench_callback_costs.{md,json}``.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.insert(0, str(ROOT / "examples"))
import train as TRAIN  # noqa: E402  (examples/train.py: the main job's helpers)

#: what each config is for, in the table
ROLE = {
    "default": "the main job's monitors",
    "attribution": "AttributionMonitor",
    "interaction": "InteractionMonitor",
    "spray": "SpRAyMonitor",
    "distiller": "Distiller",
    "saliency_masker": "SaliencyMasker",
    "cdep": "regularizer (in the loss)",
    "rrr": "regularizer (in the loss)",
    "eg_prior": "regularizer (in the loss)",
}


class HookClock:
    """Accumulates the CPU time spent inside the hooks of the wrapped callbacks."""

    def __init__(self, clock=time.process_time) -> None:
        self.seconds = 0.0
        self.clock = clock
        self._depth = 0

    def wrap(self, callback: pl.Callback) -> None:
        for name in dir(pl.Callback):
            if not (name.startswith("on_") or name in ("setup", "teardown")):
                continue
            fn = getattr(callback, name)
            if getattr(type(callback), name) is getattr(pl.Callback, name):
                continue  # not overridden: Lightning's no-op
            setattr(callback, name, self._timed(fn))

    def _timed(self, fn):
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            start = self.clock() if self._depth == 1 else None
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if start is not None:
                    self.seconds += self.clock() - start

        return inner


def compose_main_job(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def run_once(config: str, epochs: int | None, extra: list[str], budget: float | None) -> dict[str, float]:
    """One main-job fit with ``callbacks=<config>``; CPU and wall seconds of fit and of the hooks."""
    with tempfile.TemporaryDirectory() as tmp:
        over = [f"callbacks={config}", f"paths.output_dir={tmp}", "trainer.enable_progress_bar=false",
                "+trainer.enable_model_summary=false", "+trainer.enable_checkpointing=false", *extra]  # fmt: skip
        if epochs is not None:
            over.append(f"trainer.max_epochs={epochs}")
        cfg = compose_main_job(over)
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = instantiate(cfg.data)
        TRAIN.fit_net_to_data(cfg.model, datamodule)
        model = instantiate(cfg.model)
        callbacks = TRAIN.build_list(cfg.get("callbacks"))
        if budget is not None:
            for cb in callbacks:
                if hasattr(cb, "budget"):
                    cb.budget = budget
        clock = HookClock()
        for cb in callbacks:
            clock.wrap(cb)
        loggers = TRAIN.build_list(cfg.get("logger"))
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        cpu, wall = time.process_time(), time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        probes = [cb for cb in callbacks if hasattr(cb, "_fit_explanations")]  # monitors; "-" for the others
        explained = sum(int(cb._fit_explanations) for cb in probes) if probes else "-"
        return {"fit_cpu": cpu, "fit_wall": wall, "hooks_cpu": clock.seconds, "explanations": explained,
                "epochs": trainer.current_epoch}  # fmt: skip


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        short = stride != 1 or cin != cout
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if short else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + (x if self.short is None else self.short(x)))


def small_resnet(classes: int = 10) -> nn.Module:
    """3 stages × 2 residual blocks, 16/32/64 wide, for 3×32×32 inputs (issue 22's held-out-style model)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for i, w in enumerate((16, 32, 64)):
        layers += [_Block(cin, w, 1 if i == 0 else 2), _Block(w, w, 1)]
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes)]
    return nn.Sequential(*layers)


def resnet_main(args: argparse.Namespace) -> None:
    """``--resnet``: what ``AttributionMonitor()`` with its defaults costs on the small ResNet (issue 22, item 3):
    hooks CPU over the rest of fit, and fit CPU against a fit without callbacks (pairs, median)."""
    from explain_callbacks.callbacks import AttributionMonitor

    specs = {"AttributionMonitor()": lambda: AttributionMonitor()}
    if args.resnet_fixed:
        specs["AttributionMonitor(budget=None)"] = lambda: AttributionMonitor(budget=None)
    rows, raw = [], {}
    for name, make in specs.items():
        pairs = []
        for _ in range(args.repeats):
            base = heldout_run("resnet", [], args.epochs or 3, args.n_train)
            run = heldout_run("resnet", [make()], args.epochs or 3, args.n_train)
            pairs.append((base, run))
        hooks = statistics.median(r["hooks_cpu"] / max(r["fit_cpu"] - r["hooks_cpu"], 1e-9) for _, r in pairs)
        fit = statistics.median(r["fit_cpu"] / b["fit_cpu"] - 1 for b, r in pairs)
        lo = min(r["fit_cpu"] / b["fit_cpu"] - 1 for b, r in pairs)
        hi = max(r["fit_cpu"] / b["fit_cpu"] - 1 for b, r in pairs)
        base, run = pairs[-1]
        raw[name] = {"pairs": pairs, "hooks_fraction": hooks, "fit_fraction": fit}
        rows.append(f"| `{name}` | {run['explanations']} | {base['fit_cpu']:.1f} | {run['fit_cpu']:.1f} | "
                    f"{run['hooks_cpu']:.2f} | {100 * hooks:.2f} % | {100 * fit:+.1f} % "
                    f"({100 * lo:+.1f} to {100 * hi:+.1f}) |")  # fmt: skip
        print(rows[-1], flush=True)
    head = (
        "| monitor | explanations | fit CPU s, none | fit CPU s, with | hooks CPU s | hooks / training "
        "| fit overhead (min to max) |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    machine = (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, shared 2-core CPU"
    )
    note = (
        f"Small ResNet (3 stages × 2 blocks, 16/32/64 wide), {args.n_train} training images 3×32×32, batch 64, "
        f"{args.epochs or 3} epochs, TensorBoard logger, CPU time, {args.repeats} pair(s); {machine}"
    )
    table = head + "\n" + "\n".join(rows)
    print(f"\n{note}\n\n{table}")
    if not args.no_write:
        out = ROOT / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_callback_costs_resnet.md").write_text(f"{note}\n\n{table}\n")
        (out / "bench_callback_costs_resnet.json").write_text(json.dumps(raw, indent=1, default=float))


#: the callbacks --heldout measures, by their Python defaults ("default") and on the fixed schedule ("fixed":
#: budget=None, every due epoch on every probe, the defaults before the budget)
HELDOUT_CALLBACKS = ("attribution", "interaction", "concepts", "influence", "landscape", "spray", "saliency_masker",
                     "distiller")  # fmt: skip
#: callbacks that do not apply to a model (why, in the table)
NOT_APPLICABLE = {
    ("mlp", "concepts"): "needs a convolution (concepts are its channels)",
    ("mlp", "saliency_masker"): "images only",
}


def make_callback(name: str, variant: str) -> pl.Callback:
    """``name``'s callback with its Python defaults (``variant="default"``), on the fixed schedule (``"fixed"``), or
    with its defaults and 64 rows per model call given (``"rows64"``: no ``batch_size="auto"`` measurement)."""
    import explain_callbacks.callbacks as C

    cls = {"attribution": C.AttributionMonitor, "interaction": C.InteractionMonitor, "concepts": C.ConceptMonitor,
           "influence": C.InfluenceMonitor, "landscape": C.LandscapeMonitor, "spray": C.SpRAyMonitor,
           "saliency_masker": C.SaliencyMasker, "distiller": C.Distiller}[name]  # fmt: skip
    if variant == "default":
        return cls()
    if variant == "fixed":
        return cls(budget=None)
    if variant == "rows64":  # the defaults with 64 rows per call given: no batch_size="auto" measurement
        return cls(batch_size=64) if name != "landscape" else cls()
    raise ValueError(f"unknown variant {variant!r}")


def heldout_data(model: str, n_train: int, seed: int = 0) -> tuple[DataLoader, DataLoader, nn.Module]:
    """Training and validation loaders (batch 64 / 128) and the network: the small ResNet on ``n_train`` synthetic
    3×32×32 images (10 classes, a class-dependent blob on noise) and 500 validation images, or the tabular MLP of
    ``benchmarks/heldout_models.py`` (30 features, 64-64 hidden, 2 classes) on ``n_train`` rows of its task."""
    n = n_train + 500
    if model == "resnet":
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 10, (n,), generator=g)
        x = 0.5 * torch.randn(n, 3, 32, 32, generator=g)
        for c in range(10):
            r, q = divmod(c, 4)
            x[y == c, c % 3, 8 * r : 8 * r + 8, 8 * q : 8 * q + 8] += 1.5
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = small_resnet()
    elif model == "mlp":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import heldout_models

        x, y = heldout_models.data("mlp", n, seed)
        net = heldout_models.make("mlp")
    else:
        raise ValueError(f"unknown model {model!r}: resnet or mlp")
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))  # fmt: skip
    val = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=128)
    return train, val, net


def heldout_run(model: str, callbacks: list[pl.Callback], epochs: int, n_train: int, seed: int = 0) -> dict[str, Any]:
    """One fit of ``model`` with ``callbacks``: CPU seconds of fit and of the callbacks' hooks, explanations."""
    from explain_callbacks.models import LitClassifier

    train, val, net = heldout_data(model, n_train, seed)
    pl.seed_everything(seed, verbose=False)
    module = LitClassifier(net, lr=3e-3)
    clock = HookClock()
    for cb in callbacks:
        clock.wrap(cb)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=TensorBoardLogger(tmp),
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             num_sanity_val_steps=0, accelerator="cpu", devices=1)  # fmt: skip
        cpu, wall = time.process_time(), time.perf_counter()
        trainer.fit(module, train, val)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    runs = [int(getattr(cb, "_fit_explanations", len(getattr(cb, "history", [])))) for cb in callbacks]
    return {"fit_cpu": cpu, "fit_wall": wall, "hooks_cpu": clock.seconds, "explanations": sum(runs)}


def heldout_main(args: argparse.Namespace) -> None:
    """``--heldout``: every callback's default cost as a share of training on the held-out models, each run in a
    child process under ``--timeout`` seconds (a fixed schedule that does not finish says so)."""
    import subprocess

    rows, raw = [], {}
    names = args.monitors or list(HELDOUT_CALLBACKS)
    for model in args.heldout:
        n_train = args.n_train if model == "resnet" else args.mlp_train
        base = heldout_run(model, [], args.epochs or 3, n_train)
        raw[model] = {"none": base}
        print(f"{model}: fit without callbacks {base['fit_cpu']:.1f} CPU s", flush=True)
        for name in names:
            for variant in args.variants:
                if (model, name) in NOT_APPLICABLE:
                    if variant == args.variants[0]:
                        rows.append(f"| {model} | `{name}` | n/a: {NOT_APPLICABLE[(model, name)]} | | | | |")
                    continue
                cmd = [sys.executable, __file__, "--heldout-one", model, name, variant, "--epochs",
                       str(args.epochs or 3), "--n-train", str(n_train), "--threads", str(args.threads)]  # fmt: skip
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
                    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                    if not line:
                        raise RuntimeError(out.stderr[-600:])
                    r = json.loads(line[-1][7:])
                except subprocess.TimeoutExpired:
                    r = {"timeout": args.timeout}
                raw[model][f"{name}:{variant}"] = r
                if "timeout" in r:
                    row = f"| {model} | `{name}` | {variant} | – | – | > {args.timeout} s wall (stopped) | – |"
                else:
                    frac = r["hooks_cpu"] / max(r["fit_cpu"] - r["hooks_cpu"], 1e-9)
                    over = r["fit_cpu"] / base["fit_cpu"] - 1
                    row = (f"| {model} | `{name}` | {variant} | {r['explanations']} | {r['hooks_cpu']:.2f} | "
                           f"{100 * frac:.2f} % | {100 * over:+.1f} % |")  # fmt: skip
                rows.append(row)
                print(row, flush=True)
    head = ("| model | callback | settings | explanations / fits | hooks CPU s | hooks / training | fit overhead |\n"
            "|---|---|---|---:|---:|---:|---:|")  # fmt: skip
    machine = f"{platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}, shared 2-core CPU"
    base_s = ", ".join(f"{m} {raw[m]['none']['fit_cpu']:.1f} CPU s" for m in args.heldout)
    note = (f"Held-out models, {args.epochs or 3} epochs, batch 64, TensorBoard logger: small ResNet on "
            f"{args.n_train} images 3×32×32, tabular MLP on {args.mlp_train} rows of 30 features; fit without "
            f"callbacks: {base_s}; one run per callback; {machine}. 'default': the Python defaults; 'fixed': "
            "budget=None (every due epoch, every probe: the defaults before the time budget); 'rows64': the "
            "defaults with batch_size=64 (no measurement of batch_size='auto')")  # fmt: skip
    table = head + "\n" + "\n".join(rows)
    print(f"\n{note}\n\n{table}")
    if not args.no_write:
        out = ROOT / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"bench_callback_costs_heldout{args.tag}.md").write_text(f"{note}\n\n{table}\n")
        (out / f"bench_callback_costs_heldout{args.tag}.json").write_text(json.dumps(raw, indent=1, default=float))


def heldout_one(args: argparse.Namespace) -> None:
    model, name, variant = args.heldout_one
    r = heldout_run(model, [make_callback(name, variant)], args.epochs or 3, args.n_train)
    print("RESULT " + json.dumps(r), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", help="conf/callbacks names (default: all but none)")
    parser.add_argument("--epochs", type=int, default=None, help="trainer.max_epochs (default: the main job's)")
    parser.add_argument("--repeats", type=int, default=1, help="baseline/config pairs per config (median)")
    parser.add_argument("--budget", type=float, default=None, help="set every monitor's budget")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: CPU time is the work done; idle OpenMP threads spin on a busy machine)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="a Hydra override of the config's runs, e.g. 'callbacks.interaction.methods=[cd,hsic]'",
    )
    parser.add_argument("--tag", default="", help="suffix of the result files (bench_callback_costs<tag>.md)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results")
    parser.add_argument("--resnet", action="store_true",
                        help="AttributionMonitor() on the small ResNet, 2,000 images, 3 epochs (issue 22)")  # fmt: skip
    parser.add_argument("--resnet-fixed", action="store_true", help="--resnet: also budget=None (the fixed schedule)")
    parser.add_argument("--n-train", type=int, default=2000, help="--resnet: training images")
    parser.add_argument("--heldout", nargs="+", choices=("resnet", "mlp"),
                        help="every callback's default cost on these held-out models (3 epochs)")  # fmt: skip
    parser.add_argument("--monitors", nargs="+", choices=HELDOUT_CALLBACKS, help="--heldout: these callbacks")
    parser.add_argument("--variants", nargs="+", default=["default", "fixed"], choices=("default", "fixed", "rows64"),
                        help="--heldout: the Python defaults, budget=None, or the defaults with batch_size=64 (what "
                        "the measurement of batch_size='auto' costs)")  # fmt: skip
    parser.add_argument("--mlp-train", type=int, default=20000, help="--heldout: MLP training rows")
    parser.add_argument("--timeout", type=float, default=300.0, help="--heldout: seconds per run")
    parser.add_argument("--heldout-one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.heldout_one or args.heldout:
        torch.set_num_threads(args.threads)
        warnings.filterwarnings("ignore")
        (heldout_one if args.heldout_one else heldout_main)(args)
        return
    if args.resnet:
        torch.set_num_threads(args.threads)
        warnings.filterwarnings("ignore")
        resnet_main(args)
        return
    configs = args.configs or sorted(p.stem for p in (CONF / "callbacks").glob("*.yaml") if p.stem != "none")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = []
    raw: dict[str, Any] = {}
    for config in configs:
        pairs = []
        for _ in range(args.repeats):
            base = run_once("none", args.epochs, [], None)
            run = run_once(config, args.epochs, args.override, args.budget)
            pairs.append((base, run))
        hooks = statistics.median(r["hooks_cpu"] / max(r["fit_cpu"] - r["hooks_cpu"], 1e-9) for _, r in pairs)
        fit = statistics.median(r["fit_cpu"] / b["fit_cpu"] - 1 for b, r in pairs)
        base, run = pairs[-1]
        raw[config] = {"pairs": pairs, "hooks_fraction": hooks, "fit_fraction": fit}
        rows.append((config, ROLE.get(config, ""), run["explanations"], base["fit_cpu"], run["fit_cpu"],
                     run["hooks_cpu"], hooks, fit))  # fmt: skip
        print(f"{config}: hooks {100 * hooks:.1f} %, fit {100 * fit:+.1f} %", flush=True)
    head = (
        "| config | what | explanations | fit CPU s, none | fit CPU s, with | hooks CPU s | hooks / training "
        "| fit overhead |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for c, role, n, b, r, h, hf, ff in rows:
        lines.append(f"| `{c}` | {role} | {n} | {b:.1f} | {r:.1f} | {h:.2f} | {100 * hf:.1f} % | {100 * ff:+.1f} % |")
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    epochs = args.epochs if args.epochs is not None else compose_main_job([]).trainer.max_epochs
    note = (f"Main job (shapes, example CNN), {epochs} epochs, CPU time; {machine}"
            + (f"; budget={args.budget}" if args.budget is not None else "")
            + (f"; overrides {args.override}" if args.override else ""))  # fmt: skip
    table = "\n".join(lines)
    print(f"\n{note}\n\n{table}")
    if not args.no_write:
        out = ROOT / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        suffix = args.tag + ("" if args.budget is None else f"_budget{args.budget:g}")
        (out / f"bench_callback_costs{suffix}.md").write_text(f"{note}\n\n{table}\n")
        (out / f"bench_callback_costs{suffix}.json").write_text(json.dumps(raw, indent=1, default=float))


if __name__ == "__main__":
    main()
