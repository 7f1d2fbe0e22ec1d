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
    # the caller's layer relevance (the ConceptMonitor reuses its pass): the same ranking, positions and boxes
    given = relevance_maximization(lrp, model, ref, t, "2", [1], top_k=4, mode="max", relevance=rel)
    for a, b in ((given.indices, rmax.indices), (given.scores, rmax.scores), (given.boxes, rmax.boxes)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="relevance has 9 rows for 10 reference samples"):
        relevance_maximization(lrp, model, ref, t, "2", [1], relevance=rel[:9])


def test_concept_atlas_finds_planted_watermark_concept():
    """A planted concept: channel 2 of the first convolution is a detector of a 3x3 checker watermark
    (matched filter, threshold bias) and the head reads it for class 1. The atlas must put channel 2 first
    for class 1, and relevance maximisation must crop the watermark out of the class-1 references."""
    from explain_callbacks.attribution.lrp import concept_atlas, relevance_maximization

    torch.manual_seed(0)
    mark = torch.tensor([[1.0, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=torch.float64)
    conv = torch.nn.Conv2d(1, 4, 3, padding=1).double()
    head = torch.nn.Linear(4, 2).double()
    with torch.no_grad():
        conv.weight.mul_(0.1)
        conv.weight[2, 0] = mark
        conv.bias[2] = -4.0  # fires only where the pattern matches (response 5 there, at most 1.5 on the noise)
        head.weight.uniform_(-0.1, 0.1)
        head.weight[1, 2] = 200.0  # one firing position of 144 after average pooling: +1.4 for class 1
        head.bias.copy_(torch.tensor([0.5, 0.0]))
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), head)
    g = torch.Generator().manual_seed(2)
    x = 0.3 * torch.rand(12, 1, 12, 12, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1] * 6)
    where = []
    for i in range(1, 12, 2):  # the watermark in class-1 images, at a random place
        r, c = (int(v) for v in torch.randint(0, 9, (2,), generator=g))
        x[i, 0, r : r + 3, c : c + 3] = (mark + 1) / 2
        where.append((i, r, c))
    assert (model(x).argmax(1) == y).all()
    atlas = concept_atlas(LRP(), model, x, y, "0", top=2)
    assert atlas.classes == [0, 1]
    assert int(atlas.concepts[1, 0]) == 2 and float(atlas.relevance[1, 0]) > 0.5
    assert "| 1 | 2 (" in atlas.table()
    rm = relevance_maximization(LRP(), model, x, y, "0", [2], top_k=3)
    for r in range(3):
        i = int(rm.indices[r, 0])
        assert i % 2 == 1  # class-1 images only
        (_, top, left) = next(w for w in where if w[0] == i)
        (r0, r1), (c0, c1) = rm.boxes[r, 0].tolist()
        assert r0 <= top + 1 < r1 and c0 <= left + 1 < c1  # the crop holds the watermark's centre


def test_crp_inside_inference_mode():
    """Lightning's validate/test run under inference_mode: same rankings and boxes as outside."""
    from explain_callbacks.attribution.lrp import concept_atlas, relevance_maximization

    model = _tanh_net().eval()
    ref = torch.rand(6, 1, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = torch.zeros(6, dtype=torch.long)
    out = relevance_maximization(LRP(), model, ref, t, "2", [0, 1], top_k=2)
    atlas = concept_atlas(LRP(), model, ref, t, "2")
    with torch.inference_mode():
        ref_i = ref.clone()
        inside = relevance_maximization(LRP(), model, ref_i, t, "2", [0, 1], top_k=2)
        atlas_i = concept_atlas(LRP(), model, ref_i, t, "2")
    assert torch.equal(out.indices, inside.indices) and torch.equal(out.boxes, inside.boxes)
    assert torch.equal(atlas.concepts, atlas_i.concepts)
