"""Render the documentation's figures from a real run's TensorBoard event files (needs matplotlib).

    python examples/train.py                  # the main job writes logs/runs/<date>/tensorboard
    python docs/render_figures.py             # the newest run under logs/ -> docs/img/*.png
    python docs/render_figures.py RUN_DIR --out docs/img

It reads whatever the event files hold, so it keeps working when tags move:

- ``docs/img/maps.png``: the maps picture of the last explained step. A figure or image tag under a ``maps``
  section (one row per probe sample: input | a map per method), else the per-method overlays (tags ending in
  ``overlay``) side by side with the probe inputs, each titled by its tag;
- ``docs/img/faithfulness.png``: one chart per faithfulness / sanity / localisation score (deletion, insertion,
  randomisation, pointing games, drift), every method as a line over training steps; test-phase values
  (tags under ``test``) are left out;
- ``docs/img/run.png``: both side by side, the README's screenshot.

Nothing is drawn by hand: every pixel and number comes from the event file.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: scores drawn in the faithfulness chart, in this order, when the run has them
SCORES = ("deletion", "insertion", "randomisation", "energy_pointing_game", "pointing_game", "drift")


def newest_event_file(where: Path) -> Path:
    files = [p for p in where.rglob("events.out.tfevents.*") if p.is_file()]
    if not files:
        raise SystemExit(f"No TensorBoard event file under {where}: run python examples/train.py first.")
    return max(files, key=lambda p: p.stat().st_mtime)


class Run:
    """Every event file of one run directory read together (Lightning starts a new file for ``trainer.test``);
    the methods mirror tensorboard's ``EventAccumulator`` (``Tags``, ``Images``, ``Scalars``)."""

    def __init__(self, files: list[Path]) -> None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        self.accs = []
        for f in sorted(files, key=lambda p: p.stat().st_mtime):
            acc = EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
            acc.Reload()
            self.accs.append(acc)

    def Tags(self) -> dict[str, list[str]]:  # noqa: N802
        out: dict[str, list[str]] = {"images": [], "scalars": []}
        for acc in self.accs:
            for kind in out:
                out[kind] += [t for t in acc.Tags().get(kind, []) if t not in out[kind]]
        return out

    def _events(self, kind: str, tag: str) -> list:
        events = []
        for acc in self.accs:
            if tag in acc.Tags().get(kind, []):
                events += acc.Images(tag) if kind == "images" else acc.Scalars(tag)
        return sorted(events, key=lambda e: (e.step, e.wall_time))

    def Images(self, tag: str) -> list:  # noqa: N802
        return self._events("images", tag)

    def Scalars(self, tag: str) -> list:  # noqa: N802
        return self._events("scalars", tag)


def load(event_file: Path) -> Run:
    """The run of ``event_file``: it and the other event files of its directory."""
    return Run(list(event_file.parent.glob("events.out.tfevents.*")))


def _decode(png: bytes):
    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(png), format="png")


def _is_test(tag: str) -> bool:
    return tag.startswith("test") or "/test/" in tag or tag.startswith("explain/test")


def pick_map_images(tags: list[str]) -> list[str]:
    """The maps picture(s): a tag under a maps section first, else the per-method overlays (probe inputs first)."""
    tags = [t for t in tags if not _is_test(t)]
    section = [t for t in tags if re.search(r"(^|/)maps(/|$)", t)]
    if section:
        return section[:1]
    overlays = sorted(t for t in tags if t.endswith("overlay"))
    inputs = [t for t in tags if t.endswith("probe/inputs")]
    return inputs[:1] + overlays


def draw_maps(acc, ax_grid, tags: list[str]) -> None:
    """One picture per axis, the last explained step of each tag, titled by its tag and step."""
    for ax, tag in zip(ax_grid, tags):
        event = acc.Images(tag)[-1]
        ax.imshow(_decode(event.encoded_image_string), interpolation="nearest")
        ax.set_title(f"{tag}  (step {event.step})", fontsize=8, loc="left")
        ax.axis("off")


def _aspect(acc, tag: str) -> float:
    """Height over width of the tag's last picture."""
    event = acc.Images(tag)[-1]
    return event.height / max(event.width, 1) if event.width else 1.0


def score_series(acc) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{score: {method: [(step, value), ...]}} for the scores in SCORES, test-phase tags left out."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(dict)
    for tag in acc.Tags().get("scalars", []):
        if _is_test(tag):
            continue
        parts = tag.split("/")
        score = next((p for p in reversed(parts) if p in SCORES), None)
        if score is None:
            continue
        others = [p for p in parts if p not in (score, "explain", "val", "faithfulness", "sanity", "maps", "drift")]
        method = others[-1] if others else tag
        out[score][method] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return {s: out[s] for s in SCORES if s in out}


def draw_scores(axes, series) -> None:
    higher = {"deletion": "lower", "randomisation": "lower", "insertion": "higher", "pointing_game": "higher",
              "energy_pointing_game": "higher", "drift": "1 = unchanged"}  # fmt: skip
    for ax, (score, by_method) in zip(axes, series.items()):
        for method, points in sorted(by_method.items()):
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", label=method)
        ax.set_title(f"{score}\n({higher.get(score, '')} is better)" if score != "drift" else "drift\n(1 = unchanged)",
                     fontsize=9)  # fmt: skip
        ax.set_xlabel("training step")
        ax.set_ylabel(score)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)


def render(where: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    event_file = newest_event_file(where) if where.is_dir() else where
    acc = load(event_file)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    images = pick_map_images(acc.Tags().get("images", []))
    series = score_series(acc)
    width = 11.0
    heights = [width * _aspect(acc, t) + 0.35 for t in images]  # one row per picture, the full width
    if images:
        fig, axes = plt.subplots(len(images), 1, figsize=(width, sum(heights)), squeeze=False,
                                 gridspec_kw={"height_ratios": heights})  # fmt: skip
        draw_maps(acc, axes[:, 0], images)
        fig.tight_layout()
        fig.savefig(out / "maps.png", dpi=120)
        plt.close(fig)
        written.append(out / "maps.png")
    if series:
        fig, axes = plt.subplots(1, len(series), figsize=(3.2 * len(series), 3.0), squeeze=False)
        draw_scores(axes[0], series)
        fig.tight_layout()
        fig.savefig(out / "faithfulness.png", dpi=120)
        plt.close(fig)
        written.append(out / "faithfulness.png")
    if images and series:  # the README's screenshot: the maps above, four charts below
        shown = dict(list(series.items())[:4])
        fig = plt.figure(figsize=(width, sum(heights) + 3.0))
        grid = fig.add_gridspec(len(images) + 1, len(shown), height_ratios=[*heights, 3.0])
        draw_maps(acc, [fig.add_subplot(grid[i, :]) for i in range(len(images))], images)
        draw_scores([fig.add_subplot(grid[len(images), i]) for i in range(len(shown))], shown)
        shown_dir = "/".join(event_file.parent.parts[-3:])
        fig.suptitle(f"python examples/train.py → …/{shown_dir}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "run.png", dpi=100)
        plt.close(fig)
        written.append(out / "run.png")
    if not written:
        raise SystemExit(f"{event_file} holds no maps image and no faithfulness score to draw.")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default=str(ROOT / "logs"), help="a run directory or an event file")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"), help="where the PNGs go")
    args = parser.parse_args(argv)
    for path in render(Path(args.run), Path(args.out)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
