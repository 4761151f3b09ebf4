"""Gradient reduction whose bits do not depend on the number of processes.

The global batch is cut into ``train.shards`` shards (a power of two). Each
shard's gradient is computed on its own rows, so it is the same whatever
process computes it. Shard gradients are summed with the neighbour-pairing
tree of docs/exact-spec.md section 5: with W processes (a power of two
dividing the shard count) rank r holds the contiguous, aligned shards
[r*S/W, (r+1)*S/W) -- a subtree -- so summing its shards locally, gathering
the W partial sums and finishing the same tree gives the bits of W = 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

__all__ = ["tree_reduce", "add_grads", "LocalComm", "Comm"]

T = TypeVar("T")


def tree_reduce(items: Sequence[T], add: Callable[[T, T], T]) -> T:
    """Neighbour-pairing tree: (0+1), (2+3), ...; an odd last item carries."""
    level = list(items)
    if not level:
        raise ValueError("tree_reduce of nothing")
    while len(level) > 1:
        nxt = [add(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def add_grads(a: tuple[torch.Tensor, dict[str, torch.Tensor]],
              b: tuple[torch.Tensor, dict[str, torch.Tensor]]
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Elementwise f32 sum of two (loss, grads) pairs: one IEEE add each."""
    return a[0] + b[0], {k: a[1][k] + b[1][k] for k in a[1]}


class LocalComm:
    """World size 1: the local partial sum is the whole sum."""

    rank, size = 0, 1

    def combine(self, partial: tuple[torch.Tensor, dict[str, torch.Tensor]]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return partial

    def barrier(self) -> None:
        pass


Comm = LocalComm
