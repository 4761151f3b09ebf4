"""curves.png (pipeline/plots.py): a valid PNG, read back by an independent
decoder here; the curves where the metrics put them; the same bytes for the
same metrics; no plotting library."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from pipeline.record.plots import BLUE, HEIGHT, PLOT_BOX, RED, WIDTH, plot_curves, render_curves

from ..support import ROOT


def _metrics(epochs: int = 10, test: str = "test_accuracy") -> list[dict[str, Any]]:
    """Falling train loss, rising test metric, one record per epoch of 22 steps."""
    return [{"epoch": e, "step": 22 * e, "train_loss": 2.0 / e,
             test: 0.8 + 0.15 * e / epochs} for e in range(1, epochs + 1)]


def _decode(png: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes): chunk lengths and CRCs checked, IHDR
    8-bit RGB, one zlib stream, filter type 0 on every row."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(png):
        (n,) = struct.unpack(">I", png[pos:pos + 4])
        kind, data = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", png[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + data), f"{kind!r}: bad CRC"
        chunks.append((kind, data))
        pos += 12 + n
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    w, h, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(chunks[1][1])
    assert len(raw) == h * (1 + 3 * w)
    rows = [raw[y * (1 + 3 * w):(y + 1) * (1 + 3 * w)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)
    return w, h, [r[1:] for r in rows]


def _pixel(rows: list[bytes], x: int, y: int) -> tuple[int, ...]:
    return tuple(rows[y][3 * x:3 * x + 3])


def test_curves_png_is_valid_and_draws_the_metrics() -> None:
    """600 x 400 RGB; the train loss (falling) starts at the plot box's top-left
    and ends at its bottom-right in blue; the test metric (rising) starts at
    the bottom-left and ends at the top-right in red."""
    w, h, rows = _decode(render_curves(_metrics()))
    assert (w, h) == (WIDTH, HEIGHT)
    left, top, right, bottom = PLOT_BOX
    assert _pixel(rows, left + 1, top + 1) == BLUE
    assert _pixel(rows, right - 1, bottom - 1) == BLUE
    assert _pixel(rows, right - 1, top + 1) == RED
    assert _pixel(rows, (left + right) // 2 + 7, (top + bottom) // 2 + 7) == (255, 255, 255)


def test_curves_png_reads_back_with_pillow() -> None:
    """An independent decoder (Pillow, the test extra) reads the same pixels."""
    import io

    from PIL import Image as image_mod

    png = render_curves(_metrics())
    _, _, rows = _decode(png)
    img = image_mod.open(io.BytesIO(png))
    assert img.size == (WIDTH, HEIGHT) and img.mode == "RGB"
    assert img.tobytes() == b"".join(rows)


def test_same_metrics_same_bytes_other_metrics_other_bytes() -> None:
    """The bytes are a function of the metrics (no timestamp); control: other
    metrics give another image."""
    assert render_curves(_metrics()) == render_curves(_metrics())
    assert render_curves(_metrics()) != render_curves(_metrics(epochs=9))


@pytest.mark.parametrize("metrics", [
    [], _metrics(epochs=1), _metrics(test="test_loss"),
    [{"step": 1, "train_loss": math.nan, "test_accuracy": None},
     {"step": 2, "train_loss": 1.0, "test_accuracy": 0.5}],
    [{"step": s, "train_loss": 1e30 * s, "test_loss": -1e-30 * s} for s in (1, 2, 3)],
], ids=["empty", "one-epoch", "language-model", "missing-values", "extreme-values"])
def test_curves_png_for_unusual_metrics(metrics: list[dict[str, Any]]) -> None:
    """No metrics, one epoch, a language model's test loss, missing or
    non-finite values and extreme ranges all give a valid image."""
    w, h, _ = _decode(render_curves(metrics))
    assert (w, h) == (WIDTH, HEIGHT)


def test_plot_curves_writes_the_file_alone(tmp_path: Path) -> None:
    """plot_curves writes curves.png (through pipeline.core.atomic) and nothing else."""
    plot_curves(tmp_path / "curves.png", _metrics())
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
    assert (tmp_path / "curves.png").read_bytes() == render_curves(_metrics())


@pytest.mark.process
def test_plots_import_no_plotting_library() -> None:
    """Drawing curves.png loads neither matplotlib nor PIL (nor numpy, nor torch)."""
    code = ("import sys; from pipeline.record.plots import render_curves; "
            "render_curves([{'step': 1, 'train_loss': 1.0, 'test_accuracy': 0.5}]); "
            "print(sorted(m for m in ('matplotlib', 'PIL', 'numpy', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert out.strip() == "[]"
