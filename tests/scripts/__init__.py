"""Scripts the tests run in subprocesses (2-process DDP on gloo)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch


def run_main(main: Callable[..., None], *args: str) -> None:
    """Run ``main(*args)``, then leave without the interpreter's own teardown.

    Lightning leaves the gloo process group alive; torn down at interpreter exit, gloo's threads can abort the process
    ("terminate called without an active exception", exit -6) after every check has passed. So the group is destroyed
    here, the streams flushed, and the process ends with ``os._exit(0)``. An exception in ``main`` propagates as usual
    (a non-zero exit the test reports)."""
    main(*args)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
