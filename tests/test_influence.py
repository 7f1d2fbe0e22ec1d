"""TracIn functional twins: equal to Captum's TracInCP, finds flipped labels, leaves the model untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explain_callbacks.analysis import (
    RandomProjection,
    adam_preconditioner,
    layer_parameters,
    per_sample_gradients,
    self_influence,
    tracin_scores,
)


def _mlp(seed: int = 0, d_in: int = 8, hidden: int = 16, k: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, k))


def _data(n: int, d_in: int = 8, k: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randint(0, k, (n,), generator=g)


def _trajectory(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lrs: list[float]) -> list[dict]:
    """SGD steps on (x, y), a state dict saved after each (the checkpoints TracInCP reads)."""
    states = []
    for lr in lrs:
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


@pytest.mark.parametrize("layers", [None, ["2"], ["0"]])
def test_equals_captum_tracincp(tmp_path, layers):
    captum_influence = pytest.importorskip("captum.influence")
    model = _mlp()
    x, y = _data(24)
    xt, yt = _data(5, seed=7)
    lrs = [0.5, 0.2, 0.05]
    states = _trajectory(model, x, y, lrs)
    paths = []
    for i, (s, lr) in enumerate(zip(states, lrs)):
        p = tmp_path / f"ckpt{i}.pt"
        torch.save({"state": s, "lr": lr}, p)
        paths.append(str(p))

    def load(m: nn.Module, path: str) -> float:
        ck = torch.load(path, weights_only=True)
        m.load_state_dict(ck["state"])
        return float(ck["lr"])

    ref_model = _mlp()
    tracin = captum_influence.TracInCP(
        ref_model, torch.utils.data.TensorDataset(x, y), paths, checkpoints_load_func=load, layers=layers,
        loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=8,
    )  # fmt: skip
    ref = tracin.influence((xt, yt))
    ref_self = tracin.self_influence(outer_loop_by_checkpoints=True)

    ours = tracin_scores(states, x, y, xt, yt, layers=layers, lrs=lrs, model=_mlp(), batch_size=7)
    ours_self = self_influence(states, x, y, layers=layers, lrs=lrs, model=_mlp(), batch_size=5)
    scale = ref.abs().max()
    assert torch.allclose(ours.float(), ref, atol=1e-5 * scale, rtol=1e-5)
    assert torch.allclose(ours_self.float(), ref_self, atol=1e-5 * ref_self.abs().max(), rtol=1e-5)
    # checkpoint files read the same (weights_only), and the diagonal of the scores is the self-influence
    files = []
    for i, s in enumerate(states):
        files.append(tmp_path / f"sd{i}.pt")
        torch.save(s, files[-1])
    again = tracin_scores(files, x, y, x[:4], y[:4], layers=layers, lrs=lrs, model=_mlp())
    assert torch.allclose(again.diagonal(), ours_self[:4], rtol=1e-6)


def test_closed_form_last_layer_one_checkpoint():
    """Last-layer gradient of cross-entropy is (softmax - onehot) outer activation: the score is closed form."""
    model = _mlp()
    x, y = _data(10)
    xt, yt = _data(3, seed=5)

    def parts(xx, yy):
        h = torch.tanh(model[0](xx))
        delta = torch.softmax(model[2](h), 1) - F.one_hot(yy, 3).float()
        return h, delta

    h, d = parts(x, y)
    ht, dt = parts(xt, yt)
    expected = 0.3 * (dt @ d.T) * (ht @ h.T + 1.0)  # weight part (h.h') and bias part (1)
    got = tracin_scores(model, x, y, xt, yt, layers="last", lrs=0.3)
    assert torch.allclose(got.float(), expected, rtol=1e-5, atol=1e-6)
    assert layer_parameters(model, "last") == ["2.weight", "2.bias"]


def test_projection_preserves_inner_products_and_is_seeded():
    model = _mlp(hidden=64)
    x, y = _data(32)
    exact = tracin_scores(model, x, y, x[:6], y[:6])
    proj = tracin_scores(model, x, y, x[:6], y[:6], projection_dim=2048, seed=3)
    assert torch.equal(proj, tracin_scores(model, x, y, x[:6], y[:6], projection_dim=2048, seed=3))
    corr = torch.corrcoef(torch.stack([exact.flatten(), proj.flatten()]))[0, 1]
    assert corr > 0.95
    # block-wise regeneration (memory-bounded) gives the same matrix as the cached one, call after call
    g = torch.randn(4, 300)
    cached = RandomProjection(300, 16, seed=1, block_rows=7)
    blocks = RandomProjection(300, 16, seed=1, cache_bytes=0, block_rows=7)
    first = cached(g)
    assert cached._cached is not None and blocks._cached is None
    assert torch.allclose(cached(g), first, atol=1e-4) and torch.allclose(blocks(g), first, atol=1e-4)


def test_preconditioner_weights_coordinates():
    model = _mlp()
    x, y = _data(16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    names = layer_parameters(model, "last")
    pre = adam_preconditioner(opt, model, names)
    got = self_influence(model, x, y, layers="last", preconditioners=[pre])
    g = per_sample_gradients(model.eval(), x, y, names=names)
    w = torch.cat([pre[n].flatten() for n in names])
    assert torch.allclose(got.float(), (g.pow(2) * w).sum(1), rtol=1e-5)


def test_no_side_effects_and_errors():
    model = _mlp()
    model.train()
    x, y = _data(12)
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    tracin_scores(model, x, y, x[:2], y[:2], projection_dim=8)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    with pytest.raises(ValueError, match="no module named 'head'"):
        tracin_scores(model, x, y, x, y, layers=["head"])
    with pytest.raises(ValueError, match="need model="):
        self_influence([model.state_dict()], x, y)
    with pytest.raises(ValueError, match="one per checkpoint"):
        self_influence([model, model], x, y, lrs=[1.0])


def _digits_flipped(frac: float = 0.05, seed: int = 0):
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(seed)
    flip = torch.randperm(len(y), generator=g)[: int(frac * len(y))]
    noisy = y.clone()
    noisy[flip] = (y[flip] + torch.randint(1, 10, (len(flip),), generator=g)) % 10
    is_flipped = torch.zeros(len(y), dtype=torch.bool)
    is_flipped[flip] = True
    return x, noisy, is_flipped


def _auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Mann-Whitney AUC: probability that a positive outranks a negative."""
    pos, neg = scores[positive].double(), scores[~positive].double()
    return float((pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean())


def test_self_influence_finds_flipped_digits():
    """5 % of the digits' labels flipped: the highest self-influence (Pruthi et al. 2020, section 4.1) finds them."""
    x, y, flipped = _digits_flipped()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    checkpoints, lrs = [], []
    for _epoch in range(6):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
        lrs.append(0.1)
    scores = self_influence(checkpoints, x, y, lrs=lrs, model=model, layers="last", batch_size=512)
    auc = _auc(scores, flipped)
    print(f"functional AUC {auc:.3f}")
    assert auc >= 0.9, auc
