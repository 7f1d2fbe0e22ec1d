"""CUDA checks (skipped without a GPU): methods agree with CPU, the monitor keeps training bit-identical
under mixed precision, and the CUDA RNG is left untouched."""

from __future__ import annotations

import pytest
import torch

from explain_callbacks.attribution import ExpectedGradients, GradCAM, IntegratedGradients, Saliency, SmoothGrad

from .conftest import TinyCNN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("make", [Saliency, lambda: IntegratedGradients(n_steps=16), GradCAM],
                         ids=["saliency", "ig", "gradcam"])  # fmt: skip
def test_deterministic_methods_match_cpu(make):
    torch.manual_seed(0)
    model = TinyCNN().double().eval()
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64)
    t = torch.arange(6) % 5
    cpu = make()(model, x, t)
    gpu = make()(model.cuda(), x.cuda(), t.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-8)


def test_random_methods_on_cuda_are_seeded_and_leave_cuda_rng():
    torch.manual_seed(0)
    model = TinyCNN().cuda().eval()
    x = torch.rand(4, 3, 8, 8, device="cuda")
    t = torch.arange(4, device="cuda")
    state = torch.cuda.get_rng_state()
    for m in (SmoothGrad(n_samples=4), ExpectedGradients(n_samples=4)):
        torch.testing.assert_close(m(model, x, t), m(model, x, t), rtol=0, atol=0)
    assert torch.equal(state, torch.cuda.get_rng_state())


def test_monitor_bit_identical_on_gpu_with_bf16(tmp_path):
    import lightning.pytorch as pl

    from explain_callbacks.callbacks import AttributionMonitor

    from .helpers_lightning import image_loaders, lit

    def fit(cbs):
        pl.seed_everything(0)
        train, val = image_loaders()
        m = lit()
        tr = pl.Trainer(
            max_epochs=2,
            accelerator="gpu",
            devices=1,
            precision="bf16-mixed",
            callbacks=cbs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            deterministic=True,
        )
        tr.fit(m, train, val)
        return m

    m0 = fit([])
    mon = AttributionMonitor(budget=None, methods=["ig", "smoothgrad"], num_samples=8, strict=True)
    m1 = fit([mon])
    for (k, a), b in zip(m0.state_dict().items(), m1.state_dict().values()):
        assert torch.equal(a, b), k
    assert mon.last_scores["ig"]["completeness_error"] < 0.5
