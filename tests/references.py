"""Imports of the test-only reference libraries that need help to import here.

Zennit imports torchvision's ResNet blocks when it is imported, and Quantus imports Zennit; torchvision is not a
dependency of this project (no CUDA wheels on CI). A stub ``torchvision.models.resnet`` (with a ``__spec__``) is put
into ``sys.modules`` for the import and removed after, so later code still sees torchvision as absent. Before this
helper, ``tests/test_metrics_quantus.py`` was skipped when run on its own: Quantus imported only after
``test_lrp_zennit.py`` had imported Zennit in the same process.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from types import ModuleType

from torch import nn


def import_zennit() -> ModuleType | None:
    """Zennit (LGPL, test-only; ``pip install --no-deps zennit``), or None when it is not installed."""
    if importlib.util.find_spec("zennit") is None:
        return None
    stubbed = []
    if importlib.util.find_spec("torchvision") is None:
        for name in ("torchvision", "torchvision.models", "torchvision.models.resnet"):
            mod = types.ModuleType(name)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
            mod.__path__ = []
            sys.modules[name] = mod
            stubbed.append(name)
        resnet = sys.modules["torchvision.models.resnet"]
        resnet.BasicBlock = type("BasicBlock", (nn.Module,), {})
        resnet.Bottleneck = type("Bottleneck", (nn.Module,), {})
    try:
        return importlib.import_module("zennit")
    finally:
        for name in stubbed:  # later code sees torchvision as absent again
            sys.modules.pop(name, None)


def import_quantus() -> ModuleType | None:
    """Quantus (LGPL, test-only), or None when it (or Zennit, which it imports) is not installed."""
    if importlib.util.find_spec("quantus") is None or import_zennit() is None:
        return None
    return importlib.import_module("quantus")
