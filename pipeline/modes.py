"""The two numeric modes as objects: everything that differs between them.

A ``Mode`` prepares the process (pinned: the numeric profile, re-executing
the interpreter if needed; exact: nothing), names the inputs its run key
covers (``key_fields``: the run key and the golden key follow them,
pipeline.record), builds the network and the optimiser the loop trains
(pipeline.train.net's protocols), and says how it computed. ``of(name)`` is
the one place a config's ``mode`` string becomes a Mode; nothing else in the
package branches on the string.

torch is imported only inside methods: this module is loaded before the
pinned profile is in place (pipeline.core.environment).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .core import environment as env
from .core import usercode
from .core.config import Config
from .core.errors import ConfigError, ProfileError, UsageError

if TYPE_CHECKING:
    import torch

    from .data.dataset import Dataset
    from .models import Parts
    from .train.net import Net, Optimizer

__all__ = ["Mode", "of", "PINNED", "EXACT"]


class Mode:
    """What a numeric mode decides. ``key_fields``: the inputs its run key
    (and golden key) covers, of config, data, code (the package), model (the
    factory's and loss's sources), toolchain, profile."""

    name: str
    key_fields: tuple[str, ...]

    def prepare(self, argv: list[str]) -> dict[str, Any]:
        """Make this process fit to train; return its profile record."""
        raise NotImplementedError

    def will_reexec(self) -> bool:
        """Whether ``prepare`` will replace this process (pinned mode's re-exec)."""
        return False

    def require_prepared(self) -> None:
        """Raise unless this process (a launched worker) inherited ``prepare``'s work."""

    def pins_threads(self) -> bool:
        """Whether ``prepare`` fixes the thread count (else a launcher does)."""
        return False

    def how_it_ran(self) -> dict[str, Any]:
        """What run.json records of how this mode computed (not keyed)."""
        return {}

    def check_process(self) -> None:
        """Raise unless this process still computes as the mode needs (the
        loop asks after building the net and after its last step: libraries
        loaded meanwhile may have changed the floating-point environment)."""

    def make_net(self, cfg: Config, ds: Dataset, device: torch.device, parts: Parts) -> Net:
        """The network of ``cfg.model`` for ``ds``'s shapes, initialised from the seed."""
        raise NotImplementedError

    def check_loss(self, parts: Parts, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Raise ConfigError unless the project loss (if any) is one this mode
        trains as written, tried on a few examples' ``logits`` and targets
        ``y`` before training (exact mode recognises its losses in make_net)."""

    def make_optimizer(self, cfg: Config, net: Net, total_steps: int) -> Optimizer:
        """The optimiser of ``cfg.optim`` over ``net.params``; its learning-rate
        schedule spans ``total_steps`` (the steps the run trains)."""
        raise NotImplementedError


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

    def will_reexec(self) -> bool:
        if env.pinning_disabled():
            return False
        return env.needs_reexec(env.load_profile())

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
        with usercode.track(parts.factory.seen):
            module = build_module(parts.factory.function, parts.factory.name, shape, classes,
                                  cfg.model.args, cfg.seed)
        return PinnedNet(module, device, parts.loss.function if parts.loss else None)

    def check_loss(self, parts: Parts, logits: torch.Tensor, y: torch.Tensor) -> None:
        """One loss per target (PinnedNet sums them in its tree)."""
        if parts.loss is None:
            return
        import torch

        from .core.errors import ConfigError
        from .train.pinned import loss_shape_problem
        with usercode.track(parts.loss.seen), usercode.guarded(
                f"the loss of {len(y)} examples' logits", "train.loss"):
            out = parts.loss.function(logits, y)
        if not isinstance(out, torch.Tensor) or out.shape != y.shape:
            raise ConfigError(f"train.loss = {parts.loss.name!r}", [loss_shape_problem(out, y)])

    def make_optimizer(self, cfg: Config, net: Net, total_steps: int) -> Optimizer:
        from .train.stock_optim import TorchOptimizer
        return TorchOptimizer(cfg.optim, net.trainable, total_steps)


class _Exact(Mode):
    """IEEE-754-determined arithmetic (pipeline.exact): nothing to pin."""

    name = "exact"
    key_fields = ("config", "data", "code", "model")
    _probed: dict[str, str | None] = {}

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
        self.check_process()  # the process's own setting is the clearer reason
        self._check_device(device)
        net = self._make_net(cfg, ds, device, parts)
        self.check_process()  # after the model's own code has been imported
        return net

    def _check_device(self, device: torch.device) -> None:
        """Refuse (exit 4) a device whose float64 products or elementwise
        arithmetic are not what the spec assumes (pipeline.exact.probe);
        probed once per device and process."""
        from .exact.probe import device_problem

        if str(device) not in self._probed:
            self._probed[str(device)] = device_problem(device)
        if (problem := self._probed[str(device)]) is not None:
            raise ProfileError(f"exact mode cannot train on {device}: {problem}; its bits would "
                               f"not be the spec's. Train on another device (the CPU gives the "
                               f"same bits)")

    def check_process(self) -> None:
        from .exact.fpenv import subnormal_problem

        problem = subnormal_problem()
        if problem:
            raise ProfileError(f"exact mode needs IEEE-754 subnormals: {problem}; remove that "
                               f"setting or library")

    def _make_net(self, cfg: Config, ds: Dataset, device: torch.device, parts: Parts) -> Net:
        import inspect

        from .exact import Arch, ExactNet
        from .models import BUILTINS

        name, args = parts.factory.name, cfg.model.args
        shape, classes = ds.shapes(cfg.data.context)
        if parts.loss is not None and name in BUILTINS:
            raise ConfigError(f"mode = {self.name!r}", [
                f"train.loss: exact mode's built-in networks compute cross_entropy only, found "
                f"{parts.loss.name!r} (a model factory of your own takes torch's "
                f"cross-entropy with label smoothing; docs/exact-spec.md section 27)"])
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

        from .data.pretrained import loaded_tensors
        from .exact import LayerNet, from_torch
        from .exact.convert import seed_free_values
        from .exact.recorder import recording
        from .train.pinned import build_module

        shape, classes = ds.shapes(cfg.data.context)
        builds = []
        # Two builds under two seeds: what the factory sets whatever the seed
        # (pretrained weights, constants) is kept; what it draws, the spec draws.
        for seed in (cfg.seed, cfg.seed ^ _OTHER_SEED):
            # recording(): constants computed with non-exact ops are refused (section 28)
            with usercode.track(parts.factory.seen), recording():
                builds.append(build_module(parts.factory.function, parts.factory.name, shape,
                                           classes, cfg.model.args, seed))
        keep = seed_free_values(builds[0], builds[1], loaded_tensors())
        sample = torch.zeros((2, *shape), dtype=getattr(torch, ds.task.x_dtype))
        loss = None
        if parts.loss is not None:  # torch's cross-entropy (label smoothing), or refused
            from .exact.losses import recognise_loss
            with usercode.track(parts.loss.seen):
                loss = recognise_loss(parts.loss.function,
                                      ds.task.logits_shape(2, cfg.data.context, classes),
                                      parts.loss.name)
        return LayerNet(from_torch(builds[0]), cfg.seed, device, sample, keep=keep, loss=loss)

    def make_optimizer(self, cfg: Config, net: Net, total_steps: int) -> Optimizer:
        from .exact import make_exact_optimizer
        return make_exact_optimizer(cfg.optim, net.trainable, total_steps)


_OTHER_SEED = 0x5DEECE66D  # exact mode's second build (seed-free values): another seed

PINNED, EXACT = _Pinned(), _Exact()
_MODES = {m.name: m for m in (PINNED, EXACT)}


def of(name: str) -> Mode:
    """The Mode a config or run record names."""
    try:
        return _MODES[name]
    except KeyError:
        raise UsageError(f"mode: expected one of {sorted(_MODES)}, found {name!r}") from None
