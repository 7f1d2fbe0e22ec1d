"""CUDA checks of the black-box methods and the masker (skipped without a GPU): everything stays on the
model's device, seeds reproduce, the CPU and CUDA RNGs are untouched, Occlusion agrees with the CPU."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from explain_callbacks.attribution import (
    HSIC,
    RISE,
    MeaningfulPerturbation,
    NeFLAG,
    NonlinearSaliency,
    Occlusion,
    Sobol,
    SoundMask,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 3)
    ).eval()


METHODS = {
    "occlusion": lambda: Occlusion(window=4, stride=4),
    "rise": lambda: RISE(n_masks=64),
    "sobol": lambda: Sobol(n_designs=4, grid_size=4),
    "hsic": lambda: HSIC(n_designs=64, grid_size=4),
    "meaningful": lambda: MeaningfulPerturbation(n_steps=5),
    "extremal": lambda: MeaningfulPerturbation(variant="extremal", n_steps=5),
    "sound": lambda: SoundMask(n_steps=3, n_fills=2),
    "neflag": lambda: NeFLAG(n_points=3, n_iter=2),
    "nonlinear": lambda: NonlinearSaliency(max_steps=3),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_methods_on_cuda(name):
    model = _net().cuda()
    x = torch.rand(4, 1, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    t = torch.tensor([0, 1, 2, 0], device="cuda")
    cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state()
    a = METHODS[name]()(model, x, t)
    b = METHODS[name]()(model, x, t)
    assert a.is_cuda and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)


def test_occlusion_cuda_matches_cpu_and_indices_on_cuda():
    model = _net().double()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    cpu = Occlusion(window=3, stride=2)(model, x, t)
    gpu = Occlusion(window=3, stride=2)(model.cuda(), x.cuda(), t.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-10)
    idx = Sobol(n_designs=4, grid_size=4).indices(model, x.cuda(), t.cuda())
    assert idx["total"].is_cuda and idx["total"].shape == (3, 4, 4)
    inter = HSIC(n_designs=32, grid_size=4).interactions(model, x.cuda(), t.cuda())
    assert inter.is_cuda and inter.shape == (3, 16, 16)


def test_saliency_masker_on_gpu_keeps_classifier_bit_identical(tmp_path, monkeypatch):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from explain_callbacks.callbacks.saliency_masker import SaliencyMasker
    from explain_callbacks.models import LitClassifier, SmallCNN

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(48, 1, 16, 16, generator=g), torch.randint(0, 3, (48,), generator=g)

    def fit(callbacks):
        pl.seed_everything(3, verbose=False)
        model = LitClassifier(SmallCNN(1, 3, width=4), lr=1e-2)
        trainer = pl.Trainer(
            max_epochs=2, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="gpu", devices=1, deterministic=True,
            default_root_dir=str(tmp_path),
        )  # fmt: skip
        train = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8, shuffle=True)
        trainer.fit(model, train, DataLoader(TensorDataset(x[32:], y[32:]), batch_size=8))
        return model, trainer

    plain, _ = fit([])
    cb = SaliencyMasker(width=4, num_samples=8, strict=True)
    with_cb, trainer = fit([cb])
    for (k, a), (_, b) in zip(plain.state_dict().items(), with_cb.state_dict().items()):
        assert torch.equal(a, b), k
    assert next(cb.masker.parameters()).is_cuda
    assert "faithfulness/saliency_metric/masker" in trainer.callback_metrics
