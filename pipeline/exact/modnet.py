"""``LayerNet``: any network of exact layers behind the training loop's Net
protocol (pipeline.modes), trained by autograd through the layers' exact
backward passes (docs/exact-spec.md, section 17).

A shard's forward runs under the guard (pipeline.exact.guard) inside the
step context of its global step and first global row, so its dropout masks
depend on (seed, step, site, row) alone; the graph is checked before each
backward. Parameters are views of one flat f32 buffer (the optimisers then
update them with one op per formula step), handed to the optimiser as
detached views of the same memory.

BatchNorm's running statistics (spec section 24) are per shard, as pinned
mode keeps them: every shard of a step starts from the step's values and
moves them by its own rows' statistics; a shard returns its float32 values
with its gradients (under ``BUFFER + name``), the fixed tree sums them with
the gradients, and ``end_step`` sets each to that sum divided by the shard
count (a power of two: exact), so every world size gives the same bits; the
counter ``num_batches_tracked`` takes the value the step's first shard on
this rank left (every shard moves it alike).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError
from .context import step_context, weight_cache
from .fanout import fix_fanout
from .flat import flat_views
from .guard import Guard, check_graph, check_module
from .layers import _BatchNorm, init_exact
from .ops import softmax_xent, tree_sum

__all__ = ["LayerNet", "BUFFER"]

BUFFER = "buffer:"  # a buffer's per-shard value among a shard's gradients (as pinned mode's)


class LayerNet:
    """``module`` (exact layers; see ``from_torch``) initialised from ``seed``
    (spec section 16) on ``device``. ``sample``: a small input batch for the
    guard's check of the forward (ConfigError listing every refused call)."""

    # The masks are the layers' own (spec section 15), not the loop's. Exact ops are
    # thread-invariant, so shards run in order and --threads sets torch's own threads
    # (shards on a pool of threads, as pinned mode runs them, measured slower: charlm
    # at 2 threads 171-177 ms a step against 160-162 ms on 2 intra-op threads).

    def __init__(self, module: nn.Module, seed: int, device: torch.device | str,
                 sample: Tensor | None = None,
                 keep: dict[str, Tensor] | None = None, loss: Any = None) -> None:
        self.seed, self.device = seed, torch.device(device)
        # The training loss: section 7's cross-entropy, or section 27's (losses.Xent).
        self._xent = loss if loss is not None else softmax_xent
        init_exact(module, seed)
        with torch.no_grad():  # values the factory set whatever the seed (convert.seed_free_values)
            for name, p in module.named_parameters():
                if keep and name in keep:
                    p.copy_(keep[name])
        module = module.to(self.device)
        named = dict(module.named_parameters())  # a tied parameter once, under its first name
        flat = flat_views({k: p.detach() for k, p in named.items()}, self.device)
        for k, p in named.items():
            p.data = flat[k]  # the parameter now lives in the flat buffer
        self.module = module
        self.params = {k: p.detach() for k, p in named.items()}
        self.trainable = {k: self.params[k] for k, p in named.items() if p.requires_grad}
        self._leaves = [p for p in named.values() if p.requires_grad]
        first = {id(p): k for k, p in named.items()}
        self.aliases = {k: first[id(p)] for k, p in module.named_parameters(remove_duplicate=False)
                        if first[id(p)] != k}
        persistent = set(module.state_dict(keep_vars=True))
        self.buffers = {k: b for k, b in module.named_buffers() if k in persistent}
        # Quantised weights, kept while no parameter's version counter moved
        # (every in-place update of a parameter or of a view of it moves one).
        self._cache: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
        self._versions: tuple[int, ...] = ()
        # The buffers exact layers update in training (BatchNorm's running statistics).
        self._stateful = {f"{path}.{n}" if path else n for path, mod in module.named_modules()
                          if isinstance(mod, _BatchNorm)
                          for n, b in mod.named_buffers(recurse=False) if b is not None}
        self._step: int | None = None
        self._step_start: dict[str, Tensor] = {}
        self._first: dict[str, Tensor] = {}
        if sample is not None:
            before = {k: b._version for k, b in module.named_buffers()}
            start = {k: b.detach().clone() for k, b in module.named_buffers()}
            check_module(module, sample.to(self.device))
            moved = sorted(k for k, b in module.named_buffers() if b._version != before[k])
            if odd := [k for k in moved if k not in self._stateful]:
                raise ConfigError("exact mode", [
                    f"{k}: a buffer the forward updates (training-time state) outside exact "
                    f"mode's BatchNorm; exact mode keeps no other: train in pinned mode"
                    for k in odd])
            with torch.no_grad():  # the check's forward moved the running statistics back
                for k, b in module.named_buffers():
                    if k in moved:
                        b.copy_(start[k])

    def _valid_cache(self) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
        versions = tuple(p._version for p in self._leaves)
        if versions != self._versions:
            self._cache.clear()
            self._versions = versions
        return self._cache

    def shard_grads(self, x: Tensor, y: Tensor, n_global: int, keep: list[Tensor] | None,
                    stream: int = 0, *, step: int = 0, row0: int = 0
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(``tree_sum`` of the shard's per-target losses, gradients of the
        global-mean loss): forward in training mode under the guard with the
        masks of (seed, ``step``, site, ``row0 + n``), softmax cross-entropy
        over the logits' rows, backward through the exact layers."""
        if not self.module.training:
            self.module.train()
        self._begin_shard(step)
        with torch.enable_grad(), step_context(self.seed, step, row0), \
                weight_cache(self._valid_cache()), Guard():
            logits = self.module(x.to(self.device))
        problems = check_graph(logits)
        if problems:
            raise ConfigError("exact mode (the model's backward graph)", problems)
        flat = logits.detach().reshape(-1, logits.shape[-1])
        lse, g = self._xent(flat, y.reshape(-1), n_global)
        handles = fix_fanout(logits)  # 3+ consumers: section 29's order, not autograd's
        try:
            grads = torch.autograd.grad(logits, self._leaves, g.view(logits.shape),
                                        allow_unused=True) if self._leaves else ()
        finally:
            for h in handles:
                h.remove()
        # None: this shard did not use the parameter (the step's sum decides).
        out: dict[str, Tensor | None] = dict(zip(self.trainable, grads))
        for k in sorted(self._stateful):
            b = self.buffers[k]
            if b.dtype == torch.float32:
                out[BUFFER + k] = b.detach().clone()
            elif k not in self._first:
                self._first[k] = b.detach().clone()
        return tree_sum(lse, 0), out

    def _begin_shard(self, step: int) -> None:
        """Every shard of step ``step`` starts from the buffers the step began with."""
        if not self._stateful:
            return
        if step != self._step:
            self._step, self._first = step, {}
            self._step_start = {k: self.buffers[k].detach().clone() for k in self._stateful}
            return
        with torch.no_grad():
            for k in self._stateful:
                self.buffers[k].copy_(self._step_start[k])

    def end_step(self, combined: dict[str, Tensor | None], shards: int
                 ) -> dict[str, Tensor | None]:
        """Set the running statistics from the step's combined shard values
        (float32: the tree sum over all ``shards`` divided by their count, a
        power of two; the counter: this rank's first shard's); return the
        gradients alone."""
        grads = {k: v for k, v in combined.items() if not k.startswith(BUFFER)}
        with torch.no_grad():
            for k in self._stateful:
                summed = combined.get(BUFFER + k)
                if summed is not None:
                    self.buffers[k].copy_(summed / shards)
                elif k in self._first:
                    self.buffers[k].copy_(self._first[k])
        self._step = None  # the next step snapshots the values set here
        return grads

    def structure(self) -> dict[str, Any]:
        """Frozen parameters, tied names (alias -> the name saved), buffers."""
        return {"frozen": sorted(k for k in self.params if k not in self.trainable),
                "tied": dict(sorted(self.aliases.items())), "buffers": sorted(self.buffers)}

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits in evaluation mode (no dropout), under the guard."""
        if self.module.training:
            self.module.eval()
        with weight_cache(self._valid_cache()), Guard():
            return self.module(x.to(self.device))

    def loss_sum(self, logits: Tensor, y: Tensor) -> float:
        """``tree_sum`` of the per-target losses of ``logits`` (spec section 17)."""
        flat = logits.reshape(-1, logits.shape[-1])
        return float(tree_sum(softmax_xent(flat, y.reshape(-1), 1)[0], 0))
