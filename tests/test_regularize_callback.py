"""AttributionRegularizer inside Lightning: gradients equal (loss + λR) by hand (plain, accumulated,
bf16-mixed), λ = 0 is bit-identical to no regularizer, DDP replicas stay identical, errors."""

from __future__ import annotations

import copy
import itertools
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from explain_callbacks.callbacks.regularizer import AttributionRegularizer
from explain_callbacks.regularize import build_penalty

H = 8


class Tiny(pl.LightningModule):
    def __init__(self, dropout: float = 0.0, dict_out: bool = False, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * (H // 2) ** 2, 3),
        )  # fmt: skip
        self.dict_out = dict_out
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        loss = F.cross_entropy(self(x), y)
        return {"loss": loss, "extra": 1} if self.dict_out else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def dataset(n: int = 16, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, H, H, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    m = torch.zeros(n, 1, H, H)
    m[:, :, :3, :3] = 1
    return TensorDataset(x, y, m)


class GradRecorder(pl.Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})


def trainer(callbacks, **kw) -> pl.Trainer:
    args = dict(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, deterministic=True,
    )  # fmt: skip
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)


def hand_grads(model, batches, penalty, lam, accumulate=1, autocast=False):
    model = copy.deepcopy(model).train()
    params = [p for _, p in model.named_parameters()]
    total = [torch.zeros_like(p) for p in params]
    for i, (x, y, m) in enumerate(batches):
        # Lightning autocasts with cache_enabled=False (each use of a weight casts it anew)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
            loss = F.cross_entropy(model(x), y) + lam * penalty(model, x, y, m, step=i)
        for t, g in zip(total, torch.autograd.grad(loss / accumulate, params)):
            t += g
    return dict(zip([n for n, _ in model.named_parameters()], total))


@pytest.mark.parametrize("name", ["rrr", "cdep", "eg_mask"])
def test_gradients_equal_loss_plus_lambda_r(name):
    ds = dataset(8)
    model = Tiny()
    init = copy.deepcopy(model)
    rec = GradRecorder()
    cb = AttributionRegularizer(name, weight=3.0, mask=2)
    trainer([cb, rec], limit_train_batches=1).fit(model, DataLoader(ds, batch_size=8))
    expect = hand_grads(init, [ds.tensors], build_penalty(name), 3.0)
    assert all(torch.allclose(rec.grads[0][n], expect[n], atol=1e-6, rtol=1e-5) for n in expect)
    # the penalty changes the gradient (the test could fail)
    plain = hand_grads(init, [ds.tensors], build_penalty(name), 0.0)
    assert any(not torch.allclose(plain[n], expect[n], atol=1e-4) for n in expect)
    assert "training_step" not in model.__dict__  # restored in teardown


def test_gradients_with_accumulation_dict_output_and_fixed_mask():
    ds = dataset(16)
    model = Tiny(dict_out=True)
    init = copy.deepcopy(model)
    rec = GradRecorder()
    mask = torch.zeros(1, H, H)
    mask[:, -3:, -3:] = 1
    cb = AttributionRegularizer("rrr", weight=5.0, mask=mask)
    trainer([cb, rec], limit_train_batches=2, accumulate_grad_batches=2).fit(model, DataLoader(ds, batch_size=8))
    assert len(rec.grads) == 1
    batches = [(t[:8], t2[:8], mask) for t, t2 in [ds.tensors[:2]]] + [(ds.tensors[0][8:], ds.tensors[1][8:], mask)]
    expect = hand_grads(init, batches, build_penalty("rrr"), 5.0, accumulate=2)
    assert all(torch.allclose(rec.grads[0][n], expect[n], atol=1e-6, rtol=1e-5) for n in expect)


def test_gradients_bf16_mixed_on_cpu():
    ds = dataset(8)
    model = Tiny()
    init = copy.deepcopy(model)
    rec = GradRecorder()
    cb = AttributionRegularizer("rrr", weight=3.0, mask=lambda batch: batch[2])
    trainer([cb, rec], limit_train_batches=1, precision="bf16-mixed").fit(model, DataLoader(ds, batch_size=8))
    expect = hand_grads(init, [ds.tensors], build_penalty("rrr"), 3.0, autocast=True)
    fp32 = hand_grads(init, [ds.tensors], build_penalty("rrr"), 3.0, autocast=False)
    for n in expect:
        assert torch.allclose(rec.grads[0][n], expect[n], atol=1e-5, rtol=1e-4)
    # autocast really ran (bf16 rounding differs from float32)
    assert any(not torch.equal(fp32[n], expect[n]) for n in expect)


def test_lambda_zero_is_bit_identical():
    ds = dataset(32)

    def fit(callbacks):
        pl.seed_everything(0, verbose=False)
        model = Tiny(dropout=0.5)
        g = torch.Generator().manual_seed(0)
        trainer(callbacks, max_epochs=2).fit(model, DataLoader(ds, batch_size=8, shuffle=True, generator=g))
        return model.state_dict()

    base = fit([])
    zero = fit([AttributionRegularizer("cdep", weight=0.0, mask=2)])
    on = fit([AttributionRegularizer("cdep", weight=1.0, mask=2)])
    assert all(torch.equal(base[k], zero[k]) for k in base)
    assert any(not torch.equal(base[k], on[k]) for k in base)


def test_two_regularizers_logging_and_restoration():
    ds = dataset(16)
    model = Tiny()
    init = copy.deepcopy(model)
    rec = GradRecorder()
    cbs = [
        AttributionRegularizer("rrr", weight=2.0, mask=2),
        AttributionRegularizer({"name": "cdep", "form": "l1"}, weight=0.5, mask=2, name="cdep_l1"),
        rec,
    ]
    t = trainer(cbs, limit_train_batches=1)
    t.fit(model, DataLoader(ds, batch_size=16))
    for key in ("regularizers/task_loss", "regularizers/penalty/rrr", "regularizers/penalty/cdep_l1"):
        assert key in t.callback_metrics
    rrr, cdep = build_penalty("rrr"), build_penalty({"name": "cdep", "form": "l1"})
    m = init.train()
    x, y, mk = ds.tensors
    loss = F.cross_entropy(m(x), y) + 2.0 * rrr(m, x, y, mk) + 0.5 * cdep(m, x, y, mk)
    expect = dict(zip([n for n, _ in m.named_parameters()], torch.autograd.grad(loss, list(m.parameters()))))
    assert all(torch.allclose(rec.grads[0][n], expect[n], atol=1e-6, rtol=1e-5) for n in expect)
    assert "training_step" not in model.__dict__ and "_explain_regularizers" not in model.__dict__
    with pytest.raises(MisconfigurationException, match="name"):
        trainer([AttributionRegularizer("rrr", mask=2), AttributionRegularizer("rrr", weight=2.0, mask=2)]).fit(
            Tiny(), DataLoader(ds, batch_size=16)
        )


def test_warmup_schedule():
    class T:
        global_step = 0
        current_epoch = 0
        num_training_batches = 10

    cb = AttributionRegularizer("rrr", weight=4.0, warmup_steps=4)
    t = T()
    seen = []
    for s in range(6):
        t.global_step = s
        seen.append(cb.current_weight(t, 0))
    assert seen == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]
    cb = AttributionRegularizer("rrr", weight=2.0, warmup_epochs=2)
    t.current_epoch = 0
    assert cb.current_weight(t, 4) == pytest.approx(2.0 * 0.5 / 2)
    t.current_epoch = 3
    assert cb.current_weight(t, 0) == 2.0
    with pytest.raises(ValueError, match="either"):
        AttributionRegularizer("rrr", warmup_steps=2, warmup_epochs=1)


def test_start_schedule_switches_the_penalty_on_after_the_fit():
    class T:
        global_step = 0
        current_epoch = 0
        num_training_batches = 4

    t = T()
    cb = AttributionRegularizer("rrr", weight=3.0, start_steps=2, warmup_steps=2)
    seen = []
    for s in range(5):
        t.global_step = s
        seen.append(cb.current_weight(t, 0))
    assert seen == [0.0, 0.0, 1.5, 3.0, 3.0]  # the warm-up counts from the start
    cb = AttributionRegularizer("rrr", weight=3.0, start_epochs=2)
    got = []
    for epoch, b in itertools.product(range(4), range(4)):
        t.current_epoch = epoch
        got.append(cb.current_weight(t, b))
    assert got == [0.0] * 8 + [3.0] * 8  # on from the first batch of epoch 2
    cb = AttributionRegularizer("rrr", weight=2.0, start_epochs=1, warmup_epochs=2)
    t.current_epoch = 2
    assert cb.current_weight(t, 1) == pytest.approx(2.0 * 1.5 / 2)
    for bad in ({"start_steps": 2, "start_epochs": 1}, {"start_steps": 2, "warmup_epochs": 1}, {"start_epochs": -1}):
        with pytest.raises(ValueError, match="start"):
            AttributionRegularizer("rrr", **bad)


def test_manual_optimisation_gets_a_clear_error():
    class Manual(Tiny):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = F.cross_entropy(self(batch[0]), batch[1])
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()

    with pytest.raises(MisconfigurationException, match="functional"):
        trainer([AttributionRegularizer("rrr", mask=2)]).fit(Manual(), DataLoader(dataset(8), batch_size=8))


def test_mask_key_errors_are_clear():
    ds = dataset(8)
    with pytest.raises(KeyError, match="mask"):
        trainer([AttributionRegularizer("rrr", mask=5)], limit_train_batches=1).fit(
            Tiny(), DataLoader(ds, batch_size=8)
        )


# ------------------------------------------------------------------ DDP
class _DumpParams(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save(state, os.path.join(self.path, f"rank{trainer.global_rank}.pt"))


@pytest.mark.ddp
def test_ddp_replicas_stay_identical(tmp_path):
    ds = dataset(32)
    model = Tiny()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    cb = AttributionRegularizer("cdep", weight=10.0, mask=2)
    t = trainer(
        [cb, _DumpParams(str(tmp_path))],
        strategy="ddp_fork",
        devices=2,
        max_epochs=1,
        limit_train_batches=3,
        num_sanity_val_steps=0,
    )
    t.fit(model, DataLoader(ds, batch_size=4))
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    params = [k for k in r0 if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(r0[k], r1[k]) for k in params)
    assert any(not torch.equal(r0[k], init[k]) for k in params)
