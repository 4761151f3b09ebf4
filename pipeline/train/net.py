"""What the training loop needs of a network, an optimiser and a numeric mode.

``Net`` is the whole of what every mode's network provides; two optional
capabilities are protocols of their own, checked with ``isinstance``:

- ``LoopMasks``: the network wants its dropout masks drawn by the loop from
  the run's dropout stream (the spec's MLP and CNN in exact mode);
- ``Threadable``: the network says whether a step's shards may run on several
  threads at once (pinned mode's stock modules: not with buffers that forward
  updates, not on CUDA). A network without it runs its shards in order.

- ``StepState``: the network keeps state that each shard updates (pinned
  mode's BatchNorm buffers): its shards return their values with the
  gradients, the fixed tree combines them, and ``end_step`` takes them back.

``Maker`` is what the loop asks of a mode (pipeline.modes.Mode implements it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from ..core.config import Config
    from ..data.dataset import Dataset

__all__ = ["Net", "LoopMasks", "Threadable", "StepState", "Optimizer", "Maker"]


class Net(Protocol):
    params: dict[str, torch.Tensor]   # name -> parameter (fc0.weight, ...): saved and hashed
    trainable: dict[str, torch.Tensor]  # those the optimiser updates (frozen ones left out)
    buffers: dict[str, torch.Tensor]  # other persistent state, saved with the weights

    def shard_grads(self, x: torch.Tensor, y: torch.Tensor, n_global: int,
                    keep: list[torch.Tensor] | None, stream: int, *, step: int = 0,
                    row0: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the shard's summed loss, the gradients of that sum / ``n_global``,
        by trainable parameter; None for one the shard does not use).
        ``stream`` keys the shard's random draws (seed, step, shard); ``step``
        and ``row0`` (its first row in the global batch) key exact layers'
        dropout masks; ``keep``: a LoopMasks net's masks for these rows."""
        ...

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, no dropout."""
        ...

    def loss_sum(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        """The summed cross-entropy of ``logits`` (the test loss)."""
        ...

    def structure(self) -> dict[str, Any]:
        """What run.json records of its parameters: frozen, tied, buffers."""
        ...


@runtime_checkable
class LoopMasks(Protocol):
    dropout_rate: float

    def dropout_widths(self) -> list[int]:
        """The widths of the masks the loop draws each step (one per dropout site)."""
        ...


@runtime_checkable
class Threadable(Protocol):
    @property
    def threadable(self) -> bool:
        """Whether a step's shards may run on several threads at once."""
        ...


@runtime_checkable
class StepState(Protocol):
    def end_step(self, combined: dict[str, Any], shards: int) -> dict[str, Any]:
        """Take back the state among the step's combined shard results (of all
        ``shards``); return the gradients alone."""
        ...


class Optimizer(Protocol):
    def step(self, grads: dict[str, torch.Tensor]) -> None: ...
    def state_tensors(self) -> dict[str, torch.Tensor]: ...
    def state_scalars(self) -> dict[str, Any]: ...
    def load_state(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None: ...


class Maker(Protocol):
    """A numeric mode, as the loop uses it."""

    def make_net(self, cfg: Config, ds: Dataset, device: torch.device, parts: Any) -> Net: ...
    def make_optimizer(self, cfg: Config, net: Net, total_steps: int) -> Optimizer: ...
    def pins_threads(self) -> bool: ...
    def how_it_ran(self) -> dict[str, Any]: ...
    def check_process(self) -> None: ...
