"""Energy-landscape conserved weights: which inputs the low minima of the loss agree on.

Niroomand & Wales, "Physics-inspired interpretability of machine learning models" (ICLR 2023 workshop,
arXiv:2304.02381); review: Niroomand, Dicks, Pyzer-Knapp & Wales, "Insights into machine learning models from
chemical physics: an energy landscapes approach (EL for ML)", Digital Discovery 2024. The loss of a network over
its weights is an energy landscape with many minima. Weights that keep the same value across a group of low
minima are the ones the task needs; the input features those conserved (and large) first-layer weights connect
to drive the model's decisions.

The paper gives the idea, not an algorithm to the last detail: this module is a **reconstruction**, and every
choice is stated here.

Sampling (:func:`basin_hopping`):
- The trained network is deep-copied (the live module is never touched; a LightningModule's trainer is shared,
  not copied) and cast to float64, so a gradient-norm tolerance of 1e-4 is reachable. Modules run in eval mode
  (dropout off, BatchNorm on its running statistics); the copy's parameters are the only ones optimised, all of
  them (inside a callback every parameter is frozen by the model guard, so which ones the user trains cannot be
  read there; BatchNorm statistics are buffers and stay fixed).
- The landscape is the mean loss over a bounded training subset (``x``, ``y``, full batch, evaluated in chunks
  of ``batch_size`` rows so memory is bounded) plus ``weight_decay * |w|^2``. The L2 term is the papers' own
  choice: it removes the flat directions of cross-entropy on separable data (whose minima lie at infinity) and
  of weights no input uses, so that minima are isolated points.
- Minimisation ("quench"): ``torch.optim.LBFGS`` (strong-Wolfe line search) until the Euclidean gradient norm
  is at most ``gtol`` or ``max_iter`` iterations were spent. LBFGS stops on the largest gradient component; its
  ``tolerance_grad`` is set to ``gtol / sqrt(P)`` which implies the norm criterion. A minimum that did not reach
  ``gtol`` is kept in the record but flagged (``converged``) and left out of the analysis.
- Basin hopping (Wales & Doye 1997): from the current minimum, every parameter tensor is perturbed by
  ``step_size * rms(tensor) * N(0, 1)`` (relative to each tensor's scale, so layers of different size move
  comparably), then quenched; the new minimum is accepted by the Metropolis rule at ``temperature`` (in loss
  units): always when lower, else with probability ``exp(-dL / T)``. Every quenched minimum is recorded,
  accepted or not (as a database of minima is in GMIN/PATHSAMPLE); the chain continues from accepted ones.
  All noise and the Metropolis draws come from a ``torch.Generator`` seeded with ``seed``: the global RNG is
  never used, and the same seed gives the same minima.
- Step-size adaptation, as GMIN and ``scipy.optimize.basinhopping`` do: every ``adapt_interval`` hops the step is
  divided by 0.9 when more than ``target_accept`` (0.5) of those hops were accepted, else multiplied by 0.9, so
  a landscape whose hops all fall back into one basin is explored further (``adapt_interval=None``: fixed step).
  A window whose every hop fell back into the current minimum (loss within 1e-6 and RMS parameter distance within
  1e-3, the deduplication's tolerances) doubles the step instead: those hops are accepted (the same loss), so the
  acceptance rule grew the step by 1/0.9 only, and 20 hops of step 0.3 found a single minimum of a 20-32-32-2 tanh
  MLP (``benchmarks/bench_landscape.py``); where hops find other minima nothing changes.
  The step of each hop is recorded (:attr:`LandscapeSample.step_sizes`).
- Optional ``starts`` (parameter vectors, e.g. snapshots a callback took during training) are quenched with the
  same tolerance and recorded as minima of origin ``"snapshot"``; they do not enter the Markov chain.
- Optional ``max_seconds``: a time limit for the sampling (a monitor's share of the training time). The start is
  always quenched; a hop (or snapshot) is begun only while the time so far plus the mean seconds of a
  minimisation stays within the limit, so the sample stops early rather than overrunning by more than the
  spread of one minimisation's cost (:attr:`LandscapeSample.time_limited` says it stopped).

Symmetry (:func:`align_layers`): hidden units of a layer can be permuted (and, for odd activations such as tanh,
sign-flipped) without changing the function; minima must be brought to one frame before they are compared.
- Supported networks: a chain of ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (``groups=1``) layers with
  parameter-free modules between them; a Linear after a conv reads the flattened channels channel-major (as
  ``nn.Flatten`` after the conv or pooling gives). Other parameterised modules (BatchNorm, attention) are refused
  with an error naming them (``align=False`` skips alignment).
- Every minimum is aligned to the lowest one, layer by layer from the input: the previous layer's permutation and
  signs are applied to the incoming weights, each unit is described by its incoming weights and bias (plus its
  outgoing weights when the next layer is the output layer, whose rows need no alignment), and units are matched
  by minimum squared distance with the Hungarian algorithm (:func:`hungarian`, implemented here in numpy: scipy
  is only a dev dependency; tests check it against ``scipy.optimize.linear_sum_assignment``). With sign flips,
  the cost of a pair is the smaller of the distances to ``+unit`` and ``-unit``, and the sign taken is kept.
  This one forward pass (no iteration over layers as in weight matching of Ainsworth et al. 2023) is exact for
  permuted copies of one network, which the tests check.
- Sign flips are used when ``sign_flips=True``, or with ``"auto"`` when every activation module of the network is
  odd (Tanh, Softsign, Hardtanh, Identity, Flatten, Dropout, AvgPool) and at least one is a Tanh/Softsign/Hardtanh.
  Activations called functionally in ``forward`` are invisible to ``"auto"``: pass True/False.
- Duplicates: two minima are one when their losses differ by at most ``loss_tol`` and the root-mean-square
  distance of their aligned parameters is at most ``dist_tol``; the lower one is kept.

Scores (:func:`conserved_feature_scores`):
- Group: the unique converged minima whose loss is within ``loss_window`` of the lowest; with ``None`` the lower
  half by loss (at least two minima when there are two).
- For each first-layer weight ``w_hd`` (hidden unit h, input feature d) the group's mean ``mu`` and standard
  deviation ``sigma`` over aligned minima. The feature score is ``sum_h mu^2 / (|mu| + sigma)``: close to
  ``sum_h |mu|`` for weights that are large and conserved (``sigma << |mu|``), small for weights that vary
  across the group or are near zero. Reported beside it: ``magnitude = mean_h |mu|`` and
  ``conservation = sum_h |mu| / sum_h (|mu| + sigma)`` in [0, 1].
- Convolutional first layers: scores per input channel and receptive-field position, shape
  ``(C_in, *kernel)``; their per-channel sum is :attr:`LandscapeResult.channel_scores`.

The 2-D picture of the minima (:attr:`LandscapeResult.embedding`) is the exact PCA of the aligned, centred
parameter vectors (``torch.linalg.svd``): deterministic and free of the global RNG, which ``torch.pca_lowrank``
would draw from; the number of minima is small, so the exact form costs no more.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FeatureScores",
    "LandscapeResult",
    "LandscapeSample",
    "align_layers",
    "align_minima",
    "basin_hopping",
    "conserved_feature_scores",
    "deduplicate_minima",
    "hungarian",
    "landscape_analysis",
    "layer_chain",
]

LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_ODD_NONLINEAR = (nn.Tanh, nn.Softsign, nn.Hardtanh)
_ODD_LINEAR = (nn.Identity, nn.Flatten, nn.Dropout, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
               nn.AdaptiveAvgPool2d)  # fmt: skip

Layers = list[tuple[Tensor, Tensor | None]]


# ---------------------------------------------------------------------------------------------- matching
def hungarian(cost: np.ndarray | Tensor) -> np.ndarray:
    """Minimum-cost perfect matching of a square cost matrix: ``perm[i]`` is the column given to row ``i``.

    The shortest-augmenting-path form of the Hungarian algorithm (Kuhn 1955; Jonker & Volgenant 1987) with
    row/column potentials, O(n^3), vectorised over columns with numpy. Written here because scipy is not a
    runtime dependency; equal in total cost to ``scipy.optimize.linear_sum_assignment`` (tested).
    """
    c = np.asarray(cost.detach().cpu().double() if isinstance(cost, Tensor) else cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"hungarian needs a square cost matrix, got shape {c.shape}.")
    if not np.isfinite(c).all():
        raise ValueError("hungarian: the cost matrix holds NaN/Inf.")
    n = c.shape[0]
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    owner = np.zeros(n + 1, dtype=np.int64)  # owner[j]: the row (1-based) matched to column j; column 0 is virtual
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        owner[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = owner[j0]
            free = ~used[1:]
            cur = c[i0 - 1] - u[i0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[owner[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:  # augment along the path
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    perm = np.empty(n, dtype=np.int64)
    perm[owner[1:] - 1] = np.arange(n)
    return perm


# ---------------------------------------------------------------------------------------------- structure
def layer_chain(model: nn.Module) -> list[nn.Module]:
    """The parameterised layers of ``model`` in order, checked to be a chain that alignment supports.

    Raises ``ValueError`` naming the module for anything else (BatchNorm, grouped convs, modules with their own
    parameters), with the fix (``align=False``)."""
    layers: list[nn.Module] = []
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        if not isinstance(m, _LAYERS) or (isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups != 1):
            raise ValueError(
                f"landscape alignment supports chains of Linear/Conv1d/Conv2d (groups=1) layers with parameter-free "
                f"modules between them; module {name!r} ({type(m).__name__}) holds parameters. Pass align=False to "
                "compare minima without removing the permutation symmetry."
            )
        layers.append(m)
    if not layers:
        raise ValueError("landscape: the model has no Linear/Conv layer with parameters.")
    for a, b in itertools.pairwise(layers):
        out_a = a.out_features if isinstance(a, nn.Linear) else a.out_channels
        in_b = b.in_features if isinstance(b, nn.Linear) else b.in_channels
        if in_b % out_a != 0 or (not isinstance(b, nn.Linear) and in_b != out_a):
            raise ValueError(
                f"landscape alignment: layer {type(b).__name__} reads {in_b} inputs, which are not the {out_a} "
                "outputs of the layer before it (channel-major): the layers are not a chain. Pass align=False."
            )
    return layers


def _odd_activations(model: nn.Module) -> bool:
    leaves = [m for m in model.modules() if not list(m.children()) and not isinstance(m, _LAYERS)]
    if not leaves:
        return False
    return all(isinstance(m, _ODD_NONLINEAR + _ODD_LINEAR) for m in leaves) and any(
        isinstance(m, _ODD_NONLINEAR) for m in leaves
    )


def _split(vec: Tensor, shapes: Sequence[tuple[torch.Size, torch.Size | None]]) -> Layers:
    out: Layers = []
    k = 0
    for ws, bs in shapes:
        n = math.prod(ws)
        w = vec[k : k + n].reshape(ws)
        k += n
        b = None
        if bs is not None:
            nb = math.prod(bs)
            b = vec[k : k + nb].reshape(bs)
            k += nb
        out.append((w, b))
    return out


def _join(layers: Layers) -> Tensor:
    return torch.cat([t.reshape(-1) for w, b in layers for t in ((w,) if b is None else (w, b))])


def align_layers(reference: Layers, layers: Layers, sign_flips: bool = False) -> Layers:
    """``layers`` (a chain's ``(weight, bias)`` pairs) with its hidden units permuted (and sign-flipped) to match
    ``reference``; the function the network computes is unchanged. See the module docstring for the method."""
    if len(reference) != len(layers):
        raise ValueError("align_layers: the two networks have different numbers of layers.")
    out: Layers = []
    perm: Tensor | None = None
    sign: Tensor | None = None
    n = len(layers)
    for k in range(n):
        w, b = layers[k]
        if perm is not None:  # the previous layer's units were reordered: reorder this layer's inputs the same way
            assert sign is not None
            shape = w.shape
            w3 = w.reshape(shape[0], perm.numel(), -1)[:, perm] * sign.to(w.dtype)[None, :, None]
            w = w3.reshape(shape)
        if k == n - 1:
            out.append((w, b))
            break
        rw, rb = reference[k]
        feats = [w.reshape(w.shape[0], -1)]
        rfeats = [rw.reshape(rw.shape[0], -1)]
        if b is not None and rb is not None:
            feats.append(b[:, None])
            rfeats.append(rb[:, None])
        if k + 1 == n - 1:  # outgoing weights into the output layer: its rows are the same in every network
            wn, rwn = layers[k + 1][0], reference[k + 1][0]
            units = w.shape[0]
            feats.append(wn.reshape(wn.shape[0], units, -1).transpose(0, 1).reshape(units, -1))
            rfeats.append(rwn.reshape(rwn.shape[0], units, -1).transpose(0, 1).reshape(units, -1))
        a, r = torch.cat(feats, 1).double(), torch.cat(rfeats, 1).double()
        cost = torch.cdist(r, a).pow(2)  # cost[i, j]: reference unit i against unit j
        signs = torch.ones_like(cost)
        if sign_flips:
            flipped = torch.cdist(r, -a).pow(2)
            signs = torch.where(flipped < cost, -1.0, 1.0).to(cost.dtype)
            cost = torch.minimum(cost, flipped)
        perm = torch.as_tensor(hungarian(cost), device=w.device)
        sign = signs[torch.arange(cost.shape[0], device=cost.device), perm].to(w.device)
        w = w[perm] * sign.to(w.dtype).reshape(-1, *([1] * (w.ndim - 1)))
        b = None if b is None else b[perm] * sign.to(b.dtype)
        out.append((w, b))
    return out


def align_minima(
    minima: Tensor, shapes: Sequence[tuple[torch.Size, torch.Size | None]], reference: int = 0, sign_flips: bool = False
) -> Tensor:
    """Rows of ``minima`` (flat parameter vectors of one chain) aligned to row ``reference``."""
    ref = _split(minima[reference], shapes)
    return torch.stack([_join(align_layers(ref, _split(m, shapes), sign_flips)) for m in minima])


def deduplicate_minima(
    aligned: Tensor, losses: Tensor, loss_tol: float = 1e-6, dist_tol: float = 1e-3
) -> Tensor:
    """Indices of the unique minima (lowest loss first): a minimum is a duplicate of a kept one when their
    losses differ by at most ``loss_tol`` and the RMS distance of their aligned parameters is at most
    ``dist_tol``."""
    order = torch.argsort(losses, stable=True)
    kept: list[int] = []
    for i in order.tolist():
        dup = False
        for j in kept:
            if abs(float(losses[i] - losses[j])) <= loss_tol:
                rms = float((aligned[i] - aligned[j]).pow(2).mean().sqrt())
                if rms <= dist_tol:
                    dup = True
                    break
        if not dup:
            kept.append(i)
    return torch.tensor(kept, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- sampling
@dataclass
class LandscapeSample:
    """Minima found by :func:`basin_hopping` (flat float64 parameter vectors in ``model.parameters()`` order)."""

    minima: Tensor  # (M, P)
    losses: Tensor  # (M,) loss including the L2 term
    grad_norms: Tensor  # (M,)
    converged: Tensor  # (M,) bool: grad norm <= gtol
    accepted: Tensor  # (M,) bool: accepted by Metropolis (the start and snapshots: True)
    step_sizes: Tensor  # (M,) the relative step of each hop (0 for the start and snapshots)
    origin: list[str]  # "model", "hop" or "snapshot"
    n_minimisations: int
    n_evaluations: int  # loss-and-gradient evaluations over the subset
    seconds: float
    time_limited: bool = False  # max_seconds stopped the sampling before all hops (and snapshots) were done


def _detached_copy(model: nn.Module) -> nn.Module:
    # A LightningModule keeps its trainer: share it instead of deep-copying the whole training state.
    memo: dict[int, object] = {}
    for m in model.modules():
        for attr in ("_trainer", "_fabric"):
            ref = m.__dict__.get(attr)
            if ref is not None:
                memo[id(ref)] = ref
    twin = copy.deepcopy(model, memo)
    twin.to(torch.float64).eval()
    for p in twin.parameters():
        p.requires_grad_(True)
        p.grad = None
    return twin


class _Landscape:
    """Loss + L2 of a private copy of the network over a fixed subset, with LBFGS quenches."""

    def __init__(
        self, model: nn.Module, x: Tensor, y: Tensor, loss: Callable[[Tensor, Tensor], Tensor], weight_decay: float,
        batch_size: int,
    ) -> None:  # fmt: skip
        self.net = _detached_copy(model)
        self.params = [p for p in self.net.parameters()]
        device = self.params[0].device
        self.x = x.detach().to(device, torch.float64 if x.is_floating_point() else None)
        self.y = y.detach().to(device)
        if self.y.is_floating_point():
            self.y = self.y.double()
        self.loss = loss
        self.wd = weight_decay
        self.rows = batch_size
        self.evaluations = 0

    def vector(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).clone()

    def set(self, vec: Tensor) -> None:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(vec.to(self.params[0].device, torch.float64), self.params)

    def closure(self) -> Tensor:
        """Mean loss over the subset plus L2, gradients accumulated chunk by chunk (bounded memory)."""
        for p in self.params:
            p.grad = None
        n = self.x.shape[0]
        total = torch.zeros((), dtype=torch.float64, device=self.x.device)
        with torch.enable_grad():
            for s in range(0, n, self.rows):
                out = self.net(self.x[s : s + self.rows])
                part = self.loss(out, self.y[s : s + self.rows]) * (min(self.rows, n - s) / n)
                part.backward()
                total += part.detach()
            if self.wd:
                reg = self.wd * sum(p.pow(2).sum() for p in self.params)
                reg.backward()
                total += reg.detach()
        self.evaluations += 1
        return total

    def grad_norm(self) -> float:
        return float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in self.params if p.grad is not None)))

    def quench(self, gtol: float, max_iter: int) -> tuple[float, float]:
        """Minimise from the current parameters; (loss, gradient norm) at the end."""
        tol = gtol / math.sqrt(sum(p.numel() for p in self.params))
        opt = torch.optim.LBFGS(
            self.params, lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tol,
            tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe",
        )  # fmt: skip
        opt.step(self.closure)
        loss = float(self.closure())  # the final point's loss and gradient (LBFGS reports the first)
        return loss, self.grad_norm()


def _loss_fn(loss: str | Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)} or a function, got {loss!r}.")
        return LOSSES[loss]
    return loss


def basin_hopping(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss: str | Callable[[Tensor, Tensor], Tensor] = "cross_entropy",
    *,
    n_hops: int = 20,
    step_size: float = 0.3,
    temperature: float = 0.02,
    weight_decay: float = 1e-4,
    gtol: float = 1e-4,
    max_iter: int = 500,
    seed: int = 0,
    starts: Sequence[Tensor] = (),
    batch_size: int = 1024,
    adapt_interval: int | None = 5,
    target_accept: float = 0.5,
    max_seconds: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> LandscapeSample:
    """Sample minima of the loss landscape of a copy of ``model`` on ``(x, y)`` by basin hopping.

    The start (``model``'s weights, quenched), ``n_hops`` hops (perturb, quench, Metropolis) and the quenched
    ``starts``: ``1 + n_hops + len(starts)`` minimisations, fewer when ``max_seconds`` (read on ``clock``) stops
    the sampling early. ``model`` itself is never modified and the global RNG is never drawn from (see the
    module docstring for every choice).
    """
    if n_hops < 0 or step_size < 0 or temperature <= 0 or gtol <= 0 or max_iter < 1 or batch_size < 1:
        raise ValueError(
            "basin_hopping needs n_hops >= 0, step_size >= 0, temperature > 0, gtol > 0, max_iter >= 1, "
            f"batch_size >= 1; got {n_hops}, {step_size}, {temperature}, {gtol}, {max_iter}, {batch_size}."
        )
    if (adapt_interval is not None and adapt_interval < 1) or not 0 < target_accept < 1:
        raise ValueError(
            f"adapt_interval must be >= 1 or None and 0 < target_accept < 1; got {adapt_interval}, {target_accept}."
        )
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"basin_hopping needs as many labels as inputs (>= 1): got {x.shape[0]} and {y.shape[0]}.")
    if max_seconds is not None and max_seconds < 0:
        raise ValueError(f"max_seconds must be >= 0 or None, got {max_seconds}.")
    start, t0 = time.perf_counter(), clock()
    limited = False

    def in_time(done: int) -> bool:
        """Whether one more minimisation (at the mean cost of the ``done`` so far) stays within max_seconds."""
        nonlocal limited
        if max_seconds is None:
            return True
        spent = clock() - t0
        limited = spent + spent / max(done, 1) > max_seconds
        return not limited

    land = _Landscape(model, x, y, _loss_fn(loss), weight_decay, batch_size)
    gen = torch.Generator().manual_seed(seed)
    sizes = [p.numel() for p in land.params]
    rows: list[tuple[Tensor, float, float, bool, str, float]] = []
    loss0, g0 = land.quench(gtol, max_iter)
    cur, cur_loss = land.vector(), loss0
    rows.append((cur, loss0, g0, True, "model", 0.0))
    step, window, fell_back = step_size, 0, 0
    for hop in range(n_hops):
        if not in_time(len(rows)):
            break
        noise = torch.randn(cur.numel(), generator=gen, dtype=torch.float64)
        scale = torch.cat([
            torch.full((n,), float(p.detach().double().pow(2).mean().sqrt()) + 1e-12, dtype=torch.float64)
            for n, p in zip(sizes, _split_like(cur, land.params))
        ])  # fmt: skip
        land.set(cur + step * (scale * noise).to(cur.device))
        new_loss, g = land.quench(gtol, max_iter)
        new = land.vector()
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        ok = math.isfinite(new_loss) and (new_loss <= cur_loss or u < math.exp(-(new_loss - cur_loss) / temperature))
        rows.append((new, new_loss, g, ok, "hop", step))
        # the hop fell back into the current minimum (the deduplication's tolerances)
        fell_back += int(abs(new_loss - cur_loss) <= 1e-6 and float((new - cur).pow(2).mean().sqrt()) <= 1e-3)
        if ok:
            cur, cur_loss = new, new_loss
        window += int(ok)
        if adapt_interval is not None and (hop + 1) % adapt_interval == 0:
            if fell_back == adapt_interval:  # the whole window stayed in one basin: leave it
                step = step * 2.0
            else:
                step = step / 0.9 if window / adapt_interval > target_accept else step * 0.9
            window = fell_back = 0
    for s in starts:
        vec = s.detach().reshape(-1).double()
        if vec.numel() != cur.numel():
            raise ValueError(f"a start holds {vec.numel()} parameters, the model {cur.numel()}: not this network.")
        if limited or not in_time(len(rows)):
            break
        land.set(vec)
        sl, g = land.quench(gtol, max_iter)
        rows.append((land.vector(), sl, g, True, "snapshot", 0.0))
    minima = torch.stack([r[0].cpu() for r in rows])
    grads = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    return LandscapeSample(
        minima=minima,
        losses=torch.tensor([r[1] for r in rows], dtype=torch.float64),
        grad_norms=grads,
        converged=grads <= gtol,
        accepted=torch.tensor([r[3] for r in rows]),
        origin=[r[4] for r in rows],
        step_sizes=torch.tensor([r[5] for r in rows], dtype=torch.float64),
        n_minimisations=len(rows),
        n_evaluations=land.evaluations,
        seconds=time.perf_counter() - start,
        time_limited=limited,
    )


def _split_like(vec: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    out, k = [], 0
    for p in params:
        out.append(vec[k : k + p.numel()])
        k += p.numel()
    return out


# ---------------------------------------------------------------------------------------------- scores
@dataclass
class FeatureScores:
    """Per-input-feature scores of conserved first-layer weights (shape: the first layer's input, see below)."""

    score: Tensor  # Linear first layer: (D,); conv: (C_in, *kernel)
    magnitude: Tensor
    conservation: Tensor
    mean_weight: Tensor  # (H, *feature shape): the group's mean first-layer weights
    std_weight: Tensor


def conserved_feature_scores(first_weights: Tensor) -> FeatureScores:
    """Scores from a group's aligned first-layer weights ``(M, H, *feature)`` (``M`` minima, ``H`` hidden units):
    ``score = sum_h mu^2 / (|mu| + sigma)``, ``magnitude = mean_h |mu|``,
    ``conservation = sum_h |mu| / sum_h (|mu| + sigma)`` (module docstring)."""
    if first_weights.ndim < 3:
        raise ValueError(
            f"conserved_feature_scores needs (minima, hidden units, features...), got {tuple(first_weights.shape)}."
        )
    w = first_weights.double()
    mu = w.mean(0)
    sigma = w.std(0, unbiased=False) if w.shape[0] > 1 else torch.zeros_like(mu)
    a = mu.abs()
    score = (mu.pow(2) / (a + sigma).clamp_min(1e-300)).sum(0)
    conservation = a.sum(0) / (a + sigma).sum(0).clamp_min(1e-300)
    return FeatureScores(score=score, magnitude=a.mean(0), conservation=conservation, mean_weight=mu, std_weight=sigma)


@dataclass
class LandscapeResult:
    """Everything :func:`landscape_analysis` found (unique converged minima, lowest loss first)."""

    minima: Tensor  # (M, P) aligned parameter vectors
    losses: Tensor  # (M,)
    origin: list[str]
    group: Tensor  # indices into minima of the scored group
    scores: FeatureScores
    embedding: Tensor  # (M, 2) PCA of the aligned minima
    explained_variance: Tensor  # (2,) fraction of variance of each axis
    ranking: Tensor  # flat feature indices, most important first
    sample: LandscapeSample
    n_unique: int
    n_unconverged: int
    sign_flips: bool
    aligned: bool
    notes: list[str] = field(default_factory=list)

    @property
    def channel_scores(self) -> Tensor:
        """Scores summed per input channel (a Linear first layer: the scores themselves)."""
        s = self.scores.score
        return s if s.ndim == 1 else s.reshape(s.shape[0], -1).sum(1)


def _pca2(a: Tensor) -> tuple[Tensor, Tensor]:
    c = a - a.mean(0, keepdim=True)
    if c.shape[0] < 2 or float(c.abs().max()) == 0.0:
        return torch.zeros(a.shape[0], 2, dtype=a.dtype), torch.zeros(2, dtype=a.dtype)
    u, s, _ = torch.linalg.svd(c, full_matrices=False)
    k = min(2, s.numel())
    emb = torch.zeros(a.shape[0], 2, dtype=a.dtype)
    emb[:, :k] = u[:, :k] * s[:k]
    var = torch.zeros(2, dtype=a.dtype)
    var[:k] = s[:k].pow(2) / s.pow(2).sum().clamp_min(1e-300)
    return emb, var


def landscape_analysis(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss: str | Callable[[Tensor, Tensor], Tensor] = "cross_entropy",
    *,
    n_hops: int = 20,
    step_size: float = 0.3,
    temperature: float = 0.02,
    weight_decay: float = 1e-4,
    gtol: float = 1e-4,
    max_iter: int = 500,
    seed: int = 0,
    starts: Sequence[Tensor] = (),
    loss_window: float | None = None,
    align: bool = True,
    sign_flips: bool | str = "auto",
    loss_tol: float = 1e-6,
    dist_tol: float = 1e-3,
    batch_size: int = 1024,
    adapt_interval: int | None = 5,
    target_accept: float = 0.5,
    max_seconds: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> LandscapeResult:
    """Sample minima (:func:`basin_hopping`), align and deduplicate them, group the low ones and score each
    input feature by how conserved and how large its first-layer weights are (Niroomand & Wales 2023; every
    choice in the module docstring)."""
    if sign_flips not in (True, False, "auto"):
        raise ValueError(f"sign_flips must be True, False or 'auto', got {sign_flips!r}.")
    if loss_window is not None and loss_window < 0:
        raise ValueError(f"loss_window must be >= 0 or None, got {loss_window}.")
    layers = layer_chain(model) if align else [m for m in model.modules() if isinstance(m, _LAYERS)]
    if not layers:
        raise ValueError("landscape: the model has no Linear/Conv layer whose weights could be scored.")
    names = {id(p): n for n, p in model.named_parameters()}
    order = [id(p) for p in model.parameters()]
    chain_ids = [id(t) for m in layers for t in ((m.weight,) if m.bias is None else (m.weight, m.bias))]
    if align and chain_ids != order:
        raise ValueError(
            "landscape alignment: the model's parameters are not registered in the order of its layers "
            f"({[names[i] for i in order][:6]}); pass align=False."
        )
    flips = _odd_activations(model) if sign_flips == "auto" else bool(sign_flips)
    sample = basin_hopping(
        model, x, y, loss, n_hops=n_hops, step_size=step_size, temperature=temperature, weight_decay=weight_decay,
        gtol=gtol, max_iter=max_iter, seed=seed, starts=starts, batch_size=batch_size, adapt_interval=adapt_interval,
        target_accept=target_accept, max_seconds=max_seconds, clock=clock,
    )  # fmt: skip
    notes: list[str] = []
    if sample.time_limited:
        hops = sum(o == "hop" for o in sample.origin)
        notes.append(f"the time limit of {max_seconds:.3g} s stopped the sampling after {hops} of {n_hops} hops")
    ok = sample.converged.nonzero().flatten()
    n_unconverged = int(sample.minima.shape[0] - ok.numel())
    if ok.numel() == 0:
        raise RuntimeError(
            f"landscape: no minimisation reached the gradient-norm tolerance gtol={gtol} in max_iter={max_iter} "
            f"iterations (smallest norm {float(sample.grad_norms.min()):.3g}); raise max_iter or gtol."
        )
    if n_unconverged:
        notes.append(f"{n_unconverged} of {sample.minima.shape[0]} minimisations did not reach gtol and are left out")
    minima, losses = sample.minima[ok], sample.losses[ok]
    origin = [sample.origin[i] for i in ok.tolist()]
    first = int(torch.argmin(losses))
    if align:
        shapes = [(m.weight.shape, None if m.bias is None else m.bias.shape) for m in layers]
        aligned = align_minima(minima, shapes, reference=first, sign_flips=flips)
    else:
        aligned = minima
    keep = deduplicate_minima(aligned, losses, loss_tol, dist_tol)  # lowest loss first
    aligned, losses = aligned[keep], losses[keep]
    origin = [origin[i] for i in keep.tolist()]
    m = losses.numel()
    if loss_window is None:
        group = torch.arange(max(min(2, m), (m + 1) // 2))
    else:
        group = (losses <= losses[0] + loss_window).nonzero().flatten()
    if group.numel() < 2:
        notes.append("the group holds one minimum: every weight counts as conserved (widen loss_window)")
    # the first layer's weights: their slice of each parameter vector (model.parameters() order)
    w0 = layers[0].weight
    offset = 0
    for p in model.parameters():
        if p is w0:
            break
        offset += p.numel()
    first_w = aligned[group][:, offset : offset + w0.numel()].reshape(group.numel(), *w0.shape)
    scores = conserved_feature_scores(first_w)
    emb, var = _pca2(aligned)
    return LandscapeResult(
        minima=aligned, losses=losses, origin=origin, group=group, scores=scores, embedding=emb,
        explained_variance=var, ranking=torch.argsort(scores.score.flatten(), descending=True, stable=True),
        sample=sample, n_unique=m, n_unconverged=n_unconverged, sign_flips=flips, aligned=align, notes=notes,
    )  # fmt: skip
