"""The CPU sorting fast path (one NumPy sort of int64 keys) against torch's stable argsorts."""

from __future__ import annotations

import pytest
import torch

from explain_callbacks._internal.ops import descending_order, sorted_last


def _torch_order(x: torch.Tensor, ties: str, seed: int) -> torch.Tensor:
    """The reference: a stable descending argsort; for random ties a random permutation first."""
    order = torch.argsort(x, dim=1, descending=True, stable=True)
    if ties == "random":
        g = torch.Generator().manual_seed(seed)
        perm = torch.rand(x.shape, generator=g).argsort(dim=1, stable=True)
        order = perm.gather(1, torch.argsort(x.gather(1, perm), dim=1, descending=True, stable=True))
    return order


@pytest.mark.parametrize("ties", ["index", "random"])
def test_descending_order_matches_stable_argsorts(ties):
    g = torch.Generator().manual_seed(0)
    rows = [
        torch.randint(-2, 3, (6, 200), generator=g).float() * 0.25,  # many ties, negatives
        torch.randn(5, 300, generator=g).clamp_min(0),  # a long run of zeros (ReLU gradients)
        torch.tensor([[0.0, -0.0, 1.0, 0.0, float("inf"), -float("inf"), 1e-45, -1e-45]]),  # -0 ties +0
    ]
    for x in rows:
        for seed in (0, 7):
            gen = torch.Generator().manual_seed(seed)
            fast = descending_order(x, ties, gen if ties == "random" else None)
            slow = descending_order(x.double(), ties, torch.Generator().manual_seed(seed))  # torch path
            # random ties: the same permutation up to equal random draws (none at these sizes and seeds)
            assert torch.equal(fast, _torch_order(x, ties, seed)) and torch.equal(fast, slow)
            x_sorted = x.gather(1, fast)
            assert (x_sorted[:, 1:] <= x_sorted[:, :-1]).all()
    distinct = torch.randn(3, 500, generator=g)
    assert torch.equal(descending_order(distinct, "random", torch.Generator()), descending_order(distinct))
    with pytest.raises(ValueError, match="generator"):
        descending_order(distinct, "random")


def test_sorted_last_equals_torch_sort():
    g = torch.Generator().manual_seed(1)
    for x in (
        torch.randn(4, 3, 50, generator=g),
        torch.tensor([[0.0, -0.0, float("inf"), -float("inf"), 1e-45, 2.0, 2.0, -1.0]]),
        torch.randn(3, 7, generator=g).double(),
        torch.randint(0, 5, (2, 9), generator=g),  # not a float: the torch path
    ):
        assert torch.equal(sorted_last(x), torch.sort(x, dim=-1).values)
        assert torch.equal(sorted_last(x.flip(-1)), torch.sort(x, dim=-1).values)  # a non-contiguous view
