"""CRP (Achtibat et al. 2023): conditional maps and concept relevances against zennit-crp (test-only
LGPL reference, ``pip install --no-deps zennit zennit-crp``), and closed forms: the concept maps of all
channels add up to the LRP map; each concept's relevance is what its map sums to (conservation)."""

from __future__ import annotations

import importlib

import pytest
import torch

from explain_callbacks.attribution import LRP
from explain_callbacks.attribution.lrp import conditional_relevance

from .test_lrp import relu_cnn
from .test_lrp_zennit import _inputs, bn_net, vgg_like, zennit


def test_all_concepts_add_up_to_lrp_and_conserve():
    model, x = relu_cnn(bias=False), torch.rand(3, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 2, 1])
    lrp = LRP(epsilon=1e-10, stabilizer=1e-10, batch_size=7)  # chunks cut across samples' concept blocks
    maps, rel = conditional_relevance(lrp, model, x, t, "3", range(8))
    assert maps.shape == (3, 8, 2, 8, 8) and rel.shape == (3, 8)
    torch.testing.assert_close(maps.sum(1), LRP(epsilon=1e-10, stabilizer=1e-10)(model, x, t))
    torch.testing.assert_close(maps.flatten(2).sum(2), rel, rtol=1e-6, atol=1e-10)  # bias-free: conserved
    one, r1 = conditional_relevance(lrp, model, x, t, "3", [5])
    torch.testing.assert_close(one[:, 0], maps[:, 5])
    torch.testing.assert_close(r1[:, 0], rel[:, 5])
    with pytest.raises(ValueError, match="not channels of layer"):
        conditional_relevance(lrp, model, x, t, "3", [8])


@pytest.mark.skipif(
    zennit is None or importlib.util.find_spec("crp") is None,
    reason="zennit-crp not installed (pip install --no-deps zennit zennit-crp)",
)
@pytest.mark.parametrize("net,layer", [(vgg_like, "2"), (bn_net, "3")])
def test_equals_zennit_crp(net, layer):
    from crp.attribution import CondAttribution
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    model, x = net(), _inputs()[:2]
    t = torch.tensor([1, 3])
    concepts = [0, 3, 7]
    maps, rel = conditional_relevance(LRP(), model, x, t, layer, concepts)
    attribution = CondAttribution(model)
    comp = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])
    for i in range(2):
        conditions = [{"y": [int(t[i])], layer: [c]} for c in concepts]
        res = attribution(x[i : i + 1].clone().requires_grad_(True), conditions, comp, record_layer=[layer],
                          exclude_parallel=False)  # fmt: skip
        ref_heat = res.heatmap  # (k, H, W): input relevance summed over channels
        scale = float(ref_heat.abs().max())
        torch.testing.assert_close(maps[i].sum(1), ref_heat, atol=1e-5 * scale, rtol=1e-5)
        layer_rel = res.relevances[layer]  # (k, C, h, w): the layer's relevance (unmasked, as recorded)
        ref_rel = torch.stack([layer_rel[j, c].sum() for j, c in enumerate(concepts)])
        torch.testing.assert_close(rel[i], ref_rel, atol=1e-5 * float(ref_rel.abs().max()), rtol=1e-5)


def _tanh_net():
    torch.manual_seed(6)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(), torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(),
        torch.nn.Linear(3 * 6 * 6, 2),
    ).double()  # fmt: skip


def test_relevance_maximization_ranks_and_boxes():
    """'sum' ranks by the concept relevance that conditional_relevance computes by masking (an independent
    path); boxes are the 5x5 receptive field of two unpadded 3x3 convolutions at the top position."""
    from explain_callbacks.attribution.lrp import layer_relevance, relevance_maximization

    model = _tanh_net().train()  # modes must come back
    ref = torch.rand(10, 1, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.zeros(10, dtype=torch.long)
    lrp = LRP("epsilon", batch_size=4)
    rm = relevance_maximization(lrp, model, ref, t, "2", [0, 2], top_k=3, mode="sum")
    _, cond = conditional_relevance(lrp, model, ref, t, "2", [0, 2])
    want = cond.topk(3, dim=0)
    assert torch.equal(rm.indices, want.indices)
    torch.testing.assert_close(rm.scores, want.values)
    assert model.training and all(p.requires_grad for p in model.parameters())
    rmax = relevance_maximization(lrp, model, ref, t, "2", [1], top_k=4, mode="max")
    rel = layer_relevance(lrp, model, ref, t, "2")
    torch.testing.assert_close(rmax.scores[:, 0], rel[:, 1].flatten(1).amax(1).topk(4).values)
    for r in range(4):
        i, j = rmax.positions[r, 0].tolist()
        assert rel[rmax.indices[r, 0], 1, i, j] == rmax.scores[r, 0]
        assert rmax.boxes[r, 0].tolist() == [[i, i + 5], [j, j + 5]]
    crops = rmax.crops(ref, 1)
    assert len(crops) == 4 and all(c.shape == (1, 5, 5) for c in crops)
    with pytest.raises(ValueError, match="mode must be"):
        relevance_maximization(lrp, model, ref, t, "2", mode="mean")
