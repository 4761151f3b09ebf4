"""Gradient reduction whose bits do not depend on the number of processes.

The global batch is cut into ``train.shards`` shards (a power of two). Each
shard's gradient is computed on its own rows, so it is the same whatever
process computes it. Shard gradients are summed with the neighbour-pairing
tree of docs/exact-spec.md section 5: with W processes (a power of two
dividing the shard count) rank r holds the contiguous, aligned shards
[r*S/W, (r+1)*S/W) -- a subtree -- so summing its shards locally, gathering
the W partial sums and finishing the same tree gives the bits of W = 1.

``TorchComm`` does that over torch.distributed: one all_gather of each rank's
flattened partial, then the tree over ranks in rank order, on every rank, so
every rank ends with the same bits. The same message carries each rank's stop
request (preemption, pipeline.train.preempt). (An all_reduce would leave the order of
the additions to the backend's algorithm: ring or halving-doubling, chunked.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from ..core.errors import DistributedError

__all__ = ["tree_reduce", "add_grads", "LocalComm", "TorchComm"]

# (summed loss, gradients by name; None: no shard of this part used the parameter)
Grads = tuple[torch.Tensor, dict[str, "torch.Tensor | None"]]

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


def add_grads(a: Grads, b: Grads) -> Grads:
    """Elementwise f32 sum of two (loss, grads) pairs: one IEEE add each. A
    gradient None (no shard of that side used the parameter) adds nothing:
    the other side's tensor is taken as it is, not added to a zero, whose
    sign could change a -0.0."""
    return a[0] + b[0], {k: _add(a[1][k], b[1][k]) for k in a[1]}


def _add(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
    return y if x is None else x if y is None else x + y


class LocalComm:
    """World size 1: the local partial sum is the whole sum."""

    rank, size = 0, 1

    def combine(self, partial: Grads) -> Grads:
        return partial

    def exchange(self, partial: Grads, stop: bool) -> tuple[Grads, bool]:
        """The whole sum, and whether any rank asked to stop: this one's ``stop``."""
        return partial, stop

    def expect(self, tensors: dict[str, torch.Tensor]) -> None:
        """Nothing to exchange: see TorchComm.expect."""

    def decide(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank."""
        return flag


class TorchComm:
    """World size W over an initialised torch.distributed process group.

    ``combine`` gathers the W partial (loss, grads) and finishes the tree on
    every rank; a peer that died or stopped answering within the process
    group's timeout is a DistributedError (exit 6). ``plain``: the world-size
    control, ``dist.all_reduce(SUM)`` in the backend's own order.
    """

    def __init__(self, device: torch.device, plain: bool = False) -> None:
        import torch.distributed as dist

        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.plain = plain
        # The tensors a partial's names refer to (the net's trainable parameters
        # and float buffers): the shape of a gradient this rank did not compute.
        self.like: dict[str, torch.Tensor] = {}

    def expect(self, tensors: dict[str, torch.Tensor]) -> None:
        """The tensors whose gradients a partial may hold (the net's
        trainable parameters): a rank that has None for one still sends its
        shape's worth of zeros, flagged absent."""
        self.like = dict(tensors)

    def combine(self, partial: Grads) -> Grads:
        return self.exchange(partial, False)[0]

    def exchange(self, partial: Grads, stop: bool) -> tuple[Grads, bool]:
        """The whole sum of the ranks' partials, and whether any rank asked to
        stop (pipeline.train.preempt): the flag travels with the gradients, so
        every rank learns it at the same step, at no extra message."""
        import torch.distributed as dist

        loss, grads = partial
        shapes = self._shapes(grads)
        flat = _flatten(partial, shapes, stop)  # (1 + numels + a flag per name + stop,)
        try:
            if self.plain:  # the control: the backend's own summation order
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                return _unflatten(flat, loss, shapes), bool(flat[-1].item() != 0.0)
            gathered = flat.new_empty(self.size * flat.numel())
            _all_gather(dist)(gathered, flat)  # W x that
        except RuntimeError as e:  # gloo/nccl errors (DistBackendError) subclass it
            raise self.failed("exchanging step gradients", e) from None
        # Each rank's partial, its absent gradients None again, summed in the
        # same tree as the shards (add_grads): the bits of one process.
        rows = gathered.view(self.size, -1)
        parts = [_unflatten(f, loss, shapes) for f in rows.unbind(0)]
        return tree_reduce(parts, add_grads), bool((rows[:, -1] != 0.0).any().item())

    def _shapes(self, grads: dict[str, torch.Tensor | None]) -> dict[str, torch.Size]:
        """Every gradient's shape, also where this rank has None (a parameter
        its shards did not use): the net's tensors of those names give it."""
        return {k: (g.shape if g is not None else self.like[k].shape)
                for k, g in grads.items()}

    def decide(self, flag: bool) -> bool:
        import torch.distributed as dist

        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        try:
            dist.broadcast(t, src=0)
        except RuntimeError as e:
            raise self.failed("agreeing with rank 0", e) from None
        return bool(t.item())

    def failed(self, what: str, e: BaseException) -> DistributedError:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return DistributedError(
            f"rank {self.rank} of {self.size}: {what} failed ({first}): a peer process died, "
            f"or did not answer within the process group's timeout. Rerun the same command, "
            f"at any world size, to resume from the last checkpoint")


def _all_gather(dist: Any) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """torch.distributed's all-gather into one tensor: ``all_gather_single`` where
    torch has it (2.13, where ``all_gather_into_tensor`` warns that it is
    deprecated), else ``all_gather_into_tensor`` (torch 1.13 to 2.9: nixpkgs 25.11's
    2.9.1 has no all_gather_single, and `--nproc 2` exited 70 there). Both gather
    rank r's tensor into slice r; tests/train/test_torch_api.py checks every other
    torch.distributed name the package uses against 2.9.1."""
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _flatten(partial: Grads, shapes: dict[str, torch.Size], stop: bool = False
             ) -> torch.Tensor:
    """Loss, gradients (zeros where None), a presence flag (1 or 0) per name,
    and last this rank's stop request (1 or 0)."""
    loss, grads = partial
    parts = [loss.reshape(1)]
    for k, g in grads.items():
        parts.append(g.reshape(-1) if g is not None
                     else loss.new_zeros(int(torch.Size(shapes[k]).numel())))
    parts.append(loss.new_tensor([0.0 if g is None else 1.0 for g in grads.values()]
                                 + [1.0 if stop else 0.0]))
    # One dtype, or torch.cat would promote and change the bits of the sum.
    assert len({t.dtype for t in parts}) == 1, "loss and grads must share one dtype"
    return torch.cat(parts)


def _unflatten(flat: torch.Tensor, loss: torch.Tensor, shapes: dict[str, torch.Size]) -> Grads:
    out: dict[str, torch.Tensor | None] = {}
    at = 1
    present = flat[flat.numel() - 1 - len(shapes):flat.numel() - 1].tolist()
    for (k, shape), there in zip(shapes.items(), present):
        n = int(torch.Size(shape).numel())
        out[k] = flat[at:at + n].view(shape) if there != 0.0 else None
        at += n
    return flat[0].reshape(loss.shape), out
