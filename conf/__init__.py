"""Hydra configs of explain_callbacks, importable as ``pkg://explain_callbacks.conf``."""
