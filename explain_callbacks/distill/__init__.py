"""Distillation into simpler models during training, with fidelity tracked.

Students (registered in ``STUDENTS`` under short names): ``sparse_linear``, ``sparse_logistic``,
``tree``, ``rules``, ``attribution_linear``, ``online``, ``awd``, ``signature``. Fidelity: agreement
(classification) or R² (regression) with the teacher. Exported students (``save_student``) are tensors and
plain values that ``load_student`` reads with ``torch.load(weights_only=True)``: loading never runs code.
"""

from .._internal.registry import STUDENTS
from .attribution_linear import AttributionLinearStudent, mean_abs_attribution
from .awd import AWDStudent, awd_loss, max_coefficient_features, scale_names
from .base import (
    Student,
    build_student,
    infer_task,
    load_student,
    save_student,
    soft_targets,
    student_from_dict,
    teacher_labels,
)
from .buffer import RingBuffer, gather_rows
from .fidelity import agreement, fidelity, fidelity_from_stats, fidelity_stats, r2_score, student_score
from .linear import SparseLinearStudent, SparseLogisticStudent, fista, soft_threshold
from .online import OnlineStudent, distillation_loss
from .signature import SignatureFeatures, SignatureStudent
from .trees import RuleListStudent, TreeArrays, TreeStudent, tree_rules, tree_text
from .trim import trim_attribution
from .wavelets import (
    DAUBECHIES,
    AdaptiveWavelet,
    daubechies,
    dwt1d,
    dwt2d,
    idwt1d,
    idwt2d,
    low_to_high,
    wavedec,
    wavelet_constraint_losses,
    waverec,
)

__all__ = [
    "DAUBECHIES",
    "STUDENTS",
    "AWDStudent",
    "AdaptiveWavelet",
    "AttributionLinearStudent",
    "OnlineStudent",
    "RingBuffer",
    "RuleListStudent",
    "SignatureFeatures",
    "SignatureStudent",
    "SparseLinearStudent",
    "SparseLogisticStudent",
    "Student",
    "TreeArrays",
    "TreeStudent",
    "agreement",
    "awd_loss",
    "build_student",
    "daubechies",
    "distillation_loss",
    "dwt1d",
    "dwt2d",
    "fidelity",
    "fidelity_from_stats",
    "fidelity_stats",
    "fista",
    "gather_rows",
    "idwt1d",
    "idwt2d",
    "infer_task",
    "load_student",
    "low_to_high",
    "max_coefficient_features",
    "mean_abs_attribution",
    "r2_score",
    "save_student",
    "scale_names",
    "soft_targets",
    "soft_threshold",
    "student_from_dict",
    "student_score",
    "teacher_labels",
    "tree_rules",
    "tree_text",
    "trim_attribution",
    "wavedec",
    "wavelet_constraint_losses",
    "waverec",
]
