"""A whole data set through ``trainer.predict`` with ExplainWriter: memory as the data set grows, samples per second
per method, and (``captum``) our methods against Captum's on the same model and batch.

    .venv/bin/python benchmarks/bench_predict.py memory --n 1000 10000     # peak RSS, each size in a fresh process
    .venv/bin/python benchmarks/bench_predict.py speed --n 256            # samples/s per method and per metric
    .venv/bin/python benchmarks/bench_predict.py captum --device cuda     # vs Captum: IG, occlusion (+ our RISE)

The data are procedural shapes (3×32×32) generated on the fly, 64 at a time, so the data set itself takes no memory
and the peak RSS is the pipeline's: model, one batch, one shard in the writer's buffer. The model is the examples'
SmallCNN (width 16), untrained (the cost does not depend on the weights). Prints Markdown tables; ``--json`` writes
the rows too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import sync, timed  # a sibling module: the benchmarks run as scripts

BLOCK = 64


class LazyShapes(Dataset):
    """``n`` shapes images made on demand, 64 per generator call (one block cached): constant memory in ``n``."""

    def __init__(self, n: int) -> None:
        self.n, self._block, self._data = n, -1, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        from explain_callbacks.datasets.shapes import make_shapes

        b = i // BLOCK
        if b != self._block:
            self._block, self._data = b, make_shapes(BLOCK, seed=1000 + b)
        d = self._data
        return d.x[i % BLOCK], d.y[i % BLOCK], d.mask[i % BLOCK]


def _model():
    from explain_callbacks.models import LitClassifier, SmallCNN

    torch.manual_seed(0)
    return LitClassifier(SmallCNN(3, 4, width=16))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _run(n: int, out: str, methods: list, metrics: list, batch: int = 64, shard: int = 512, devices: int = 1) -> dict:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from explain_callbacks.predict import ExplainWriter, SplitData

    class Data(pl.LightningDataModule):
        def test_dataloader(self):
            return DataLoader(LazyShapes(n), batch_size=batch)

    writer = ExplainWriter(out, methods=methods, metrics=metrics, shard_size=shard)
    trainer = pl.Trainer(
        accelerator="auto", devices=devices, logger=False, callbacks=[writer], enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.predict(_model(), datamodule=SplitData(Data()), return_predictions=False)
    return {"seconds": time.perf_counter() - start, "summary": writer.summary}


def memory_child(n: int) -> None:
    """One size in this process: RSS before predict (imports, model) and the peak after it, as JSON."""
    import lightning.pytorch  # noqa: F401 - counted in the baseline

    import explain_callbacks  # noqa: F401

    torch.set_num_threads(2)
    base = _rss_mb()
    with tempfile.TemporaryDirectory() as out:
        r = _run(n, out, ["saliency"], ["sparseness"])
        disk = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) / 2**20
    print(json.dumps({"n": n, "baseline_mb": base, "peak_mb": _rss_mb(), "seconds": r["seconds"], "disk_mb": disk}))


def memory(sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "_memory_child", str(n)], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONWARNINGS="ignore"))  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| samples | RSS after imports (MiB) | peak RSS (MiB) | growth (MiB) | seconds | samples/s | on disk (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['baseline_mb']:.0f} | "
              f"{r['seconds']:.1f} | {r['n'] / r['seconds']:.0f} | {r['disk_mb']:.0f} |")  # fmt: skip
    return rows


SPEED_METHODS = ["saliency", "input_x_gradient", "ig", "smoothgrad", "gradcam", "occlusion", "rise"]


def speed(n: int, methods: list[str], metrics: list[str]) -> list[dict]:
    """Samples per second of each method (its own seconds, read from the summary) and of each metric on saliency
    maps (a run with the metric minus one without), through the whole predict pipeline, one process. Rows are
    printed as they come."""
    torch.set_num_threads(2)
    rows = []
    print(f"| {n} samples, 3×32×32, SmallCNN width 16, CPU ({torch.get_num_threads()} threads) | samples/s |")
    print("|---|---|", flush=True)

    def add(what: str, per_s: float) -> None:
        rows.append({"what": what, "samples_per_s": per_s})
        print(f"| {what} | {per_s:.0f} |", flush=True)

    with tempfile.TemporaryDirectory() as out:
        r = _run(n, out, methods, [], shard=n)
        for m, s in r["summary"]["seconds"].items():
            add(f"method {m}", n / s)
        add("whole run (all methods, data, I/O)", n / r["seconds"])
    if metrics:
        with tempfile.TemporaryDirectory() as out:
            base = _run(n, out, ["saliency"], [], shard=n)["seconds"]
    for metric in metrics:
        with tempfile.TemporaryDirectory() as out:
            t = _run(n, out, ["saliency"], [metric], shard=n)["seconds"]
        add(f"metric {metric} (on saliency maps)", n / max(t - base, 1e-9))
    return rows


def captum(device: str, n: int, repeats: int) -> list[dict]:
    """Ours and Captum's IG (32 steps, zero baseline) and occlusion (4×4 windows, stride 4) on one batch of ``n``
    shapes on ``device``, same model; our RISE (Captum has none) for reference. Best of ``repeats``."""
    from captum.attr import IntegratedGradients as CaptumIG
    from captum.attr import Occlusion as CaptumOcclusion

    from explain_callbacks.attribution import build_attributor

    dev = torch.device(device)
    model = _model().eval().to(dev)
    for p in model.parameters():
        p.requires_grad_(False)
    data = LazyShapes(n)
    x = torch.stack([data[i][0] for i in range(n)]).to(dev)
    y = torch.stack([data[i][1] for i in range(n)]).to(dev)
    ours = {
        "ig": build_attributor({"name": "ig", "n_steps": 32}),
        "occlusion": build_attributor({"name": "occlusion", "window": 4, "stride": 4}),
        "rise": build_attributor("rise"),
    }
    theirs = {
        "ig": lambda: CaptumIG(model).attribute(x, target=y, n_steps=32, internal_batch_size=256),
        "occlusion": lambda: CaptumOcclusion(model).attribute(
            x, target=y, sliding_window_shapes=(3, 4, 4), strides=(3, 4, 4), perturbations_per_eval=64
        ),
    }
    rows = []
    for name, method in ours.items():
        t, _ = timed(lambda method=method: method(model, x, y), repeats)
        row = {"method": name, "ours_samples_per_s": n / t}
        if name in theirs:
            tc, _ = timed(theirs[name], repeats)
            row["captum_samples_per_s"] = n / tc
        rows.append(row)
    sync()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"| {n} samples, 3×32×32, SmallCNN width 16, {name} | ours (samples/s) | Captum (samples/s) |")
    print("|---|---|---|")
    for r in rows:
        c = r.get("captum_samples_per_s")
        print(f"| {r['method']} | {r['ours_samples_per_s']:.0f} | {'—' if c is None else f'{c:.0f}'} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["memory", "speed", "captum", "_memory_child"])
    ap.add_argument("n", nargs="*", type=int)
    ap.add_argument("--n", dest="sizes", nargs="+", type=int)
    ap.add_argument("--methods", nargs="+", default=SPEED_METHODS)
    ap.add_argument("--metrics", nargs="*", default=["deletion", "insertion", "pointing_game"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sizes = args.sizes or args.n
    if args.mode == "_memory_child":
        memory_child(sizes[0])
        return
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}\n")
    if args.mode == "memory":
        rows = memory(sizes or [1000, 10000])
    elif args.mode == "speed":
        rows = speed((sizes or [256])[0], args.methods, args.metrics)
    else:
        rows = captum(args.device, (sizes or [256])[0], args.repeats)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
