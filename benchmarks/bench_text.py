"""Token models: how well each method finds the planted keyword, and what explaining a text probe costs.

The small transformer (explain_callbacks.models.TokenTransformer) is trained on the planted-keyword sentences
(explain_callbacks.datasets.text) with a plain loop; on ``--n-test`` held-out sentences, each method explains the
target logit in the space of the token embeddings (``TokenProbe``). Per method and per-token reduction (sum over
the embedding dims, L2 norm): how often the top token is the keyword (chance: the mean of 1 / sentence length),
the deletion AUC by token (removed tokens replaced by ``<mask>``, padding left out; lower is better; the oracle
deletes the keyword first) and the seconds the method took on the whole test set.

Run: ``.venv/bin/python benchmarks/bench_text.py`` (about a minute on 2 CPU cores); ``--epochs`` and ``--n-train``
change the training.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from explain_callbacks.attribution import ATTRIBUTIONS, TokenProbe
from explain_callbacks.datasets import TEXT_VOCAB, TextKeywordDataModule, make_keyword_text
from explain_callbacks.metrics.functional import deletion
from explain_callbacks.models import TokenTransformer

METHODS = {
    "saliency": {},
    "saliency (abs)": {"name": "saliency", "abs": True},
    "input_x_gradient": {},
    "ig (16 steps)": {"name": "ig", "n_steps": 16},
    "smoothgrad": {"n_samples": 16},
    # a window of one whole token (1 step x all D dims), filled with zeros: the padding's embedding
    "occlusion (1 token)": {"name": "occlusion", "window": (1, 16), "stride": (1, 16), "channels_first": False},
    "rise": {"n_masks": 256},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    t = 16
    ids, y, kw = make_keyword_text(args.n_train + args.n_test, max_len=t, seed=0)
    net = TokenTransformer(len(TEXT_VOCAB), 2, max_len=t, d_model=16, dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), 5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(args.epochs):
        for b in torch.randperm(args.n_train, generator=g).split(50):
            loss = nn.functional.cross_entropy(net(ids[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    ids, y, kw = ids[args.n_train :], y[args.n_train :], kw[args.n_train :]
    with torch.no_grad():
        acc = float((net(ids).argmax(1) == y).float().mean())
    probe = TokenProbe.of(net, ids, substrate_token=TextKeywordDataModule.mask_id)
    chance = float((1.0 / probe.valid.sum(1).float()).mean())
    rows = torch.arange(len(y))
    kw_ = dict(substrate=probe.substrate, features="pixel", channels_first=False, keep=probe.valid, n_steps=t)
    oracle = float(deletion(probe.view, probe.embedded, kw.float().unsqueeze(-1), y, **kw_).mean())
    print(f"test accuracy {acc:.3f} on {len(y)} sentences; chance of hitting the keyword {chance:.3f}; "
          f"deletion AUC with the keyword first (oracle) {oracle:.3f}\n")  # fmt: skip
    print("| method | reduce | top token = keyword | deletion AUC | seconds |")
    print("|---|---|---|---|---|")
    for label, spec in METHODS.items():
        method = ATTRIBUTIONS.build({"name": spec.get("name", label), **{k: v for k, v in spec.items() if k != "name"}})
        start = time.perf_counter()
        maps = method(probe.view, probe.embedded, y)
        seconds = time.perf_counter() - start
        for reduce in ("sum", "norm"):
            if maps.shape[-1] == 1 and reduce == "norm":
                continue  # one value per token already (mask methods)
            scores = probe.scores(maps, reduce)
            hits = float(kw[rows, scores.argmax(1)].float().mean())
            auc = float(deletion(probe.view, probe.embedded, scores.unsqueeze(-1), y, **kw_).mean())
            print(f"| {label} | {reduce} | {hits:.2f} | {auc:.3f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
