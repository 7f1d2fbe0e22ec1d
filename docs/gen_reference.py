"""Write the argument tables of docs/*.md from the code: every registered method, metric, interaction,
penalty and student, and every callback, with each argument's default.

    python docs/gen_reference.py           # rewrite the tables in place
    python docs/gen_reference.py --check   # exit 1 when a page is out of date (tests/test_docs.py runs it)

A page holds its table between ``<!-- reference:<kind> -->`` and ``<!-- /reference -->``.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent

#: arguments every entry shares, left out of the tables (described once on each page)
COMMON = {"self", "batch_size", "args", "kwargs"}


def _default(p: inspect.Parameter) -> str:
    if p.default is inspect.Parameter.empty:
        return f"`{p.name}`"
    value = p.default
    if hasattr(value, "items") and not isinstance(value, dict):  # MappingProxyType
        value = {k: dict(v) if hasattr(v, "items") else v for k, v in value.items()}
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"`{p.name}={text}`".replace("|", "\\|")


def _arguments(obj: Any, skip: set[str] = COMMON) -> str:
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return ""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return ", ".join(_default(p) for p in params if p.name not in skip and p.kind not in variadic)


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    line = doc.split("\n\n")[0].replace("\n", " ").strip()
    return line.replace("|", "\\|")


def registry_table(kind: str) -> str:
    import explain_callbacks  # noqa: F401  (registers everything)
    from explain_callbacks._internal import registry as reg

    registry = {"attribution": reg.ATTRIBUTIONS, "metric": reg.METRICS, "interaction": reg.INTERACTIONS,
                "penalty": reg.PENALTIES, "student": reg.STUDENTS}[kind]  # fmt: skip
    by_obj: dict[Any, list[str]] = {}
    for name in registry.names():
        by_obj.setdefault(registry.get(name), []).append(name)
    rows = ["| short name | class / function | what | arguments (defaults) |", "|---|---|---|---|"]
    for obj, names in sorted(by_obj.items(), key=lambda kv: kv[1][0]):
        shown = ", ".join(f"`{n}`" for n in names)
        rows.append(f"| {shown} | `{obj.__name__}` | {_first_line(obj)} | {_arguments(obj)} |")
    return "\n".join(rows)


def callbacks_table(kind: str = "callbacks") -> str:
    from explain_callbacks.callbacks import (
        AttributionMonitor,
        InteractionMonitor,
        SaliencyMasker,
    )
    from explain_callbacks.callbacks.base import ProbeCallback
    from explain_callbacks.callbacks.distiller import Distiller
    from explain_callbacks.callbacks.regularizer import AttributionRegularizer
    from explain_callbacks.callbacks.spray_monitor import SpRAyMonitor

    rows = ["| callback | config | what | arguments (defaults) |", "|---|---|---|---|"]
    probe = {p for p in inspect.signature(ProbeCallback.__init__).parameters if p != "self"}
    for cls, config in [(AttributionMonitor, "attribution"), (InteractionMonitor, "interaction"),
                        (SpRAyMonitor, "spray"), (SaliencyMasker, "saliency_masker"), (Distiller, "distiller"),
                        (AttributionRegularizer, "cdep, rrr, eg_prior"), (ProbeCallback, "(base)")]:  # fmt: skip
        own = _arguments(cls.__init__, COMMON - {"batch_size"} | ({"self"} if cls is ProbeCallback else set()))
        if issubclass(cls, ProbeCallback) and cls is not ProbeCallback:
            # arguments of the base listed in the subclass's signature stay; the rest come through **kwargs
            inherited = probe - set(inspect.signature(cls.__init__).parameters)
            own += ", and ProbeCallback's " + ", ".join(f"`{p}`" for p in sorted(inherited)) if inherited else ""
        rows.append(f"| `{cls.__name__}` | `{config}` | {_first_line(cls)} | {own} |")
    return "\n".join(rows)


GENERATORS = {
    "attribution": lambda: registry_table("attribution"),
    "metric": lambda: registry_table("metric"),
    "interaction": lambda: registry_table("interaction"),
    "penalty": lambda: registry_table("penalty"),
    "student": lambda: registry_table("student"),
    "callbacks": callbacks_table,
}

BLOCK = re.compile(r"(<!-- reference:(\w+) -->\n)(.*?)(<!-- /reference -->)", re.S)


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + GENERATORS[m.group(2)]() + "\n" + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report out-of-date pages instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        new = render(text)
        if new != text:
            stale.append(page.name)
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)} (run python docs/gen_reference.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
