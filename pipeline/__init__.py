"""A reproducible training pipeline: weights as a pure function of code,
locked toolchain, data manifest, config and seed."""

from __future__ import annotations

__version__ = "0.1.0"
