"""A small ResNet for 8x8 grey digits (examples/resnet): a 3x3 stem with
BatchNorm and max pooling (8x8 -> 4x4), two residual stages of BasicBlocks
(the second downsamples by a strided convolution, with a 1x1 projection
shortcut: 4x4 -> 2x2), global average pooling and a linear head. Stock
modules only, so exact mode converts it (pipeline.exact.from_torch); BatchNorm
normalises each shard by its own rows in both modes."""

from __future__ import annotations

from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm; the shortcut is the identity, or a
    strided 1x1 convolution with BatchNorm where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, channels: int, num_classes: int, widths: tuple[int, ...],
                 blocks: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(),
                                  nn.MaxPool2d(3, stride=2, padding=1))
        stages, c = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                stages.append(BasicBlock(c, w, stride=2 if i > 0 and b == 0 else 1))
                c = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pool(self.stages(self.stem(x)))
        return self.fc(h.flatten(1))


def resnet(input_shape: tuple[int, ...], num_classes: int, *, widths: tuple[int, ...] = (16, 32),
           blocks: int = 1) -> nn.Module:
    """``input_shape`` is (C, H, W) from the dataset."""
    return ResNet(input_shape[0], num_classes, tuple(widths), blocks)
