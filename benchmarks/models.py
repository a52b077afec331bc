"""Benchmark workloads: an MLP, a small CNN with BatchNorm and a small transformer encoder.

Section 6 (``Trainer.fit``) adds a few of its own, built by the ``*_workload`` functions below:
the README's MLP, the issue's CNN, the MLP on a linear-teacher task and a small ResNet.

Every workload comes with a synthetic, learnable data set (class templates plus noise for the
images, class-dependent token distributions for the sequences), so a few SGD steps give the
loss landscape a realistic, non-random shape. Three scales:

* ``full``  – the sizes the benchmark reports (MLP ~1.07M, CNN ~0.49M, transformer ~0.93M
  parameters);
* ``eigen`` – smaller versions of the same three architectures for the eigenvalue race, where
  every method runs to convergence many times over the whole subsample;
* ``quick`` – toy sizes for ``--quick`` and the smoke test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

NUM_CLASSES = 10


class TokenClassifier(nn.Module):
    """Embedding + learned positions + ``nn.TransformerEncoder`` + mean pooling + linear head."""

    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, NUM_CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.pos).mean(dim=1))


def mlp(widths: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], NUM_CLASSES))
    return nn.Sequential(*layers)


def cnn(channels: tuple[int, ...], image: int, hidden: int) -> nn.Module:
    """Conv(3x3, no bias) -> BatchNorm -> ReLU -> MaxPool(2) blocks, then a two-layer head (one linear
    layer if ``hidden`` is 0)."""
    layers: list[nn.Module] = []
    c_in = 3
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c
    side = image // 2 ** len(channels)
    features = c_in * side * side
    if hidden:
        layers += [nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES)]
    else:
        layers += [nn.Flatten(), nn.Linear(features, NUM_CLASSES)]
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the identity (or a strided 1x1 conv + BN where the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        )  # fmt: skip
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet(channels: tuple[int, ...]) -> nn.Module:
    """Stem conv3x3 3->channels[0] with stride 2 + BN + ReLU, one :class:`ResidualBlock` per stage (every stage
    after the first halves the side again), global average pooling, one linear layer.

    The strided stem (ImageNet ResNets downsample first too) keeps a fit near the CNN's cost: at (16, 32, 64) on
    32x32, about 3.1M multiply-adds a sample against the CNN's 5.6M (12.5M with a stem of stride 1).
    """
    c_in = channels[0]
    layers: list[nn.Module] = [nn.Conv2d(3, c_in, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU()]
    for i, c in enumerate(channels):
        layers.append(ResidualBlock(c_in, c, 1 if i == 0 else 2))
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, NUM_CLASSES)]
    return nn.Sequential(*layers)


@dataclass
class Workload:
    """A model and a generator of labelled batches for it."""

    name: str
    label: str
    model: nn.Module
    sample: Callable[[int, torch.Generator], tuple[Tensor, Tensor]]  # (n, generator) -> (x, y) on CPU

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def batches(self, n: int, batch_size: int, seed: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        """``n`` samples as a list of ``(x, y)`` chunks of ``batch_size`` on ``device``."""
        gen = torch.Generator().manual_seed(seed)
        x, y = self.sample(n, gen)
        x, y = x.to(device), y.to(device)
        return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def _image_sampler(shape: tuple[int, ...], seed: int) -> Callable[[int, torch.Generator], tuple[Tensor, Tensor]]:
    templates = torch.randn(NUM_CLASSES, *shape, generator=torch.Generator().manual_seed(seed))

    def sample(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        x = 0.5 * templates[y] + torch.randn(n, *shape, generator=gen)
        return x, y

    return sample


def _token_sampler(vocab: int, seq_len: int, seed: int) -> Callable[[int, torch.Generator], tuple[Tensor, Tensor]]:
    logits = 2.0 * torch.randn(NUM_CLASSES, vocab, generator=torch.Generator().manual_seed(seed))
    probs = torch.softmax(logits, dim=1)

    def sample(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        x = torch.multinomial(probs[y], seq_len, replacement=True, generator=gen)
        return x, y

    return sample


def _teacher_sampler(dim: int, seed: int, noise: float = 0.5) -> Callable[[int, torch.Generator], tuple[Tensor, Tensor]]:
    """x ~ N(0, I_dim); y = argmax of a random linear map ``W x`` plus Gaussian noise of ``noise`` × the logits' std.

    ``W`` is drawn once from ``seed``; the logits' std is the population one, sqrt(mean_k ||W_k||²), so a
    sample's label does not depend on the batch it is drawn in.
    """
    weight = torch.randn(NUM_CLASSES, dim, generator=torch.Generator().manual_seed(seed))
    scale = noise * weight.pow(2).sum(dim=1).mean().sqrt().item()

    def sample(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, dim, generator=gen)
        logits = x @ weight.T + scale * torch.randn(n, NUM_CLASSES, generator=gen)
        return x, logits.argmax(dim=1)

    return sample


SCALES = {
    # name: (mlp widths, (cnn channels, image side, hidden), (vocab, d_model, layers, heads, seq_len))
    "full": ((784, 1024, 256), ((32, 64, 128), 32, 192), (1000, 128, 4, 4, 16)),
    "eigen": ((196, 256, 128), ((16, 32), 16, 64), (200, 48, 2, 4, 12)),
    "quick": ((64, 64), ((8, 16), 8, 32), (50, 16, 1, 2, 8)),
}


def workloads(scale: str, device: torch.device, names: tuple[str, ...] | None = None, seed: int = 0) -> list[Workload]:
    """The benchmark's models at ``scale`` (``"full"``, ``"eigen"`` or ``"quick"``) on ``device``."""
    widths, (channels, side, hidden), (vocab, d_model, layers, heads, seq_len) = SCALES[scale]
    torch.manual_seed(seed)
    image = int(round((widths[0]) ** 0.5))
    out = [
        Workload(
            "mlp",
            f"MLP {'-'.join(map(str, widths))}-{NUM_CLASSES}",
            mlp(widths),
            _image_sampler((1, image, image), seed),
        ),
        Workload(
            "cnn_bn",
            f"CNN+BN {'-'.join(map(str, channels))} on {side}x{side}",
            cnn(channels, side, hidden),
            _image_sampler((3, side, side), seed + 1),
        ),
        Workload(
            "transformer",
            f"Transformer d={d_model} L={layers} T={seq_len}",
            TokenClassifier(vocab, d_model, layers, heads, seq_len),
            _token_sampler(vocab, seq_len, seed + 2),
        ),
    ]
    out = [w for w in out if names is None or w.name in names]
    for w in out:
        w.model.to(device)
    return out


def _single(
    name: str, label: str, build: Callable[[], nn.Module], sample: Callable, device: torch.device, seed: int
) -> Workload:
    """One workload, its network initialized under ``seed`` and moved to ``device``."""
    torch.manual_seed(seed)
    work = Workload(name, label, build(), sample)
    work.model.to(device)
    return work


def readme_workload(device: torch.device, seed: int = 0) -> Workload:
    """The README's batch-size study model, a 40-256-256-10 MLP, on mnist1d-shaped synthetic data."""
    sample = _image_sampler((40,), seed + 3)
    return _single("mlp", "README MLP 40-256-256-10", lambda: mlp((40, 256, 256)), sample, device, seed)


def issue_cnn_workload(device: torch.device, seed: int = 0) -> Workload:
    """The CNN of the issue's ``Trainer.fit`` measurement: conv32-BN-conv64-BN-linear on 3x32x32 images."""
    return _single("cnn_bn", "CNN conv32-BN-conv64-BN-linear 3x32x32", lambda: cnn((32, 64), 32, 0),
                   _image_sampler((3, 32, 32), seed + 4), device, seed)  # fmt: skip


def teacher_workload(device: torch.device, seed: int = 0, widths: tuple[int, ...] = (40, 256, 256)) -> Workload:
    """The README's MLP on a linear-teacher task, as a user reported it: x ~ N(0, I_40), y = argmax(W x + noise)."""
    label = f"MLP {'-'.join(map(str, widths))}-{NUM_CLASSES}, linear teacher"
    return _single("teacher_mlp", label, lambda: mlp(widths), _teacher_sampler(widths[0], seed + 5), device, seed)


def resnet_workload(device: torch.device, seed: int = 0, channels: tuple[int, ...] = (16, 32, 64), side: int = 32) -> Workload:
    """A small ResNet (:func:`resnet`, one residual block per stage) on the issue CNN's kind of data: 3 x side x side
    class templates plus noise."""
    label = f"ResNet {'-'.join(map(str, channels))} on 3x{side}x{side}"
    return _single("resnet", label, lambda: resnet(channels), _image_sampler((3, side, side), seed + 6), device, seed)


def train_briefly(work: Workload, steps: int, device: torch.device, seed: int = 0, lr: float = 0.05) -> None:
    """A few SGD steps in train mode, so the landscape is not the one at initialization."""
    model = work.model
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 1000)
    for _ in range(steps):
        x, y = work.sample(64, gen)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
