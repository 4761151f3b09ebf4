"""Pinned mode's network: a stock ``nn.Module`` from a model factory
(pipeline.models) with autograd, reproducible under the pinned numeric
profile (pipeline.core.environment), behind the loop's Net protocol
(pipeline.train.net); its optimiser is pipeline.train.stock_optim.

Randomness inside the module (``nn.Dropout``, ``torch.rand`` in forward) is
world-size and thread-count invariant: each shard's forward and backward draw
from a generator seeded with ``stream``, a key of (seed, step, shard) alone
(pipeline.train.loop), so a shard draws the same numbers whichever rank or thread
runs it. On one thread that generator is torch's default one, re-seeded per
shard; when shards run on several threads at once (a ShardRunner's pool), each
shard gets its own ``torch.Generator`` with the same seed, handed to every
random op that was given none (``_ShardGenerator``): the same draws, as the
default CPU generator is the same MT19937 (tests/train/test_threads.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..core import _testing, usercode
from ..core.errors import ConfigError
from .threads import SharedGeneratorOp, on_pool_thread

__all__ = ["PinnedNet", "build_module", "BUFFER"]


def build_module(factory: Callable[..., Any], name: str, input_shape: tuple[int, ...],
                 n_classes: int, args: dict[str, Any], seed: int) -> nn.Module:
    """``factory(input_shape, n_classes, **args)`` with torch's generators
    seeded from ``seed`` for its initialisation (and restored after), or
    ConfigError (exit 2) naming the factory."""
    call = f"{name}(input_shape={tuple(input_shape)}, num_classes={n_classes}, **{args})"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # nn's default init draws from the default generator
        with usercode.guarded(call, "model.factory"):  # model.args that do not fit are caught here
            module = factory(tuple(input_shape), n_classes, **args)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model.factory = {name!r}", [
            f"model.factory: expected a torch.nn.Module, found {type(module).__name__}"])
    return module


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over examples (and positions, for (N, T, V) logits)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                           reduction="sum")


class _ShardGenerator(TorchDispatchMode):
    """Every random aten op (tagged ``nondeterministic_seeded``) draws from
    ``gen``: given it as its ``generator`` argument when that was left unset,
    or routed to its overload that takes one (``rand`` -> ``rand.generator``);
    one that has neither raises SharedGeneratorOp. Dispatch modes are
    thread-local, and autograd carries the mode into the backward pass that
    ``autograd.grad`` runs on the calling thread, so concurrent shards never
    share a generator."""

    _routes: dict[Any, Any] = {}  # op -> op to call with generator=, None, or an op name

    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.gen = gen

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        route = self._routes.get(func, False)
        if route is False:
            route = self._routes[func] = _route(func)
        if route is None or kwargs.get("generator") is not None:
            return func(*args, **kwargs)
        if isinstance(route, str):
            raise SharedGeneratorOp(route)
        return route(*args, **{**kwargs, "generator": self.gen})


def _route(func: Any) -> Any:
    """``func`` itself if it takes a generator; else its overload that does
    (the same arguments otherwise); None if it draws nothing; else its name."""
    if any(a.name == "generator" for a in func._schema.arguments):
        return func
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return None
    mine = [(a.name, str(a.type)) for a in func._schema.arguments]
    packet = func.overloadpacket
    for name in packet.overloads():
        other = getattr(packet, name)
        theirs = [(a.name, str(a.type)) for a in other._schema.arguments]
        if any(t[0] == "generator" for t in theirs) and [
                t for t in theirs if t[0] != "generator"] == mine:
            return other
    return str(func)


BUFFER = "buffer:"  # prefix of a buffer's per-shard value among a shard's gradients


class PinnedNet:
    """A stock module; stock kernels under the pinned profile; the module's
    features kept as PyTorch defines them:

    - tied parameters (one tensor under two names) are one tensor: trained,
      checkpointed, saved and hashed once, under the first name
      ``named_parameters()`` gives (``aliases`` maps the others to it);
    - a frozen parameter (``requires_grad`` False) is saved and hashed but
      never differentiated nor given to the optimiser (``trainable``);
    - a parameter a shard does not use gets no gradient from it (None); if no
      shard of a step uses it, the optimiser skips it, as torch does;
    - hooks run (the module is the user's, as built);
    - buffers that forward updates (BatchNorm's running statistics) are
      per-shard, "ghost batch" style: every shard of a step starts from the
      step's values and normalises with its own rows' statistics; the new
      float32 values are the mean over the step's shards of each shard's
      update, summed in the fixed tree with the gradients and divided by the
      shard count (a power of two: exact), so every world size agrees; other
      buffers (counters such as ``num_batches_tracked``) take the value the
      step's first shard on each rank left (every shard moves them alike).
    """

    def __init__(self, module: nn.Module, device: torch.device,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> None:
        self.module, self.device = module.to(device), device
        self.params = dict(self.module.named_parameters())   # a tied tensor once
        self.trainable = {k: p for k, p in self.params.items() if p.requires_grad}
        first = {id(p): k for k, p in self.params.items()}
        self.aliases = {k: first[id(p)] for k, p in
                        self.module.named_parameters(remove_duplicate=False)
                        if first[id(p)] != k}
        # Persistent buffers (those state_dict holds): saved with the weights.
        persistent = set(self.module.state_dict(keep_vars=True))
        self.buffers = {k: b for k, b in self.module.named_buffers() if k in persistent}
        self._user_loss = loss
        self._step_start: dict[str, torch.Tensor] | None = None
        self._step: int | None = None
        self._first: dict[str, torch.Tensor] = {}

    @property
    def threadable(self) -> bool:
        """Whether shards may run on several threads at once: on the CPU, and
        with no buffers (each shard's forward updates them in place)."""
        return self.device.type == "cpu" and not self.buffers

    def structure(self) -> dict[str, Any]:
        """What run.json records of the parameters: the frozen ones, the tied
        names and the name each is saved under, the buffers."""
        return {"frozen": sorted(k for k in self.params if k not in self.trainable),
                "tied": dict(sorted(self.aliases.items())), "buffers": sorted(self.buffers)}

    def _loss_sum(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._user_loss is None:
            return _cross_entropy(logits, y)
        out = self._user_loss(logits, y)
        if not isinstance(out, torch.Tensor) or out.shape != y.shape:
            raise ConfigError("train.loss", [loss_shape_problem(out, y)])
        return out.sum()

    def shard_grads(self, x: torch.Tensor, y: torch.Tensor, n_global: int,
                    keep: list[torch.Tensor] | None, stream: int = 0, *, step: int = 0,
                    row0: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """(the shard's summed loss, gradients of that sum / n_global, None
        for a trainable parameter it does not use; with buffers, their values
        after this shard under ``BUFFER + name``); ``stream`` seeds the
        module's draws (``row0``: unused)."""
        if not self.module.training:
            self.module.train()  # recursive: only on a switch from predict()
        self._begin_shard(step)
        if _testing.SWITCHES.no_shard_streams:  # (the test-only control)
            return self._grads(x, y, n_global)
        if on_pool_thread():
            gen = torch.Generator(device=self.device)
            gen.manual_seed(stream)
            with _ShardGenerator(gen):
                return self._grads(x, y, n_global)
        # This shard's draws. The generators of the module's device only:
        # torch.manual_seed would visit every backend (60 us, per shard).
        torch.random.default_generator.manual_seed(stream)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(stream)
        return self._grads(x, y, n_global)

    def _begin_shard(self, step: int) -> None:
        """Every shard of step ``step`` starts from the buffers the step began with."""
        if not self.buffers:
            return
        if step != self._step:
            self._step, self._first = step, {}
            self._step_start = {k: b.detach().clone() for k, b in self.buffers.items()}
            return
        assert self._step_start is not None
        with torch.no_grad():
            for k, b in self.buffers.items():
                b.copy_(self._step_start[k])

    def _grads(self, x: torch.Tensor, y: torch.Tensor, n_global: int
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        loss = self._loss_sum(self.module(x), y)
        grads = torch.autograd.grad(loss / n_global, list(self.trainable.values()),
                                    allow_unused=True) if self.trainable else ()
        out: dict[str, torch.Tensor | None] = dict(zip(self.trainable, grads))
        for k, b in self.buffers.items():
            if b.dtype == torch.float32:
                out[BUFFER + k] = b.detach().clone()
            elif k not in self._first:
                self._first[k] = b.detach().clone()
        return loss.detach(), out

    def end_step(self, combined: dict[str, torch.Tensor | None], shards: int
                 ) -> dict[str, torch.Tensor | None]:
        """Set the buffers from the step's combined shard values (float32: the
        tree sum over all ``shards`` divided by their count; others: this
        rank's first shard's); return the gradients alone."""
        grads = {k: v for k, v in combined.items() if not k.startswith(BUFFER)}
        with torch.no_grad():
            for k, b in self.buffers.items():
                summed = combined.get(BUFFER + k)
                if summed is not None:
                    b.copy_(summed / shards)
                elif k in self._first:
                    b.copy_(self._first[k])
        self._step = None  # the next step snapshots the values set here
        return grads

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        return self.module(x)

    @torch.no_grad()
    def loss_sum(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        """Summed cross-entropy of ``logits`` against ``y`` (the test loss)."""
        return float(_cross_entropy(logits, y))


def loss_shape_problem(out: object, y: torch.Tensor) -> str:
    """Why a project loss's result is refused: it must be unreduced, one loss per
    target (a mean, reduction="mean", would train on the shard's mean divided by
    the batch: other gradients than written, silently)."""
    found = (f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
             else type(out).__name__)
    return (f"train.loss: expected one loss per target, shape {tuple(y.shape)} (unreduced: "
            f"reduction=\"none\"; the pipeline sums them in its fixed tree), found {found}")
