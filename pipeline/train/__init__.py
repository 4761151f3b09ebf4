"""Training: the loop, what it needs of a mode (``Net``, ``Optimizer``,
``Maker``), checkpoints that restore everything or raise, the thread plan, the
fixed reduction tree over shards and ranks, pinned mode's stock networks and
optimisers, and seeding."""

from __future__ import annotations

from ..core._lazy import exports

__all__ = ["train", "TrainResult", "Net", "Optimizer", "Maker", "ShardRunner", "tree_reduce",
           "LocalComm", "TorchComm", "seed_everything"]

__getattr__ = exports(__name__, {
    "train": "loop", "TrainResult": "loop", "Net": "net", "Optimizer": "net", "Maker": "net",
    "ShardRunner": "threads", "tree_reduce": "distributed", "LocalComm": "distributed",
    "TorchComm": "distributed", "seed_everything": "determinism"})
