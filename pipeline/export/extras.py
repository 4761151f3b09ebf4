"""The export extra (MLflow, TensorBoard): optional packages, pinned in
requirements-export.lock, imported only by the export commands. Training,
loading and the model card never import them (tests/system/test_layout.py)."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..core.errors import UsageError

__all__ = ["require", "INSTALL"]

INSTALL = (".venv/bin/pip install --require-hashes -r requirements.lock "
           "-r requirements-export.lock")


def require(module: str, what: str) -> ModuleType:
    """``module`` imported, or UsageError (exit 2) saying how to install the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UsageError(f"{what} needs the export extra, which is not installed ({e}); "
                         f"install it from its lock in the checkout: {INSTALL} (the pins "
                         f"of pyproject.toml's [export] extra, every file hashed)") from None
