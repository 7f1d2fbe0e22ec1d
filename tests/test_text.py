"""Token models in the callbacks: integer-id probes explained through their embeddings, padding, token metrics and
heatmaps, on the planted-keyword text data and the small transformer (``docs/text.md``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from explain_callbacks.attribution import ATTRIBUTIONS, TokenProbe, token_scores
from explain_callbacks.callbacks import AttributionMonitor
from explain_callbacks.callbacks.attribution_monitor import token_method_settings, token_metric_settings
from explain_callbacks.datasets import KEYWORDS, TEXT_VOCAB, TextKeywordDataModule, make_keyword_text
from explain_callbacks.metrics import METRICS
from explain_callbacks.metrics import functional as MF
from explain_callbacks.models import LitClassifier, TokenTransformer
from explain_callbacks.viz import token_figure, token_markdown

from .helpers_lightning import event_tags, trainer

V = len(TEXT_VOCAB)
T = 16


# ---------------------------------------------------------------- the data set
def test_keyword_data_plants_one_keyword_that_decides_the_label():
    ids, y, kw = make_keyword_text(500, max_len=T, min_len=6, seed=3)
    assert ids.shape == kw.shape == (500, T) and ids.dtype == torch.long
    neg = torch.arange(2, 2 + len(KEYWORDS[0]))
    pos = torch.arange(2 + len(KEYWORDS[0]), 2 + len(KEYWORDS[0]) + len(KEYWORDS[1]))
    is_kw = torch.isin(ids, torch.cat([neg, pos]))
    assert torch.equal(is_kw, kw) and bool((kw.sum(1) == 1).all())  # exactly one keyword, where the mask says
    assert torch.equal(torch.isin(ids[kw], pos).long(), y)  # a positive keyword <=> label 1
    lengths = (ids != 0).sum(1)
    assert int(lengths.min()) >= 6 and int(lengths.max()) == T
    assert bool((ids[torch.arange(T) >= lengths[:, None]] == 0).all())  # right-padded, no padding inside
    assert not bool((ids == 1).any())  # <mask> never occurs in the data
    assert 0.4 < float(y.float().mean()) < 0.6
    torch.manual_seed(0)
    again = make_keyword_text(500, max_len=T, min_len=6, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((ids, y, kw), again))


# ---------------------------------------------------------------- a trained transformer (plain loop, a few seconds)
@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    ids, y, kw = make_keyword_text(700, max_len=T, seed=0)
    net = TokenTransformer(V, 2, max_len=T, d_model=16, dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), 5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        for b in torch.randperm(600, generator=g).split(50):
            loss = nn.functional.cross_entropy(net(ids[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    test = slice(600, 700)
    with torch.no_grad():
        acc = float((net(ids[test]).argmax(1) == y[test]).float().mean())
    assert acc >= 0.95, acc
    return net, ids[test], y[test], kw[test]


@pytest.mark.parametrize(
    "method,reduce,least", [("ig", "sum", 0.9), ("saliency", "norm", 0.25), ("input_x_gradient", "sum", 0.3)]
)
def test_top_token_is_the_keyword(trained, method, reduce, least):
    """The maps of a trained model put the top token on the planted keyword above chance (1 / real tokens, about
    0.1): IG nearly always (measured 0.96), the plain gradient methods less often (0.36, 0.48: gradients of a
    transformer also follow the attention, see docs/text.md)."""
    net, ids, y, kw = trained
    probe = TokenProbe.of(net, ids)
    kwargs = {"n_steps": 16} if method == "ig" else {}
    maps = ATTRIBUTIONS.build(method, **kwargs)(probe.view, probe.embedded, y)
    scores = probe.scores(maps, reduce)
    hits = float(kw[torch.arange(len(y)), scores.argmax(1)].float().mean())
    chance = float((1.0 / probe.valid.sum(1).float()).mean())
    assert hits >= least and hits > 2.5 * chance, (hits, chance)


def test_occlusion_occludes_whole_tokens_on_token_probes(trained):
    """Occlusion's default window (4 steps x 1 embedding dim) fits no token: on token probes it occludes one token
    per window, which finds the keyword (the default window: 41% of the sentences)."""
    net, ids, y, kw = trained
    probe = TokenProbe.of(net, ids)
    occ = ATTRIBUTIONS.build("occlusion")
    with token_method_settings(occ, 16):
        assert occ.window == occ.stride == (1, 16) and occ.channels_first is False
        scores = probe.scores(occ(probe.view, probe.embedded, y))
    assert occ.window is None and occ.stride is None and occ.channels_first is None  # restored
    assert float(kw[torch.arange(len(y)), scores.argmax(1)].float().mean()) >= 0.9
    own = ATTRIBUTIONS.build({"name": "occlusion", "window": (2, 16), "stride": (1, 16)})
    with token_method_settings(own, 16):  # the user's window is kept
        assert own.window == (2, 16)


def test_deletion_by_token_drops_fastest_when_the_keyword_goes_first(trained):
    net, ids, y, kw = trained
    probe = TokenProbe.of(net, ids, substrate_token=1)
    first = kw.float().unsqueeze(-1)  # the keyword first, the other tokens in random order
    last = (1 - kw.float()).unsqueeze(-1)  # the keyword last
    kw_ = dict(substrate=probe.substrate, features="pixel", channels_first=False, keep=probe.valid, n_steps=T)
    auc_first, curve_first, xs = MF.deletion(probe.view, probe.embedded, first, y, return_curve=True, **kw_)
    auc_last = MF.deletion(probe.view, probe.embedded, last, y, **kw_)
    ig = probe.scores(ATTRIBUTIONS.build("ig", n_steps=16)(probe.view, probe.embedded, y)).unsqueeze(-1)
    auc_ig = MF.deletion(probe.view, probe.embedded, ig, y, **kw_)
    assert bool((auc_first < auc_last).all())
    assert float(auc_first.mean()) < float(auc_last.mean()) - 0.2
    assert float(auc_ig.mean()) < float(auc_first.mean()) + 0.05  # IG is about as good as the oracle
    # deleting the keyword alone takes the score down; deleting other tokens first does not
    _, curve_last, _ = MF.deletion(probe.view, probe.embedded, last, y, return_curve=True, **kw_)
    one = int(((xs * 6).ceil() >= 1).float().argmax())  # the first point where every sample lost a token
    assert float(curve_first[:, one].mean()) < float(curve_last[:, one].mean()) - 0.3
    assert bool((curve_first.mean(0) <= curve_last.mean(0) + 1e-6).all())


# ---------------------------------------------------------------- padding, substrate, per-token reduction
def test_keep_leaves_padding_alone_and_each_curve_spans_its_own_tokens():
    """Against a closed form: on a linear model of the embeddings (logit = sum of w . e over positions), the
    deletion curve with keep= at point k removes exactly the ceil(k n_i / S) top real tokens of sample i."""
    torch.manual_seed(0)
    b, t, d, steps = 3, 6, 4, 4
    w = torch.randn(d, dtype=torch.float64)

    class Linear(nn.Module):
        def forward(self, e):
            return torch.stack([(e @ w).sum(1), torch.zeros(e.shape[0], dtype=e.dtype)], 1)

    x = torch.randn(b, t, d, dtype=torch.float64)
    keep = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    rel = torch.randn(b, t, 1, dtype=torch.float64)
    sub = torch.randn(d, dtype=torch.float64)
    curve, xs = MF.perturbation_curve(Linear(), x, rel, torch.zeros(b, dtype=torch.long), substrate=sub,
                                      features="pixel", channels_first=False, keep=keep, n_steps=steps,
                                      output="logit")  # fmt: skip
    big_s = 3  # n_steps=4 over 6 tokens: 2 tokens a step, 3 steps
    torch.testing.assert_close(xs, torch.arange(big_s + 1, dtype=torch.float64) / big_s)
    for i in range(b):
        n_i = int(keep[i].sum())
        order = [j for j in rel[i, :, 0].argsort(descending=True).tolist() if keep[i, j]]
        for k in range(big_s + 1):
            e = x[i].clone()
            e[order[: math.ceil(k * n_i / big_s)]] = sub
            torch.testing.assert_close(curve[i, k], (e @ w).sum())
    # insertion: the padding shows its input from the start, real tokens start as the substrate
    curve_in, _ = MF.perturbation_curve(Linear(), x, rel, torch.zeros(b, dtype=torch.long), mode="insertion",
                                        substrate=sub, features="pixel", channels_first=False, keep=keep,
                                        n_steps=steps, output="logit")  # fmt: skip
    start = torch.where(keep[..., None], sub.expand_as(x), x)
    torch.testing.assert_close(curve_in[:, 0], (start @ w).sum(1))
    torch.testing.assert_close(curve_in[:, -1], (x @ w).sum(1))
    with pytest.raises(ValueError, match="keep has 6 features per sample, the map 24"):
        MF.deletion(Linear(), x, rel.expand_as(x), torch.zeros(b, dtype=torch.long), features="element", keep=keep)


def test_token_probe_padding_substrate_and_reduction(trained):
    net, ids, _, _ = trained
    probe = TokenProbe.of(net, ids)
    assert probe.pad_id == 0 and probe.substrate_id == 0 and torch.equal(probe.valid, ids != 0)
    torch.testing.assert_close(probe.substrate, torch.zeros(16))  # the padding row (padding_idx) is zero
    mask = TokenProbe.of(net, ids, substrate_token=1)
    torch.testing.assert_close(mask.substrate, net.tok.weight[1].detach())
    maps = torch.randn(*ids.shape, 16)
    s, n = probe.scores(maps, "sum"), probe.scores(maps, "norm")
    assert bool((s[ids == 0] == 0).all()) and bool((n[ids == 0] == 0).all())
    torch.testing.assert_close(s[ids != 0], maps.sum(-1)[ids != 0])
    torch.testing.assert_close(n[ids != 0], maps.norm(dim=-1)[ids != 0])
    torch.testing.assert_close(token_scores(maps[..., :1], "norm"), maps[..., 0].abs())  # (B,T,1) mask maps
    with pytest.raises(ValueError, match="token_reduce must be one of"):
        token_scores(maps, "mean")
    with pytest.raises(ValueError, match="substrate_token=99 is not a token id"):
        TokenProbe.of(net, ids, substrate_token=99)
    with pytest.raises(TypeError, match="token probes are"):
        TokenProbe.of(net, ids.float())
    plain = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))  # no padding_idx: no padding, zeros
    p = TokenProbe.of(plain, torch.tensor([[0, 1]]))
    assert p.pad_id is None and bool(p.valid.all()) and bool((p.substrate == 0).all())


def test_token_metric_settings_are_restored():
    metric = METRICS.build("deletion")
    sub, valid = torch.ones(4), torch.ones(2, 3, dtype=torch.bool)
    with token_metric_settings(metric, sub, valid):
        assert metric.substrate is sub and metric.features == "pixel" and metric.channels_first is False
        assert metric.keep is valid
    assert (metric.substrate, metric.features, metric.channels_first, metric.keep) == ("zeros", "auto", None, None)
    own = METRICS.build({"name": "insertion", "substrate": 0.5, "features": "element"})
    with token_metric_settings(own, sub, valid):  # the user's float substrate and element features are kept
        assert own.substrate == 0.5 and own.features == "element" and own.keep is None


# ---------------------------------------------------------------- the monitor
class TwoEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, 8, padding_idx=0)
        self.seg = nn.Embedding(2, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        return self.head((self.tok(ids) + self.seg(torch.zeros_like(ids))).mean(1))


class MasksItsPadding(nn.Module):
    """Averages over the real tokens, found from the ids: a function of more than its embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, 8, padding_idx=0)
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        keep = (ids != 0).unsqueeze(-1).float()
        return self.head((self.tok(ids) * keep).sum(1) / keep.sum(1))


def _fit(tmp_path, monitor, net=None, epochs=2, logger=True):
    torch.manual_seed(0)
    dm = TextKeywordDataModule(n_samples=240, max_len=T, batch_size=40, seed=0)
    net = net or TokenTransformer(V, 2, max_len=T, d_model=16)
    model = LitClassifier(net, lr=5e-3)
    cbs = [monitor] if monitor is not None else []
    tr = trainer(tmp_path, cbs, max_epochs=epochs, logger=logger)
    tr.fit(model, dm)
    return model


def test_monitor_explains_token_ids_with_metrics_figure_and_text(tmp_path):
    mon = AttributionMonitor(methods=["saliency", {"name": "ig", "n_steps": 8}, {"name": "rise", "n_masks": 32}],
                             metrics=[{"name": "deletion", "n_steps": 8}, "insertion"], num_samples=4,
                             strict=True, budget=None)  # fmt: skip
    _fit(tmp_path, mon)
    assert mon.vocab is not None and mon.vocab[:2] == ["<pad>", "<mask>"]  # found on the data module
    ids = mon.probe_x
    assert ids.dtype == torch.long and bool((ids == 0).any())  # the probe holds padding
    for name in ("saliency", "ig", "rise"):
        prev = mon.previous[name]
        assert prev.shape == (4, T, 1)
        assert bool((prev[..., 0][ids == 0] == 0).all())  # padding gets zero attribution
        assert {"deletion", "insertion", "sparseness", "drift"} <= set(mon.last_scores[name])
    tags = event_tags(tmp_path)
    assert {"maps/attributions", "faithfulness/deletion_curve"} <= tags["images"]
    assert any(t.startswith("maps/tokens") for t in tags["text"])
    assert "faithfulness/deletion/ig" in tags["scalars"]


def test_monitor_names_the_embedding_or_says_which_to_name(tmp_path):
    mon = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4, strict=True)
    with pytest.raises(ValueError, match=r"several nn.Embedding layers \['net.tok', 'net.seg'\]; pass embedding="):
        _fit(tmp_path, mon, TwoEmbeddings(), epochs=1, logger=False)
    lenient = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4)  # not strict: a warning
    with pytest.warns(UserWarning, match=r"token ids could not be explained \(.*several nn.Embedding layers"):
        _fit(tmp_path, lenient, TwoEmbeddings(), epochs=1, logger=False)
    assert not lenient.last_scores
    reads_ids = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4, strict=True)
    with pytest.raises(ValueError, match="reads its token ids beyond the embedding layer"):
        _fit(tmp_path, reads_ids, MasksItsPadding(), epochs=1, logger=False)
    named = AttributionMonitor(budget=None, methods=["saliency"], num_samples=4, strict=True, embedding="net.tok")
    _fit(tmp_path, named, TwoEmbeddings(), epochs=1, logger=False)
    assert named.last_scores["saliency"]["seconds"] >= 0
    with pytest.raises(ValueError, match="token_reduce must be one of"):
        AttributionMonitor(token_reduce="max")


def test_weights_bit_identical_with_the_monitor_on(tmp_path):
    mon = AttributionMonitor(methods=["saliency", {"name": "ig", "n_steps": 4}], metrics=[{"name": "deletion",
                             "n_steps": 4}], num_samples=4, strict=True, budget=None)  # fmt: skip
    with_cb = _fit(tmp_path / "a", mon, logger=False)
    without = _fit(tmp_path / "b", None, logger=False)
    assert mon.last_scores  # it did explain
    for (k, a), (_, b) in zip(with_cb.state_dict().items(), without.state_dict().items()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------- pictures
def test_token_figure_and_markdown():
    words = [["a", "great", "film"], ["awful", "plot"]]
    scores = {"ig": torch.tensor([[0.1, 0.9, -0.2], [0.8, 0.1, 0.0]]), "norm": torch.tensor([[0.1, 0.5, 0.2],
                                                                                              [0.3, 0.2, 0.0]])}
    fig = token_figure(words, scores, captions=["true positive · pred positive (0.97)", "true negative · pred "
                                                 "negative (0.91)"], wrong=[False, True], title="t")  # fmt: skip
    texts = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert {"a", "great", "film", "awful", "plot", "ig", "norm", "true positive · pred positive (0.97)"} <= texts
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 2  # one colour bar per method
    great = next(t for ax in fig.axes for t in ax.texts if t.get_text() == "great")
    a = next(t for ax in fig.axes for t in ax.texts if t.get_text() == "a")
    # the top token's background is the red end of the diverging map, a small score's nearly white
    red = great.get_bbox_patch().get_facecolor()
    assert red[0] > red[1] + 0.3 and red[0] > red[2] + 0.2 and great.get_color() == "white"
    assert min(a.get_bbox_patch().get_facecolor()[:3]) > 0.75 and a.get_color() == "black"
    md = token_markdown(words, scores, top=1)
    assert "**great**`+0.9`" in md and "**awful**`+0.8`" in md and "film`-0.2`" in md


def test_token_figure_without_matplotlib(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    img = token_figure([["a", "b"]], {"ig": torch.tensor([[0.5, -0.5]])})
    assert isinstance(img, torch.Tensor) and img.shape[0] == 3


class _DictText(torch.utils.data.Dataset):
    """Dict batches whose padding id (9, the filler "the"... any real word) also occurs as a real token: only the
    attention mask tells the padding apart."""

    def __init__(self, n: int) -> None:
        ids, self.y, _ = make_keyword_text(n, max_len=T, seed=1)
        self.att = (ids != 0).long()
        self.ids = torch.where(ids == 0, torch.full_like(ids, 9), ids)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.ids[i], "y": self.y[i], "attention_mask": self.att[i]}


def test_attention_mask_key_marks_the_padding(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    data = _DictText(120)
    train, val = DataLoader(data, batch_size=40), DataLoader(data, batch_size=40)
    mon = AttributionMonitor(budget=None, methods=["input_x_gradient"], metrics=[{"name": "deletion", "n_steps": 4}],
                             num_samples=6, per_class=3, attention_mask_key="attention_mask", strict=True)  # fmt: skip
    model = LitClassifier(TokenTransformer(V, 2, max_len=T, d_model=8), lr=5e-3)
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[mon]).fit(model, train, val)  # fmt: skip
    ids, att = mon.probe_x, mon.probe_attention
    # per_class picks rows out of order: each captured mask is its own row's
    rows = [int((data.ids == r).all(1).nonzero()[0]) for r in ids]
    assert torch.equal(att, data.att[rows])
    scores = mon.previous["input_x_gradient"][..., 0]
    assert bool((scores[att == 0] == 0).all())
    real_nines = (ids == 9) & (att == 1)
    assert bool(real_nines.any()) and bool((scores[real_nines] != 0).all())  # the real word 9 keeps its score
    assert "deletion" in mon.last_scores["input_x_gradient"]
    with pytest.raises(ValueError, match="the attention mask has shape"):
        TokenProbe.of(model.net, ids, attention_mask=att[:, :3])


@pytest.mark.ddp
@pytest.mark.slow
def test_token_monitor_under_ddp():
    """2 gloo processes: metrics reduced identically on both ranks, padding zero on each rank's shard, and a token
    probe that fails on one rank skips the epoch on both (no hang)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONWARNINGS="ignore", PL_DISABLE_FORK="1")
    out = subprocess.run([sys.executable, str(root / "tests" / "scripts" / "ddp_tokens.py")], capture_output=True,
                         text=True, timeout=240, env=env, cwd=root)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "DDP_TOKENS_OK" in out.stdout
