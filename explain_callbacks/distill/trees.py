"""Tree and rule students through scikit-learn (or imodels), imported lazily.

- :class:`TreeStudent`: a shallow CART tree (Breiman et al. 1984) fitted to the teacher's predicted
  classes (classification) or outputs (regression); the readable form is the tree as text.
- :class:`RuleListStudent`: a rule list. With the ``sklearn`` backend it is read off a CART tree
  with at most ``max_rules`` leaves: each leaf is a conjunction of conditions (tightened to one lower
  and one upper bound per feature); for classification the leaves of the most frequent class are
  folded into the final ``ELSE`` rule, so the list has (non-majority leaves + 1) rules. The leaves
  are disjoint, so the list's order does not change its predictions. With the ``imodels`` backend
  (Singh et al. 2021, JOSS, when installed) any imodels estimator is fitted instead (RuleFit by
  default) and described by its own text form.

Fitted trees are kept as plain arrays (:class:`TreeArrays`, scikit-learn's ``tree_`` layout) with their
own prediction, so exported trees and rule lists are tensors and text that load with
``torch.load(weights_only=True)``, without scikit-learn and without unpickling code. An imodels
estimator is an arbitrary object: students fitted with that backend predict in memory but cannot be
exported.

Neither scikit-learn nor imodels is a runtime dependency of explain_callbacks.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._internal.registry import STUDENTS
from .base import Student, regression_targets, require_sklearn, single_thread, teacher_labels

__all__ = ["RuleListStudent", "TreeArrays", "TreeStudent", "tree_rules", "tree_text"]


def _numpy(x: Tensor) -> np.ndarray:
    """Rows as a C-contiguous float32 array: what scikit-learn's trees compute on (they cast other inputs to
    float32 themselves, so the trees are the same)."""
    return np.ascontiguousarray(x.detach().reshape(x.shape[0], -1).float().cpu().numpy())


def _fit_tree(est: Any, X: np.ndarray, y: np.ndarray) -> Any:
    """``est.fit(X, y)``, skipping scikit-learn's input validation when ``X`` is finite float32 (on a
    Distiller's buffer the validation costs more than growing a shallow tree; the tree is identical).
    Non-finite inputs take the validated path (missing-value support)."""
    if X.dtype == np.float32 and X.flags.c_contiguous and bool(np.isfinite(X).all()):
        return est.fit(X, y, check_input=False)
    return est.fit(X, y)


class TreeArrays:
    """A fitted binary decision tree as arrays, in scikit-learn's ``tree_`` layout, with its own predict.

    Node ``i`` is a leaf when ``children_left[i] == -1``; otherwise a row goes left when its
    ``feature[i]`` is ``<= threshold[i]`` (compared in float64, as scikit-learn compares its float32
    inputs), and a missing value (NaN) goes left when ``missing_go_to_left[i]``. ``value`` is
    (nodes, outputs, classes) for classifiers (``classes`` the class labels) and (nodes, outputs, 1)
    for regressors (``classes`` None). Prediction follows ``DecisionTreeClassifier.predict`` /
    ``DecisionTreeRegressor.predict`` exactly (arg-max of the leaf's value, first on ties).
    """

    FIELDS = ("children_left", "children_right", "feature", "threshold", "missing_go_to_left", "value",
              "n_node_samples")  # fmt: skip

    def __init__(
        self,
        children_left: np.ndarray,
        children_right: np.ndarray,
        feature: np.ndarray,
        threshold: np.ndarray,
        missing_go_to_left: np.ndarray,
        value: np.ndarray,
        n_node_samples: np.ndarray,
        classes: np.ndarray | None = None,
    ) -> None:
        self.children_left = np.asarray(children_left, dtype=np.int64)
        self.children_right = np.asarray(children_right, dtype=np.int64)
        self.feature = np.asarray(feature, dtype=np.int64)
        self.threshold = np.asarray(threshold, dtype=np.float64)
        self.missing_go_to_left = np.asarray(missing_go_to_left, dtype=bool)
        self.value = np.asarray(value, dtype=np.float64)
        self.n_node_samples = np.asarray(n_node_samples, dtype=np.int64)
        self.classes = None if classes is None else np.asarray(classes)
        n = self.children_left.shape[0]
        if not (n >= 1 and self.value.ndim == 3 and self.value.shape[0] == n and all(
            getattr(self, f).shape == (n,) for f in self.FIELDS if f != "value"
        )):  # fmt: skip
            raise ValueError(f"Inconsistent tree arrays ({n} nodes, value {self.value.shape}).")
        inner = self.children_left >= 0
        kids = np.concatenate([self.children_left[inner], self.children_right[inner]])
        if kids.size and (kids.min() < 1 or kids.max() >= n or np.unique(kids).size != kids.size):
            raise ValueError("Tree arrays do not describe a tree (children out of range or shared).")
        if bool((self.feature[inner] < 0).any()) or bool((self.children_right[inner] < 0).any()):
            raise ValueError("Tree arrays do not describe a tree (a split without a feature or a right child).")

    @classmethod
    def from_sklearn(cls, estimator: Any) -> TreeArrays:
        """The arrays of a fitted ``DecisionTreeClassifier`` / ``DecisionTreeRegressor``."""
        t = estimator.tree_
        missing = getattr(t, "missing_go_to_left", None)  # scikit-learn >= 1.3
        if missing is None:
            missing = np.zeros(t.node_count, dtype=bool)
        classes = getattr(estimator, "classes_", None)
        if classes is not None and getattr(estimator, "n_outputs_", 1) != 1:
            raise ValueError("Only single-output classification trees are supported.")
        return cls(t.children_left, t.children_right, t.feature, t.threshold, missing, t.value, t.n_node_samples,
                   classes)  # fmt: skip

    @property
    def is_classifier(self) -> bool:
        return self.classes is not None

    def is_leaf(self, node: int) -> bool:
        return bool(self.children_left[node] < 0)

    def apply(self, X: np.ndarray) -> np.ndarray:
        """Index of the leaf each row of ``X`` (N, features) falls in."""
        X = np.asarray(X)
        node = np.zeros(X.shape[0], dtype=np.int64)
        rows = np.arange(X.shape[0])
        for _ in range(self.children_left.shape[0]):  # at most one step per level
            left = self.children_left[node]
            inner = left >= 0
            if not inner.any():
                break
            v = X[rows, np.where(inner, self.feature[node], 0)].astype(np.float64)
            go_left = np.where(np.isnan(v), self.missing_go_to_left[node], v <= self.threshold[node])
            node = np.where(inner, np.where(go_left, left, self.children_right[node]), node)
        return node

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class labels (N,) or values (N,) / (N, outputs), as scikit-learn's ``predict``."""
        v = self.value[self.apply(X)]
        if self.is_classifier:
            assert self.classes is not None
            return self.classes[np.argmax(v[:, 0, :], axis=1)]
        out = v[:, :, 0]
        return out[:, 0] if out.shape[1] == 1 else out

    def depth(self) -> int:
        depth = np.zeros(self.children_left.shape[0], dtype=np.int64)
        for i in range(self.children_left.shape[0]):  # children have larger indices than their parent
            if self.children_left[i] >= 0:
                depth[self.children_left[i]] = depth[self.children_right[i]] = depth[i] + 1
        return int(depth.max())

    def n_leaves(self) -> int:
        return int((self.children_left < 0).sum())

    def to_state(self) -> dict[str, Any]:
        """Tensors only (loadable with ``torch.load(weights_only=True)``)."""
        state: dict[str, Any] = {f: torch.from_numpy(np.array(getattr(self, f))) for f in self.FIELDS}
        state["classes"] = None if self.classes is None else torch.from_numpy(np.array(self.classes))
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TreeArrays:
        arrays = {f: _as_numpy(state[f]) for f in cls.FIELDS}
        return cls(**arrays, classes=None if state.get("classes") is None else _as_numpy(state["classes"]))


def _as_numpy(v: Any) -> np.ndarray:
    return v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)


def _as_tree(tree: Any) -> TreeArrays:
    return tree if isinstance(tree, TreeArrays) else TreeArrays.from_sklearn(tree)


def tree_text(tree: TreeArrays | Any, names: list[str], decimals: int = 3) -> str:
    """The tree as indented text, in the layout of scikit-learn's ``export_text``."""
    t = _as_tree(tree)
    lines: list[str] = []
    stack: list[tuple[int, int] | str] = [(0, 0)]  # (node, depth) to expand, or a finished line
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            lines.append(item)
            continue
        node, depth = item
        ind = "|   " * depth
        if t.is_leaf(node):
            v = t.value[node]
            if t.is_classifier:
                assert t.classes is not None
                lines.append(f"{ind}|--- class: {t.classes[int(np.argmax(v[0]))]}")
            else:
                lines.append(f"{ind}|--- value: [{', '.join(f'{x:.{decimals}f}' for x in v[:, 0])}]")
            continue
        name, thr = names[int(t.feature[node])], float(t.threshold[node])
        stack += [(int(t.children_right[node]), depth + 1), f"{ind}|--- {name} >  {thr:.{decimals}f}",
                  (int(t.children_left[node]), depth + 1), f"{ind}|--- {name} <= {thr:.{decimals}f}"]  # fmt: skip
    return "\n".join(lines) + "\n"


class _SklearnStudent(Student):
    """Students fitted with scikit-learn trees, kept and exported as :class:`TreeArrays`.

    ``estimator_`` is the fitted scikit-learn (or imodels) estimator in the process that fitted it; it
    is not exported (None after :func:`~explain_callbacks.distill.load_student`): predictions and the
    readable form use ``tree_``, so a loaded student predicts exactly as the one saved.
    """

    backend = "sklearn"

    def __init__(self, task: str = "auto", seed: int = 0) -> None:
        super().__init__(task=task, seed=seed)
        self.estimator_: Any = None
        self.tree_: TreeArrays | None = None

    def _targets(self, teacher_out: Tensor) -> np.ndarray:
        if self.task_ == "classification":
            return teacher_labels(teacher_out).cpu().numpy()
        return regression_targets(teacher_out).cpu().numpy()

    def predict(self, x: Tensor) -> Tensor:
        self._check_fitted()
        X = _numpy(x)
        if self.tree_ is not None:
            n = self.tree_.feature.max(initial=-1) + 1
            if X.shape[1] < n:
                raise ValueError(f"The tree splits on feature {n - 1} but the inputs have {X.shape[1]} features.")
            pred = self.tree_.predict(X)
        else:  # an imodels estimator (in memory only)
            pred = self.estimator_.predict(X)
        out = torch.as_tensor(np.asarray(pred))
        return out.long() if self.task_ == "classification" else out.double()

    def _names(self) -> list[str]:
        n = int(np.prod(self.input_shape_)) if self.input_shape_ else 1
        return [self.feature_name(i) for i in range(n)]

    def get_state(self) -> dict[str, Any]:
        assert self.tree_ is not None
        return {"tree": self.tree_.to_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.tree_ = TreeArrays.from_state(state["tree"])
        self.estimator_ = None


@STUDENTS.register("tree", "decision_tree")
class TreeStudent(_SklearnStudent):
    """A shallow decision tree (scikit-learn CART).

    Args:
        max_depth: depth limit (3 gives at most 8 leaves).
        max_leaf_nodes: optional leaf limit (best-first growth).
        min_samples_leaf: minimum samples per leaf.
        criterion: scikit-learn's split criterion (default ``gini`` / ``squared_error``).
    """

    name = "tree"

    def __init__(
        self,
        max_depth: int | None = 3,
        max_leaf_nodes: int | None = None,
        min_samples_leaf: int = 1,
        criterion: str | None = None,
        task: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(task=task, seed=seed)
        self.max_depth = max_depth
        self.max_leaf_nodes = max_leaf_nodes
        self.min_samples_leaf = min_samples_leaf
        self.criterion = criterion

    def config(self) -> dict[str, Any]:
        return {
            "max_depth": self.max_depth,
            "max_leaf_nodes": self.max_leaf_nodes,
            "min_samples_leaf": self.min_samples_leaf,
            "criterion": self.criterion,
            **super().config(),
        }

    def _fit(self, x: Tensor, teacher_out: Tensor, teacher: Any) -> None:
        require_sklearn(type(self).__name__)
        from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

        cls = DecisionTreeClassifier if self.task_ == "classification" else DecisionTreeRegressor
        kw: dict[str, Any] = {
            "max_depth": self.max_depth,
            "max_leaf_nodes": self.max_leaf_nodes,
            "min_samples_leaf": self.min_samples_leaf,
            "random_state": self.seed,
        }
        if self.criterion is not None:
            kw["criterion"] = self.criterion
        with single_thread():
            self.estimator_ = _fit_tree(cls(**kw), _numpy(x), self._targets(teacher_out))
        self.tree_ = TreeArrays.from_sklearn(self.estimator_)

    def complexity(self) -> dict[str, int]:
        self._check_fitted()
        assert self.tree_ is not None
        return {"leaves": self.tree_.n_leaves(), "depth": self.tree_.depth()}

    def describe(self) -> str:
        self._check_fitted()
        assert self.tree_ is not None
        c = self.complexity()
        text = tree_text(self.tree_, self._names(), decimals=3)
        return f"**TreeStudent**: {c['leaves']} leaves, depth {c['depth']}\n\n```\n{text}```"


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def tree_rules(estimator: TreeArrays | Any, names: list[str]) -> list[dict[str, Any]]:
    """One rule per leaf of a fitted tree (:class:`TreeArrays` or a scikit-learn tree): conditions tightened
    per feature.

    Returns dicts with ``conditions`` (list of str), ``value`` (class index or float), ``support``
    (training samples in the leaf) and ``purity`` (fraction of the leaf's majority class; 1 for
    regression).
    """
    t = _as_tree(estimator)
    rules: list[dict[str, Any]] = []
    stack: list[tuple[int, dict[int, list[float]]]] = [(0, {})]
    is_clf = t.is_classifier
    while stack:
        node, bounds = stack.pop()
        left, right = t.children_left[node], t.children_right[node]
        if left == right:  # leaf
            conds = []
            for f in sorted(bounds):
                lo, hi = bounds[f]
                if lo > -np.inf and hi < np.inf:
                    conds.append(f"{_fmt(lo)} < {names[f]} <= {_fmt(hi)}")
                elif hi < np.inf:
                    conds.append(f"{names[f]} <= {_fmt(hi)}")
                else:
                    conds.append(f"{names[f]} > {_fmt(lo)}")
            v = t.value[node][0]
            support = int(t.n_node_samples[node])
            if is_clf:
                k = int(np.argmax(v))
                rules.append({"conditions": conds, "value": int(t.classes[k]), "support": support,  # type: ignore[index]
                              "purity": float(v[k] / max(v.sum(), 1e-12))})  # fmt: skip
            else:
                rules.append({"conditions": conds, "value": float(v[0]), "support": support, "purity": 1.0})
            continue
        f, thr = int(t.feature[node]), float(t.threshold[node])
        lo, hi = bounds.get(f, [-np.inf, np.inf])
        lb = dict(bounds)
        lb[f] = [lo, min(hi, thr)]
        rb = dict(bounds)
        rb[f] = [max(lo, thr), hi]
        stack.append((right, rb))
        stack.append((left, lb))
    return rules


@STUDENTS.register("rules", "rule_list")
class RuleListStudent(_SklearnStudent):
    """A rule list read off a shallow tree (scikit-learn) or an imodels rule model.

    Args:
        max_rules: leaves of the underlying tree (sklearn backend); the list has at most this many rules.
        max_depth: optional depth limit of the tree.
        min_samples_leaf: minimum support of a rule.
        backend: ``sklearn`` (default: a rule list read off a tree, exportable), ``imodels`` or ``auto``
            (imodels when installed, else scikit-learn). An imodels estimator is an arbitrary Python object
            that cannot be stored without pickle, so students fitted with it predict in memory but
            :func:`~explain_callbacks.distill.save_student` refuses them (and the Distiller does not export
            them); the default does not depend on what happens to be installed.
        imodels_model: imodels estimator class name (default ``RuleFitClassifier`` /
            ``RuleFitRegressor``); ``imodels_kwargs`` its arguments.
    """

    name = "rules"

    def __init__(
        self,
        max_rules: int = 8,
        max_depth: int | None = None,
        min_samples_leaf: int = 5,
        backend: str = "sklearn",
        imodels_model: str | None = None,
        imodels_kwargs: dict[str, Any] | None = None,
        task: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(task=task, seed=seed)
        if backend not in ("auto", "sklearn", "imodels"):
            raise ValueError(f"backend must be 'auto', 'sklearn' or 'imodels', got {backend!r}.")
        if max_rules < 2:
            raise ValueError(f"max_rules must be >= 2, got {max_rules}.")
        self.max_rules = max_rules
        self.max_depth = max_depth
        self.min_samples_leaf = min_samples_leaf
        self.backend_choice = backend
        self.imodels_model = imodels_model
        self.imodels_kwargs = dict(imodels_kwargs or {})
        self.rules_: list[dict[str, Any]] = []
        self.default_: Any = None
        self.used_backend_: str | None = None

    def config(self) -> dict[str, Any]:
        return {
            "max_rules": self.max_rules,
            "max_depth": self.max_depth,
            "min_samples_leaf": self.min_samples_leaf,
            "backend": self.backend_choice,
            "imodels_model": self.imodels_model,
            "imodels_kwargs": self.imodels_kwargs,
            **super().config(),
        }

    def _imodels(self) -> Any:
        if self.backend_choice == "sklearn":
            return None
        try:
            return importlib.import_module("imodels")
        except ImportError as err:
            if self.backend_choice == "imodels":
                raise ImportError(
                    "RuleListStudent(backend='imodels') needs imodels: pip install imodels "
                    "(or use backend='sklearn' for a rule list read off a scikit-learn tree)."
                ) from err
            return None

    def _fit(self, x: Tensor, teacher_out: Tensor, teacher: Any) -> None:
        X, y = _numpy(x), self._targets(teacher_out)
        imodels = self._imodels()
        if imodels is not None:
            default = "RuleFitClassifier" if self.task_ == "classification" else "RuleFitRegressor"
            cls = getattr(imodels, self.imodels_model or default)
            est = cls(**self.imodels_kwargs)
            X = X.astype(np.float64)  # imodels computes in its own precision
            try:
                est.fit(X, y, feature_names=self._names())
            except TypeError:  # estimators without a feature_names argument
                est.fit(X, y)
            self.estimator_, self.used_backend_ = est, "imodels"
            self.tree_, self.rules_, self.default_ = None, [], None
            return
        require_sklearn(type(self).__name__)
        from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

        cls = DecisionTreeClassifier if self.task_ == "classification" else DecisionTreeRegressor
        with single_thread():
            est = cls(
                max_leaf_nodes=self.max_rules,
                max_depth=self.max_depth,
                min_samples_leaf=self.min_samples_leaf,
                random_state=self.seed,
            )
            est = _fit_tree(est, X, y)
        self.estimator_, self.used_backend_ = est, "sklearn"
        self.tree_ = TreeArrays.from_sklearn(est)
        rules = sorted(tree_rules(self.tree_, self._names()), key=lambda r: -r["support"])
        if self.task_ == "classification":
            support: dict[int, int] = {}
            for r in rules:
                support[r["value"]] = support.get(r["value"], 0) + r["support"]
            self.default_ = max(support, key=lambda c: support[c])
            self.rules_ = [r for r in rules if r["value"] != self.default_]
        else:
            self.default_, self.rules_ = None, rules

    def complexity(self) -> dict[str, int]:
        self._check_fitted()
        if self.used_backend_ == "imodels":
            c = getattr(self.estimator_, "complexity_", None)
            n = len(getattr(self.estimator_, "rules_", []) or [])
            return {"rules": int(c if c is not None else n)}
        n_rules = len(self.rules_) + (1 if self.default_ is not None else 0)
        return {"rules": n_rules, "conditions": sum(len(r["conditions"]) for r in self.rules_)}

    def describe(self) -> str:
        self._check_fitted()
        c = self.complexity()
        if self.used_backend_ == "imodels":
            kind = type(self.estimator_).__name__
            return f"**RuleListStudent** (imodels {kind}): {c['rules']} rules\n\n```\n{self.estimator_}\n```"
        lines = []
        for i, r in enumerate(self.rules_):
            cond = " AND ".join(r["conditions"]) or "TRUE"
            head = "IF" if i == 0 else "ELSE IF"
            if self.task_ == "classification":
                lines.append(f"{head} {cond} THEN class {r['value']}  (n={r['support']}, purity={r['purity']:.2f})")
            else:
                lines.append(f"{head} {cond} THEN {_fmt(r['value'])}  (n={r['support']})")
        if self.default_ is not None:
            lines.append(f"ELSE class {self.default_}")
        return f"**RuleListStudent**: {c['rules']} rules\n\n```\n" + "\n".join(lines) + "\n```"

    def get_state(self) -> dict[str, Any]:
        if self.used_backend_ == "imodels":
            raise TypeError(
                f"RuleListStudent fitted with imodels ({type(self.estimator_).__name__}) cannot be exported: an "
                "imodels estimator can only be stored with pickle, and student files must load without running "
                "code. Use backend='sklearn' (a rule list read off a tree) for an exportable student, or keep the "
                "estimator in memory (student.estimator_)."
            )
        assert self.tree_ is not None
        return {
            "tree": self.tree_.to_state(),
            "rules": [dict(r) for r in self.rules_],
            "default": self.default_,
            "backend": self.used_backend_,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.tree_ = TreeArrays.from_state(state["tree"])
        self.estimator_ = None
        self.rules_ = [dict(r) for r in state["rules"]]
        self.default_ = state["default"]
        self.used_backend_ = state["backend"]
