"""The two numeric modes as objects: everything that differs between them.

A ``Mode`` prepares the process (pinned: the numeric profile, re-executing
the interpreter if needed; exact: nothing), names the inputs its run key
covers, builds the network and the optimiser, and keys golden entries.
``of(name)`` is the one place a config's ``mode`` string becomes a Mode;
nothing else in the package branches on the string.

The training loop talks to nets and optimisers through two small protocols:

- ``net.params``: name -> tensor (fc0.weight, conv0.bias, ...); ``net.buffers``:
  other persistent state (BatchNorm statistics), saved with the weights;
- ``net.dropout_widths()``, ``net.dropout_rate``: the loop's counter-based
  dropout masks (exact mode; pinned modules draw their own, per shard);
- ``net.shard_grads(x, y, n_global, keep, stream, step=, row0=)``: (the
  shard's summed loss, the gradients by name of that sum divided by
  n_global, the number of targets in the global batch); ``stream`` keys the
  shard's random draws, ``step`` and ``row0`` (the shard's first row in the
  global batch) key exact layers' dropout masks;
- ``net.predict(x)``: logits, no dropout; ``net.loss_sum(logits, y)``: the
  summed cross-entropy of those logits (the test loss);
- ``net.threadable``: whether a step's shards may run on several threads at
  once (pipeline.train.threads; then the loop sets ``net.in_threads``);
- ``opt.step(grads)``, ``state_tensors()``, ``state_scalars()``,
  ``load_state(tensors, scalars)``.

torch is imported only inside methods: this module is loaded before the
pinned profile is in place (pipeline.core.environment).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Protocol

from .core import environment as env
from .core.config import Config, canonical_json
from .core.errors import ConfigError, ProfileError, UsageError

if TYPE_CHECKING:
    import torch

    from .data.dataset import Dataset
    from .models import Parts

__all__ = ["Mode", "Net", "Optimizer", "of", "PINNED", "EXACT"]


class Net(Protocol):
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    dropout_rate: float
    threadable: bool
    in_threads: bool

    def dropout_widths(self) -> list[int]: ...
    def shard_grads(self, x: torch.Tensor, y: torch.Tensor, n_global: int,
                    keep: list[torch.Tensor] | None, stream: int, *, step: int = 0,
                    row0: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...
    def predict(self, x: torch.Tensor) -> torch.Tensor: ...
    def loss_sum(self, logits: torch.Tensor, y: torch.Tensor) -> float: ...


class Optimizer(Protocol):
    def step(self, grads: dict[str, torch.Tensor]) -> None: ...
    def state_tensors(self) -> dict[str, torch.Tensor]: ...
    def state_scalars(self) -> dict[str, Any]: ...
    def load_state(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None: ...


class Mode:
    """What a numeric mode decides. ``key_fields``: the inputs its run key
    (and golden key) covers, of config, data, code (the package), model (the
    factory's and loss's sources), toolchain, profile."""

    name: str
    key_fields: tuple[str, ...]

    def prepare(self, argv: list[str]) -> dict[str, Any]:
        """Make this process fit to train; return its profile record."""
        raise NotImplementedError

    def require_prepared(self) -> None:
        """Raise unless this process (a launched worker) inherited ``prepare``'s work."""

    def pins_threads(self) -> bool:
        """Whether ``prepare`` fixes the thread count (else a launcher does)."""
        return False

    def how_it_ran(self) -> dict[str, Any]:
        """What run.json records of how this mode computed (not keyed)."""
        return {}

    def make_net(self, cfg: Config, ds: Dataset, device: torch.device, parts: Parts) -> Net:
        """The network of ``cfg.model`` for ``ds``'s shapes, initialised from the seed."""
        raise NotImplementedError

    def make_optimizer(self, cfg: Config, net: Net, total_steps: int) -> Optimizer:
        """The optimiser of ``cfg.optim`` over ``net.params``; its learning-rate
        schedule spans ``total_steps`` (the steps the run trains)."""
        raise NotImplementedError

    def golden_key(self, record: dict[str, Any]) -> dict[str, str]:
        """The key of a run record's golden entry: the config, and the
        toolchain and profile only where the mode's bits depend on them."""
        def digest(field: str) -> str:
            return hashlib.sha256(canonical_json(record[field])).hexdigest()
        key = {"mode": self.name, "config_sha256": record["config_sha256"],
               "toolchain": "any", "profile": "any"}
        if "toolchain" in self.key_fields:
            key["toolchain"] = digest("toolchain")
        if "profile" in self.key_fields:
            key["profile"] = record["profile"]["name"] + ":" + digest("profile")[:16]
        return key


class _Pinned(Mode):
    """Stock torch kernels under the pinned numeric profile."""

    name = "pinned"
    key_fields = ("config", "data", "code", "model", "toolchain", "profile")

    def prepare(self, argv: list[str]) -> dict[str, Any]:
        """Re-execute with the profile's environment (or refuse this CPU)."""
        if env.pinning_disabled():
            return env.profile_record(None)
        profile = env.load_profile()
        env.check_host(profile)
        if env.needs_reexec(profile):
            env.reexec(profile, argv)  # does not return
        env.apply_in_process(profile)
        return env.profile_record(profile)

    def require_prepared(self) -> None:
        if env.pinning_disabled():
            return
        profile = env.load_profile()
        if env.needs_reexec(profile):
            raise ProfileError(f"worker started without numeric profile {profile.name}'s "
                               f"environment; start workers with `pipeline train --nproc N`, "
                               f"which pins before torchrun starts them")

    def pins_threads(self) -> bool:
        return not env.pinning_disabled()

    def make_net(self, cfg: Config, ds: Dataset, device: torch.device, parts: Parts) -> Net:
        from .train.pinned import PinnedNet, build_module

        shape, classes = ds.shapes(cfg.data.context)
        module = build_module(parts.factory.function, parts.factory.name, shape, classes,
                              cfg.model.args, cfg.seed)
        return PinnedNet(module, device, parts.loss.function if parts.loss else None)

    def make_optimizer(self, cfg: Config, net: Net, total_steps: int) -> Optimizer:
        from .train.pinned import TorchOptimizer
        return TorchOptimizer(cfg.optim, net.params, total_steps)


class _Exact(Mode):
    """IEEE-754-determined arithmetic (pipeline.exact): nothing to pin."""

    name = "exact"
    key_fields = ("config", "data", "code", "model")

    def prepare(self, argv: list[str]) -> dict[str, Any]:
        return env.profile_record(None)

    def how_it_ran(self) -> dict[str, Any]:
        # The native kernels change speed, not bits: recorded, not keyed.
        from .exact import native

        return {"exact_kernels": native.status()}

    def make_net(self, cfg: Config, ds: Dataset, device: torch.device, parts: Parts) -> Net:
        """The built-in factories: the spec's MLP or CNN (pipeline.exact.ExactNet,
        arguments checked against the factory's own signature). Any other
        factory: its stock module converted by ``pipeline.exact.from_torch``,
        initialised by the spec and checked under the guard (LayerNet).
        The built-in loss only. Refuses a process that flushes subnormals
        (pipeline.exact.fpenv; exit 4)."""
        net = self._make_net(cfg, ds, device, parts)
        if device.type == "cpu":
            from .exact.fpenv import subnormal_problem

            problem = subnormal_problem()  # after the model's own code has been imported
            if problem:
                raise ProfileError(f"exact mode needs IEEE-754 subnormals: {problem}; "
                                   f"remove that setting or library")
        return net

    def _make_net(self, cfg: Config, ds: Dataset, device: torch.device, parts: Parts) -> Net:
        import inspect

        from .exact import Arch, ExactNet
        from .models import BUILTINS

        name, args = parts.factory.name, cfg.model.args
        shape, classes = ds.shapes(cfg.data.context)
        if parts.loss is not None:
            raise ConfigError(f"mode = {self.name!r}", [
                f"train.loss: exact mode computes cross_entropy only, found "
                f"{parts.loss.name!r}"])
        if name not in BUILTINS:
            return self._layer_net(cfg, ds, device, parts)
        try:
            inspect.signature(parts.factory.function).bind(shape, classes, **args)
        except TypeError as e:
            raise ConfigError(f"mode = {self.name!r}", [f"model.args: {e}"]) from None
        arch = Arch(name.rpartition(":")[2], tuple(args.get("hidden", (128,))),
                    float(args.get("dropout", 0.1)))
        return ExactNet(arch, cfg.seed, device, input_shape=shape, n_classes=classes)

    def _layer_net(self, cfg: Config, ds: Dataset, device: torch.device, parts: Parts) -> Net:
        import torch

        from .exact import LayerNet, from_torch
        from .train.pinned import build_module

        shape, classes = ds.shapes(cfg.data.context)
        stock = build_module(parts.factory.function, parts.factory.name, shape, classes,
                             cfg.model.args, cfg.seed)
        sample = torch.zeros((2, *shape), dtype=torch.int64 if ds.task == "lm" else None)
        return LayerNet(from_torch(stock), cfg.seed, device, sample)

    def make_optimizer(self, cfg: Config, net: Net, total_steps: int) -> Optimizer:
        from .exact import make_exact_optimizer
        return make_exact_optimizer(cfg.optim, net.params, total_steps)


PINNED, EXACT = _Pinned(), _Exact()
_MODES = {m.name: m for m in (PINNED, EXACT)}


def of(name: str) -> Mode:
    """The Mode a config or run record names."""
    try:
        return _MODES[name]
    except KeyError:
        raise UsageError(f"mode: expected one of {sorted(_MODES)}, found {name!r}") from None
