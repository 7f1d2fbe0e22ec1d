"""An online student: a small network trained on the teacher's soft targets at every training step.

Knowledge distillation loss (Hinton, Vinyals & Dean 2015, arXiv:1503.02531):
``T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))`` for classification (the T² keeps gradient
magnitudes comparable across temperatures), mean squared error to the teacher's outputs for
regression. The student has its own parameters and optimiser, is initialised from its own seeded
generator and never touches the teacher, its gradients or the global RNG.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._internal.registry import STUDENTS
from .base import Student, class_logits, infer_task, regression_targets, single_thread

__all__ = ["OnlineStudent", "distillation_loss"]


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0) -> Tensor:
    """``T² KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over the batch."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    p_t = F.softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * t * t


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


@STUDENTS.register("online", "online_mlp")
class OnlineStudent(Student):
    """A small MLP distilled from the teacher during training.

    Args:
        hidden: hidden layer widths (``()`` gives a linear/softmax student).
        temperature: distillation temperature T.
        lr: Adam learning rate.
        steps_per_batch: optimiser steps per :meth:`partial_fit` call.
        epochs, batch_size: of the offline :meth:`fit` (on a buffer), shuffled with the student's generator.
    """

    name = "online"
    online = True

    def __init__(
        self,
        hidden: Sequence[int] = (32,),
        temperature: float = 2.0,
        lr: float = 1e-2,
        steps_per_batch: int = 1,
        epochs: int = 30,
        batch_size: int = 64,
        task: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(task=task, seed=seed)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.hidden = tuple(int(h) for h in hidden)
        self.temperature = temperature
        self.lr = lr
        self.steps_per_batch = steps_per_batch
        self.epochs = epochs
        self.batch_size = batch_size
        self.net_: nn.Sequential | None = None
        self.opt_: torch.optim.Optimizer | None = None
        self.steps_ = 0

    def config(self) -> dict[str, Any]:
        return {
            "hidden": list(self.hidden),
            "temperature": self.temperature,
            "lr": self.lr,
            "steps_per_batch": self.steps_per_batch,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            **super().config(),
        }

    # ------------------------------------------------------------------ model
    def _build(self, in_features: int, out_features: int, device: torch.device) -> None:
        layers: list[nn.Module] = []
        d = in_features
        for h in self.hidden:  # skip_init: constructing nn.Linear would draw from the global RNG
            layers += [nn.utils.skip_init(nn.Linear, d, h), nn.ReLU()]
            d = h
        layers.append(nn.utils.skip_init(nn.Linear, d, out_features))
        net = nn.Sequential(*layers)
        gen = torch.Generator().manual_seed(int(self.seed))
        with torch.no_grad():  # PyTorch's default Linear init, drawn from our generator
            for m in net:
                if isinstance(m, nn.Linear):
                    bound = 1.0 / m.in_features**0.5
                    m.weight.copy_(torch.empty_like(m.weight).uniform_(-bound, bound, generator=gen))
                    m.bias.copy_(torch.empty_like(m.bias).uniform_(-bound, bound, generator=gen))
        self.net_ = net.to(device)
        self.opt_ = torch.optim.Adam(self.net_.parameters(), lr=self.lr)

    def _ensure(self, x: Tensor, teacher_out: Tensor) -> None:
        if self.task_ is None:
            self.task_ = infer_task(teacher_out, self.task)
            self.input_shape_ = tuple(int(s) for s in x.shape[1:])
            self.n_outputs_ = int(teacher_out.shape[1]) if teacher_out.ndim == 2 else 1
        if self.net_ is None:
            out = self.n_outputs_ or 1
            self._build(x[0].numel(), out, x.device)

    def _loss(self, x: Tensor, teacher_out: Tensor) -> Tensor:
        assert self.net_ is not None
        s = self.net_(x.reshape(x.shape[0], -1).float())
        if self.task_ == "classification":
            return distillation_loss(s, teacher_out.float(), self.temperature)
        t = regression_targets(teacher_out).float().reshape(s.shape)
        return F.mse_loss(s, t)

    # ------------------------------------------------------------------ training
    def partial_fit(self, x: Tensor, teacher_out: Tensor) -> OnlineStudent:
        """``steps_per_batch`` optimiser steps on one batch of (inputs, teacher outputs)."""
        x, teacher_out = x.detach(), teacher_out.detach()
        if infer_task(teacher_out, self.task if self.task_ is None else self.task_) == "classification":
            teacher_out = class_logits(teacher_out)  # a one-logit binary teacher as two logits
        self._ensure(x, teacher_out)
        assert self.net_ is not None and self.opt_ is not None
        dev = next(self.net_.parameters()).device
        x, teacher_out = x.to(dev), teacher_out.to(dev)
        with torch.inference_mode(False), torch.enable_grad(), _autocast_off(dev), single_thread():
            x, teacher_out = x.clone(), teacher_out.clone()
            for _ in range(self.steps_per_batch):
                self.opt_.zero_grad(set_to_none=True)
                loss = self._loss(x, teacher_out)
                loss.backward()
                self.opt_.step()
                self.steps_ += 1
        return self

    def _fit(self, x: Tensor, teacher_out: Tensor, teacher: Any) -> None:
        """Offline fit on a buffer: ``epochs`` passes of shuffled mini-batches (own generator)."""
        if self.net_ is None or self._shape_changed(x, teacher_out):
            self._build(x[0].numel(), self.n_outputs_ or 1, x.device)
        gen = torch.Generator().manual_seed(int(self.seed) + 1)
        n = x.shape[0]
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, self.batch_size):
                idx = perm[start : start + self.batch_size].to(x.device)
                self.partial_fit(x[idx], teacher_out[idx])

    def _shape_changed(self, x: Tensor, teacher_out: Tensor) -> bool:
        assert self.net_ is not None
        first, last = self.net_[0], self.net_[-1]
        return first.in_features != x[0].numel() or last.out_features != (self.n_outputs_ or 1)

    # ------------------------------------------------------------------ using
    @torch.no_grad()
    def scores(self, x: Tensor) -> Tensor:
        self._check_fitted()
        assert self.net_ is not None
        dev = next(self.net_.parameters()).device
        with torch.inference_mode(False):
            return self.net_(x.reshape(x.shape[0], -1).float().to(dev)).cpu()

    def predict(self, x: Tensor) -> Tensor:
        s = self.scores(x)
        if self.task_ == "classification":
            return s.argmax(1)
        return s[:, 0].double() if s.shape[1] == 1 else s.double()

    @property
    def fitted(self) -> bool:
        return self.task_ is not None and self.net_ is not None

    def complexity(self) -> dict[str, int]:
        self._check_fitted()
        assert self.net_ is not None
        return {"parameters": sum(p.numel() for p in self.net_.parameters()), "steps": self.steps_}

    def describe(self) -> str:
        self._check_fitted()
        c = self.complexity()
        return (
            f"**OnlineStudent**: MLP {self.input_shape_} -> {list(self.hidden)} -> {self.n_outputs_}, "
            f"{c['parameters']} parameters, temperature {self.temperature}, {c['steps']} optimiser steps"
        )

    def get_state(self) -> dict[str, Any]:
        assert self.net_ is not None
        return {"net": {k: v.detach().cpu() for k, v in self.net_.state_dict().items()}, "steps": self.steps_}

    def set_state(self, state: dict[str, Any]) -> None:
        in_features = int(torch.tensor(self.input_shape_).prod()) if self.input_shape_ else 1
        self._build(in_features, self.n_outputs_ or 1, torch.device("cpu"))
        assert self.net_ is not None
        self.net_.load_state_dict(state["net"])
        self.steps_ = int(state["steps"])
