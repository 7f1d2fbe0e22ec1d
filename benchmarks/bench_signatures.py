"""Cost of truncated path signatures (``analysis.signatures``) against iisignature, by level and stream length.

1. Signature of B streams of T points in D channels (float64, CPU; the GPU too when one is present), level m:
   the pure-torch backend (Chen's identity as a balanced tree of batched tensor products), with the backward
   pass, pySigLib's (``backend="pysiglib"``, C++ with torch autograd) when installed, and iisignature's
   ``sig`` (C++, NumPy arrays, no autograd) when installed.
2. The signature student's fit and its exact IG attributions on the Lévy-area task of the tests.

Best of ``--repeats`` wall times after a warm-up; one torch thread by default. Run:
``.venv/bin/python benchmarks/bench_signatures.py`` (under a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import timed

from explain_callbacks.analysis.signatures import levy_area, signature, signature_channels
from explain_callbacks.distill import SignatureStudent

try:
    import iisignature
except ImportError:  # optional reference
    iisignature = None
try:
    import pysiglib
except ImportError:  # optional backend
    pysiglib = None


def bench_signature(batch: int, channels: int, repeats: int, device: str) -> None:
    print(f"\n### Signature of {batch} streams, {channels} channels, float64, {device}\n")
    ref = "iisignature (s)" if iisignature is not None and device == "cpu" else None
    psl = "pysiglib (s)" if pysiglib is not None else None
    heads = ["level", "T", "features", "torch (s)", "torch fwd+bwd (s)"]
    heads += [psl, "pysiglib fwd+bwd (s)"] if psl else []
    heads += [ref, "torch / iisignature"] if ref else []
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    g = torch.Generator().manual_seed(0)
    for depth in (2, 3, 4, 5):
        for length in (16, 64, 256):
            x = torch.randn(batch, length, channels, generator=g, dtype=torch.float64).cumsum(1).to(device)
            t_ours, _ = timed(lambda x=x, m=depth: signature(x, m, backend="torch"), repeats)
            xr = x.clone().requires_grad_(True)

            def fwd_bwd(xr: torch.Tensor = xr, m: int = depth, backend: str = "torch") -> None:
                signature(xr, m, backend=backend).sum().backward()

            t_bwd, _ = timed(fwd_bwd, repeats)
            row = [str(depth), str(length), str(signature_channels(channels, depth)), f"{t_ours:.4f}", f"{t_bwd:.4f}"]
            if psl:
                t_psl, _ = timed(lambda x=x, m=depth: signature(x, m, backend="pysiglib"), repeats)
                t_psl_bwd, _ = timed(lambda: fwd_bwd(backend="pysiglib"), repeats)
                row += [f"{t_psl:.5f}", f"{t_psl_bwd:.5f}"]
            if ref:
                xn = x.cpu().numpy()
                t_ref, _ = timed(lambda xn=xn, m=depth: iisignature.sig(xn, m), repeats)
                row += [f"{t_ref:.4f}", f"{t_ours / t_ref:.2f}"]
            print("| " + " | ".join(row) + " |")


def bench_student(repeats: int) -> None:
    print("\n### SignatureStudent on the Lévy-area task (800 streams x 20 steps x 3 channels, level 3, backend auto)\n")
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.zeros(800, 1, 3), torch.randn(800, 19, 3, generator=g).cumsum(1)], 1)
    z = levy_area(x, 0, 1)
    out = torch.stack([-z, z], 1)
    t_fit, student = timed(lambda: SignatureStudent(depth=3, max_nonzeros=6).fit(x, out), repeats)
    t_attr, _ = timed(lambda: student.attribute(x[:256]), repeats)
    print("| fit (s) | attribute 256 streams (s) | non-zeros |")
    print("|---|---|---|")
    print(f"| {t_fit:.3f} | {t_attr:.4f} | {student.complexity()['nonzeros']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); iisignature: {iisignature is not None}, "
          f"pysiglib: {pysiglib is not None}")  # fmt: skip
    bench_signature(args.batch, args.channels, args.repeats, "cpu")
    if torch.cuda.is_available():
        bench_signature(args.batch, args.channels, args.repeats, "cuda")
    bench_student(args.repeats)


if __name__ == "__main__":
    main()
