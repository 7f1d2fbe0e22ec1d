"""Student files load without running code: every registered student round-trips through plain tensors,
tree students predict from their arrays exactly as scikit-learn does, and pickles are refused unopened."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from explain_callbacks.distill import STUDENTS, Student, TreeStudent, load_student, save_student, student_from_dict
from explain_callbacks.distill.trees import TreeArrays, tree_text

CONF = Path(__file__).resolve().parents[1] / "conf" / "student"
STUDENT_CONFS = sorted(p.stem for p in CONF.glob("*.yaml"))


def test_every_registered_student_has_a_config():
    """The round-trip test below covers every student the library registers (conf/student lists them)."""
    registered = {STUDENTS.get(n) for n in STUDENTS.names()}
    ours = {c for c in registered if c.__module__.startswith("explain_callbacks.")}
    confs = {type(instantiate(OmegaConf.load(CONF / f"{n}.yaml"))) for n in STUDENT_CONFS}
    assert len(ours) == 8 and ours <= confs


# ---------------------------------------------------------------------------- trees as arrays
def _random_tree_data(seed: int, n: int = 400, d: int = 6, nan: bool = False):
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 6, size=(n, d)).astype(np.float32) + rng.normal(0, 0.3, (n, d)).astype(np.float32)
    if nan:
        X[rng.random((n, d)) < 0.1] = np.nan
    return X, rng


@pytest.mark.parametrize("nan", [False, True])
@pytest.mark.parametrize("kind", ["classifier", "regressor", "regressor2"])
def test_tree_arrays_predict_as_sklearn(kind, nan):
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor, export_text

    X, rng = _random_tree_data(0, nan=nan)
    if kind == "classifier":
        y = rng.integers(0, 4, size=X.shape[0]) * 3 - 2  # labels -2, 1, 4, 7: classes_ are not 0..k-1
        est = DecisionTreeClassifier(max_depth=8, random_state=0).fit(X, y)
    else:
        y = rng.normal(size=(X.shape[0], 2) if kind == "regressor2" else X.shape[0])
        est = DecisionTreeRegressor(max_leaf_nodes=40, random_state=0).fit(X, y)
    tree = TreeArrays.from_sklearn(est)
    Xt, _ = _random_tree_data(1, n=2000, nan=True)
    inner = est.tree_.children_left >= 0
    Xt[: inner.sum(), 0] = est.tree_.threshold[inner].astype(np.float32)  # values at (float32) thresholds
    Xt[: inner.sum(), est.tree_.feature[inner]] = est.tree_.threshold[inner].astype(np.float32)
    ours, ref = tree.predict(Xt), est.predict(Xt)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(tree.apply(Xt), est.apply(Xt))
    assert tree.depth() == est.get_depth() and tree.n_leaves() == est.get_n_leaves()
    names = [f"f{i}" for i in range(X.shape[1])]
    ref_text = export_text(est, feature_names=names, decimals=3, show_weights=False, max_depth=100)
    assert tree_text(tree, names) == ref_text
    again = TreeArrays.from_state(torch.load(_saved(tree.to_state()), weights_only=True))
    np.testing.assert_array_equal(again.predict(Xt), ref)


def _saved(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_tree_arrays_refuse_what_is_not_a_tree():
    from sklearn.tree import DecisionTreeClassifier

    X, rng = _random_tree_data(0)
    state = TreeArrays.from_sklearn(DecisionTreeClassifier(max_depth=2).fit(X, rng.integers(0, 2, 400))).to_state()
    bad = dict(state, children_left=state["children_left"].clone())
    bad["children_left"][0] = 0  # the root as its own child: a cycle
    with pytest.raises(ValueError, match="do not describe a tree"):
        TreeArrays.from_state(bad)
    with pytest.raises(ValueError, match="Inconsistent"):
        TreeArrays.from_state(dict(state, threshold=state["threshold"][:2]))


# ---------------------------------------------------------------------------- every registered student
class _Teacher(nn.Module):
    """A linear teacher on 32-sample signals: 3 logits (classification) or 1 / 2 outputs (regression)."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.lin = nn.Linear(32, outputs)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(outputs, 32, generator=torch.Generator().manual_seed(outputs)))
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.lin(x.flatten(1))


def _cases():
    for name in STUDENT_CONFS:
        tasks = {"sparse_linear": ["regression"], "sparse_logistic": ["classification"], "awd": ["classification",
                 "regression"]}.get(name, ["classification", "regression", "regression2"])  # fmt: skip
        for task in tasks:
            yield name, task


def _fit_from_config(name: str, task: str) -> tuple[Student, torch.Tensor]:
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    if name == "awd":
        cfg.epochs = 1  # the round trip, not the wavelet, is under test
    student = instantiate(cfg)
    assert isinstance(student, Student) and student.name == name
    x = torch.randn(160, 32, generator=torch.Generator().manual_seed(0))
    teacher = _Teacher({"classification": 3, "regression": 1, "regression2": 2}[task])
    out = teacher(x)
    if task == "regression":
        out = out[:, 0]
    student.fit(x, out, teacher=teacher if student.needs_teacher else None)
    return student, x


@pytest.mark.parametrize(("name", "task"), list(_cases()))
def test_registered_student_round_trips_through_a_safe_file(name, task, tmp_path):
    student, x = _fit_from_config(name, task)
    path = save_student(student, tmp_path / name, {"epoch": 2})
    assert path.name == f"{name}.pt"
    payload = torch.load(path, weights_only=True)  # tensors and plain values only
    assert payload["name"] == name
    loaded = load_student(path)
    assert type(loaded) is type(student)
    xt = torch.randn(300, 32, generator=torch.Generator().manual_seed(1))
    for data in (x, xt):
        torch.testing.assert_close(loaded.predict(data), student.predict(data), rtol=0, atol=0)
    assert loaded.complexity() == student.complexity()
    assert loaded.describe() == student.describe()
    assert loaded.metadata_ == {"epoch": 2}
    # what the Distiller's checkpoint stores (to_dict) also reads back with weights_only=True
    again = student_from_dict(torch.load(_saved(student.to_dict()), weights_only=True))
    torch.testing.assert_close(again.predict(xt), student.predict(xt), rtol=0, atol=0)


def test_tree_student_predicts_from_its_arrays_without_sklearn_estimator(tmp_path):
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits = torch.stack([x[:, 0], x[:, 1] - x[:, 2], -x[:, 3]], 1)
    s = TreeStudent(max_depth=4).fit(x, logits)
    xt = torch.randn(1000, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = torch.as_tensor(s.estimator_.predict(xt.float().numpy())).long()
    assert torch.equal(s.predict(xt), ref)
    loaded = load_student(save_student(s, tmp_path / "tree"))
    assert loaded.estimator_ is None and torch.equal(loaded.predict(xt), ref)
    with pytest.raises(ValueError, match="splits on feature"):
        loaded.predict(xt[:, :1])


# ---------------------------------------------------------------------------- refusing unsafe files
class _Payload:
    """A pickle that creates a file when unpickled (``open(target, "w")``)."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickles_are_refused_without_running_them(tmp_path):
    target = tmp_path / "pwned"
    for suffix in (".pkl", ".pickle", ".PKL", ".joblib"):
        path = tmp_path / f"student{suffix}"
        path.write_bytes(pickle.dumps({"format": "explain_callbacks.student/1", "x": _Payload(target)}))
        with pytest.raises(ValueError, match="re-export the student with this version"):
            load_student(path)
        assert not target.exists()
    # the same pickle disguised as a .pt file, and a torch.save of the object: weights_only refuses both
    disguised = tmp_path / "student.pt"
    disguised.write_bytes(pickle.dumps(_Payload(target)))
    with pytest.raises(ValueError, match="not a student file that loads safely"):
        load_student(disguised)
    torch.save({"format": "explain_callbacks.student/1", "state": _Payload(target)}, disguised)
    with pytest.raises(ValueError, match="not a student file that loads safely"):
        load_student(disguised)
    assert not target.exists()
    # the demonstration is real: unpickling creates the file
    pickle.loads(pickle.dumps(_Payload(target))).close()
    assert target.is_file()


def test_unknown_formats_and_foreign_files_are_refused(tmp_path):
    for name in ("student.json", "student", "student.safetensors"):
        (tmp_path / name).write_text("{}")
        with pytest.raises(ValueError, match="unknown student file format"):
            load_student(tmp_path / name)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a student exported"):
        load_student(tmp_path / "other.pt")


class _EstimatorStudent(TreeStudent):
    """A user's student that keeps an estimator in its state (what the tree student did before)."""

    def get_state(self):
        return {"estimator": self.estimator_}


def test_a_state_with_objects_is_refused_before_anything_is_written(tmp_path):
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    s = _EstimatorStudent().fit(x, torch.stack([x[:, 0], -x[:, 0]], 1))
    with pytest.raises(TypeError, match=r"get_state\(\)\['estimator'\] is a sklearn.tree.*DecisionTreeClassifier"):
        save_student(s, tmp_path / "bad")
    with pytest.raises(TypeError, match="numpy"):
        s.get_state = lambda: {"n": np.float64(1.0)}  # a float subclass that pickles as numpy
        s.to_dict()
    assert not list(tmp_path.iterdir())


def test_save_student_suffix(tmp_path):
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    s = TreeStudent().fit(x, torch.stack([x[:, 0], -x[:, 0]], 1))
    assert save_student(s, tmp_path / "a.pt").name == "a.pt"
    assert save_student(s, tmp_path / "tree_v1.2").name == "tree_v1.2.pt"  # a dot in a name is kept


def test_distiller_checkpoint_with_an_online_student_loads_weights_only():
    from explain_callbacks.callbacks.distiller import Distiller

    dist = Distiller(budget=None, students={"online": "online", "tree": "tree"})
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    dist.students["online"].partial_fit(x, torch.stack([x[:, 0], -x[:, 0]], 1))
    state = torch.load(_saved(dist.state_dict()), weights_only=True)
    fresh = Distiller(budget=None, students={"online": "online", "tree": "tree"})
    fresh.load_state_dict(state)
    assert torch.equal(fresh.students["online"].predict(x), dist.students["online"].predict(x))
