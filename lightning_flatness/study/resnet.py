"""The architecture study's models (Li et al. 2018): small ResNets with and without skip connections.

An architecture is written ``res<depth>x<width>`` (``res8x16``: 8 residual blocks of 16 channels) or
``plain<depth>x<width>`` (the same network without the identity shortcuts). The network is

    stem: conv(1 → width, 3) → BatchNorm → ReLU
    depth × block: conv(width → width, 3) → BatchNorm → ReLU → conv(width → width, 3) → BatchNorm
                   (+ the block's input with skip connections) → ReLU
    head: global average pool → linear(width → classes)

one convolution per stem, two per block, no bias in the convolutions (BatchNorm has one), so
``res<d>x<w>`` and ``plain<d>x<w>`` have the same layers, the same parameters and, built after the same
``torch.manual_seed``, the same initial weights: they differ only by the identity shortcuts, which
have no parameters (every block keeps the width and the resolution, so no projection is needed).

Inputs are the study's flat ``(B, D)`` rows: a square ``D`` is a single-channel ``√D x √D`` image and
the convolutions are 2-D (MNIST's 28x28, the digits' 8x8), any other ``D`` a one-channel sequence of
length ``D`` with 1-D convolutions (mnist1d's 40). A 2-D stem of side ≥ 16 has stride 2 (28x28 → 14x14),
which keeps the 2-D network's blocks 4x cheaper on a CPU.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ARCHITECTURE = re.compile(r"(?P<kind>res|plain)(?P<depth>\d+)x(?P<width>\d+)")
ARCHITECTURE_FORMAT = "res<depth>x<width> or plain<depth>x<width> (e.g. res8x16, plain8x16)"
STRIDED_STEM_SIDE = 16  # 2-D images at least this large get a stride-2 stem


@dataclass(frozen=True)
class Architecture:
    """``depth`` residual blocks of ``width`` channels, with identity shortcuts when ``skip``."""

    depth: int
    width: int
    skip: bool = True

    @property
    def name(self) -> str:
        """``res8x16`` / ``plain8x16``: how configurations and the command line name it."""
        return f"{'res' if self.skip else 'plain'}{self.depth}x{self.width}"

    @property
    def twin(self) -> Architecture:
        """The same depth and width with the shortcuts the other way (``res8x16`` ↔ ``plain8x16``)."""
        return Architecture(self.depth, self.width, not self.skip)


def parse_architecture(text: str) -> Architecture:
    """``"res8x16"`` → ``Architecture(8, 16, skip=True)``; a ``ValueError`` naming the text otherwise."""
    match = ARCHITECTURE.fullmatch(text.strip())
    depth, width = (int(match["depth"]), int(match["width"])) if match else (0, 0)
    if depth < 1 or width < 1:
        raise ValueError(f"architecture {text!r} is not of the form {ARCHITECTURE_FORMAT}, with depth and width >= 1.")
    return Architecture(depth, width, match["kind"] == "res")


def input_shape(in_features: int) -> tuple[int, ...]:
    """``(1, side, side)`` for a square number of features, else ``(1, in_features)``: see the module's doc."""
    side = math.isqrt(in_features)
    return (1, side, side) if side * side == in_features else (1, in_features)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the input when ``skip``, then ReLU (He et al. 2016's basic block)."""

    def __init__(self, width: int, dims: int, skip: bool) -> None:
        super().__init__()
        conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.skip = skip
        self.body = nn.Sequential(
            conv(width, width, 3, padding=1, bias=False), norm(width), nn.ReLU(),
            conv(width, width, 3, padding=1, bias=False), norm(width),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return torch.relu(out + x if self.skip else out)


class ResNet(nn.Module):
    """A small ResNet (or its no-skip twin) on the study's flat rows; see the module's doc.

    Args:
        in_features: features per row (40 for mnist1d: 1-D; 784 for MNIST: 2-D, 28x28).
        num_classes: outputs.
        architecture: depth, width and whether the blocks have their identity shortcuts.
    """

    def __init__(self, in_features: int, num_classes: int, architecture: Architecture) -> None:
        super().__init__()
        self.shape = input_shape(in_features)
        self.architecture = architecture
        dims, width = len(self.shape) - 1, architecture.width
        conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        stride = 2 if dims == 2 and self.shape[-1] >= STRIDED_STEM_SIDE else 1
        self.stem = nn.Sequential(conv(1, width, 3, stride=stride, padding=1, bias=False), norm(width), nn.ReLU())
        self.blocks = nn.Sequential(*(ResidualBlock(width, dims, architecture.skip) for _ in range(architecture.depth)))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.blocks(self.stem(x.reshape(-1, *self.shape)))
        return self.head(features.flatten(2).mean(2))  # global average pool over positions
