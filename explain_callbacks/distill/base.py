"""The student contract, teacher targets, and export/loading of fitted students.

A student is fitted to a teacher's outputs on a set of inputs (or features of a layer):

    student.fit(x, teacher_outputs, teacher=model)   # teacher only for students that need it
    student.predict(x)        # class indices (N,) or regression values (N,) / (N, D)
    student.complexity()      # {"nonzeros": 7} / {"leaves": 8, "depth": 3} / {"rules": 5, ...}
    student.describe()        # Markdown: a coefficient table, a tree or a rule list as text
    student.image()           # (3, H, W) in [0, 1] or None (coefficient image, wavelet filters)

Teacher outputs of shape (N, K ≥ 2) are logits of a classifier (task ``classification``); (N,) or
(N, 1) (or any shape with ``task="regression"``) are regression outputs, unless ``task="classification"``
says they are the logit of a one-logit binary classifier (read as the two logits [0, z]).
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._internal.registry import STUDENTS

__all__ = [
    "TASKS",
    "check_plain",
    "Student",
    "build_student",
    "class_logits",
    "infer_task",
    "load_student",
    "require_sklearn",
    "save_student",
    "single_thread",
    "soft_targets",
    "student_from_dict",
    "teacher_device",
    "teacher_dtype",
    "teacher_labels",
]

TASKS = ("classification", "regression")
FORMAT = "explain_callbacks.student/1"
#: the one file format of students: ``torch.save`` of plain data, read with ``torch.load(weights_only=True)``.
SUFFIX = ".pt"
#: suffixes of pickle files (written by earlier versions for tree and rule students), refused unopened.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".sav", ".dill")


def infer_task(teacher_out: Tensor, task: str = "auto") -> str:
    """``classification`` for (N, K ≥ 2) outputs, ``regression`` otherwise (unless ``task`` says)."""
    if task in TASKS:
        return task
    if task != "auto":
        raise ValueError(f"task must be 'auto', 'classification' or 'regression', got {task!r}.")
    return "classification" if teacher_out.ndim == 2 and teacher_out.shape[1] >= 2 else "regression"


def class_logits(teacher_out: Tensor) -> Tensor:
    """Classifier logits (N, K ≥ 2): as given, or a one-logit binary classifier's logit z, (N,) or
    (N, 1), as the two logits [0, z] (softmax [1 − σ(z), σ(z)], the class σ(z) > 1/2)."""
    if teacher_out.ndim == 2 and teacher_out.shape[1] >= 2:
        return teacher_out
    z = teacher_out.reshape(teacher_out.shape[0], -1)
    if z.shape[1] != 1:
        raise ValueError(
            f"Classifier outputs must be (N, K) logits or a one-logit binary classifier's (N,) / (N, 1), got "
            f"{tuple(teacher_out.shape)}; use task='regression' for other outputs."
        )
    return torch.cat([torch.zeros_like(z), z], 1)


def teacher_labels(teacher_out: Tensor) -> Tensor:
    """The teacher's predicted classes (arg-max of its logits)."""
    return teacher_out.argmax(1)


def soft_targets(teacher_out: Tensor, temperature: float = 1.0) -> Tensor:
    """Soft labels ``softmax(z / T)`` (Hinton, Vinyals & Dean 2015, arXiv:1503.02531)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    return torch.softmax(teacher_out.double() / temperature, dim=1)


def regression_targets(teacher_out: Tensor) -> Tensor:
    """(N,) for a single output, (N, D) otherwise, float64."""
    t = teacher_out.detach().double().reshape(teacher_out.shape[0], -1)
    return t[:, 0] if t.shape[1] == 1 else t


def teacher_device(teacher: Any, x: Tensor) -> torch.device:
    """Where a teacher network computes: its first parameter's device, else the inputs'."""
    if isinstance(teacher, nn.Module):
        for p in teacher.parameters():
            return p.device
    return x.device


def teacher_dtype(teacher: Any, x: Tensor) -> torch.dtype:
    """The dtype a teacher network computes in: its first floating parameter's (float64 networks stay
    float64), else the inputs' floating dtype, else float32."""
    if isinstance(teacher, nn.Module):
        for p in teacher.parameters():
            if p.is_floating_point():
                return p.dtype
    return x.dtype if x.is_floating_point() else torch.float32


def require_sklearn(what: str) -> Any:
    """Import scikit-learn lazily with an error naming the extra to install."""
    try:
        return importlib.import_module("sklearn")
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{what} needs scikit-learn, which is not a runtime dependency of explain_callbacks: "
            "pip install 'explain_callbacks[distill]' (or pip install scikit-learn)."
        ) from err


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run small solves on one intra-op thread (restored afterwards).

    Small matrix products gain nothing from threads, and when the machine is oversubscribed (a
    data loader, other jobs) OpenMP barriers can make each tiny op milliseconds slower.
    """
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _plain(v: Any) -> Any:
    """A config value reduced to types that ``torch.load(weights_only=True)`` accepts."""
    if v is None or isinstance(v, (bool, int, float, str, Tensor)):
        return v
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return repr(v)


def check_plain(v: Any, where: str = "value") -> None:
    """Raise TypeError unless ``v`` is made of tensors and plain values only (None, bool, int, float, str;
    lists, tuples and str-keyed dicts of them): what ``torch.load(weights_only=True)`` accepts, naming
    the first offending entry."""
    # exact types: subclasses such as numpy.float64 (a float) pickle as themselves and would not load
    if v is None or type(v) in (bool, int, float, str, Tensor, nn.Parameter):
        return
    if isinstance(v, dict) and type(v) is dict:
        for k, x in v.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a key {k!r} of type {type(k).__name__}; student states use str keys.")
            check_plain(x, f"{where}[{k!r}]")
        return
    if type(v) in (list, tuple):
        for i, x in enumerate(v):
            check_plain(x, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(v).__module__}.{type(v).__qualname__}: a student's state must hold only tensors and "
        "plain values (so that its file loads with torch.load(weights_only=True), without running code). Convert "
        "it (e.g. numpy arrays with torch.from_numpy, estimators to their fitted arrays) in get_state/set_state."
    )


class Student(ABC):
    """Base class of students.

    Args:
        task: ``auto`` (from the teacher outputs' shape), ``classification`` or ``regression``.
        seed: seed of the student's own generators (never the global RNG).

    Fitted attributes (trailing underscore): ``task_``, ``input_shape_``, ``n_outputs_``,
    ``feature_names_``.
    """

    name: ClassVar[str] = "student"
    #: fit() needs ``teacher=`` (a callable model in the input space).
    needs_teacher: ClassVar[bool] = False
    #: trained at every training step through :meth:`partial_fit`.
    online: ClassVar[bool] = False
    #: the library that fits the student (``torch`` or ``sklearn``); every student exports the same way
    #: (tensors and plain values, :func:`save_student`).
    backend: ClassVar[str] = "torch"

    def __init__(self, task: str = "auto", seed: int = 0) -> None:
        if task not in ("auto", *TASKS):
            raise ValueError(f"task must be 'auto', 'classification' or 'regression', got {task!r}.")
        self.task = task
        self.seed = seed
        self.task_: str | None = None
        self.input_shape_: tuple[int, ...] | None = None
        self.n_outputs_: int | None = None
        self.feature_names_: list[str] | None = None

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        x: Tensor,
        teacher_out: Tensor,
        *,
        teacher: Callable[[Tensor], Tensor] | None = None,
        feature_names: Sequence[str] | None = None,
    ) -> Student:
        """Fit to the teacher's outputs ``teacher_out`` on inputs ``x`` (N, ...)."""
        if x.shape[0] != teacher_out.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but teacher outputs {teacher_out.shape[0]}; they must match.")
        if x.shape[0] < 2:
            raise ValueError(f"A student needs at least 2 samples to fit, got {x.shape[0]}.")
        if self.needs_teacher and teacher is None:
            raise ValueError(f"{type(self).__name__} needs the teacher model: call fit(x, outputs, teacher=model).")
        self.task_ = infer_task(teacher_out, self.task)
        if self.task_ == "classification":
            teacher_out = class_logits(teacher_out)
        self.input_shape_ = tuple(int(s) for s in x.shape[1:])
        self.n_outputs_ = int(teacher_out.shape[1]) if teacher_out.ndim == 2 else 1
        n_feat = int(torch.tensor(self.input_shape_).prod()) if self.input_shape_ else 1
        if feature_names is not None:
            feature_names = [str(f) for f in feature_names]
            if len(feature_names) != n_feat:
                raise ValueError(
                    f"{len(feature_names)} feature names for {n_feat} features; pass one name per input feature."
                )
        self.feature_names_ = feature_names
        with single_thread():  # small solves: see single_thread
            self._fit(x.detach(), teacher_out.detach(), teacher)
        return self

    @abstractmethod
    def _fit(self, x: Tensor, teacher_out: Tensor, teacher: Callable[[Tensor], Tensor] | None) -> None:
        """Fit on validated inputs."""

    def partial_fit(self, x: Tensor, teacher_out: Tensor) -> Student:
        """One online update (online students only)."""
        raise NotImplementedError(f"{type(self).__name__} is not an online student.")

    @property
    def fitted(self) -> bool:
        return self.task_ is not None

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted yet; call fit(x, teacher_outputs) first.")

    # ------------------------------------------------------------------ using
    @abstractmethod
    def predict(self, x: Tensor) -> Tensor:
        """Class indices (N,) for classification; values (N,) or (N, D) for regression."""

    @abstractmethod
    def complexity(self) -> dict[str, int]:
        """Size measures, the first being the headline (non-zeros, leaves, rules, parameters)."""

    def describe(self) -> str:
        """The student in readable form (Markdown)."""
        return repr(self)

    def image(self) -> Tensor | None:
        """A picture of the student (3, H, W) in [0, 1], or None."""
        return None

    def feature_name(self, i: int) -> str:
        if self.feature_names_ is not None:
            return self.feature_names_[i]
        if self.input_shape_ is not None and len(self.input_shape_) > 1:
            idx = []
            for s in reversed(self.input_shape_):
                idx.append(i % s)
                i //= s
            return "x[" + ",".join(str(j) for j in reversed(idx)) + "]"
        return f"x{i}"

    # ------------------------------------------------------------------ export
    def config(self) -> dict[str, Any]:
        """Constructor arguments (override when they differ from ``task``/``seed``)."""
        return {"task": self.task, "seed": self.seed}

    @abstractmethod
    def get_state(self) -> dict[str, Any]:
        """Fitted parameters: tensors and plain values only (None, bool, int, float, str, and lists, tuples and
        str-keyed dicts of them), what ``torch.load(weights_only=True)`` reads back without running code. Never
        an estimator or other object: :meth:`to_dict` refuses them."""

    @abstractmethod
    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_state` returned."""

    def to_dict(self, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The fitted student as plain data (files of :func:`save_student`, the Distiller's checkpoints).

        Raises TypeError when :meth:`get_state` holds anything but tensors and plain values, which
        ``torch.load(weights_only=True)`` could not read back (and a pickle would run code to rebuild).
        """
        self._check_fitted()
        state = self.get_state()
        check_plain(state, f"{type(self).__name__}.get_state()")
        return {
            "format": FORMAT,
            "name": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "config": _plain(self.config()),
            "fitted": {
                "task": self.task_,
                "input_shape": list(self.input_shape_ or ()),
                "n_outputs": self.n_outputs_,
                "feature_names": self.feature_names_,
            },
            "state": state,
            "metadata": _plain(dict(metadata or {})),
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def build_student(spec: str | Mapping[str, Any] | Student, **overrides: Any) -> Student:
    """A student from a registered name, a ``{"name": ..., **kwargs}`` mapping or an instance."""
    obj = STUDENTS.build(spec, **overrides)
    if not isinstance(obj, Student):
        raise TypeError(f"{spec!r} did not give a Student (got {type(obj).__name__}).")
    return obj


def save_student(student: Student, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Export a fitted student with what is needed to load it: ``torch.save`` of tensors and plain values
    (trees and rule lists as arrays and text), suffix ``.pt`` (appended unless ``path`` ends with it).

    The file loads with ``torch.load(weights_only=True)``, which runs no code from the file; see
    :func:`load_student`. Returns the path written.
    """
    path = Path(path)
    if path.suffix != SUFFIX:
        path = path.with_name(path.name + SUFFIX)
    payload = student.to_dict(metadata)  # before creating anything: a student that cannot be stored raises
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def load_student(path: str | Path) -> Student:
    """Load a student written by :func:`save_student`, without running code from the file.

    Only ``.pt`` files are read, with ``torch.load(weights_only=True)`` (tensors and plain values); the
    class is looked up in the ``STUDENTS`` registry, never imported from a name in the file. Pickle
    files (``.pkl``, written by earlier versions for tree and rule students) and other formats are
    refused without being opened.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path} is a pickle file, which can run arbitrary code when loaded, so load_student refuses it without "
            "opening it. Student files are now .pt files of tensors and plain values: re-export the student with "
            "this version of explain_callbacks (fit it again, e.g. rerun training with the Distiller, or, only if "
            "you trust the file, unpickle it yourself and rebuild the student)."
        )
    if path.suffix != SUFFIX:
        raise ValueError(
            f"{path}: unknown student file format {path.suffix or '(no suffix)'!r}; load_student reads the {SUFFIX} "
            "files written by explain_callbacks.distill.save_student."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(
            f"{path} is not a student file that loads safely (torch.load(weights_only=True) refused it: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}). Re-export the student with "
            "explain_callbacks.distill.save_student."
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a student exported by explain_callbacks.distill.save_student.")
    return student_from_dict(payload)


def student_from_dict(payload: Mapping[str, Any]) -> Student:
    """Rebuild a student from :meth:`Student.to_dict`."""
    # Classes are looked up in the STUDENTS registry only (never imported from a path in the file).
    try:
        cls = STUDENTS.get(payload["name"])
    except KeyError:
        raise KeyError(
            f"Student {payload['name']!r} ({payload.get('class')}) is not registered; import the module that "
            "registers it (@STUDENTS.register) before loading."
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Student)):
        raise TypeError(f"STUDENTS[{payload['name']!r}] is {cls!r}, not a Student subclass.")
    student: Student = cls(**payload["config"])
    fitted = payload["fitted"]
    student.task_ = fitted["task"]
    student.input_shape_ = tuple(fitted["input_shape"])
    student.n_outputs_ = fitted["n_outputs"]
    student.feature_names_ = fitted["feature_names"]
    student.set_state(payload["state"])
    student.metadata_ = dict(payload.get("metadata", {}))  # type: ignore[attr-defined]
    return student
