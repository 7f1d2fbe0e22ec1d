"""The README runs as written: every Python snippet trains (on a few batches) and explains something in its 3 epochs,
the quick-start commands are the ones CI runs, its links and figures exist, and it stays short. The
``python examples/train.py ...`` lines of the README and of docs/ run in tests/test_hydra_more.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import lightning.pytorch as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)
#: what each of the five things logs when it worked
EXPECTED = ["maps/", "faithfulness/", "interactions/", "regularizers/penalty/", "distillation/fidelity/"]


def test_readme_is_short_and_has_the_five_things():
    assert len(README.encode()) <= 15 * 1024
    for heading in ("Monitor", "Evaluate", "Interactions", "Regularise", "Distil"):
        assert re.search(rf"^### \d\. {heading}", README, re.M), heading
    assert len(SNIPPETS) == 5
    # each of the five has a Hydra line right after its snippet
    for part in README.split("### ")[1:6]:
        assert "python examples/train.py" in part


def test_readme_links_and_images_exist():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if target.startswith("http"):
            continue
        assert (ROOT / target).exists(), target


def test_quick_start_commands_are_what_ci_runs():
    """The README's test command is .ci/run's, step by step; the main-job command ends in the main job."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    main_job, tests = blocks[0].strip(), blocks[1].strip()
    assert main_job.endswith("python examples/train.py")
    ci = (ROOT / ".ci" / "run").read_text()
    for step in tests.split(" && "):
        step = step.replace(". .venv/bin/activate", ".venv/bin/activate")
        if step.startswith("pip install"):
            pkg = shlex.split(step)[-1]
            assert pkg in ci, step
        else:
            assert step.split()[-1] in ci, step


@pytest.fixture
def tiny_trainer(monkeypatch, tmp_path):
    """pl.Trainer as the snippets call it, on 2 training batches and 1 validation batch per epoch."""
    original = pl.Trainer
    made: list[pl.Trainer] = []

    def trainer(*args, **kwargs):
        kwargs.update(limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=str(tmp_path))  # fmt: skip
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(pl, "Trainer", trainer)
    monkeypatch.chdir(tmp_path)
    return made


@pytest.mark.parametrize("i", range(5), ids=["monitor", "evaluate", "interactions", "regularise", "distil"])
def test_readme_snippet_runs_and_explains_in_three_epochs(i, tiny_trainer):
    code = SNIPPETS[i]
    assert "max_epochs=3" in code
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, f"README.md snippet {i + 1}", "exec"), namespace)
    (trainer,) = tiny_trainer
    assert trainer.current_epoch == 3
    logged = list(trainer.callback_metrics)
    assert any(k.startswith(EXPECTED[i]) for k in logged), logged


def test_docs_argument_tables_are_up_to_date():
    """docs/*.md's tables of every method, metric, callback and their defaults come from the code."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_reference.py"), "--check"], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_render_figures_draws_a_run(tmp_path):
    """docs/render_figures.py on a tiny real run: the maps picture and the faithfulness chart."""
    pytest.importorskip("matplotlib")
    import importlib.util

    from explain_callbacks import AttributionMonitor
    from explain_callbacks.datasets import ShapesDataModule
    from explain_callbacks.models import LitClassifier, SmallCNN

    monitor = AttributionMonitor(budget=None, methods=["saliency", "ig"], metrics=["deletion"], num_samples=2)
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, callbacks=[monitor],
                         default_root_dir=str(tmp_path), enable_progress_bar=False)  # fmt: skip
    trainer.fit(LitClassifier(SmallCNN(in_channels=3, num_classes=4)), ShapesDataModule(n_train=64, n_val=16))
    spec = importlib.util.spec_from_file_location("render_figures", ROOT / "docs" / "render_figures.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    written = render.render(tmp_path, tmp_path / "img")
    assert {p.name for p in written} == {"maps.png", "faithfulness.png", "run.png"}
    assert all(p.stat().st_size > 1000 for p in written)
