"""Model factories: the built-in ones, and loading a user's.

A factory is ``package.module:function``: ``function(input_shape, num_classes,
**args)`` returns a stock ``torch.nn.Module`` whose ``forward(x)`` returns
logits: (N, num_classes) for classification, (N, T, num_classes) for language
modelling (``input_shape`` is then ``(T,)`` and ``num_classes`` the
vocabulary size). ``mlp`` and ``cnn`` below are factories of that kind.

A user's module is imported with the config file's directory first on
``sys.path`` (a project is a config beside its model.py). Its source (the
module file, or the whole directory of its top-level package) is hashed into
the run key, so a changed line changes the key. A loss ``module:function``
is loaded the same way: ``loss(logits, targets)`` returns the per-example
(or per-position) losses, unreduced.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core.errors import ConfigError

__all__ = ["mlp", "cnn", "Loaded", "Parts", "load", "resolve", "source_sha256", "BUILTINS"]

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


@dataclass(frozen=True)
class Loaded:
    """A loaded ``module:function`` and the sha256 of its source."""

    name: str
    function: Callable[..., Any]
    source: str          # the file or package directory hashed
    sha256: str


def _source(module: Any) -> Path:
    """The file of a top-level module, or the directory of its top-level package."""
    top = sys.modules[module.__name__.split(".")[0]]
    path = Path(top.__file__ or "")
    return path.parent if path.name == "__init__.py" else path


def source_sha256(path: Path) -> str:
    """sha256 over a file, or over a directory's .py files (sorted relative
    paths and contents), so that any changed line changes it."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if p.is_file())
    for f in files:
        rel = f.name if f == path else f.relative_to(path).as_posix()
        data = f.read_bytes()
        h.update(len(rel).to_bytes(8, "little") + rel.encode())
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def load(spec: str, base: Path | None, key: str = "model.factory") -> Loaded:
    """Import ``module:function`` (``base`` first on sys.path); ConfigError
    (exit 2) naming ``key`` and the spec if it cannot be imported or called."""
    mod_name, _, fn_name = spec.partition(":")
    where = str(base) if base is not None else "sys.path"
    if base is not None and str(base) not in sys.path:
        sys.path.insert(0, str(base))
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure of user code is a config error
        raise ConfigError(f"{key} = {spec!r}", [
            f"{key}: cannot import module {mod_name!r} (looked in {where} first): "
            f"{type(e).__name__}: {e}"]) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"{key} = {spec!r}", [
            f"{key}: module {mod_name!r} ({getattr(module, '__file__', '?')}) has no function "
            f"{fn_name!r}"])
    src = _source(module)
    return Loaded(spec, fn, str(src), source_sha256(src))


@dataclass(frozen=True)
class Parts:
    """A config's model factory and (unless the built-in) loss, loaded."""

    factory: Loaded
    loss: Loaded | None

    def record(self) -> dict[str, Any]:
        """What the run key and run.json hold of them: names and source hashes."""
        out = {"factory": self.factory.name, "factory_sha256": self.factory.sha256}
        if self.loss is not None:
            out.update(loss=self.loss.name, loss_sha256=self.loss.sha256)
        return out


def resolve(factory: str, loss: str, base: Path | None) -> Parts:
    """Load ``factory`` and (when not a built-in loss name) ``loss``."""
    from .core.config import LOSSES

    return Parts(load(factory, base),
                 None if loss in LOSSES else load(loss, base, key="train.loss"))
