"""A small CNN for 8x8 grey digits (examples/images): three 3x3 convolutions
(the last two of stride 2: 8x8 -> 4x4 -> 2x2) and a linear layer. Stock
modules only, so exact mode converts it (pipeline.exact.convert)."""

from __future__ import annotations

from torch import nn


def small_cnn(input_shape: tuple[int, ...], num_classes: int, *, width: int = 16) -> nn.Module:
    c, h, w = input_shape
    out_h, out_w = (h + 3) // 4, (w + 3) // 4  # two stride-2 convolutions, padding 1
    return nn.Sequential(
        nn.Conv2d(c, width // 2, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(width * out_h * out_w, num_classes))
