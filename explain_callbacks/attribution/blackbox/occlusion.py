"""Occlusion (Zeiler & Fergus 2014, arXiv:1311.2901)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..._internal.batching import BatchSize
from ..._internal.layout import check_channels_first, reads_channels_first
from ..._internal.masks import base_scores, make_substrate, masked_scores
from ..._internal.registry import ATTRIBUTIONS
from ._common import PerturbationAttributor

__all__ = ["Occlusion"]

WindowSpec = int | tuple[int, ...]


@ATTRIBUTIONS.register("occlusion")
class Occlusion(PerturbationAttributor):
    """Slide a window over the input, fill it with a baseline, and credit ``f_c(x) − f_c(x_occluded)``
    to every position the window covers, averaged over the windows covering each position.

    Same definition as Captum's ``Occlusion`` (equal to 1e-6 for the same window, stride and
    baseline): per dimension, ``ceil((L − w)/s) + 1`` window positions starting at multiples of the
    stride, the last one cut at the border, so every position is covered at least once.

    Args:
        window: window size. An int (capped at the size of shorter dims), a tuple over the spatial
            dims (the window then spans all channels), or a tuple over every per-sample dim, channels included (Captum's
            ``sliding_window_shapes``). ``None`` (default): 4 for inputs with positions (images, signals),
            1 for tabular (B,D) inputs: a table's features have no order, so a wider window would credit
            each feature with the effect of its neighbours in column order (on a linear model reading
            only x0, a window of 4 gave x1 as much as x0). An explicit int on tabular inputs is a
            window of that many consecutive features.
            (B,T,D) sequences (a model that reads the last dim as features, see ``channels_first``)
            get windows of 4 steps and 1 feature, ``(4, 1)``: the steps are ordered, the features not.
        stride: likewise; ``None`` (default): 2 for inputs with positions, 1 for tabular inputs,
            ``(2, 1)`` for (B,T,D) sequences; must not exceed the window where the window is smaller
            than the input.
        baseline: fill of the window: ``zeros``, ``mean``, ``blur``, a float or a tensor (``mean`` and
            ``blur`` run along the positions: over T for (B,T,D) sequences).
        output: ``logit`` (default, as Captum on a logit model), ``softmax``, ...
        channels_first: how 3-D inputs are read: True (B,C,L) signals (windows along L spanning the
            channels), False (B,T,D) sequences, None (default) decided from the model's first layer.
            :meth:`n_forwards`, which sees no model, counts (B,C,L) windows unless this is False.

    Cost: Π_d (ceil((L_d − w_d)/s_d) + 1) + 1 forward passes per sample: 226 for a 32×32 image with
    the defaults (window 4, stride 2), D + 1 for D tabular features, (ceil((T − 4)/2) + 1)·D + 1 for a
    (T, D) sequence, in chunks of ``batch_size`` rows.
    """

    name = "occlusion"

    def __init__(
        self,
        window: WindowSpec | None = None,
        stride: WindowSpec | None = None,
        baseline: str | float | Tensor = "zeros",
        blur_sigma: float = 5.0,
        output: str = "logit",
        budget: int | None = None,
        channels_first: bool | None = None,
        batch_size: BatchSize = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(output=output, budget=budget, batch_size=batch_size, seed=seed)
        self.channels_first = check_channels_first(channels_first)
        self.window = window
        self.stride = stride
        self.baseline = baseline
        self.blur_sigma = blur_sigma

    @staticmethod
    def _full(spec: WindowSpec, shape: tuple[int, ...], what: str) -> tuple[int, ...]:
        spatial = shape if len(shape) == 1 else shape[1:]
        sp = (spec,) * len(spatial) if isinstance(spec, int) else tuple(int(v) for v in spec)
        if len(sp) == len(shape):
            return sp
        if len(sp) == len(spatial) and len(shape) > 1:
            return (shape[0], *sp)  # span all channels
        raise ValueError(
            f"{what} {spec!r} does not fit a per-sample shape {shape}: give an int, one value per spatial "
            f"dim ({len(spatial)}), or one value per dim including channels ({len(shape)})."
        )

    def _geometry(
        self, shape: tuple[int, ...], sequence: bool = False
    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Window, stride and window counts per per-sample dim; ``sequence``: (T, D) read as steps."""
        tabular = len(shape) == 1
        if sequence:  # ordered steps, unordered features: 4 steps of one feature
            default_window, default_stride = (min(4, shape[0]), 1), (2, 1)
        else:
            default_window, default_stride = (1 if tabular else 4), (1 if tabular else 2)
        window = default_window if self.window is None else self.window
        stride_spec = default_stride if self.stride is None else self.stride
        win = self._full(window, shape, "window")
        if isinstance(window, int):  # one size for every dim: a short dim is occluded whole
            win = tuple(min(w, L) for w, L in zip(win, shape))
        stride = self._full(stride_spec, shape, "stride")
        counts = []
        for L, w, s in zip(shape, win, stride):
            if w > L or w < 1:
                raise ValueError(f"window {win} must be >= 1 and fit inside the input {shape}.")
            if s < 1:
                raise ValueError(f"stride {stride} must be >= 1.")
            if w < L and s > w:
                raise ValueError(
                    f"stride {stride} exceeds the window {win} in a dim where the window does not span the "
                    "input, so some positions would never be occluded; use stride <= window."
                )
            counts.append(math.ceil((L - w) / s) + 1)
        return win, stride, tuple(counts)

    def n_forwards(self, input_shape: tuple[int, ...]) -> int:
        _, _, counts = self._geometry(tuple(input_shape), len(input_shape) == 2 and self.channels_first is False)
        return math.prod(counts) + 1

    def attribute(
        self, model: nn.Module, inputs: Tensor, target: Tensor | None, *, create_graph: bool = False
    ) -> Tensor:
        shape = tuple(inputs.shape[1:])
        sequence = inputs.ndim == 3 and not reads_channels_first(model, inputs, self.channels_first)
        win, stride, counts = self._geometry(shape, sequence)
        n_win = math.prod(counts)
        if self.budget is not None and n_win + 1 > self.budget:
            raise ValueError(
                f"Occlusion with window {win} and stride {stride} needs {n_win + 1} forward passes per sample, "
                f"over the budget of {self.budget}; raise the stride or the window."
            )
        dev, dt = inputs.device, inputs.dtype
        # Per-dim indicators ind_j[k, p] = 1 if window position k covers p.
        inds = []
        for L, w, s, n in zip(shape, win, stride, counts):
            start = torch.arange(n, device=dev).unsqueeze(1) * s
            pos = torch.arange(L, device=dev).unsqueeze(0)
            inds.append(((pos >= start) & (pos < start + w)).to(dt))
        cover = inds[0].sum(0)
        for j in range(1, len(inds)):
            cover = cover.unsqueeze(-1) * inds[j].sum(0).view(*([1] * j), -1)
        strides_idx = [math.prod(counts[j + 1 :]) for j in range(len(counts))]

        def occluded(msl: slice) -> Tensor:
            idx = torch.arange(msl.start, msl.stop, device=dev)
            m = None
            for j, ind in enumerate(inds):
                ij = (idx // strides_idx[j]) % counts[j]
                v = ind[ij].view(idx.numel(), *([1] * j), -1)
                m = v if m is None else m.unsqueeze(-1) * v
            return m

        fx = base_scores(model, inputs, target, batch_size=self.batch_size, output=self.output)
        total = torch.zeros(inputs.shape, device=dev, dtype=dt)  # contiguous whatever the input's layout
        flat_total = total.view(inputs.shape[0], -1)

        def accumulate(ssl: slice, msl: slice, keep: Tensor, sc: Tensor) -> None:
            occ = (1 - keep).reshape(keep.shape[0], -1)
            flat_total[ssl] += (fx[ssl].unsqueeze(1) - sc) @ occ

        if sequence and isinstance(self.baseline, str):  # mean / blur along T: on the (B, D, T) view
            base = make_substrate(inputs.transpose(1, 2), self.baseline, sigma=self.blur_sigma).transpose(1, 2)
        else:
            base = make_substrate(inputs, self.baseline, sigma=self.blur_sigma)
        masked_scores(
            model,
            inputs,
            target,
            n_win,
            lambda msl: 1 - occluded(msl),
            base,
            batch_size=self.batch_size,
            output=self.output,
            accumulate=accumulate,
        )
        self._record_forwards(inputs, n_win + 1)
        return total / cover.unsqueeze(0)
