"""``Model``: a finished run's trained network as a ``torch.nn.Module``, for
inference: ``model(x)`` and ``model.predict(x)`` give the logits the training
loop's test metric was computed from (evaluation mode, no dropout, no
gradients), through the run's own numeric mode's network (pipeline.modes).

``model.module`` is the trained module itself: the factory's stock module in
pinned mode, the exact-layer module in exact mode (pipeline.exact.from_torch
of the factory's module, or, for the built-in ``mlp`` and ``cnn``, the spec's
network as an ``ExactModule``). ``model.state()`` holds the tensors the
weights file holds, under the same names; ``model.weights_sha256()`` is
their canonical hash, the one run.json records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..core.hashing import weights_sha256
from ..data.task import Task
from ..record.schema import RunRecord
from ..train.net import Net

if TYPE_CHECKING:
    from ..data.standardize import Standardizer

__all__ = ["Model", "ExactModule", "Shapes"]


@dataclass(frozen=True)
class Shapes:
    """What the model was built for, from the run's dataset: one example's
    input shape, the classes (the vocabulary's size for a language model),
    the task, the vocabulary of a text dataset (characters, or a tokenizer's
    tokens), and a tokenized one's tokenizer file with its sha256."""

    task: Task
    input_shape: tuple[int, ...]
    num_classes: int
    vocabulary: tuple[str, ...] | None
    tokenizer: tuple[Path, str] | None = None


class ExactModule(nn.Module):
    """The spec's MLP or CNN (pipeline.exact.ExactNet, explicit forward and
    backward, no module of its own) as an ``nn.Module``: its parameters are the
    net's tensors (shared memory), named as in the weights file; ``forward``
    is the net's evaluation forward."""

    def __init__(self, net: Any) -> None:
        super().__init__()
        self.net = net
        for name, tensor in net.params.items():
            layer, _, kind = name.rpartition(".")
            if not hasattr(self, layer):
                self.add_module(layer, nn.Module())
            getattr(self, layer).register_parameter(kind, nn.Parameter(tensor,
                                                                       requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.predict(x)


class Model(nn.Module):
    """A run's trained network (see the module docstring). Built by
    ``pipeline.load``, which checks its weights against run.json."""

    def __init__(self, net: Net, record: RunRecord, run_dir: Path, shapes: Shapes) -> None:
        super().__init__()
        inner = getattr(net, "module", None)
        self.module = inner if isinstance(inner, nn.Module) else ExactModule(net)
        self.module.eval()
        self.net = net  # the mode's network (pipeline.train.net.Net): predict() is the loop's
        self.record, self.run_dir, self.shapes = record, Path(run_dir), shapes

    @property
    def context(self) -> int:
        """Tokens per example of a language model (0 for classification)."""
        return int(self.record.config["data"]["context"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.predict(x)

    @property
    def standardizer(self) -> Standardizer | None:
        """The per-column statistics the run's inputs were standardised by
        (``data.standardize``; checked by ``pipeline.load``), or None. Its
        ``apply`` maps raw rows into the model's input space."""
        raw = self.record.data.get("standardize")
        if raw is None:
            return None
        from ..data.standardize import Standardizer

        return Standardizer.from_json(raw, f"{self.run_dir / 'run.json'} [data.standardize]")

    @torch.no_grad()
    def predict(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Logits for a batch of inputs in the model's input space: float32
        ``(N, *input_shape)`` (classification; standardised by ``standardizer``
        where the run's data was), int64 token ids ``(N, T)``
        (language model; logits ``(N, T, classes)``). A NumPy array is
        converted to the task's dtype first."""
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=self.shapes.task.x_dtype))
        return self.net.predict(x)

    def state(self) -> dict[str, torch.Tensor]:
        """The trained tensors by name (parameters and persistent buffers),
        as weights.safetensors holds them."""
        merged = {**self.net.params, **self.net.buffers}
        return {k: v.detach().cpu().contiguous() for k, v in merged.items()}

    def weights_sha256(self) -> str:
        """The canonical hash of ``state()`` (run.json's ``weights_sha256``)."""
        return weights_sha256(self.state())
