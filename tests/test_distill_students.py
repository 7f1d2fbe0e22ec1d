"""Students and fidelity: planted teachers with known answers, export round trips, error messages."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from explain_callbacks.distill import (
    STUDENTS,
    AttributionLinearStudent,
    OnlineStudent,
    RuleListStudent,
    SparseLinearStudent,
    SparseLogisticStudent,
    TreeStudent,
    agreement,
    build_student,
    fidelity,
    fidelity_from_stats,
    fidelity_stats,
    load_student,
    r2_score,
    save_student,
)


def _design(n=200, d=20, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


BETA = torch.zeros(20, dtype=torch.float64)
BETA[[2, 7, 11]] = torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)


@pytest.mark.parametrize("kwargs", [{}, {"max_nonzeros": 3}, {"alpha": 0.2}])
def test_sparse_linear_teacher_is_recovered_exactly(kwargs):
    X = _design()
    y = X @ BETA + 0.3
    s = SparseLinearStudent(**kwargs).fit(X, y)
    assert s.support().tolist() == [2, 7, 11]
    assert torch.allclose(s.coef_[:, 0], BETA, atol=1e-10, rtol=0)
    assert float(s.intercept_[0]) == pytest.approx(0.3, abs=1e-10)
    assert s.complexity() == {"nonzeros": 3, "features": 3}
    assert float(r2_score(s.predict(X), y)) == pytest.approx(1.0, abs=1e-12)


def test_lasso_without_refit_shrinks_and_refit_removes_the_bias():
    X = _design()
    y = X @ BETA
    lasso = SparseLinearStudent(alpha=0.2, refit=False).fit(X, y)
    assert lasso.support().tolist() == [2, 7, 11]
    assert float((lasso.coef_[:, 0] - BETA).abs().max()) > 1e-2  # L1 shrinkage


def test_sparse_logistic_teacher_is_recovered_exactly():
    X = _design()
    logits = torch.stack([torch.zeros(200, dtype=torch.float64), X @ BETA + 0.3], 1)
    for kw in ({"ridge": 0.0}, {"ridge": 0.0, "max_nonzeros": 3}):
        s = SparseLogisticStudent(**kw).fit(X, logits)
        assert s.support().tolist() == [2, 7, 11]
        assert torch.allclose(s.coef_[:, 0], BETA, atol=1e-7, rtol=0)
        assert float(s.intercept_[0]) == pytest.approx(0.3, abs=1e-7)
        assert float(agreement(s.predict(X), logits)) == 1.0


def test_multiclass_sparse_logistic_recovers_a_sparse_softmax_teacher():
    X = _design(500, 12, seed=1)
    B = torch.zeros(12, 4, dtype=torch.float64)
    B[0, 0], B[3, 1], B[5, 2], B[5, 3], B[8, 3] = 2.0, -1.5, 1.0, -1.0, 2.0
    logits = X @ B + torch.tensor([0.1, 0.2, -0.3, 0.0], dtype=torch.float64)
    s = SparseLogisticStudent(ridge=0.0, max_nonzeros=5).fit(X, logits)
    assert s.complexity() == {"nonzeros": 5, "features": 4}
    assert torch.equal(s.coef_ != 0, B != 0)
    assert torch.allclose(s.coef_, B, atol=1e-6)
    assert s.predict_proba(X).shape == (500, 4)


def _tree_teacher(x: torch.Tensor) -> torch.Tensor:
    """A depth-2 axis-aligned tree (three leaves, two classes) on integer-valued features, as logits."""
    cls = torch.where(x[:, 1] <= 4.5, torch.where(x[:, 3] <= 2.5, 0, 1), 1)
    return torch.nn.functional.one_hot(cls, 2).double() * 5


@pytest.mark.parametrize("student", [TreeStudent(max_depth=3), RuleListStudent(max_rules=4, min_samples_leaf=1)])
def test_a_tree_teacher_gives_fidelity_one_to_a_tree_student(student):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 10, (600, 6), generator=g).double()
    xt = torch.randint(0, 10, (300, 6), generator=g).double()
    student.fit(x, _tree_teacher(x))
    assert float(agreement(student.predict(xt), _tree_teacher(xt))) == 1.0
    text = student.describe()
    assert "x1" in text and "x3" in text
    if isinstance(student, RuleListStudent):
        assert student.complexity()["rules"] == 2  # one class-0 leaf + the default
        assert "ELSE class 1" in text


def test_tree_regression_and_feature_names():
    X = _design(300, 4)
    y = torch.where(X[:, 0] > 0, 2.0, -1.0).double()
    s = TreeStudent(max_depth=1).fit(X, y, feature_names=["a", "b", "c", "d"])
    assert float(r2_score(s.predict(X), y)) == pytest.approx(1.0)
    assert s.complexity() == {"leaves": 2, "depth": 1}
    assert "a <=" in s.describe()
    with pytest.raises(ValueError, match="feature names"):
        TreeStudent().fit(X, y, feature_names=["a"])


def test_fidelity_functions_against_closed_forms_and_sklearn():
    from sklearn.metrics import r2_score as sk_r2

    g = torch.Generator().manual_seed(0)
    t = torch.randn(50, 3, generator=g, dtype=torch.float64)
    p = t + 0.3 * torch.randn(50, 3, generator=g, dtype=torch.float64)
    assert float(r2_score(p, t)) == pytest.approx(sk_r2(t.numpy(), p.numpy()), abs=1e-12)
    assert float(r2_score(p[:, 0], t[:, 0])) == pytest.approx(sk_r2(t[:, 0].numpy(), p[:, 0].numpy()), abs=1e-12)
    # sufficient statistics are additive: two halves reduce to the whole
    s = fidelity_stats(p[:20], t[:20], "regression") + fidelity_stats(p[20:], t[20:], "regression")
    assert float(fidelity_from_stats(s, "regression")) == pytest.approx(float(r2_score(p, t)), abs=1e-12)
    logits = torch.randn(40, 4, generator=g)
    labels = logits.argmax(1).clone()
    labels[:10] = (labels[:10] + 1) % 4
    assert float(agreement(labels, logits)) == pytest.approx(0.75)
    s = fidelity_stats(labels[:13], logits[:13], "classification")
    s = s + fidelity_stats(labels[13:], logits[13:], "classification")
    assert float(fidelity_from_stats(s, "classification")) == pytest.approx(0.75)
    assert float(fidelity(logits, logits, "classification")) == 1.0


class _LinearTeacher(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.float())

    def forward(self, x):
        z = x.flatten(1) @ self.w
        return torch.stack([-z, z], 1)


def test_attribution_linear_student_keeps_the_features_the_teacher_uses():
    w = torch.zeros(10)
    w[3], w[7] = 2.0, -1.0
    teacher = _LinearTeacher(w)
    x = torch.randn(300, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = teacher(x)
    s = AttributionLinearStudent(k=2, ridge=0.0).fit(x, out, teacher=teacher)
    assert s.features_.tolist() == [3, 7]
    assert float(agreement(s.predict(x), out)) == 1.0
    assert s.complexity() == {"nonzeros": 2, "features": 2}
    assert teacher.w.grad is None
    with pytest.raises(ValueError, match="needs the teacher"):
        AttributionLinearStudent(k=2).fit(x, out)


def test_online_student_learns_from_soft_targets_without_the_global_rng():
    w = torch.randn(8, generator=torch.Generator().manual_seed(3))
    teacher = _LinearTeacher(w)
    g = torch.Generator().manual_seed(4)
    rng = torch.get_rng_state()
    s = OnlineStudent(hidden=(16,), temperature=2.0, lr=3e-2)
    for _ in range(150):
        xb = torch.randn(32, 8, generator=g)
        with torch.no_grad():
            s.partial_fit(xb, teacher(xb))
    assert torch.equal(rng, torch.get_rng_state())
    xt = torch.randn(500, 8, generator=g)
    with torch.no_grad():
        assert float(agreement(s.predict(xt), teacher(xt))) > 0.9
    assert s.complexity()["steps"] == 150
    # the same seed gives the same student
    s2 = OnlineStudent(hidden=(16,), temperature=2.0, lr=3e-2, epochs=1, batch_size=32)
    s3 = OnlineStudent(hidden=(16,), temperature=2.0, lr=3e-2, epochs=1, batch_size=32)
    with torch.no_grad():
        out = teacher(xt)
    s2.fit(xt, out)
    s3.fit(xt, out)
    assert torch.equal(s2.scores(xt), s3.scores(xt))


def _fitted_students():
    X = _design(120, 6).float()
    logits = torch.stack([torch.zeros(120), X[:, 0] - X[:, 2]], 1)
    teacher = _LinearTeacher(torch.tensor([1.0, 0, -1, 0, 0, 0]) / 2)
    out = [
        SparseLogisticStudent(max_nonzeros=2).fit(X, logits),
        SparseLinearStudent().fit(X, X[:, 1] * 2),
        TreeStudent().fit(X, logits),
        RuleListStudent(backend="sklearn").fit(X, logits),
        AttributionLinearStudent(k=3, method="saliency").fit(X, logits, teacher=teacher),
        OnlineStudent(epochs=2).fit(X, logits),
    ]
    return X, out


def test_every_student_exports_and_loads(tmp_path):
    X, students = _fitted_students()
    for s in students:
        path = save_student(s, tmp_path / s.name, {"epoch": 3})
        assert path.suffix == ".pt"
        torch.load(path, weights_only=True)  # loadable without unpickling code
        loaded = load_student(path)
        assert type(loaded) is type(s)
        assert torch.equal(loaded.predict(X), s.predict(X))
        assert loaded.complexity() == s.complexity()
        assert loaded.metadata_ == {"epoch": 3}
        assert isinstance(s.describe(), str) and s.describe()


def test_registry_names_and_specs():
    names = ("sparse_linear", "sparse_logistic", "tree", "rules", "attribution_linear", "online", "awd", "signature")
    for name in names:
        assert name in STUDENTS
    s = build_student({"name": "tree", "max_depth": 2})
    assert isinstance(s, TreeStudent) and s.max_depth == 2
    with pytest.raises(KeyError, match="Unknown student"):
        build_student("nope")


def test_clear_errors():
    X = _design(50, 3)
    logits = torch.randn(50, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="SparseLogisticStudent"):
        SparseLinearStudent().fit(X, logits)
    with pytest.raises(ValueError, match="SparseLinearStudent"):
        SparseLogisticStudent().fit(X, X[:, 0])
    with pytest.raises(RuntimeError, match="not fitted"):
        TreeStudent().predict(X)
    with pytest.raises(ValueError, match="rows"):
        TreeStudent().fit(X, logits[:10])
    with pytest.raises(ImportError, match="pip install imodels"):
        if "imodels" in sys.modules:
            pytest.skip("imodels installed")
        RuleListStudent(backend="imodels").fit(X, logits)


def test_rule_student_uses_imodels_when_installed(monkeypatch, tmp_path):
    class FakeRuleFit:
        def __init__(self, **kw):
            self.kw = kw

        def fit(self, X, y, feature_names=None):
            self.names = feature_names
            self.complexity_ = 3
            self.thr = float(np.median(X[:, 0]))
            return self

        def predict(self, X):
            return (X[:, 0] > self.thr).astype(np.int64)

        def __str__(self):
            return "rule: x0 > thr"

    fake = types.ModuleType("imodels")
    fake.RuleFitClassifier = FakeRuleFit
    monkeypatch.setitem(sys.modules, "imodels", fake)
    X = _design(60, 3)
    logits = torch.stack([torch.zeros(60, dtype=torch.float64), X[:, 0]], 1)
    assert RuleListStudent().fit(X, logits).used_backend_ == "sklearn"  # the default does not follow what is installed
    s = RuleListStudent(backend="auto", imodels_kwargs={"max_rules": 5}).fit(X, logits)
    assert s.used_backend_ == "imodels" and s.estimator_.kw == {"max_rules": 5}
    assert s.estimator_.names == ["x0", "x1", "x2"]
    assert s.complexity() == {"rules": 3}
    assert "rule: x0 > thr" in s.describe()
    assert s.predict(X).dtype == torch.long
    with pytest.raises(TypeError, match="backend='sklearn'"):  # an imodels estimator is stored only by pickle
        save_student(s, tmp_path / "rules")
    assert not list(tmp_path.iterdir())


def test_one_logit_binary_teacher_with_task_classification():
    """A one-logit binary classifier's z, (N,) or (N, 1), with task='classification' is the two logits
    [0, z]: the sparse logistic student recovers the same coefficients as from the two-column logits,
    trees and the online student predict classes z > 0, and the fidelity reads z > 0 (auto: regression)."""
    X = _design()
    z = X @ BETA + 0.3
    two = torch.stack([torch.zeros_like(z), z], 1)
    ref = SparseLogisticStudent(ridge=0.0).fit(X, two)
    for shaped in (z, z.unsqueeze(1)):
        s = SparseLogisticStudent(ridge=0.0, task="classification").fit(X, shaped)
        assert s.task_ == "classification" and s.n_outputs_ == 2
        torch.testing.assert_close(s.coef_, ref.coef_)
        assert float(fidelity(s.predict(X), shaped, "classification")) == 1.0
    tree = TreeStudent(max_depth=8, task="classification").fit(X, z.unsqueeze(1))
    assert set(tree.predict(X).tolist()) == {0, 1}
    assert float(fidelity(tree.predict(X), z.unsqueeze(1), "classification")) > 0.9
    online = OnlineStudent(task="classification", seed=0)
    online.partial_fit(X.float(), z.unsqueeze(1).float())
    assert online.task_ == "classification" and online.n_outputs_ == 2
    assert SparseLinearStudent().fit(X, z.unsqueeze(1)).task_ == "regression"  # auto: one output is a regression
    with pytest.raises(ValueError, match=r"one-logit binary classifier's \(N,\) / \(N, 1\), got \(200, 2, 2\)"):
        SparseLogisticStudent(task="classification").fit(X, torch.zeros(200, 2, 2, dtype=torch.float64))
