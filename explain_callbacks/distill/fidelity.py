"""Fidelity of a student to its teacher: agreement (classification) or R² (regression).

Both come with a sufficient-statistics form (``fidelity_stats`` / ``fidelity_from_stats``) so that
sums can be all-reduced across DDP ranks before the ratio is taken.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import class_logits

__all__ = [
    "agreement",
    "fidelity",
    "fidelity_from_stats",
    "fidelity_stats",
    "r2_score",
    "student_score",
    "to_labels",
    "to_values",
]


def to_labels(t: Tensor) -> Tensor:
    """Class indices from labels (N,) or scores/logits/probabilities (N, K)."""
    if t.ndim == 2 and t.shape[1] >= 2:
        return t.argmax(1)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.is_floating_point():
        raise ValueError(
            "Got floating-point predictions of shape (N,) for a classification fidelity; pass class indices "
            "or (N, K) scores. A single-output model is a regression: use task='regression'."
        )
    return t.long()


def to_values(t: Tensor) -> Tensor:
    """Regression outputs as (N, D) float64 ((N,) and (N, 1) give D = 1)."""
    t = t.detach().double()
    return t.reshape(t.shape[0], -1)


def agreement(student: Tensor, teacher: Tensor) -> Tensor:
    """Fraction of samples where the student's class equals the teacher's (arg-max) class."""
    s, t = to_labels(student).cpu(), to_labels(teacher).cpu()
    if s.shape != t.shape:
        raise ValueError(f"student and teacher give {tuple(s.shape)} vs {tuple(t.shape)} labels; same N needed.")
    return (s == t).double().mean()


def r2_score(pred: Tensor, target: Tensor) -> Tensor:
    """Coefficient of determination 1 − SS_res/SS_tot, averaged uniformly over outputs (as scikit-learn).

    A constant target gives 1 for a perfect prediction and 0 otherwise (scikit-learn's convention).
    """
    return fidelity_from_stats(_r2_stats(pred, target), "regression")


def _r2_stats(pred: Tensor, target: Tensor) -> Tensor:
    p, t = to_values(pred).cpu(), to_values(target).cpu()
    if p.shape != t.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and target {tuple(t.shape)} differ; reshape to (N,) or (N, D).")
    n = torch.tensor([float(t.shape[0])], dtype=torch.float64)
    return torch.cat([((p - t) ** 2).sum(0), t.sum(0), (t**2).sum(0), n])


def fidelity_stats(student: Tensor, teacher: Tensor, task: str) -> Tensor:
    """Additive statistics of the fidelity (sum them over ranks, then call :func:`fidelity_from_stats`).

    Classification: ``[n_agree, n]``; regression: ``[Σ res² (D), Σ y (D), Σ y² (D), n]``.
    """
    if task == "classification":
        if teacher.is_floating_point():  # logits; a one-logit binary teacher's z reads as [0, z]
            teacher = class_logits(teacher)
        s, t = to_labels(student).cpu(), to_labels(teacher).cpu()
        return torch.tensor([float((s == t).sum()), float(t.numel())], dtype=torch.float64)
    if task == "regression":
        return _r2_stats(student, teacher)
    raise ValueError(f"task must be 'classification' or 'regression', got {task!r}.")


def fidelity_from_stats(stats: Tensor, task: str) -> Tensor:
    stats = stats.double()
    if task == "classification":
        return stats[0] / stats[1].clamp_min(1)
    d = (stats.numel() - 1) // 3
    ss_res, s1, s2, n = stats[:d], stats[d : 2 * d], stats[2 * d : 3 * d], stats[-1].clamp_min(1)
    ss_tot = (s2 - s1**2 / n).clamp_min(0)
    const = ss_tot <= 1e-12 * s2.clamp_min(1e-300)
    r2 = torch.where(const, (ss_res <= 1e-12).double(), 1 - ss_res / ss_tot.clamp_min(1e-300))
    return r2.mean()


def fidelity(student: Tensor, teacher: Tensor, task: str) -> Tensor:
    """Agreement (classification) or R² (regression) of student predictions with teacher outputs."""
    return fidelity_from_stats(fidelity_stats(student, teacher, task), task)


def student_score(pred: Tensor, labels: Tensor, task: str) -> Tensor:
    """The student's own accuracy (classification) or R² against the true labels/targets."""
    return fidelity(pred, labels.reshape(labels.shape[0], -1) if task == "regression" else labels, task)
