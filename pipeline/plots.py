"""curves.png: train loss and test accuracy per epoch, for people (no hash
covers it; matplotlib's Agg backend, no timestamps in the file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import atomic

__all__ = ["plot_curves"]


def plot_curves(path: Path, metrics: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(6, 4))
    steps = [m["step"] for m in metrics]
    ax1.plot(steps, [m["train_loss"] for m in metrics], color="tab:blue", label="train loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("train loss", color="tab:blue")
    test = "test_accuracy" if metrics and "test_accuracy" in metrics[0] else "test_loss"
    ax2 = ax1.twinx()
    ax2.plot(steps, [m.get(test) for m in metrics], color="tab:red", label=test)
    ax2.set_ylabel(test.replace("_", " "), color="tab:red")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())
