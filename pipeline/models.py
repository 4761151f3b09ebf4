"""Model factories: the built-in ones, and loading a user's.

A factory is ``package.module:function``: ``function(input_shape, num_classes,
**args)`` returns a stock ``torch.nn.Module`` whose ``forward(x)`` returns
logits: (N, num_classes) for classification, (N, T, num_classes) for language
modelling (``input_shape`` is then ``(T,)`` and ``num_classes`` the
vocabulary size). ``mlp`` and ``cnn`` below are factories of that kind.

A user's module is imported with the config file's directory first on
``sys.path`` (a project is a config beside its model.py). The sources of the
user modules it runs (what importing it, calling it and a forward pass
imported: pipeline.core.usercode) are hashed into the run key, so a changed
line changes the key, from whatever directory it runs. Its failures, a
``sys.exit`` included, are a UserCodeError (exit 2) naming where. A loss ``module:function``
is loaded the same way: ``loss(logits, targets)`` returns the per-example
(or per-position) losses, unreduced.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core import usercode
from .core.errors import ConfigError

__all__ = ["mlp", "cnn", "Loaded", "Parts", "load", "resolve", "BUILTINS"]

BUILTINS = ("pipeline.models:mlp", "pipeline.models:cnn")


def mlp(input_shape: tuple[int, ...], num_classes: int, *, hidden: list[int] | tuple[int, ...]
        = (128,), dropout: float = 0.1) -> Any:
    """Flatten, then Linear -> ReLU -> Dropout per hidden size, then Linear.
    Parameters fc0..fcL (the names exact mode uses too)."""
    from torch import nn

    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a number in [0, 1), found {dropout!r}")
    sizes = [math.prod(input_shape), *hidden, num_classes]
    net = nn.Module()
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(len(sizes) - 1):
        fc = nn.Linear(sizes[i], sizes[i + 1])
        net.add_module(f"fc{i}", fc)
        layers.append(fc)
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return _Sequence(net, layers)


def cnn(input_shape: tuple[int, ...], num_classes: int) -> Any:
    """conv 3x3 C->8, ReLU, conv 3x3 stride 2 8->16, ReLU, Linear to classes
    (the spec's CNN, docs/exact-spec.md section 3). Inputs (N, C, H, W)."""
    from torch import nn

    c, h, w = input_shape
    net = nn.Module()
    net.conv0 = nn.Conv2d(c, 8, 3, stride=1, padding=1)
    net.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)     # H x W -> ceil(H/2) x ceil(W/2)
    net.fc0 = nn.Linear(16 * ((h - 1) // 2 + 1) * ((w - 1) // 2 + 1), num_classes)
    layers = [net.conv0, nn.ReLU(), net.conv1, nn.ReLU(), nn.Flatten(), net.fc0]
    return _Sequence(net, layers)


def _Sequence(named: Any, layers: list[Any]) -> Any:
    """A module whose parameters carry ``named``'s names (fc0.weight, ...) and
    whose forward runs ``layers`` in order. The parameter-free layers are
    registered too (as ``op<i>``: no state, so no names change), so that
    ``.eval()`` reaches them: an unregistered Dropout stays in training mode."""
    from torch import nn

    class Sequence(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, child in named.named_children():
                self.add_module(name, child)
            for i, layer in enumerate(layers):
                if not any(layer is c for c in self.children()):
                    self.add_module(f"op{i}", layer)
            self._order = layers  # a plain list: not registered twice

        def forward(self, x: Any) -> Any:
            for layer in self._order:
                x = layer(x)
            return x

    return Sequence()


def _project_first(mod_name: str, base: Path) -> None:
    """``base`` first on sys.path, and a module of that name imported earlier in
    this process from elsewhere (another project's ``model.py``: a second
    ``pipeline.load`` or in-process run) forgotten, so that the project's own
    file is the one imported, never a stale namesake."""
    import importlib.machinery

    if str(base) in sys.path:
        sys.path.remove(str(base))
    sys.path.insert(0, str(base))
    top = mod_name.split(".")[0]
    cached = sys.modules.get(top)
    if cached is None:
        return
    found = importlib.machinery.PathFinder.find_spec(top, [str(base)])
    if found is None:
        return
    here = getattr(cached, "__file__", None)
    if found.origin is not None and here is not None and \
            Path(found.origin).resolve() == Path(here).resolve():
        return
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()


@dataclass(frozen=True)
class Loaded:
    """A loaded ``module:function``, and the modules loading it imported."""

    name: str
    function: Callable[..., Any]
    module: str                                    # the module it comes from
    imported: set[str] = field(default_factory=set)  # modules its import added
    # Modules user code added later: the factory's call, a forward pass (usercode.track).
    seen: set[str] = field(default_factory=set)

    def user_modules(self) -> dict[str, Path]:
        """The user modules it runs: module name -> source file (pipeline.core.usercode)."""
        return usercode.closure({self.module, *self.imported, *self.seen})


def load(spec: str, base: Path | None, key: str = "model.factory") -> Loaded:
    """Import ``module:function`` (``base`` first on sys.path); ConfigError
    (exit 2) naming ``key`` and the spec if it cannot be imported, exits or is
    not a function."""
    mod_name, _, fn_name = spec.partition(":")
    where = str(base) if base is not None else "sys.path"
    if base is not None:
        _project_first(mod_name, base)
    imported: set[str] = set()
    try:
        with usercode.track(imported):
            module = importlib.import_module(mod_name)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - any failure of user code is theirs
        raise usercode.user_error(key, f"cannot import module {mod_name!r} (looked in {where} "
                                       f"first):", e) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"{key} = {spec!r}", [
            f"{key}: module {mod_name!r} ({getattr(module, '__file__', '?')}) has no function "
            f"{fn_name!r}"])
    return Loaded(spec, fn, mod_name, imported)


@dataclass(frozen=True)
class Parts:
    """A config's model factory and (unless the built-in) loss, loaded."""

    factory: Loaded
    loss: Loaded | None
    transform: Loaded | None = None  # data.augment.transform (pipeline.data.augment)

    def record(self) -> dict[str, Any]:
        """What the run key and run.json hold of them: names, the user modules
        each runs and the sha256 of their sources (empty for the built-ins,
        which the code hash covers)."""
        mods = self.factory.user_modules()
        out: dict[str, Any] = {"factory": self.factory.name,
                               "factory_sha256": usercode.modules_sha256(mods)}
        if self.loss is not None:
            loss_mods = self.loss.user_modules()
            out.update(loss=self.loss.name, loss_sha256=usercode.modules_sha256(loss_mods))
            mods = {**mods, **loss_mods}
        if self.transform is not None:
            t_mods = self.transform.user_modules()
            out.update(transform=self.transform.name,
                       transform_sha256=usercode.modules_sha256(t_mods))
            mods = {**mods, **t_mods}
        out["modules"] = sorted(mods)
        return out


def resolve(factory: str, loss: str, base: Path | None, transform: str = "") -> Parts:
    """Load ``factory``, (when not a built-in loss name) ``loss`` and (if given)
    the augmentation ``transform``: each user module they import enters the key."""
    from .core.config import LOSSES

    return Parts(load(factory, base),
                 None if loss in LOSSES else load(loss, base, key="train.loss"),
                 load(transform, base, key="data.augment.transform") if transform else None)
