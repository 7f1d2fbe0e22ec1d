"""Held-out-style models for the benchmarks: architectures the project's methods were never tuned on.

Four seeded, CPU-sized classifiers, each with its own small data and a short seeded training run (so
maps and metric values are those of a model that learned something, not of a random network):

- ``resnet``: a small ResNet (He et al. 2016, "Deep residual learning for image recognition"):
  a 3x3 stem, 3 stages x 2 basic residual blocks 16/32/64 wide, BatchNorm, global average pooling;
  inputs 3x32x32 (the procedural shapes, 4 classes);
- ``mlp``: a tabular MLP (30 -> 64 -> 64 -> 2, BatchNorm1d) on a seeded Gaussian task whose label
  depends on 5 of the 30 features;
- ``lstm``: a one-layer LSTM sequence classifier on (B, T=32, D=8) continuous sequences;
- ``transformer``: a 2-layer transformer encoder (d_model 32, 4 heads, learned positions, mean
  pooling) on the same sequences.

    from heldout_models import build
    model, x, y = build("resnet", n=32)      # model in eval mode, a probe batch and its labels
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MODELS = ("resnet", "mlp", "lstm", "transformer")
SEQ_T, SEQ_D, TAB_D = 32, 8, 30


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1 strided) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.short: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(h)) + self.short(x))


class SmallResNet(nn.Module):
    """3 stages x 2 basic blocks, 16/32/64 channels, on 3x32x32 images."""

    def __init__(self, num_classes: int = 4, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks: list[nn.Module] = []
        c = widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(c, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            c = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


class TabularMLP(nn.Module):
    def __init__(self, d_in: int = TAB_D, hidden: int = 64, num_classes: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class LSTMClassifier(nn.Module):
    """(B, T, D) -> an LSTM -> the last hidden state -> logits."""

    def __init__(self, d_in: int = SEQ_D, hidden: int = 32, num_classes: int = 2) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class TransformerClassifier(nn.Module):
    """(B, T, D) -> a linear embedding + learned positions -> 2 encoder layers -> mean pool -> logits."""

    def __init__(self, d_in: int = SEQ_D, d_model: int = 32, n_heads: int = 4, n_layers: int = 2,
                 t_max: int = SEQ_T, num_classes: int = 2) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.pos = nn.Parameter(torch.zeros(1, t_max, d_model))
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos[:, : x.shape[1]]
        return self.head(self.encoder(h).mean(1))


def data(name: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` seeded rows of the model's task: (inputs, labels)."""
    g = torch.Generator().manual_seed(seed)
    if name == "resnet":
        from explain_callbacks.datasets.shapes import make_shapes

        d = make_shapes(n, size=32, seed=seed)
        return d.x, d.y
    if name == "mlp":
        x = torch.randn(n, TAB_D, generator=g)
        return x, (x[:, :5].sum(1) + 0.5 * x[:, 0] * x[:, 1] > 0).long()
    if name in ("lstm", "transformer"):
        x = torch.randn(n, SEQ_T, SEQ_D, generator=g)
        # the label: the sign of a signal in channel 0 over steps 8..15 (a localised pattern)
        return x, (x[:, 8:16, 0].sum(1) > 0).long()
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def make(name: str) -> nn.Module:
    """The untrained architecture, seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return {"resnet": SmallResNet, "mlp": TabularMLP, "lstm": LSTMClassifier,
                "transformer": TransformerClassifier}[name]()  # fmt: skip


def build(
    name: str, n: int = 32, train_rows: int = 512, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Tensor, Tensor]:
    """The model trained for one seeded pass over ``train_rows`` rows (batches of 64, Adam), in eval
    mode with frozen parameters, and a probe batch of ``n`` held-out rows with labels, on ``device``."""
    model = make(name)
    xt, yt = data(name, train_rows, seed=1)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(2 if name == "resnet" else 6):
            perm = torch.randperm(train_rows)
            for i in range(0, train_rows, 64):
                idx = perm[i : i + 64]
                loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = data(name, n, seed=123)
    return model.to(device), x.to(device), y.to(device)
