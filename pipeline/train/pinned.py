"""Pinned mode's network and optimiser: a stock ``nn.Module`` from a model
factory (pipeline.models), autograd and ``torch.optim``, reproducible under
the pinned numeric profile (pipeline.core.environment). They implement the Net and
Optimizer protocols of pipeline.modes.

Randomness inside the module (``nn.Dropout``, ``torch.rand`` in forward) is
world-size and thread-count invariant: each shard's forward and backward draw
from a generator seeded with ``stream``, a key of (seed, step, shard) alone
(pipeline.train.loop), so a shard draws the same numbers whichever rank or thread
runs it. On one thread that generator is torch's default one, re-seeded per
shard; when shards run on several threads at once (a ShardRunner's pool), each
shard gets its own ``torch.Generator`` with the same seed, handed to every
random op that was given none (``_ShardGenerator``): the same draws, as the
default CPU generator is the same MT19937 (tests/test_threads.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..core import _testing, usercode
from ..core.config import OptimConfig
from ..core.errors import ConfigError
from ..core.schedule import schedule_of
from .threads import SharedGeneratorOp, on_pool_thread

__all__ = ["PinnedNet", "TorchOptimizer", "build_module"]


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


class PinnedNet:
    """A stock module; stock kernels under the pinned profile."""

    def __init__(self, module: nn.Module, device: torch.device,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> None:
        self.module, self.device = module.to(device), device
        self.params = dict(self.module.named_parameters())
        # Persistent buffers (BatchNorm statistics): saved with the weights.
        self.buffers = {k: v for k, v in self.module.state_dict(keep_vars=True).items()
                        if k not in self.params}
        self._user_loss = loss

    @property
    def threadable(self) -> bool:
        """Whether shards may run on several threads at once: on the CPU, and
        with no buffers that forward updates in place (BatchNorm statistics,
        whose order of updates would then depend on the threads)."""
        return self.device.type == "cpu" and not self.buffers

    def dropout_widths(self) -> list[int]:
        return []  # randomness lives inside the module (see the module docstring)

    def _loss_sum(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._user_loss is None:
            return _cross_entropy(logits, y)
        return self._user_loss(logits, y).sum()

    def shard_grads(self, x: torch.Tensor, y: torch.Tensor, n_global: int,
                    keep: list[torch.Tensor] | None, stream: int = 0, *, step: int = 0,
                    row0: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the shard's summed loss, gradients of that sum / n_global);
        ``stream`` seeds the module's draws (``step``, ``row0``: unused)."""
        if not self.module.training:
            self.module.train()  # recursive: only on a switch from predict()
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

    def _grads(self, x: torch.Tensor, y: torch.Tensor, n_global: int
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = self._loss_sum(self.module(x), y)
        grads = torch.autograd.grad(loss / n_global, list(self.params.values()))
        return loss.detach(), dict(zip(self.params, grads))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        return self.module(x)

    @torch.no_grad()
    def loss_sum(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        """Summed cross-entropy of ``logits`` against ``y`` (the test loss)."""
        return float(_cross_entropy(logits, y))


def _undecorated(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``cls`` whose ``add_param_group`` and ``step`` skip torch's dynamo decorators.

    torch 2.13 imports ``torch._dynamo`` (about 1 s, as long as ``import torch``
    itself: bench/bench_startup.py) in ``Optimizer.add_param_group``'s
    ``torch._disable_dynamo`` wrapper and in ``_use_grad_for_differentiable``
    around every ``step`` (torch/optim/optimizer.py), for graph breaks that only
    a ``torch.compile`` tracing the optimizer needs; the pipeline never compiles
    it. The same bodies run, undecorated (``inspect.unwrap``), step under
    ``no_grad`` as ``_use_grad`` sets it (``differentiable`` is False); the step
    hooks and profiler label that Optimizer wraps around ``step`` are kept.
    tests/test_pinned.py checks equal bits against the stock classes."""
    add_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)
    step = inspect.unwrap(cls.step)

    def add_param_group(self: Any, param_group: dict[str, Any]) -> None:
        add_group(self, param_group)

    @torch.no_grad()
    def undecorated_step(self: Any, closure: Any = None) -> Any:
        return step(self, closure)
    return type(cls.__name__, (cls,), {"add_param_group": add_param_group,
                                       "step": undecorated_step, "__module__": __name__})


_SGD, _ADAM = _undecorated(torch.optim.SGD), _undecorated(torch.optim.Adam)
_ADAMW = _undecorated(torch.optim.AdamW)


class TorchOptimizer:
    """torch.optim behind the Optimizer interface; state keyed by param name.
    SGD (momentum, Nesterov, weight decay), Adam, AdamW, all with
    ``foreach=False``; ``clip_norm > 0``: ``torch.nn.utils.clip_grad_norm_``
    (``foreach=False``) before each step, which scales the given gradient
    tensors in place; the rate of step ``t`` is the
    schedule's ``lr(t)`` (pipeline.core.schedule, as ``LambdaLR`` would set it),
    so the step count is state too."""

    _STATE = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq", "step"),
              "adamw": ("exp_avg", "exp_avg_sq", "step")}

    def __init__(self, cfg: OptimConfig, params: dict[str, torch.Tensor],
                 total_steps: int) -> None:
        self.cfg, self.params = cfg, params
        self.schedule, self.t = schedule_of(cfg, total_steps), 0
        plist = list(params.values())
        if cfg.name == "sgd":
            self.opt: torch.optim.Optimizer = _SGD(
                plist, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                nesterov=cfg.nesterov, foreach=False)
        else:
            cls = _ADAMW if cfg.name == "adamw" else _ADAM
            self.opt = cls(plist, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                           weight_decay=cfg.weight_decay, foreach=False)

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            p.grad = grads[name]
        if self.cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.clip_norm,
                                           foreach=False)
        for group in self.opt.param_groups:
            group["lr"] = self.schedule(self.t)
        self.opt.step()
        self.t += 1
        for p in self.params.values():
            p.grad = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.params.items():
            for k, v in self.opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out[f"{k}.{name}"] = v.detach().reshape(p.shape if k != "step" else ())
        return out

    def state_scalars(self) -> dict[str, Any]:
        return {"step": self.t}

    def load_state(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
        expected = {f"{k}.{n}" for n in self.params for k in self._STATE[self.cfg.name]}
        if tensors and set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(f"optimiser state: missing {missing}, unexpected {extra}")
        step = scalars.get("step")
        if set(scalars) != {"step"} or isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"optimiser state: expected scalars {{'step': an integer}}, "
                             f"found {sorted(scalars)}")
        self.opt.state.clear()
        self.t = step
        for name, p in self.params.items():
            if tensors:
                self.opt.state[p] = {k: tensors[f"{k}.{name}"].clone().to(p.device)
                                     for k in self._STATE[self.cfg.name]}
