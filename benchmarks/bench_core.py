"""Core benchmark: gradient/path methods vs a bare loop of the same passes and vs Captum; monitor
overhead on the example training; peak memory against batch_size.

    python benchmarks/bench_core.py            # full (a few minutes on 2 CPU cores)
    python benchmarks/bench_core.py --quick

Prints Markdown tables. Times are medians of repeated runs, measured side by side in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from explain_callbacks._internal import model_guard
from explain_callbacks.attribution import IntegratedGradients, Saliency, SmoothGrad
from explain_callbacks.models import SmallCNN

ROOT = Path(__file__).resolve().parents[1]


def timeit(fns, repeats: int) -> list[float]:
    """Median time of each function, run interleaved (one of each per round) so drifts hit all alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def bare_passes(model, batches: list[torch.Tensor], target: torch.Tensor) -> None:
    """The raw compute: one forward + input-gradient backward per batch, as a plain loop."""
    for xb in batches:
        xb = xb.detach().requires_grad_(True)
        out = model(xb).gather(1, target.view(-1, 1)).sum()
        torch.autograd.grad(out, xb)


def method_table(repeats: int, n_steps: int, n_samples: int) -> list[list]:
    import captum.attr as ca

    torch.manual_seed(0)
    model = SmallCNN(1, 10)
    x = torch.rand(32, 1, 32, 32)
    t = torch.randint(0, 10, (32,))
    rows = []
    with model_guard(model):  # eval mode, frozen parameters: the state the monitor explains in
        cases = [
            ("Saliency", 1, lambda: Saliency()(model, x, t),
             lambda: ca.Saliency(model).attribute(x, target=t, abs=False)),
            (f"SmoothGrad n={n_samples}", n_samples, lambda: SmoothGrad(n_samples=n_samples, stdev=0.1)(model, x, t),
             lambda: ca.NoiseTunnel(ca.Saliency(model)).attribute(
                 x, target=t, nt_type="smoothgrad", nt_samples=n_samples, stdevs=0.1, abs=False)),
            (f"IG n_steps={n_steps}", n_steps,
             lambda: IntegratedGradients(n_steps=n_steps, completeness=False)(model, x, t),
             lambda: ca.IntegratedGradients(model).attribute(x, target=t, n_steps=n_steps)),
            (f"IG n_steps={n_steps} + completeness", n_steps,
             lambda: IntegratedGradients(n_steps=n_steps)(model, x, t),
             lambda: ca.IntegratedGradients(model).attribute(x, target=t, n_steps=n_steps,
                                                              return_convergence_delta=True)),
        ]  # fmt: skip
        for name, passes, ours, theirs in cases:
            batches = [x + 0.0 * k for k in range(passes)]
            t_raw, t_ours, t_cap = timeit([lambda b=batches: bare_passes(model, b, t), ours, theirs], repeats)
            rows.append([name, passes, t_raw * 1e3, t_ours * 1e3, t_cap * 1e3, t_ours / t_raw, t_ours / t_cap])
    return rows


def monitor_overhead(repeats: int, epochs: int | None = None) -> list[list]:
    """The default monitor (conf/callbacks/attribution.yaml) on the main job's data, model and epochs.

    Two figures: wall-time overhead (median of interleaved runs, noisy on a shared machine) and the
    time spent inside the monitor's explain step relative to the rest of the run (robust to noise).
    """
    import lightning.pytorch as pl
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import TensorBoardLogger

    from explain_callbacks.datasets import DigitsDataModule
    from explain_callbacks.models import LitClassifier

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train")
    epochs = epochs or int(cfg.trainer.max_epochs)

    def fit(with_monitor: bool) -> tuple[float, float, LitClassifier]:
        pl.seed_everything(0, verbose=False)
        dm = DigitsDataModule(batch_size=int(cfg.data.batch_size))
        model = LitClassifier(SmallCNN(), lr=float(cfg.model.lr))
        inside = [0.0]
        cbs = []
        if with_monitor:
            mon = instantiate(cfg.callbacks.attribution)
            run = mon.run_explain

            def timed(*args, **kwargs):
                start = time.perf_counter()
                run(*args, **kwargs)
                inside[0] += time.perf_counter() - start

            mon.run_explain = timed
            cbs.append(mon)
        # both runs log to TensorBoard, as the main job does: the monitor's pictures are part of its cost
        logger = TensorBoardLogger(tempfile.mkdtemp(prefix="bench_core_"), name="tb")
        tr = pl.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=cbs, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic=True)  # fmt: skip
        start = time.perf_counter()
        tr.fit(model, dm)
        return time.perf_counter() - start, inside[0], model

    fit(False)  # warm-up (data loading, first-call overheads)
    base, mon, share = [], [], []
    for _ in range(repeats):  # alternate, so drifts of the machine hit both sides
        tb, _, m0 = fit(False)
        tm, inside, m1 = fit(True)
        base.append(tb)
        mon.append(tm)
        share.append(inside / (tm - inside) * 100)
    same = all(torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m1.state_dict().values()))
    b, m = statistics.median(base), statistics.median(mon)
    a = cfg.callbacks.attribution
    methods = ", ".join(str(x if isinstance(x, str) else dict(x)) for x in a.methods)
    run = f"{epochs} epochs; {methods}; {a.num_samples} probes every {a.every_n_epochs} epochs"
    return [[run, b, m, (m / b - 1) * 100, statistics.median(share), same]]


def _memory_child(batch_size: int, n_steps: int) -> None:
    torch.manual_seed(0)
    model = SmallCNN(1, 10)
    x = torch.rand(32, 1, 32, 32)
    t = torch.randint(0, 10, (32,))
    with model_guard(model):
        Saliency()(model, x[:2], t[:2])  # load kernels before the baseline reading
        before = _rss_kib()
        _reset_peak()
        IntegratedGradients(n_steps=n_steps, batch_size=batch_size, completeness=False)(model, x, t)
        after = _peak_kib()
    print(json.dumps({"peak_mib": (after - before) / 1024}))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_kib() -> int:
    return _status("VmRSS")


def _peak_kib() -> int:
    return _status("VmHWM")


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (Linux: writing 5 to clear_refs), so VmHWM is this run's peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def memory_table(n_steps: int) -> list[list]:
    rows = []
    for bs in (32, 128, 512, 1024):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(bs), str(n_steps)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        rows.append([bs, n_steps, json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]])
    return rows


def table(headers, rows) -> str:
    def f(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                     + ["| " + " | ".join(f(v) for v in r) + " |" for r in rows])  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--memory-child", nargs=2, type=int)
    args = p.parse_args()
    if args.memory_child:
        _memory_child(*args.memory_child)
        return
    cores = len(os.sched_getaffinity(0))  # honours taskset: one thread per core we may use
    torch.set_num_threads(cores)
    print(f"machine: {platform.machine()}, {cores} usable cores, torch {torch.__version__}\n")
    reps = 3 if args.quick else 15
    print("### (a) attribution time, SmallCNN 1x32x32, batch 32 (ms, median)\n")
    rows = method_table(reps, n_steps=32, n_samples=25)
    print(table(["method", "passes", "bare loop", "ours", "Captum", "ours / bare", "ours / Captum"], rows))
    print("\n### (b) training overhead of the default monitor (digits example, seconds, median)\n")
    rows = monitor_overhead(repeats=1 if args.quick else 3, epochs=5 if args.quick else None)
    print(table(["run", "without", "with", "wall overhead %", "time in monitor %", "bit-identical weights"], rows))
    print("\n### (c) peak extra memory of IG (n_steps=32, batch 32) against batch_size\n")
    print(table(["batch_size", "n_steps", "peak MiB"], memory_table(32)))


if __name__ == "__main__":
    main()
