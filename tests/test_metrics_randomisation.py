"""Cascading model-parameter randomisation on a small trained CNN (Adebayo et al. 2018)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain_callbacks.attribution import Saliency
from explain_callbacks.metrics import Randomisation
from explain_callbacks.metrics import functional as MF
from explain_callbacks.metrics.functional.randomisation import copy_model, randomisable_layers, randomise_layer


@pytest.fixture(scope="module")
def trained():
    """SmallCNN trained one epoch on scikit-learn's 8x8 digits (well above chance on held-out digits)."""
    datasets = pytest.importorskip("explain_callbacks.datasets.tabular_images")
    from explain_callbacks.models.nets import SmallCNN

    x, y = datasets.load_digits_tensors(8)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():  # weights and dropout from a fixed seed, whatever ran before
        torch.manual_seed(0)
        model = SmallCNN(1, 10, width=8)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        perm = torch.randperm(1500, generator=g)
        for i in range(0, 1500, 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    acc = (model(x[1500:]).argmax(1) == y[1500:]).float().mean()
    assert acc > 0.4  # chance: 0.1
    return model, x[1500:1532], y[1500:1532]


def test_gradient_maps_of_the_randomised_cnn_decorrelate(trained):
    model, x, y = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    names, rows = MF.model_randomisation(model, x, y, Saliency(), return_cascade=True)
    assert names == ["head.3", "features.9", "features.8", "features.5", "features.4", "features.1", "features.0"]
    assert rows.shape == (7, 32)
    assert float(rows[-1].mean()) < 0.3
    full = MF.model_randomisation(model, x, y, Saliency())  # one call: the same fully randomised model
    torch.testing.assert_close(full, rows[-1])
    # The user's model is untouched, and so is the global RNG.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training
    assert torch.equal(rng, torch.get_rng_state())


def test_a_method_blind_to_the_weights_stays_correlated(trained):
    """An 'edge detector' that ignores the model fails the check (correlation 1)."""
    model, x, y = trained
    edge = lambda m, inp, t: (inp - inp.roll(1, -1)).abs()  # noqa: E731
    score = MF.model_randomisation(model, x, y, edge)
    torch.testing.assert_close(score, torch.ones_like(score))


def test_class_reports_the_fully_randomised_value(trained):
    model, x, y = trained
    metric = Randomisation()
    maps = Saliency()(model, x, y)
    metric.update(model, x, y, Saliency(), attributions=maps)
    assert float(metric.compute()) < 0.3
    torch.testing.assert_close(metric.last_scores, MF.model_randomisation(model, x, y, Saliency()))


def test_independent_mode_and_layer_selection():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    x = torch.randn(8, 6)
    y = torch.randint(0, 3, (8,))
    names, rows = MF.model_randomisation(model, x, y, Saliency(), mode="independent", return_cascade=True)
    assert names == ["2", "0"] and rows.shape == (2, 8)
    names, rows = MF.model_randomisation(model, x, y, Saliency(), layers=["0"], return_cascade=True)
    assert names == ["0"]
    with pytest.raises(ValueError, match="unknown layers"):
        MF.model_randomisation(model, x, y, Saliency(), layers=["nope"])
    for wrong in (torch.rand(8, 3), torch.rand(4, 12)):  # not the maps this method gives for x
        with pytest.raises(ValueError, match="attributions= has"):
            MF.model_randomisation(model, x, y, Saliency(), attributions=wrong)


def test_randomise_layer_is_seeded_and_copy_shares_the_trainer():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)
            self.bn = nn.BatchNorm1d(2)
            self._trainer = object()  # stands for a Lightning trainer: must not be deep-copied

    m = Holder()
    m.bn.running_mean.fill_(3.0)
    c = copy_model(m)
    assert c._trainer is m._trainer and c.lin.weight is not m.lin.weight
    assert [n for n, _ in randomisable_layers(c)] == ["lin", "bn"]
    randomise_layer(c.lin, torch.Generator().manual_seed(1))
    w1 = c.lin.weight.clone()
    randomise_layer(c.lin, torch.Generator().manual_seed(1))
    assert torch.equal(w1, c.lin.weight) and not torch.equal(w1, m.lin.weight)
    assert c.lin.weight.abs().max() <= 0.5  # U(±1/√fan_in), fan_in = 4
    randomise_layer(c.bn, torch.Generator().manual_seed(1))
    assert torch.equal(c.bn.running_mean, torch.zeros(2)) and float(m.bn.running_mean[0]) == 3.0
