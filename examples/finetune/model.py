"""Fine-tuning a pretrained backbone: the digits MLP's first two layers,
trained on the ten digit classes and saved as ``backbone`` (a safetensors
file in this project's data manifest, verified like data), frozen, with a new
head for another task: whether a digit is odd.

``pipeline.pretrained(name)`` reads a file the manifest lists, checks its
sha256 against the run's verified manifest, and records it in the run key;
the frozen layers never move and get no optimiser state; in exact mode they
keep the loaded values (the same on every machine), and the head is drawn
from the spec's generator.
"""

from __future__ import annotations

import torch
from torch import nn

import pipeline


def finetune(input_shape: tuple[int, ...], num_classes: int, *, backbone: str = "backbone",
             freeze: bool = True) -> nn.Module:
    """Flatten, the pretrained Linear 64 -> 64 and 64 -> 32 (ReLU after each),
    then a new Linear 32 -> ``num_classes``."""
    weights = pipeline.pretrained(backbone)  # {"fc0.weight", "fc0.bias", "fc1.weight", ...}
    body = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32),
                         nn.ReLU())
    with torch.no_grad():
        for i, layer in ((0, body[1]), (1, body[3])):
            layer.weight.copy_(weights[f"fc{i}.weight"])
            layer.bias.copy_(weights[f"fc{i}.bias"])
    if freeze:
        body.requires_grad_(False)
    return nn.Sequential(body, nn.Linear(32, num_classes))
