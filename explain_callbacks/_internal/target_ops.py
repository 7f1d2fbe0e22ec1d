"""Target operators: which scalar of a model's output an attribution explains, for any output shape.

A class index explains ``out[n, c]`` of a classifier. Dense and multi-output models need more: a region
of a segmentation map (B, C, H, W), one position of a sequence output (B, T, C), one box of a
detector-style output (B, N, 5 + C), several targets per sample. A :class:`TargetOperator` maps the
model's output (a tensor, or a dict/tuple read at ``key``) to one scalar per row, and is sliced and
repeated like the (B,) tensor of class indices it stands in for, so every method and metric that
chunks its model calls (``target[sl]``, ``target.repeat(k)``) takes it unchanged.

The operators here are linear in the output (sums and means of entries), so for a gradient method the
map of a region equals the sum of the maps of its pixels (Simonyan et al. 2014's saliency is linear in
the explained output; so are the path methods of Sundararajan et al. 2017).

:class:`MultiTarget` holds several targets per sample: a method explains them in one batched call of
K·B rows (row ``k·B + b`` is target k of sample b) and returns maps of shape (B, K, ...).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Union

import torch
from torch import Tensor

from .outputs import OutputSpec, pick_output

__all__ = [
    "BoxTarget",
    "ClassTarget",
    "MultiTarget",
    "PositionTarget",
    "PredictedRegion",
    "RegionTarget",
    "StackedTarget",
    "TargetOperator",
    "is_operator",
]

#: the output transforms a target operator takes (the metrics' ``output=`` settings)
TRANSFORMS = ("logit", "probability", "softmax", "log_softmax", "sigmoid", "auto")
IntOrTensor = Union[int, Sequence[int], Tensor, None]


def _row_tensor(value: Any, device: torch.device | None = None) -> Tensor | None:
    if value is None:
        return None
    t = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if t.is_inference():  # made under torch.inference_mode: a method's gather could not save it for backward
        with torch.inference_mode(False):
            t = t.detach().clone()
    return t if device is None else t.to(device)


def _describe(v: Any) -> str:
    if isinstance(v, Tensor):
        if v.numel() <= 8:
            return str(v.tolist())
        return f"tensor{tuple(v.shape)}:{float(v.double().sum()):.6g}"
    return repr(v)


class TargetOperator:
    """Maps a model output to the scalar explained per row.

    Subclasses set :attr:`row_fields` (attribute name -> number of dims of one row's value: 0 for a class
    index, 2 for an (H, W) mask) and implement :meth:`select` on the output tensor. A field given with one
    more dim than that holds one value per sample; otherwise it is shared by every sample. :meth:`bind`
    fixes the number of rows; then the operator is indexed (``op[sl]``) and repeated (``op.repeat(k)``)
    row-wise like a (B,) tensor. ``key`` picks the scores of a dict/tuple output (see ``output_key``).
    """

    row_fields: ClassVar[dict[str, int]] = {}
    #: the dim of the output that holds the classes (softmax/log-softmax are taken over it)
    class_dim: int = 1
    key: OutputSpec = None
    _n: int | None = None

    # ------------------------------------------------------------------ rows
    @property
    def shape(self) -> tuple[int]:
        """(rows,) once bound, like the class-index tensor it replaces."""
        if self._n is None:
            raise ValueError(f"{type(self).__name__} is not bound to a batch yet; call .bind(batch_size, device).")
        return (self._n,)

    ndim = 1

    def __len__(self) -> int:
        return self.shape[0]

    def numel(self) -> int:
        return self.shape[0]

    @property
    def device(self) -> torch.device:
        for name in self.row_fields:
            v = getattr(self, name)
            if isinstance(v, Tensor):
                return v.device
        return torch.device("cpu")

    def _replace(self, **fields: Any) -> TargetOperator:
        new = copy.copy(self)
        for k, v in fields.items():
            setattr(new, k, v)
        return new

    def bind(self, batch: int, device: torch.device | None = None) -> TargetOperator:
        """A copy with every row field a tensor of ``batch`` rows on ``device`` (shared values expanded
        without copying). An operator bound to ``batch`` rows already is moved only."""
        if self._n is not None:
            if self._n != batch:
                raise ValueError(
                    f"{type(self).__name__} holds {self._n} rows (one per sample) but the inputs have {batch}; "
                    "give per-sample values for exactly these inputs, or shared ones (one mask/index for all)."
                )
            return self.to(device) if device is not None else self
        fields: dict[str, Any] = {}
        for name, dims in self.row_fields.items():
            t = _row_tensor(getattr(self, name), device)
            if t is None:
                fields[name] = None
                continue
            if t.ndim == dims:
                t = t.unsqueeze(0).expand(batch, *t.shape)
            elif t.ndim != dims + 1 or t.shape[0] != batch:
                raise ValueError(
                    f"{type(self).__name__}.{name} must have {dims} dims (shared by every sample) or {dims + 1} "
                    f"with {batch} rows (one per sample), got shape {tuple(t.shape)}."
                )
            fields[name] = t
        return self._replace(_n=batch, **fields)

    def _map_rows(self, fn: Callable[[Tensor], Tensor]) -> dict[str, Any]:
        """``fn`` of every row field that is a tensor (others as they are)."""
        return {n: (fn(v) if isinstance(v, Tensor) else v) for n in self.row_fields for v in [getattr(self, n)]}

    def to(self, device: torch.device | str | None) -> TargetOperator:
        return self._replace(**self._map_rows(lambda v: v.to(device)))

    def __getitem__(self, index: slice | Tensor) -> TargetOperator:
        n = int(torch.arange(self.shape[0])[index].numel())  # rows kept by a slice, an index or a boolean mask
        return self._replace(_n=n, **self._map_rows(lambda v: v[index]))

    def repeat(self, k: int) -> TargetOperator:
        """The rows repeated ``k`` times, block after block (as ``Tensor.repeat`` does for class indices)."""
        self.shape  # noqa: B018
        return self._replace(_n=self._n * k, **self._map_rows(lambda v: v.repeat(k, *([1] * (v.ndim - 1)))))

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        # torch.cat([op, op]) (the metrics stack copies of the rows): rows of the same operator type, joined
        if func is torch.cat and args and all(isinstance(a, TargetOperator) for a in args[0]):
            ops = list(args[0])
            return StackedTarget.join(ops)
        return NotImplemented

    # ------------------------------------------------------------------ scores
    def pick(self, out: Any) -> Tensor:
        """The tensor of scores in ``out`` (a dict/tuple output read at :attr:`key`)."""
        return pick_output(out, self.key)

    def transform(self, out: Tensor, output: str = "logit") -> Tensor:
        """``out`` as the scores to explain: raw (``"logit"``), softmax (``"probability"``/``"softmax"``) or
        log-softmax over :attr:`class_dim`, or the sigmoid; ``"auto"``: softmax when there are several
        classes, raw otherwise."""
        if output not in TRANSFORMS:
            raise ValueError(f"Unknown output {output!r}; choose one of {TRANSFORMS}.")
        several = out.ndim > 1 and out.shape[self.class_dim] > 1
        if output == "auto":
            output = "softmax" if several else "logit"
        if output == "logit":
            return out
        if output == "sigmoid":
            return out.sigmoid()
        if not several:
            if output == "probability":  # single-output models are scored raw under "probability", as before
                return out
            raise ValueError(
                f"output={output!r} needs several classes along dim {self.class_dim} of the output, got shape "
                f"{tuple(out.shape)}; use output='logit' or 'sigmoid'."
            )
        return out.softmax(self.class_dim) if output in ("probability", "softmax") else out.log_softmax(self.class_dim)

    def select(self, out: Tensor) -> Tensor:
        """One scalar per row of the (transformed) output tensor ``out`` (N, ...); N equals the bound rows."""
        raise NotImplementedError

    def __call__(self, out: Any, output: str = "logit") -> Tensor:
        scores = self.pick(out)
        if self._n is not None and scores.shape[0] != self._n:
            raise ValueError(
                f"{type(self).__name__} holds {self._n} rows but the model output has {scores.shape[0]}."
            )
        if self._n is None:
            return self.bind(scores.shape[0], scores.device)(scores, output)
        return self.select(self.transform(scores, output))

    def region(self, spatial: Sequence[int]) -> Tensor | None:
        """The explained output positions as a (rows, *spatial) float mask resized to ``spatial`` (for
        figures), or None when the target has no spatial extent."""
        return None

    def describe(self, class_names: Sequence[str] | None = None) -> list[str]:
        """A short caption per row (figures): what is explained. ``class_names``: the names of the output's
        classes (``"class circle"`` instead of ``"class 1"``), index by index; classes beyond it keep their index."""
        return [self._describe_row(i, class_names) for i in range(self.shape[0])]

    def _describe_row(self, i: int, class_names: Sequence[str] | None = None) -> str:
        return type(self).__name__

    def _class_text(self, i: int, class_names: Sequence[str] | None) -> str:
        """``"class <name>"`` of row ``i``'s ``cls`` (its index when ``class_names`` does not name it)."""
        k = self._row("cls", i)
        if isinstance(k, int) and class_names is not None and 0 <= k < len(class_names):
            return f"class {class_names[k]}"
        return f"class {k}"

    def _row(self, name: str, i: int) -> Any:
        v = getattr(self, name)
        return int(v[i]) if isinstance(v, Tensor) and v[i].numel() == 1 else v

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={_describe(getattr(self, n))}" for n in self.row_fields)
        extra = {k: v for k, v in self._repr_extra().items() if v is not None}
        args += "".join(f", {k}={v!r}" for k, v in extra.items())
        return f"{type(self).__name__}({args})"

    def _repr_extra(self) -> dict[str, Any]:
        return {"key": self.key}


def _class_index(cls: Tensor, size: int, what: str) -> Tensor:
    cls = cls.long()
    if cls.numel() and (int(cls.min()) < 0 or int(cls.max()) >= size):
        raise ValueError(
            f"{what}: class indices must lie in [0, {size - 1}] (the output has {size} classes along its class "
            f"dim), got values in [{int(cls.min())}, {int(cls.max())}]."
        )
    return cls


def _check_int(value: Any, name: str) -> None:
    if isinstance(value, Tensor):
        if value.is_floating_point():
            raise TypeError(f"{name} must hold integer indices, got dtype {value.dtype}; use .long().")
    elif value is not None and not isinstance(value, (int, Sequence)):
        raise TypeError(f"{name} must be an int, a sequence of ints or a LongTensor, got {type(value).__name__}.")


class ClassTarget(TargetOperator):
    """The output of class ``cls``: ``out[n, cls_n]``, trailing dims summed (what a plain class index
    means; the operator form, for :class:`MultiTarget`). ``cls=None``: a single-output model."""

    row_fields: ClassVar[dict[str, int]] = {"cls": 0}

    def __init__(self, cls: IntOrTensor = None, key: OutputSpec = None) -> None:
        _check_int(cls, "cls")
        self.cls, self.key = cls, key

    def _describe_row(self, i: int, class_names: Sequence[str] | None = None) -> str:
        return "output" if self.cls is None else self._class_text(i, class_names)

    def select(self, out: Tensor) -> Tensor:
        if out.ndim == 1:
            return out
        if self.cls is None:
            if out.shape[1] != 1:
                raise ValueError(
                    f"ClassTarget(cls=None) explains a single-output model, but the output has {out.shape[1]} "
                    "entries per sample; give cls."
                )
            return out.reshape(out.shape[0], -1).sum(1)
        cls = _class_index(self.cls, out.shape[1], "ClassTarget")
        sel = out.gather(1, cls.view(-1, *([1] * (out.ndim - 1))).expand(-1, 1, *out.shape[2:]))
        return sel.reshape(out.shape[0], -1).sum(1)


class RegionTarget(TargetOperator):
    """The class-``cls`` scores of a dense output summed (or averaged) over a region: for a segmentation
    output (B, C, H, W), ``Σ_{h,w} mask[h,w] · out[n, cls, h, w]`` (Simonyan et al. 2014's saliency of a
    class score, taken for a set of output pixels, as in the segmentation saliency of Vinogradova et al.
    2020, "Towards interpretable semantic segmentation via gradient-weighted class activation mapping").

    Args:
        mask: which output positions (boolean) or how much each counts (float weights): (*S) shared by every
            sample or (B, *S) one per sample, where *S are the output's spatial dims.
        cls: the class explained (int, or (B,) one per sample); None for a one-channel output (B, *S) or
            (B, 1, *S) (dense regression, a binary mask logit).
        reduce: ``"sum"`` or ``"mean"`` (divided by the mask's total weight; an empty mask gives 0).
        spatial_dims: the output's spatial dims (2 for images; 1 for signals, 3 for volumes): a mask with that
            many dims is shared, one with one more holds one mask per sample.
        key: where the scores are in a dict/tuple output (e.g. ``"out"`` of torchvision's segmentation models).
    """

    def __init__(
        self, mask: Tensor, cls: IntOrTensor = None, reduce: str = "sum", spatial_dims: int = 2,
        key: OutputSpec = None,
    ) -> None:  # fmt: skip
        if reduce not in ("sum", "mean"):
            raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}.")
        _check_int(cls, "cls")
        mask = torch.as_tensor(mask)
        if mask.ndim not in (spatial_dims, spatial_dims + 1):
            raise ValueError(
                f"RegionTarget: mask must have the output's {spatial_dims} spatial dims (shared by every sample) or "
                f"{spatial_dims + 1} (B, *S) (one per sample), got shape {tuple(mask.shape)}; set spatial_dims "
                "for outputs that are not images (1 for sequences, 3 for volumes)."
            )
        self.mask, self.cls, self.reduce, self.spatial_dims, self.key = mask, cls, reduce, spatial_dims, key
        self.row_fields = {"mask": spatial_dims, "cls": 0}  # per instance: the mask's spatial rank

    def _describe_row(self, i: int, class_names: Sequence[str] | None = None) -> str:
        what = "region" if self.cls is None else self._class_text(i, class_names)
        return f"{what}, {int((self.mask[i] > 0).sum())} px"

    def _weights(self, spatial: Sequence[int], dtype: torch.dtype) -> Tensor:
        m = self.mask
        if tuple(m.shape[1:]) != tuple(spatial):
            raise ValueError(
                f"RegionTarget: the mask covers {tuple(m.shape[1:])} positions but the output's spatial dims are "
                f"{tuple(spatial)}; give a mask of the output's size (resize it with nearest-neighbour "
                "interpolation for a lower-resolution head)."
            )
        return m.to(dtype)

    def select(self, out: Tensor) -> Tensor:
        s = self.mask.ndim - 1  # spatial dims
        if self.cls is None:
            if out.ndim == s + 2 and out.shape[1] == 1:
                out = out[:, 0]
            elif out.ndim != s + 1:
                raise ValueError(
                    f"RegionTarget(cls=None) explains a one-channel dense output (B, *S) or (B, 1, *S), got "
                    f"{tuple(out.shape)}; give cls for a multi-class output."
                )
            dense = out
        else:
            if out.ndim != s + 2:
                raise ValueError(
                    f"RegionTarget: a mask with {s} spatial dims needs an output (B, C, *S) of {s + 2} dims, got "
                    f"{tuple(out.shape)}."
                )
            cls = _class_index(self.cls, out.shape[1], "RegionTarget")
            dense = out.gather(1, cls.view(-1, 1, *([1] * s)).expand(-1, 1, *out.shape[2:]))[:, 0]
        w = self._weights(dense.shape[1:], dense.dtype)
        total = (dense * w).reshape(dense.shape[0], -1).sum(1)
        if self.reduce == "mean":
            total = total / w.reshape(w.shape[0], -1).sum(1).clamp_min(1e-12)
        return total

    def region(self, spatial: Sequence[int]) -> Tensor | None:
        m = self.mask.float()
        if m.ndim - 1 != len(spatial):
            return None
        if tuple(m.shape[1:]) != tuple(spatial):
            m = torch.nn.functional.interpolate(m.unsqueeze(1), size=tuple(spatial), mode="nearest")[:, 0]
        return m

    def _repr_extra(self) -> dict[str, Any]:
        return {
            "reduce": self.reduce if self.reduce != "sum" else None,
            "spatial_dims": self.spatial_dims if self.spatial_dims != 2 else None,
            "key": self.key,
        }


class PositionTarget(TargetOperator):
    """One position of a sequence output: ``out[n, t_n, cls_n]`` of a (B, T, C) output (``class_dim=-1``,
    the default; ``class_dim=1`` reads (B, C, T)). ``cls=None``: a (B, T) output (one value per position).

    Args:
        position: the position explained (int, negative counts from the end, or (B,) one per sample).
        cls: the class (int or (B,)), or None.
        class_dim: where the classes are: -1 (B, T, C) or 1 (B, C, T).
    """

    row_fields: ClassVar[dict[str, int]] = {"position": 0, "cls": 0}

    def __init__(
        self, position: IntOrTensor, cls: IntOrTensor = None, class_dim: int = -1, key: OutputSpec = None
    ) -> None:
        if class_dim not in (1, -1, 2):
            raise ValueError(f"class_dim must be -1 (B, T, C) or 1 (B, C, T), got {class_dim}.")
        _check_int(position, "position")
        _check_int(cls, "cls")
        self.position, self.cls, self.key = position, cls, key
        self.class_dim = 2 if class_dim == -1 else class_dim

    def _describe_row(self, i: int, class_names: Sequence[str] | None = None) -> str:
        what = "" if self.cls is None else f" · {self._class_text(i, class_names)}"
        return f"position {self._row('position', i)}{what}"

    def select(self, out: Tensor) -> Tensor:
        rows = torch.arange(out.shape[0], device=out.device)
        if self.cls is None:
            if out.ndim != 2:
                raise ValueError(
                    f"PositionTarget(cls=None) explains a (B, T) output, got {tuple(out.shape)}; give cls."
                )
            seq = out
        else:
            if out.ndim != 3:
                raise ValueError(f"PositionTarget explains a (B, T, C) or (B, C, T) output, got {tuple(out.shape)}.")
            seq = out if self.class_dim == 2 else out.transpose(1, 2)  # (B, T, C)
        t_len = seq.shape[1]
        pos = self.position.long()
        if pos.numel() and (int(pos.min()) < -t_len or int(pos.max()) >= t_len):
            raise ValueError(
                f"PositionTarget: positions must lie in [{-t_len}, {t_len - 1}] (the output has {t_len}), got "
                f"values in [{int(pos.min())}, {int(pos.max())}]."
            )
        pos = pos % t_len
        if self.cls is None:
            return seq[rows, pos]
        cls = _class_index(self.cls, seq.shape[2], "PositionTarget")
        return seq[rows, pos, cls]

    def _repr_extra(self) -> dict[str, Any]:
        return {"class_dim": -1 if self.class_dim == 2 else 1, "key": self.key}


class BoxTarget(TargetOperator):
    """A score of one box of a detector-style output (B, N, 5 + C): each box a row ``(x, y, w, h,
    objectness, class scores...)`` as in YOLO (Redmon et al. 2016). ``score="class"`` explains the class
    score ``out[n, box, 5 + cls]`` (softmax/sigmoid over the class columns under the metrics' ``output=``),
    ``"objectness"`` the box's objectness ``out[n, box, 4]``, and ``"coordinate"`` one of the four box
    coordinates (``cls`` = 0..3: x, y, w, h: why the box lies where it does).

    Args:
        box: which box (int or (B,) one per sample).
        cls: the class (``score="class"``) or coordinate index (``"coordinate"``); ignored for ``"objectness"``.
        n_box_fields: the columns before the class scores (5: four coordinates and the objectness).
    """

    row_fields: ClassVar[dict[str, int]] = {"box": 0, "cls": 0}
    class_dim = 2  # softmax over the class columns (see transform)

    def __init__(
        self, box: IntOrTensor, cls: IntOrTensor = None, score: str = "class", n_box_fields: int = 5,
        key: OutputSpec = None,
    ) -> None:  # fmt: skip
        if score not in ("class", "objectness", "coordinate"):
            raise ValueError(f"score must be 'class', 'objectness' or 'coordinate', got {score!r}.")
        if score != "objectness" and cls is None:
            raise ValueError(f"BoxTarget(score={score!r}) needs cls (which class or coordinate).")
        _check_int(box, "box")
        _check_int(cls, "cls")
        self.box, self.cls, self.score, self.n_box_fields, self.key = box, cls, score, n_box_fields, key

    def _describe_row(self, i: int, class_names: Sequence[str] | None = None) -> str:
        what = {"class": self._class_text(i, class_names), "objectness": "objectness"}.get(
            self.score, f"coordinate {self._row('cls', i)}"
        )
        return f"box {self._row('box', i)} · {what}"

    def transform(self, out: Tensor, output: str = "logit") -> Tensor:
        if output in ("logit", "sigmoid") or self.score != "class":
            return super().transform(out, "logit" if output not in ("logit", "sigmoid") else output)
        classes = super().transform(out[..., self.n_box_fields :], output)  # softmax over the class columns only
        return torch.cat([out[..., : self.n_box_fields], classes], -1)

    def select(self, out: Tensor) -> Tensor:
        if out.ndim != 3 or out.shape[2] <= self.n_box_fields - (self.score != "class"):
            raise ValueError(
                f"BoxTarget explains a detector output (B, N, {self.n_box_fields} + C), got {tuple(out.shape)}."
            )
        rows = torch.arange(out.shape[0], device=out.device)
        box = self.box.long()
        if box.numel() and (int(box.min()) < 0 or int(box.max()) >= out.shape[1]):
            raise ValueError(
                f"BoxTarget: box indices must lie in [0, {out.shape[1] - 1}] (the output has {out.shape[1]} boxes), "
                f"got values in [{int(box.min())}, {int(box.max())}]."
            )
        boxes = out[rows, box]  # (N, 5 + C)
        if self.score == "objectness":
            return boxes[:, self.n_box_fields - 1]
        if self.score == "coordinate":
            return boxes.gather(1, _class_index(self.cls, 4, "BoxTarget coordinate").view(-1, 1))[:, 0]
        cls = _class_index(self.cls, boxes.shape[1] - self.n_box_fields, "BoxTarget")
        return boxes.gather(1, (cls + self.n_box_fields).view(-1, 1))[:, 0]

    def _repr_extra(self) -> dict[str, Any]:
        return {"score": self.score, "key": self.key}


class StackedTarget(TargetOperator):
    """Rows of several bound operators joined: row r is row ``local[r]`` of operator ``parts[which[r]]``.
    Slicing and repeating move only these two indices; each part is evaluated on its own rows only, so K
    parts cost K selections of their rows, not of every row. What :class:`MultiTarget` and ``torch.cat``
    build."""

    row_fields: ClassVar[dict[str, int]] = {"which": 0, "local": 0}

    def __init__(self, parts: Sequence[TargetOperator], which: Tensor, local: Tensor) -> None:
        self.parts = list(parts)
        self.which, self.local = which.long(), local.long()
        self._n = int(which.shape[0])

    @staticmethod
    def join(ops: Sequence[TargetOperator]) -> StackedTarget:
        """Rows of the bound operators ``ops`` one after the other."""
        device = ops[0].device
        sizes = torch.tensor([len(op) for op in ops], device=device)
        which = torch.repeat_interleave(torch.arange(len(ops), device=device), sizes)
        local = torch.cat([torch.arange(len(op), device=device) for op in ops])
        return StackedTarget(ops, which, local)

    def to(self, device: torch.device | str | None) -> TargetOperator:
        new = super().to(device)
        new.parts = [p.to(device) for p in self.parts]  # type: ignore[attr-defined]
        return new

    def __call__(self, out: Any, output: str = "logit") -> Tensor:
        scores = self.pick(out)
        if scores.shape[0] != self._n:
            raise ValueError(f"StackedTarget holds {self._n} rows but the model output has {scores.shape[0]}.")
        which = self.which.to(scores.device)
        vals, pos = [], []
        for k in torch.unique(which).tolist():
            rows = (which == k).nonzero()[:, 0]
            part = self.parts[k][self.local.to(self.parts[k].device)[rows.to(self.parts[k].device)]]
            vals.append(part(scores[rows], output))
            pos.append(rows)
        order = torch.cat(pos).argsort()
        return torch.cat(vals)[order]

    def pick(self, out: Any) -> Tensor:
        return self.parts[0].pick(out)

    def _describe_row(self, i: int, class_names: Sequence[str] | None = None) -> str:
        return self.parts[int(self.which[i])]._describe_row(int(self.local[i]), class_names)

    def region(self, spatial: Sequence[int]) -> Tensor | None:
        regions = [p.region(spatial) for p in self.parts]
        if any(r is None for r in regions) or len({tuple(r.shape) for r in regions}) != 1:  # type: ignore[union-attr]
            return None
        stacked = torch.stack(regions)  # type: ignore[arg-type]  # (parts, B, *spatial)
        return stacked[self.which.to(stacked.device), self.local.to(stacked.device)]

    def __repr__(self) -> str:
        return f"StackedTarget({self.parts!r}, which={_describe(self.which)}, local={_describe(self.local)})"


def as_operator(target: Any) -> TargetOperator:
    """An operator for a :class:`MultiTarget` entry: operators as they are, ints / (B,) indices as classes."""
    return target if isinstance(target, TargetOperator) else ClassTarget(target)


class MultiTarget:
    """Several targets per sample, explained at once: a method called with ``MultiTarget([t_1, ..., t_K])``
    runs one batched computation over K·B rows (row ``k·B + b`` is sample b under target k, chunked like any
    other call) and returns maps of shape (B, K, ...); per-sample side results (``last_info``) are (B, K).

    Args:
        targets: target operators, class indices (ints or (B,) tensors), or a mix.

    Random methods (SmoothGrad, RISE, ...) draw their noise per row of the K·B rows, so their maps equal K
    separate calls in distribution, not draw for draw; deterministic methods give the same maps exactly.
    """

    def __init__(self, targets: Sequence[Any]) -> None:
        targets = list(targets)
        if not targets:
            raise ValueError("MultiTarget needs at least one target.")
        if any(isinstance(t, MultiTarget) for t in targets):
            raise TypeError("MultiTarget entries are single targets (operators or class indices), not MultiTargets.")
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def stacked(self, batch: int, device: torch.device) -> StackedTarget:
        """The K·B-row operator: block k holds target k bound to the ``batch`` samples."""
        return StackedTarget.join([as_operator(t).bind(batch, device) for t in self.targets])

    def __repr__(self) -> str:
        return f"MultiTarget({self.targets!r})"


class PredictedRegion:
    """A target factory for the monitors: the region the model itself predicts as class ``cls`` (its arg-max
    over the class dim equals ``cls``), as a :class:`RegionTarget` of each probe sample, taken from one
    forward pass without grad when the probe set is explained. ``cls=None``: each sample's most frequent
    predicted class other than ``background`` (the shape's class in a segmentation of shapes). ``reduce``:
    ``"mean"`` (default) explains the region's mean score, so the metrics' curves read as the mean class
    probability over the region (in [0, 1]); ``"sum"`` its sum.

    Called as ``factory(model, inputs, labels) -> TargetOperator``; the monitors take any such callable as
    ``target``.
    """

    def __init__(self, cls: int | None = None, background: int | None = 0, reduce: str = "mean",
                 key: OutputSpec = None) -> None:  # fmt: skip
        self.cls, self.background, self.reduce, self.key = cls, background, reduce, key

    @torch.no_grad()
    def __call__(self, model: Callable[[Tensor], Any], inputs: Tensor, labels: Tensor | None = None) -> RegionTarget:
        out = pick_output(model(inputs), self.key)
        if out.ndim < 3:
            raise ValueError(
                f"PredictedRegion needs a dense output (B, C, *S), got {tuple(out.shape)}; use a class target for a "
                "classifier."
            )
        pred = out.argmax(1)  # (B, *S)
        if self.cls is not None:
            cls = torch.full((out.shape[0],), int(self.cls), dtype=torch.long, device=out.device)
        else:
            counts = torch.stack([(pred == c).reshape(pred.shape[0], -1).sum(1) for c in range(out.shape[1])], 1)
            if self.background is not None and out.shape[1] > 1:
                counts[:, self.background] = -1
            cls = counts.argmax(1)
        mask = pred == cls.view(-1, *([1] * (pred.ndim - 1)))
        empty = int((~mask.reshape(mask.shape[0], -1).any(1)).sum())
        if empty:  # nothing to explain there: zero maps, whatever the method
            which = self.cls if self.cls is not None else "(any)"
            warnings.warn(
                f"PredictedRegion: the model predicts no pixel of class {which} in {empty} of {mask.shape[0]} samples; "
                "their region is empty and their maps are zero (an untrained "
                "model, or a class the samples do not show: choose cls=None for each sample's own class).",
                stacklevel=2,
            )
        return RegionTarget(mask, cls, reduce=self.reduce, spatial_dims=pred.ndim - 1, key=self.key)

    def __repr__(self) -> str:
        return f"PredictedRegion(cls={self.cls!r}, background={self.background!r}, reduce={self.reduce!r})"


def is_operator(target: Any) -> bool:
    """Whether ``target`` is a target operator (not a class-index tensor)."""
    return isinstance(target, TargetOperator)
