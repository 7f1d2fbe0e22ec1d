"""The sparse logistic student's solver: the L1 objective against scikit-learn, the Hessian against autograd,
the non-zero budget on multi-class teachers, warm starts across fits, and the large-support refit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from explain_callbacks.distill import SparseLogisticStudent
from explain_callbacks.distill.linear import softmax_hessian


def _problem(n: int, d: int, k: int, seed: int, scale: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ (torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(
        d, d, generator=g, dtype=torch.float64))  # correlated features  # fmt: skip
    B = torch.randn(d, k, generator=g, dtype=torch.float64) * (torch.rand(d, 1, generator=g) < 0.4)
    return X, scale * X @ B / d**0.5 + 0.2 * torch.randn(n, k, generator=g, dtype=torch.float64)


def _standardised(X: torch.Tensor) -> torch.Tensor:
    sd = X.std(0, unbiased=False)
    return (X - X.mean(0)) / torch.where(sd > 1e-12, sd, torch.ones_like(sd))


def _objective(s: SparseLogisticStudent, X: torch.Tensor, P: torch.Tensor, lam: float, W, b) -> float:
    """1/n Σ_i CE(p_i, softmax(z_i W + b)) + λ ‖W‖₁ on standardised features (one logit for two classes)."""
    Z = _standardised(X)
    logits = Z @ W + b
    if W.shape[1] == 1:
        p1 = P[:, 1:]
        ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, p1, reduction="none").sum(1)
    else:
        ce = -(P * torch.log_softmax(logits, 1)).sum(1)
    return float(ce.mean() + lam * W.abs().sum())


def _sklearn_l1(Z: np.ndarray, P: np.ndarray, lam: float):
    """scikit-learn's L1 logistic regression on soft targets: each row once per class, weighted by p_ic."""
    from sklearn.linear_model import LogisticRegression

    n, k = P.shape
    Zr = np.repeat(Z, k, axis=0)
    yr = np.tile(np.arange(k), n)
    wr = P.reshape(-1)
    # sklearn minimises C Σ_i w_i CE_i + ‖W‖₁; ours 1/n Σ_i CE_i + λ‖W‖₁ (Σ w = n), so C = 1/(nλ)
    est = LogisticRegression(l1_ratio=1.0, C=1.0 / (n * lam), solver="saga", tol=1e-12, max_iter=100_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(Zr, yr, sample_weight=wr)
    return torch.from_numpy(est.coef_.T.copy()), torch.from_numpy(est.intercept_.copy())


@pytest.mark.parametrize(("k", "d", "alpha"), [(2, 8, 0.1), (4, 10, 0.05), (4, 160, 0.2)])
def test_l1_objective_matches_sklearn(k, d, alpha):
    """Same optimum as scikit-learn's saga at the same penalty: objective and coefficients. The (160, 4)
    case has 644 coefficients and goes through the screened first-order path, the others through
    proximal Newton."""
    X, logits = _problem(300, d, k, seed=k + d)
    s = SparseLogisticStudent(alpha=alpha, refit=False, ridge=0.0, tol=1e-7, max_iter=5000).fit(X, logits)
    P = torch.softmax(logits, 1)
    Z = _standardised(X)
    W_sk, b_sk = _sklearn_l1(Z.numpy(), P.numpy(), s.lambda_)
    sd = X.std(0, unbiased=False)
    W = s.coef_ * sd.unsqueeze(1)  # back to standardised units
    b = s.intercept_ + X.mean(0) @ s.coef_
    if k == 2:  # sklearn's binary model is one logit too
        W_sk, b_sk = W_sk[:, :1], b_sk[:1]
    else:  # softmax logits are defined up to a constant per row: centre the intercepts
        b, b_sk = b - b.mean(), b_sk - b_sk.mean()
    ours, ref = _objective(s, X, P, s.lambda_, W, b), _objective(s, X, P, s.lambda_, W_sk, b_sk)
    assert ours <= ref + 1e-8 * abs(ref)
    assert ours == pytest.approx(ref, rel=1e-7)
    if k == 2:
        torch.testing.assert_close(W, W_sk, atol=2e-4, rtol=0)
        assert torch.equal(W != 0, W_sk.abs() > 1e-6)
    else:  # softmax weights can shift per feature across classes at equal penalty: compare the model instead
        Z = _standardised(X)
        torch.testing.assert_close(torch.softmax(Z @ W + b, 1), torch.softmax(Z @ W_sk + b_sk, 1), atol=1e-4, rtol=0)


def test_softmax_hessian_matches_autograd():
    g = torch.Generator().manual_seed(0)
    Za = torch.cat([torch.randn(30, 4, generator=g, dtype=torch.float64), torch.ones(30, 1, dtype=torch.float64)], 1)
    T = torch.softmax(torch.randn(30, 3, generator=g, dtype=torch.float64), 1)
    theta = torch.randn(5, 3, generator=g, dtype=torch.float64)

    def loss(v):
        return -(T * torch.log_softmax(Za @ v.view(5, 3), 1)).sum(1).mean()

    ref = torch.autograd.functional.hessian(loss, theta.reshape(-1))
    P = torch.softmax(Za @ theta, 1)
    torch.testing.assert_close(softmax_hessian(Za, P), ref)
    idx = torch.tensor([0, 4, 5, 11, 14])
    torch.testing.assert_close(softmax_hessian(Za, P, idx), ref[idx][:, idx])
    # one sigmoid column: p(1 − p) z zᵀ
    p = torch.sigmoid(Za @ theta[:, :1])
    torch.testing.assert_close(softmax_hessian(Za, p), (Za * p * (1 - p)).T @ Za / 30)


def test_budget_is_used_when_a_grid_step_adds_many_weights():
    """Ten classes: one step of the λ grid adds many weights at once. The path bisects between the last
    penalty within the budget and the first beyond it (before: the empty student was kept)."""
    X, logits = _problem(600, 40, 10, seed=3, scale=4.0)
    for budget in (5, 10, 25):
        s = SparseLogisticStudent(max_nonzeros=budget).fit(X, logits)
        nnz = s.complexity()["nonzeros"]
        assert budget - 2 <= nnz <= budget, (budget, nnz)


def test_warm_start_across_fits_gives_the_cold_solution():
    """The Distiller refits the same student on a changed buffer: from the previous solution (one solve
    at the target penalty, or the previous grid point) it reaches the cold fit's support and weights."""
    X, logits = _problem(400, 30, 4, seed=5)
    X2, logits2 = X + 0.05 * torch.randn(X.shape, generator=torch.Generator().manual_seed(6), dtype=X.dtype), logits
    for kw in ({"alpha": 0.1}, {"max_nonzeros": 12}):
        warm = SparseLogisticStudent(**kw)
        warm.fit(X, logits)
        warm.fit(X2, logits2)
        cold = SparseLogisticStudent(warm_start=False, **kw).fit(X2, logits2)
        assert torch.equal(warm.coef_ != 0, cold.coef_ != 0), kw
        torch.testing.assert_close(warm.coef_, cold.coef_, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(warm.intercept_, cold.intercept_, atol=1e-5, rtol=1e-5)


def test_newton_cg_refit_matches_the_newton_refit():
    """Large supports are refitted by truncated Newton (Hessian-vector products only); it reaches the
    same minimum as Newton with the full Hessian, and the same predictions."""
    X, logits = _problem(500, 40, 5, seed=7)
    dense = SparseLogisticStudent(alpha=0.02)
    dense.newton_refit_max = 10**9
    dense.fit(X, logits)
    cg = SparseLogisticStudent(alpha=0.02)
    cg.newton_refit_max = 0
    cg.fit(X, logits)
    assert dense.complexity()["nonzeros"] > 50 and torch.equal(dense.coef_ != 0, cg.coef_ != 0)
    P = torch.softmax(logits, 1)

    def objective(s):
        z = s.decision_function(X)
        sd = X.std(0, unbiased=False)
        ridge = 0.5 * s.ridge * ((s.coef_ * sd[:, None]) ** 2).sum()
        return float(-(P * torch.log_softmax(z, 1)).sum(1).mean() + ridge)

    assert objective(cg) == pytest.approx(objective(dense), rel=1e-7, abs=0)
    assert torch.equal(cg.predict(X), dense.predict(X))
