"""Pairwise interaction methods: integrated Hessians, CD interactions, Sobol, HSIC, groups, ACD."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain_callbacks._internal.registry import ATTRIBUTIONS, INTERACTIONS
from explain_callbacks.attribution.path import IntegratedGradients
from explain_callbacks.interaction import (
    ACD,
    CDInteraction,
    ContextualDecomposition,
    HSICInteraction,
    IntegratedHessians,
    SobolInteraction,
    build_interaction,
    draw_hierarchy,
    make_groups,
    pair_auc,
    top_pairs,
)


def _smooth_mlp(d: int = 5, k: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, k)).double()


class _Product(nn.Module):
    """f(x) = x0·x1 + x2 (one output)."""

    def forward(self, x):
        return (x[:, 0] * x[:, 1] + x[:, 2]).unsqueeze(1)


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_integrated_hessians_rows_sum_to_ig(mode):
    net = _smooth_mlp()
    x = torch.randn(4, 5, dtype=torch.float64)
    tgt = torch.tensor([0, 1, 1, 0])
    ih = IntegratedHessians(n_steps=16, mode=mode, softplus_beta=None)
    gamma = ih(net, x, tgt)
    ig = IntegratedGradients(n_steps=16)(net, x, tgt)
    torch.testing.assert_close(gamma.sum(2), ig, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(gamma.sum((1, 2)), ih.last_info["delta"], atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(gamma, gamma.transpose(1, 2))
    # grouped: Γ over groups is the block sum of the feature-level Γ
    groups = [[0, 1], [2], [3, 4]]
    g2 = IntegratedHessians(n_steps=16, mode=mode, softplus_beta=None)(net, x, tgt, groups=groups)
    blocks = torch.stack([torch.stack([gamma[:, p][:, :, q].sum((1, 2)) for q in groups], 1) for p in groups], 1)
    torch.testing.assert_close(g2, blocks, atol=1e-10, rtol=1e-8)


def test_integrated_hessians_closed_form_product():
    x = torch.tensor([[1.5, -2.0, 0.7]], dtype=torch.float64)
    gamma = IntegratedHessians(n_steps=4, softplus_beta=None)(_Product(), x)
    # Γ_01 = x0·x1·∫∫αβ = x0x1/4 and Γ_00 = x0·∫∫ x1·αβ = x0x1/4; Γ_22 = x2 (linear term)
    q = 1.5 * -2.0 / 4
    expected = torch.tensor([[[q, q, 0], [q, q, 0], [0, 0, 0.7]]], dtype=torch.float64)
    torch.testing.assert_close(gamma, expected, atol=1e-12, rtol=0)


def test_relu_is_smoothed_for_hessians():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(3, 4)
    off = ~torch.eye(4, dtype=torch.bool)
    raw = IntegratedHessians(n_steps=4, softplus_beta=None)(net, x)
    assert raw[:, off].abs().max() == 0  # a ReLU net has no curvature almost everywhere
    smooth = IntegratedHessians(n_steps=4)(net, x)
    assert smooth[:, off].abs().max() > 0


def test_cd_interactions_linear_bias_free_is_zero_and_diag_is_main_effect():
    lin = nn.Linear(6, 2, bias=False).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    tgt = torch.tensor([0, 1, 0])
    scores = CDInteraction()(lin, x, tgt)
    off = ~torch.eye(6, dtype=torch.bool)
    assert scores[:, off].abs().max() < 1e-12
    contrib = lin.weight[tgt] * x
    torch.testing.assert_close(torch.diagonal(scores, dim1=1, dim2=2), contrib)


@pytest.fixture(scope="module")
def planted_mlp() -> tuple[nn.Module, torch.Tensor]:
    """An MLP trained on y = x0·x1 + x2 + 0.5·x3 (5 features; x4 irrelevant)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2048, 5, generator=g) * 2 - 1
    y = x[:, 0] * x[:, 1] + x[:, 2] + 0.5 * x[:, 3]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(250):
        idx = torch.randint(0, 2048, (256,), generator=g)
        loss = (net(x[idx]).squeeze(1) - y[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.02
    return net.eval(), x[:64]


@pytest.mark.parametrize("name", ["integrated_hessians", "cd", "sobol"])
def test_planted_pair_ranks_first(planted_mlp, name):
    net, x = planted_mlp
    kwargs = {"n_designs": 128} if name == "sobol" else {}
    method = build_interaction(name, **kwargs)
    scores = method(net, x)
    assert scores.shape == (64, 5, 5)
    i, j, _ = top_pairs(scores.abs().mean(0), k=1)
    assert (int(i[0]), int(j[0])) == (0, 1)
    truth = torch.zeros(5, 5, dtype=torch.bool)
    truth[0, 1] = truth[1, 0] = True
    assert pair_auc(scores.abs().mean(0), truth) == 1.0


def test_sobol_second_order_closed_form():
    """f(u) = 2·u0·u1 + 3·u2 with u ~ U[0,1]³ (x = (1, 2, 3), masks x⊙u): S_01 = (4/144)/V,
    S_0 = (4/48)/V with V = 4·7/144 + 9/12; interaction share ST_0 − S_0 = S_01."""
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    m = SobolInteraction(n_designs=2048)
    s = m(_Product(), x)
    var = 4 * 7 / 144 + 9 / 12
    assert abs(float(s[0, 0, 1]) - (4 / 144) / var) < 0.004
    assert abs(float(m.last_info["first_order"][0, 0]) - (4 / 48) / var) < 0.01
    assert abs(float(s[0, 0, 0]) - (4 / 144) / var) < 0.006
    assert abs(float(s[0, 0, 2])) < 0.004
    assert abs(float(s[0, 2, 2])) < 0.004


def test_hsic_wrapper_shapes_and_layout_errors():
    x = torch.randn(2, 4, dtype=torch.float64)
    s = HSICInteraction(n_designs=64)(_Product(), x)
    assert s.shape == (2, 4, 4)
    torch.testing.assert_close(s, s.transpose(1, 2))
    with pytest.raises(ValueError, match="HSIC's own layout"):
        HSICInteraction(n_designs=64)(_Product(), x, groups=[[0, 1], [2, 3]])


def test_make_groups_variants():
    tab = torch.randn(2, 6)
    g = make_groups(tab)
    assert g.n == 6 and g.names[0] == "x0"
    assert make_groups(tab, 3).n == 3
    assert make_groups(tab, [[0, 5], [1]]).masks.sum().item() == 3
    img = torch.randn(2, 3, 8, 8)
    grid = make_groups(img, 2)
    assert grid.masks.shape == (4, 1, 8, 8) and grid.grid == (2, 2)
    torch.testing.assert_close(grid.masks.sum(0), torch.ones(1, 8, 8))
    seg = torch.zeros(8, 8, dtype=torch.long)
    seg[4:] = 7
    seg[:, :2] = -1
    ids = make_groups(img, seg)
    assert ids.n == 2 and ids.masks.shape == (2, 1, 8, 8) and ids.masks[:, 0, :, :2].sum() == 0
    seq = torch.randn(2, 5, 3)
    assert make_groups(seq).masks.shape == (5, 5, 1)
    with pytest.raises(ValueError, match="broadcast"):
        make_groups(img, torch.zeros(3, 3, dtype=torch.long))
    vals = torch.arange(4.0).view(1, 4)
    torch.testing.assert_close(grid.paint(vals)[0, 0, 0, :], torch.tensor([0.0] * 4 + [1.0] * 4))


def test_pair_auc_and_top_pairs():
    s = torch.tensor([[0, 3, 1], [3, 0, 2], [1, 2, 0.0]])
    truth = torch.zeros(3, 3, dtype=torch.bool)
    truth[0, 1] = truth[1, 0] = True
    assert pair_auc(s, truth) == 1.0
    assert pair_auc(-s, truth) == 0.0
    i, j, v = top_pairs(s.unsqueeze(0), k=2)
    assert (i[0].tolist(), j[0].tolist(), v[0].tolist()) == ([0, 1], [1, 2], [3.0, 2.0])


def test_cd_attribution_registered_and_exact_for_bias_free_linear():
    assert "cd" in ATTRIBUTIONS and "cd" in INTERACTIONS
    lin = nn.Linear(5, 3, bias=False).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    tgt = torch.tensor([0, 2, 1, 1])
    attr = ContextualDecomposition()(lin, x, tgt)
    torch.testing.assert_close(attr, lin.weight[tgt] * x)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(3 * 16, 2, bias=False))
    img = torch.randn(2, 2, 4, 4)
    amap = ContextualDecomposition(batch_size=7)(conv, img, torch.tensor([0, 1]))
    assert amap.shape == (2, 1, 4, 4)
    logits = conv(img)[torch.arange(2), torch.tensor([0, 1])]
    torch.testing.assert_close(amap.sum((1, 2, 3)), logits, rtol=1e-4, atol=1e-5)
    patch = ContextualDecomposition(patch_size=2)(conv, img, torch.tensor([0, 1]))
    assert torch.equal(patch[:, :, 0, 0], patch[:, :, 1, 1])


class _TileModel(nn.Module):
    """Logit 0 = Σ w ⊙ x with a heavy 2x2 block (rows 0-1, cols 0-1) and a lighter one at the corner."""

    def __init__(self) -> None:
        super().__init__()
        w = torch.zeros(1, 8, 8)
        w[0, :2, :2] = 5.0
        w[0, 6:, 6:] = 2.0
        self.register_buffer("w", w)

    def forward(self, x):
        return torch.stack([(x * self.w).flatten(1).sum(1), torch.zeros(x.shape[0])], 1)


def test_acd_hierarchy_grows_merges_and_draws():
    x = torch.ones(1, 1, 8, 8)
    (h,) = ACD(tile=2, percentile=90, num_iters=3)(_TileModel(), x, 0)
    assert h.grid == (4, 4)
    first = h.levels[0]
    assert int(first[0, 0]) > 0  # the heaviest tile is selected first
    assert len(h.level_scores[-1]) == 1  # merged into one component at the end
    assert len(h.merges) == len(h.level_scores[-len(h.merges) - 1]) - 1
    img = draw_hierarchy(h, x[0])
    assert img.ndim == 3 and img.shape[0] == 3 and float(img.min()) >= 0 and float(img.max()) <= 1
    (hs,) = ACD(tile=1, percentile=80, num_iters=2)(nn.Sequential(nn.Flatten(), nn.Linear(6, 2)), torch.randn(1, 6), 1)
    assert hs.grid == (6,)
    assert draw_hierarchy(hs).shape[0] == 3


def test_conv1d_signals_are_grouped_by_time_step_over_channels():
    """(B, C, L) inputs of a model whose first layer is a Conv1d: default groups are the L steps shared
    over channels (the same as passing those ids), CD attribution paints (B, 1, L); a recurrent model
    keeps (B, T, D) steps. A linear read-out of one step must put CD's whole main effect on that step."""
    from explain_callbacks._internal.layout import reads_channels_first

    c, n = 3, 10
    conv = nn.Sequential(nn.Conv1d(c, c, 1, bias=False), nn.Flatten(), nn.Linear(c * n, 2, bias=False)).double()
    with torch.no_grad():
        conv[0].weight.copy_(torch.eye(c).unsqueeze(2))
        conv[2].weight.zero_()
        conv[2].weight.view(2, c, n)[0, :, 4] = 1.0  # class 0 reads step 4 of every channel
    x = torch.randn(4, c, n, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    assert reads_channels_first(conv, x)
    for name in ("cd", "integrated_hessians", "sobol"):
        m = INTERACTIONS.build(name)
        got = m(conv, x, y)
        assert got.shape == (4, n, n)
        torch.testing.assert_close(got, m(conv, x, y, groups=torch.arange(n).view(1, n)))
    cd = ATTRIBUTIONS.build("cd")(conv, x, y)
    assert cd.shape == (4, 1, n)
    torch.testing.assert_close(cd[:, 0, 4], x[:, :, 4].sum(1))
    assert cd[:, 0, torch.arange(n) != 4].abs().max() < 1e-12
    gru = nn.GRU(c, 4, batch_first=True)
    assert not reads_channels_first(gru, x.transpose(1, 2))
    assert not reads_channels_first(nn.Sequential(nn.Linear(3, 2)), torch.randn(2, 5, 3))
