"""Gradient reduction whose bits do not depend on the number of processes.

The global batch is cut into ``train.shards`` shards (a power of two). Each
shard's gradient is computed on its own rows, so it is the same whatever
process computes it. Shard gradients are summed with the neighbour-pairing
tree of docs/exact-spec.md section 5: with W processes (a power of two
dividing the shard count) rank r holds the contiguous, aligned shards
[r*S/W, (r+1)*S/W) -- a subtree -- so summing its shards locally, gathering
the W partial sums and finishing the same tree gives the bits of W = 1.

``TorchComm`` does that over torch.distributed without gathering every
rank's partial (memory and traffic per rank O(model), not O(W x model)): a
reduce-scatter by distance doubling, whose level l pairs rank r with rank
r XOR 2^l, each keeping half of the segment it holds and adding the
partner's half to it as the tree's node does (the left subtree's sum + the
right subtree's, whichever rank computes it), so after log2 W levels rank r
holds the whole tree's sum of one segment; an all-gather of the segments
then gives every rank every bit. The same additions as the tree over the W
partials, so the same bits; each rank's stop request (preemption,
pipeline.train.preempt) travels with its presence flags; a gradient some
ranks lack (None) is taken from the subtree that has it, never added to
zeros. (An all_reduce would leave
the order of the additions to the backend's algorithm: ring or
halving-doubling, chunked.)

A rank's own shards are folded into the same tree as they are computed
(``TreeFold``: a stack of subtree sums), so a step holds O(log S) partial
sums, not S.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import torch

from ..core.errors import DistributedError

__all__ = ["tree_reduce", "TreeFold", "add_grads", "LocalComm", "TorchComm"]

# World size x buffer elements up to which TorchComm gathers every partial in one
# collective (latency wins); above it, the reduce-scatter (memory and traffic win).
GATHER_BELOW = 1 << 20

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


class TreeFold(Generic[T]):
    """``tree_reduce`` of items pushed one at a time, holding at most one
    subtree sum per level (log2 n + 1 items, not n): two sums of the same
    level are added as soon as both exist, and ``result`` adds what is left
    from the right, as the carried odd items of tree_reduce are added. The
    same additions in the same order, so the same bits
    (tests/train/test_distributed.py checks it for 1..70 items)."""

    def __init__(self, add: Callable[[T, T], T]) -> None:
        self.add = add
        self.stack: list[tuple[int, T]] = []  # (level, subtree sum), levels decreasing

    def push(self, item: T) -> None:
        level = 0
        while self.stack and self.stack[-1][0] == level:
            item = self.add(self.stack.pop()[1], item)
            level += 1
        self.stack.append((level, item))

    def result(self) -> T:
        if not self.stack:
            raise ValueError("TreeFold of nothing")
        item = self.stack.pop()[1]
        while self.stack:
            item = self.add(self.stack.pop()[1], item)
        return item


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

    def __init__(self, device: torch.device, plain: bool = False,
                 gather_below: int = GATHER_BELOW) -> None:
        import torch.distributed as dist

        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.plain = plain
        # The tensors a partial's names refer to (the net's trainable parameters
        # and float buffers): the shape of a gradient this rank did not compute.
        self.like: dict[str, torch.Tensor] = {}
        self.gather_below = gather_below
        self._owner_key: tuple[Any, ...] = ()
        self._owner = torch.empty(0, dtype=torch.int64)

    def expect(self, tensors: dict[str, torch.Tensor]) -> None:
        """The tensors whose gradients a partial may hold (the net's
        trainable parameters): a rank that has None for one still sends its
        shape's worth of zeros, flagged absent."""
        self.like = dict(tensors)

    def combine(self, partial: Grads) -> Grads:
        return self.exchange(partial, False)[0]

    def exchange(self, partial: Grads, stop: bool) -> tuple[Grads, bool]:
        """The whole sum of the ranks' partials, and whether any rank asked to
        stop (pipeline.train.preempt): the request travels last among the
        presence flags, so every rank learns it at the same step, at no extra
        message."""
        import torch.distributed as dist

        loss, grads = partial
        shapes = self._shapes(grads)
        flat = _flatten(partial, shapes)   # (1 + sum of numels,): absent gradients as zeros
        here = flat.new_tensor([1.0] + [0.0 if g is None else 1.0 for g in grads.values()]
                               + [1.0 if stop else 0.0])  # the loss, each name, the stop
        try:
            if self.plain:  # the control: the backend's own summation order
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                dist.all_reduce(here, op=dist.ReduceOp.SUM)
                return (_unflatten(flat, loss, shapes, here[1:-1] > 0),
                        bool(here[-1].item() > 0))
            if self.size * flat.numel() <= self.gather_below:  # small: one collective
                return self._gather_tree(dist, flat, here, loss, shapes)
            total, present = self._reduce_scatter_gather(dist, flat, here > 0, shapes)
        except RuntimeError as e:  # gloo/nccl errors (DistBackendError) subclass it
            raise self.failed("exchanging step gradients", e) from None
        return _unflatten(total, loss, shapes, present[1:-1]), bool(present[-1].item())

    def _gather_tree(self, dist: Any, flat: torch.Tensor, here: torch.Tensor,
                     loss: torch.Tensor, shapes: dict[str, torch.Size]) -> tuple[Grads, bool]:
        """The same sum for a small buffer: every rank's partial and flags
        gathered in one all-gather (W x the buffer, at most ``gather_below``
        elements), then the tree over the partials in rank order (add_grads:
        a gradient a rank lacks is None there)."""
        both = torch.cat([flat, here])
        gathered = both.new_empty(self.size * both.numel())
        _all_gather(dist)(gathered, both)
        n = flat.numel()
        rows = gathered.view(self.size, -1)
        parts = [_unflatten(row[:n], loss, shapes, row[n + 1:-1] > 0) for row in rows.unbind(0)]
        return tree_reduce(parts, add_grads), bool((rows[:, -1] > 0).any().item())

    def _reduce_scatter_gather(self, dist: Any, flat: torch.Tensor, here: torch.Tensor,
                               shapes: dict[str, torch.Size]) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
        """The tree's sum of every rank's ``flat`` (module docstring), on every
        rank, and which parts (the loss, each name) any rank had. Point-to-point
        exchanges only, 2 log2 W of them, each of half the segment held: each
        reduce-scatter message carries its sender's subtree's presence flags
        after its half; the all-gather runs the same pairs backwards."""
        rank, size, n = self.rank, self.size, flat.numel()
        owner = self._owners(shapes, flat.device)  # element -> part (0: the loss)
        lo, hi, held, has, level = 0, n, flat, here, 1
        path: list[tuple[int, int, int]] = []  # (level, segment lo, hi) before each split
        while level < size:
            mid = lo + (hi - lo) // 2
            partner, left = rank ^ level, rank & level == 0  # left: this subtree is the left
            keep, give = ((lo, mid), (mid, hi)) if left else ((mid, hi), (lo, mid))
            send = torch.cat([held[give[0] - lo:give[1] - lo], has.to(held.dtype)])
            got = held.new_empty(keep[1] - keep[0] + has.numel())
            _exchange(dist, send, got, partner)
            mine, theirs = held[keep[0] - lo:keep[1] - lo], got[:keep[1] - keep[0]]
            other = got[keep[1] - keep[0]:] > 0
            a, b = (mine, theirs) if left else (theirs, mine)  # left subtree + right subtree
            has_l, has_r = (has, other) if left else (other, has)
            if bool((has_l & has_r)[:-1].all()):  # every part on both sides (the last: stop)
                held = a + b
            else:  # a part one side lacks is the other side's, never added to its zeros
                el, er = has_l[owner[keep[0]:keep[1]]], has_r[owner[keep[0]:keep[1]]]
                held = torch.where(el & er, a + b, torch.where(el, a, b))
            path.append((level, lo, hi))
            has, (lo, hi), level = has_l | has_r, keep, level * 2
        # The all-gather: the same pairs backwards, each swapping its halves,
        # so the segment held doubles until it is the whole buffer.
        for level, plo, phi in reversed(path):
            whole = held.new_empty(phi - plo)
            whole[lo - plo:hi - plo] = held
            glo, ghi = (hi, phi) if lo == plo else (plo, lo)  # the partner's half
            _exchange(dist, held.contiguous(), whole[glo - plo:ghi - plo], rank ^ level)
            held, lo, hi = whole, plo, phi
        return held, has

    def _owners(self, shapes: dict[str, torch.Size], device: torch.device) -> torch.Tensor:
        """For each element of a flat buffer, its part (cached per layout)."""
        key = tuple((k, tuple(s)) for k, s in shapes.items())
        if self._owner_key != key:
            self._owner_key, self._owner = key, _owners(shapes, device)
        return self._owner

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


def _exchange(dist: Any, send: torch.Tensor, recv: torch.Tensor, partner: int) -> None:
    """Send ``send`` to ``partner`` and receive its message into ``recv`` (a
    contiguous tensor or slice of one), both at once."""
    req = dist.isend(send, partner)
    dist.recv(recv, partner)
    req.wait()


def _owners(shapes: dict[str, torch.Size], device: torch.device) -> torch.Tensor:
    """For each element of a flat buffer, its part: 0 the loss, k the k-th name."""
    counts = [1] + [int(torch.Size(s).numel()) for s in shapes.values()]
    return torch.repeat_interleave(torch.arange(len(counts), device=device),
                                   torch.tensor(counts, device=device))


def _flatten(partial: Grads, shapes: dict[str, torch.Size]) -> torch.Tensor:
    """Loss and gradients (zeros where None), one flat buffer."""
    loss, grads = partial
    parts = [loss.reshape(1)]
    for k, g in grads.items():
        parts.append(g.reshape(-1) if g is not None
                     else loss.new_zeros(int(torch.Size(shapes[k]).numel())))
    # One dtype, or torch.cat would promote and change the bits of the sum.
    assert len({t.dtype for t in parts}) == 1, "loss and grads must share one dtype"
    return torch.cat(parts)


def _unflatten(flat: torch.Tensor, loss: torch.Tensor, shapes: dict[str, torch.Size],
               present: torch.Tensor) -> Grads:
    """(loss, grads) of a flat buffer; a name no rank had (``present`` False) is None."""
    out: dict[str, torch.Tensor | None] = {}
    at = 1
    for (k, shape), there in zip(shapes.items(), present.tolist()):
        n = int(torch.Size(shape).numel())
        out[k] = flat[at:at + n].view(shape) if there else None
        at += n
    return flat[0].reshape(loss.shape), out
