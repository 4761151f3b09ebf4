"""Links outward, read-only: a finished run exported to MLflow
(``to_mlflow``) or TensorBoard (``to_tensorboard``), and its model card
(``card``). They read a finished record; training never imports them, and
MLflow and TensorBoard are an optional extra (``extras``)."""

from __future__ import annotations

from ..core._lazy import exports

__all__ = ["export_mlflow", "export_tensorboard", "card", "config_toml", "require"]

__getattr__ = exports(__name__, {"export_mlflow": "to_mlflow",
                                 "export_tensorboard": "to_tensorboard", "card": "card",
                                 "config_toml": "card", "require": "extras"})
