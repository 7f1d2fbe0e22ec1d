"""Token models explained through their embeddings (``attribution.embedding``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain_callbacks.attribution import ATTRIBUTIONS, EmbeddingView, IntegratedGradients, find_embedding
from explain_callbacks.metrics import functional as MF

V, T, D = 20, 7, 5


class TokenLSTM(nn.Module):
    """ids (B, T) -> embedding (padding id 0) scaled and shifted by a positional table -> LSTM -> 3 logits."""

    def __init__(self, pad_mask: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, D, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(T, D) * 0.1)
        self.rnn = nn.LSTM(D, 8, batch_first=True)
        self.fc = nn.Linear(8, 3)
        self.pad_mask = pad_mask

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.tok(ids) * 2.0 + self.pos
        h = self.rnn(e)[0]
        if self.pad_mask:  # reads the ids beyond the embedding
            keep = (ids != 0).unsqueeze(-1).float()
            return self.fc((h * keep).sum(1) / keep.sum(1).clamp_min(1))
        return self.fc(h[:, -1])


def _ids(b: int = 4) -> torch.Tensor:
    ids = torch.randint(1, V, (b, T), generator=torch.Generator().manual_seed(0))
    ids[0, -2:] = 0  # padding at the end of the first sequence
    return ids


def test_view_reproduces_the_model_and_ig_matches_captum_layer_ig():
    captum = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    model = TokenLSTM().eval().double()
    ids, t = _ids(), torch.tensor([0, 1, 2, 0])
    view = EmbeddingView(model)
    e = view.embed(ids)
    assert e.shape == (4, T, D) and not e.requires_grad
    torch.testing.assert_close(view(e), model(ids))
    view.check(ids)
    ref_ids = torch.zeros_like(ids)  # the padding token as the reference text
    ours = IntegratedGradients(n_steps=16, rule="gausslegendre", baseline=view.embed(ref_ids))(view, e, t)
    lig = captum.LayerIntegratedGradients(model, model.tok)
    theirs = lig.attribute(ids, baselines=ref_ids, target=t, n_steps=16, method="gausslegendre")
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert not any(m._forward_hooks for m in model.modules())  # the swap hook is removed after each call


def test_mask_methods_and_metrics_work_per_token():
    model = TokenLSTM().eval()
    ids, t = _ids(), torch.tensor([0, 1, 2, 0])
    view = EmbeddingView(model, "tok")
    e = view.embed(ids)
    rise = ATTRIBUTIONS.build("rise", n_masks=64, grid_size=T)(view, e, t)
    assert rise.shape == (4, T, 1)  # masks over the tokens (the LSTM reads (B, T, D)), not the D dims
    sal = ATTRIBUTIONS.build("saliency")(view, e, t)
    assert MF.deletion(view, e, sal, t).shape == (4,)


def test_models_reading_their_ids_beyond_the_embedding_are_refused():
    model = TokenLSTM(pad_mask=True).eval()
    view = EmbeddingView(model)
    with pytest.raises(ValueError, match="reads its token ids beyond the embedding layer"):
        view.check(_ids())
    with pytest.raises(TypeError, match="embed takes token ids"):
        view.embed(torch.zeros(2, T))


def test_find_embedding_names_the_candidates():
    with pytest.raises(ValueError, match=r"has no nn\.Embedding"):
        find_embedding(nn.Linear(3, 2))
    two = nn.ModuleDict({"tok": nn.Embedding(5, 3), "seg": nn.Embedding(2, 3)})
    with pytest.raises(ValueError, match=r"several nn.Embedding layers \['tok', 'seg'\]"):
        find_embedding(two)
    assert find_embedding(two, "seg") is two["seg"]
