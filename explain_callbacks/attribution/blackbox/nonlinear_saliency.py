"""Nonlinear saliency (after Rosenzweig et al. 2021, "When saliency goes off on a tangent") — a
**reconstruction**.

The paper's own algorithm could not be read when this was written; this follows methods.md section 2:
plain saliency is the tangent (first-order) view; here the model's own steepest-descent path is
followed instead, and the map summarises that curved path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..._internal.batching import BatchSize, chunks, known_rows
from ..._internal.masks import score_seeder
from ..._internal.registry import ATTRIBUTIONS
from ._common import PerturbationAttributor, score_grad, target_onehot

__all__ = ["NonlinearSaliency"]

MAPS = ("secant", "path_integral", "displacement")


@ATTRIBUTIONS.register("nonlinear_saliency")
class NonlinearSaliency(PerturbationAttributor):
    """Saliency along the model's own steepest-descent flow (**reconstruction**).

    Follow ``dx/dt = −∇f_c/‖∇f_c‖`` from x in steps of length ``h = step_size · ‖x‖₂`` (√D when
    x = 0) until the predicted class changes (``stop_on_class_change``, multi-class models), f_c has
    fallen by ``drop · |f_c(x)|``, or ``max_steps`` were taken; each sample stops on its own. Three maps
    of the path x(0) → x(T) (``map=``):

    - ``secant`` (default): ``(x(0) − x(T)) · (f_c(x(0)) − f_c(x(T))) / ‖x(T) − x(0)‖²``, the slope of
      f_c along the chord of the path. On a linear model the path is straight along the gradient and
      this equals the plain saliency exactly (methods.md's oracle); on a curved model it is the
      finite-difference view that replaces the tangent.
    - ``path_integral``: ``∫ ∂_i f_c dx_i`` along the path (trapezoid rule), which sums to
      f_c(x(T)) − f_c(x(0)) (like IG, but on the model's own curved path; negative where features
      carried the class).
    - ``displacement``: x(T) − x(0).

    All three are also stored in ``last_info`` (with ``steps`` (B,) and ``output_change`` (B,)). A sample
    whose score or gradient is not a number stops where it is.

    Cost: ``steps + 1`` forward+backward steps per sample, at most ``max_steps + 1`` (51); the samples
    advance together, one model call (in chunks of ``batch_size`` rows) per step. A sample that stopped
    stays in the calls, frozen, while its row costs less than dropping it from the carried state would
    (the per-row seconds ``batch_size="auto"`` measured for the model; a small MLP's row costs about a
    microsecond, re-indexing a dozen tensors a tenth of a millisecond); on a costly model (or one never
    measured) it leaves at once. ``last_info["forwards"]`` counts the rows each sample sent.
    Not differentiable.
    """

    passes = "grad"  # its model calls take input gradients (batch_size="auto" is measured so)

    name = "nonlinear_saliency"

    def __init__(
        self,
        step_size: float = 0.02,
        max_steps: int = 50,
        drop: float = 0.5,
        stop_on_class_change: bool = True,
        map: str = "secant",
        output: str = "logit",
        batch_size: BatchSize = "auto",
    ) -> None:
        super().__init__(output=output, budget=None, batch_size=batch_size, seed=0)
        if map not in MAPS:
            raise ValueError(f"map must be one of {MAPS}, got {map!r}.")
        if step_size <= 0 or max_steps < 1 or not 0 < drop <= 1:
            raise ValueError(
                f"need step_size > 0, max_steps >= 1, 0 < drop <= 1; got {step_size}, {max_steps}, {drop}."
            )
        self.step_size = step_size
        self.max_steps = max_steps
        self.drop = drop
        self.stop_on_class_change = stop_on_class_change
        self.map = map

    def n_forwards(self, input_shape: tuple[int, ...]) -> int:
        return self.max_steps + 1

    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        x0 = inputs.detach()
        shape = x0.shape
        b = shape[0]
        flat0 = x0.reshape(b, -1)
        d = flat0.shape[1]
        norm = torch.linalg.vector_norm(flat0, dim=1)
        h = self.step_size * torch.where(norm > 0, norm, torch.full_like(norm, math.sqrt(d)))
        flow = _Flow(model, self.output, self.batch_size, shape[1:])
        g, f0, pred0 = flow(flat0, target, None)
        row_seconds = self._row_seconds(model, x0)
        classify = self.stop_on_class_change and flow.multi
        # The rows carried through the model calls: every sample at first. A sample that stops keeps its
        # row, frozen (its step is zero, so x, f_c and the integral stay as they were), as long as its share
        # of a call costs less than re-indexing the carried state would (``row_seconds``: the model's own
        # measured cost per row); then the stopped rows are written out and dropped. On a cheap model this
        # saves a dozen small tensor operations per stop, which cost more than the rows; on a costly one
        # every stopped row is dropped at once, as only the moving ones are worth a pass.
        xa, ga, fa, ia = flat0, g, f0, torch.zeros_like(flat0)
        gna = torch.linalg.vector_norm(ga, dim=1)
        nh, thr, p0 = -h.unsqueeze(1), f0 - self.drop * f0.abs(), pred0
        tgt, onehot = target, flow.onehot
        # A sample stops when f_c fell to the threshold, its gradient vanished or (``classify``) its class
        # changed; one whose score or gradient is not a number stops too (every comparison with NaN fails).
        moving = gna > 1e-12  # no gradient: nowhere to go
        moves = torch.zeros(b, dtype=torch.long, device=x0.device)  # steps taken, per carried row
        rows = None  # the samples of the carried rows; None: all, in order
        out: tuple[Tensor, ...] | None = None  # (x, f, integral, steps, calls) of the dropped samples
        n, taken = b, 0
        for _ in range(self.max_steps):
            n_moving = int(moving.sum())
            if n_moving == 0:
                break
            if (n - n_moving) * row_seconds > _REINDEX_SECONDS:  # drop the stopped rows
                keep = moving.nonzero()[:, 0]
                fin = moving.logical_not().nonzero()[:, 0]
                if out is None:
                    out = (torch.empty_like(flat0), torch.empty_like(f0), torch.empty_like(flat0),
                           torch.empty_like(moves), torch.empty_like(moves))  # fmt: skip
                ids = fin if rows is None else rows.index_select(0, fin)
                for dst, src in zip(out, (xa, fa, ia, moves)):
                    dst.index_copy_(0, ids, src.index_select(0, fin))
                out[4].index_fill_(0, ids, taken + 1)
                xa, ga, gna, fa, ia, nh, thr, p0, moves = (
                    t.index_select(0, keep) for t in (xa, ga, gna, fa, ia, nh, thr, p0, moves)
                )
                moving = moving.new_ones(n_moving)
                tgt = None if tgt is None else tgt[keep]
                onehot = None if onehot is None else onehot.index_select(0, keep)
                rows = keep if rows is None else rows.index_select(0, keep)
                n = n_moving
            # a step of length h along −∇f_c/‖∇f_c‖ (the flow dx/dt = −∇f_c/‖∇f_c‖); stopped rows stay put
            dx = torch.where(moving.unsqueeze(1), ga * (nh / gna.unsqueeze(1)), 0.0)
            xa = xa + dx
            g_new, fa, pred = flow(xa, tgt, onehot)  # a stopped row's f_c: recomputed at the same x
            taken += 1
            ia.addcmul_(ga + g_new, dx, value=0.5)  # trapezoid rule: ½ (g_k + g_k+1) · Δx
            ga = g_new
            gna = torch.linalg.vector_norm(ga, dim=1)
            moves.add_(moving)
            moving.logical_and_(fa > thr).logical_and_(gna > 1e-12)
            if classify:
                moving.logical_and_(pred == p0)
        if out is None:  # no row was dropped: the carried state is the output
            x, f, integral, steps = xa, fa, ia, moves
            calls = torch.full_like(steps, taken + 1)
        else:
            x, f, integral, steps, calls = out
            for dst, src in zip(out, (xa, fa, ia, moves)):
                dst.index_copy_(0, rows, src)
            calls.index_fill_(0, rows, taken + 1)
        disp = x - flat0
        dist2 = disp.pow(2).sum(1, keepdim=True)
        change = f - f0
        # (x(0) − x(T)) · (f_c(x(0)) − f_c(x(T))) / ‖x(T) − x(0)‖², written with the signs cancelled (exactly)
        secant = torch.where(dist2 > 0, disp * change.unsqueeze(1) / dist2.clamp_min(1e-30), 0.0)
        self.last_info.update(
            secant=secant.reshape(shape),
            path_integral=integral.reshape(shape),
            displacement=disp.reshape(shape),
            steps=steps.cpu(),
            output_change=change.cpu(),
            forwards=calls.cpu(),
        )
        return self.last_info[self.map]

    def _row_seconds(self, model: nn.Module, x: Tensor) -> float:
        """What one more row in a call costs: the seconds per row that ``batch_size="auto"`` measured with
        this model's forward+backward passes (at the rows it chose), this call's or an earlier one's; inf
        where none was measured (a fixed ``batch_size`` on a model never measured), so stopped rows are
        dropped at once. Deterministic within a process: the measurement is made once and cached."""
        choice = self.rows_choice
        if choice is None or choice.how != "measured":
            choice = known_rows("auto", model, x, "grad")
        if choice is None or choice.how != "measured" or not choice.timings:
            return math.inf
        per_row = dict(choice.timings)
        return per_row.get(choice.rows, min(per_row.values()))


#: what dropping the stopped rows from the carried state costs: about 20 small tensor operations, measured
#: at 0.1-0.4 ms on a busy 2-core CPU beside a small MLP or LSTM (their passes evict the operations' caches);
#: a stopped row stays in the model calls while its share of a call costs less
_REINDEX_SECONDS = 2e-4


class _Flow:
    """The model calls of one :class:`NonlinearSaliency` run: (∂f_c/∂x, f_c, arg-max class) per row of
    flattened inputs, in chunks of ``batch_size`` rows (one call, without the chunk loop's bookkeeping,
    when the rows fit). The first call learns whether the model is a multi-class classifier and builds
    the targets' one-hot seed once (:func:`score_grad`), which the caller then re-indexes with its rows."""

    def __init__(self, model: nn.Module, output: str, batch_size: int | None, row_shape: tuple[int, ...]) -> None:
        self.model, self.output, self.batch_size, self.row_shape = model, output, batch_size, tuple(row_shape)
        self.multi = False
        self.onehot: Tensor | None = None
        self.fast = False  # later calls seed the score's gradient without score_grad's checks
        self._bound: tuple[object, object, object] | None = None  # (targets, one-hot rows, their seed)

    def __call__(self, x: Tensor, target: Tensor | None, onehot: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        n = x.shape[0]
        if self.batch_size is None or n <= self.batch_size:
            return self._one(x, target, onehot, first=onehot is None and self.onehot is None)
        parts = [
            self._one(x[sl], None if target is None else target[sl], None if onehot is None else onehot[sl],
                      first=False)
            for sl in chunks(n, self.batch_size)
        ]  # fmt: skip
        if onehot is None and self.onehot is None and target is not None and self.multi:
            self.onehot = target_onehot(torch.empty(n, self._k, device=x.device, dtype=x.dtype), target)
        return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]

    def _one(self, x: Tensor, target: Tensor | None, onehot: Tensor | None, first: bool) -> tuple[Tensor, ...]:
        xc = x.reshape(x.shape[0], *self.row_shape).detach().requires_grad_(True)
        if self.fast and onehot is not None and torch.is_grad_enabled():
            # a later call with class-index targets: score_grad's closed-form seed (its checks were made on
            # the first call), bound to these rows' targets once (they change only when rows are dropped)
            raw = self.model(xc)
            z = raw.detach()
            if self._bound is None or self._bound[0] is not target or self._bound[1] is not onehot:
                self._bound = (target, onehot, score_seeder(z, target, self.output, onehot))
            y, dz = self._bound[2](z)  # type: ignore[misc]
            (g,) = torch.autograd.grad(raw, xc, dz)
            return g.reshape(x.shape[0], -1), y, z.argmax(1)
        with torch.enable_grad():
            g, y, raw = score_grad(self.model, xc, target, self.output, onehot=onehot)
        self.multi = raw.ndim == 2 and raw.shape[1] > 1
        if self.multi:
            self._k = raw.shape[1]
            pred = raw.detach().argmax(1)
        else:
            pred = torch.full_like(y, -1, dtype=torch.long)
        if first:
            self.onehot = target_onehot(raw, target)
            self.fast = self.onehot is not None and score_seeder(raw, target, self.output, self.onehot) is not None
        return g.reshape(x.shape[0], -1), y, pred
