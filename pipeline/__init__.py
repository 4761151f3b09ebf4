"""A reproducible training pipeline: weights as a pure function of code,
locked toolchain, data manifest, config and seed.

``pipeline.load(run_dir, project)`` gives a finished run's trained model
(pipeline.inference; imported only when first used, so that ``import
pipeline`` stays light)."""

from __future__ import annotations

from .core._lazy import exports

__version__ = "0.1.0"
__all__ = ["load", "Model", "pretrained", "__version__"]

# A model factory's pretrained weights, verified like data (pipeline/data/pretrained.py).
__getattr__ = exports(__name__, {"load": "inference", "Model": "inference",
                                 "pretrained": "data.pretrained"})
