"""The per-call fixed cost of a method: the model's structure is walked only when it may have changed
(``_internal.batching.structure_id``), Grad-CAM records the graph from its layer on only, and path
methods build and reduce a call's points per block of whole steps (``run_blocks``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain_callbacks._internal import batching
from explain_callbacks._internal.batching import (
    auto_rows,
    flat_calls,
    forget_model,
    model_facts,
    output_width,
    run_blocks,
    structure_id,
)
from explain_callbacks._internal.guard import model_guard
from explain_callbacks.attribution import ExpectedGradients, GradCAM, IntegratedGradients, Saliency


@pytest.fixture
def walks(monkeypatch):
    """The number of structure walks so far (a list, appended to per walk)."""
    seen: list[int] = []
    real = batching._walk_structure

    def counting(model):
        seen.append(1)
        return real(model)

    monkeypatch.setattr(batching, "_walk_structure", counting)
    return seen


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_unchanged_model_is_walked_once(walks):
    model, x = _mlp(), torch.randn(4, 6)
    sid = structure_id(model)
    for _ in range(5):
        assert structure_id(model) == sid
        Saliency(batch_size=2)(model, x, 1)
    assert len(walks) == 1


@pytest.mark.parametrize(
    "change",
    [
        "parameter replaced",
        "head replaced",
        "module added",
        "module appended",
        "dtype moved",
        "device moved",
    ],
)
def test_structure_changes_are_seen(change, walks):
    model, x = _mlp(), torch.randn(4, 6)
    before = structure_id(model)
    assert output_width(model, x) == 3
    if change == "parameter replaced":
        model[2].weight = nn.Parameter(torch.randn(5, 8))
        model[2].bias = nn.Parameter(torch.randn(5))
    elif change == "head replaced":
        model[2] = nn.Linear(8, 5)
    elif change == "module added":
        model.add_module("extra", nn.Linear(3, 5))
    elif change == "module appended":
        model.append(nn.Linear(3, 5))
    elif change == "dtype moved":
        model.double()
        x = x.double()
    else:
        model.to("meta")  # every parameter moves without a registration; the first one's device says so
    after = structure_id(model)
    assert after != before
    assert len(walks) == 2
    if change != "device moved":
        # the facts are probed again for the new structure: the new output width
        assert output_width(model, x) == 5 if change != "dtype moved" else 3
        width = 5 if change != "dtype moved" else 3
        Saliency(batch_size=None)(model, x, width - 1)
        with pytest.raises(ValueError, match=f"lie in \\[0, {width - 1}\\]"):
            Saliency(batch_size=None)(model, x, width)


def test_registration_elsewhere_keeps_the_facts(monkeypatch):
    """A module registered anywhere (another model, a layer built in a training step) moves the global
    counter: the model's structure is walked again, found unchanged, and keeps its id and probed facts."""
    model, x = _mlp(), torch.randn(4, 6)
    sid, facts = structure_id(model), model_facts(model, x)
    probes = []
    real = batching._probe
    monkeypatch.setattr(batching, "_probe", lambda *a, **k: probes.append(1) or real(*a, **k))
    nn.Linear(2, 2)  # registers two parameters
    assert structure_id(model) == sid
    assert model_facts(model, x) == facts
    assert probes == []


def test_changes_bypassing_registration_after_forget_model():
    """``param.data =`` a tensor of another shape registers nothing: the cached width stays until
    :func:`forget_model`; a target that the stale width lets through still gets the clear error."""
    model, x = _mlp(), torch.randn(4, 6)
    assert output_width(model, x) == 3
    with torch.no_grad():
        model[2].weight.data = torch.randn(2, 8)
        model[2].bias.data = torch.randn(2)
    assert output_width(model, x) == 3  # stale: nothing registered
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        Saliency(batch_size=None)(model, x, 2)  # let through by the stale width; the gather names it
    forget_model(model)
    assert output_width(model, x) == 2


def test_call_plans_follow_the_setting_the_pass_and_forgotten_rows():
    """A method's remembered call plan (facts and rows per call) is per kind of pass and setting, and is
    dropped with the rows choices it holds (``auto_rows``/``forget_rows``)."""
    model, x = _mlp(), torch.randn(4, 6)
    sal = Saliency()
    with auto_rows(measure=False):
        for _ in range(2):
            sal(model, x, 1)
            assert (sal.rows_choice.how, sal.rows_choice.kind) == ("rule", "grad")
        sal(model, x.double().float(), 1, create_graph=True)
        assert sal.rows_choice.kind == "double"
        sal.batch_size = 3
        sal(model, x, 1)
        assert (sal.rows_choice.how, sal.rows_choice.rows) == ("fixed", 3)
        sal.batch_size = "auto"
    with auto_rows(measure=True, budget_s=0.2):
        sal(model, x, 1)
        assert sal.rows_choice.how == "measured"


def test_gradcam_records_the_graph_from_its_layer_on():
    """With frozen parameters and an input without grad (the monitors' guard), the layers before Grad-CAM's
    layer run outside the graph, and the map is the one a graph from the input gives."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.Flatten(), nn.Linear(5 * 36, 3)
    ).eval()
    x, t = torch.randn(2, 3, 6, 6), torch.tensor([0, 2])
    first_out = []
    model[1].register_forward_hook(lambda _m, _i, out: first_out.append(out.requires_grad))

    def reference() -> torch.Tensor:  # the textbook computation, the graph taken from the input
        xg = x.clone().requires_grad_(True)
        act = model[:3](xg)
        y = model[3:](act).gather(1, t.view(-1, 1)).sum()
        (g,) = torch.autograd.grad(y, act)
        cam = torch.relu((g.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True))
        return cam.detach()

    with model_guard(model):
        ours = GradCAM(layer="2", upsample=False)(model, x, t)
        assert first_out and not any(first_out)  # nothing before the layer recorded (nor in the probe forward)
        torch.testing.assert_close(ours, reference())
    # parameters that require grad: the graph runs through them as before, and the map is the same
    first_out.clear()
    torch.testing.assert_close(GradCAM(layer="2", upsample=False)(model, x, t), ours)
    assert first_out[-1]


@pytest.mark.parametrize(
    ("n_runs", "batch", "rows_per_call"), [(16, 8, 128), (7, 5, 3), (7, 5, 12), (3, 4, None), (5, 3, 1)]
)
def test_run_blocks_merge_whole_runs(n_runs, batch, rows_per_call):
    for call, pieces in flat_calls(n_runs, batch, rows_per_call):
        blocks = run_blocks(pieces, batch)
        got = [(r, i) for r0, r1, s, _ in blocks for r in range(r0, r1) for i in range(s.start, s.stop)]
        assert got == [(r, i) for r, s, _ in pieces for i in range(s.start, s.stop)]  # the same rows, in order
        stops = [0] + [at.stop for *_, at in blocks]
        assert [at.start for *_, at in blocks] == stops[:-1] and stops[-1] == call.stop - call.start
        assert len(blocks) <= 3  # a partial run, the whole runs, a partial run


@pytest.mark.parametrize("rows_per_call", [1, 3, 7, 10, 16, None])
def test_path_methods_same_map_whatever_the_rows_per_call(rows_per_call):
    """Blocks of whole steps and partial steps at the call's ends give the map of a single call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, t = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    for method in (
        IntegratedGradients(n_steps=7, completeness=False, baseline="uniform"),
        ExpectedGradients(reference=x[[4, 0, 2]], n_samples=7),
    ):
        method.batch_size = None
        whole = method(model, x, t)
        method.batch_size = rows_per_call
        torch.testing.assert_close(method(model, x, t), whole, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("frozen", [True, False])
def test_gradcam_with_an_inplace_relu_after_its_layer_matches_captum(frozen):
    """The layer's output as the layer returned it (a VGG's ``ReLU(inplace=True)`` follows the last
    convolution): the in-place op changes the forward's copy, not the stored activations (Captum's
    LayerGradCam, which also clones)."""
    captum_attr = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(5 * 36, 3),
    ).double().eval()  # fmt: skip
    x, t = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 2])
    ref = captum_attr.LayerGradCam(model, model[2]).attribute(x, target=t, relu_attributions=True)
    if frozen:
        with model_guard(model):
            ours = GradCAM(layer="2", upsample=False)(model, x, t)
    else:
        ours = GradCAM(layer="2", upsample=False)(model, x, t)
    torch.testing.assert_close(ours, ref)
