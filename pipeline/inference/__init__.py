"""Using a finished run: ``load`` its trained model (checked against its
record; never importing code from the run directory), ``Model`` (an
``nn.Module`` with ``predict``), evaluate it again or on another dataset
(``pipeline eval``), and write predictions for an input file (``pipeline
predict``). Training never imports this package."""

from __future__ import annotations

from ..core._lazy import exports

__all__ = ["load", "Model", "evaluate", "predict_file"]

__getattr__ = exports(__name__, {"load": "loading", "Model": "model",
                                 "evaluate": "evaluate", "predict_file": "predict"})
