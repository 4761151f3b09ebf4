"""A reproducible training pipeline: weights as a pure function of code,
locked toolchain, data manifest, config and seed."""

from __future__ import annotations

from .core._lazy import exports

__version__ = "0.1.0"
__all__ = ["pretrained"]

# A model factory's pretrained weights, verified like data (pipeline/data/pretrained.py).
__getattr__ = exports(__name__, {"pretrained": "data.pretrained"})
