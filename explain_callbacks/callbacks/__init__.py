"""Lightning callbacks: orchestration only (when, on what, where to log)."""

from .attribution_monitor import AttributionMonitor
from .base import ProbeCallback

__all__ = ["AttributionMonitor", "ProbeCallback"]
