"""Lazy re-exports for the packages' ``__init__`` (PEP 562): a package names
its public surface without importing its modules (and torch, NumPy) until a
name is used, so that importing any one module of a package stays light."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["exports"]


def exports(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``name`` from its
    module ``where[name]`` (relative to the package) when first asked."""
    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
    return __getattr__
