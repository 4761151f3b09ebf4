"""curves.png: train loss (blue, left scale) and the test metric (red, right
scale) per epoch, for people; no hash covers it.

Drawn here, with no plotting library: a 600 x 400 RGB raster, straight lines,
a 5x7 bitmap font for the labels, and a PNG written with zlib (the PNG
specification, https://www.w3.org/TR/png/: signature, IHDR, one IDAT, IEND).
matplotlib took 0.7 s of every run to import and draw this (bench/bench_startup.py);
this takes milliseconds, and the same metrics give the same bytes (no
timestamps, fixed compression level).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core import atomic

__all__ = ["plot_curves", "render_curves", "WIDTH", "HEIGHT", "PLOT_BOX", "BLUE", "RED",
           "GREEN"]

WIDTH, HEIGHT = 600, 400
PLOT_BOX = (96, 40, WIDTH - 96, HEIGHT - 60)   # left, top, right, bottom (pixels)
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (225, 225, 225)
BLUE, RED = (31, 119, 180), (214, 39, 40)       # matplotlib's tab:blue and tab:red
GREEN = (44, 160, 44)                            # tab:green: the validation split
_SCALE = 2                                      # each font pixel is 2 x 2

# 5x7 glyphs (the HD44780's shapes), one int per row, bit 4 leftmost.
_FONT: dict[str, tuple[int, ...]] = {
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14),
    "2": (14, 17, 1, 2, 4, 8, 31), "3": (31, 2, 4, 2, 1, 17, 14),
    "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8),
    "8": (14, 17, 17, 14, 17, 17, 14), "9": (14, 17, 17, 15, 1, 2, 12),
    ".": (0, 0, 0, 0, 0, 12, 12), "-": (0, 0, 0, 31, 0, 0, 0), "+": (0, 4, 4, 31, 4, 4, 0),
    " ": (0,) * 7, "a": (0, 0, 14, 1, 15, 17, 15), "c": (0, 0, 14, 16, 16, 17, 14),
    "e": (0, 0, 14, 17, 31, 16, 14), "i": (4, 0, 12, 4, 4, 4, 14),
    "l": (12, 4, 4, 4, 4, 4, 14), "n": (0, 0, 22, 25, 17, 17, 17),
    "o": (0, 0, 14, 17, 17, 17, 14), "p": (0, 0, 30, 17, 30, 16, 16),
    "r": (0, 0, 22, 25, 16, 16, 16), "s": (0, 0, 14, 16, 14, 1, 30),
    "t": (8, 8, 28, 8, 8, 9, 6), "u": (0, 0, 17, 17, 17, 19, 13),
    "v": (0, 0, 17, 17, 17, 10, 4), "y": (0, 0, 17, 17, 15, 1, 14),
}
_BOX = (31, 17, 17, 17, 17, 17, 31)  # any other character


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, color: tuple[int, int, int], size: int = 1) -> None:
        for yy in range(y, y + size):
            for xx in range(x, x + size):
                if 0 <= xx < self.w and 0 <= yy < self.h:
                    i = (yy * self.w + xx) * 3
                    self.px[i:i + 3] = bytes(color)

    def line(self, a: tuple[int, int], b: tuple[int, int], color: tuple[int, int, int],
             size: int = 1) -> None:
        """Bresenham's line from a to b, both ends included."""
        (x0, y0), (x1, y1) = a, b
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.dot(x0, y0, color, size)
            if (x0, y0) == (x1, y1):
                return
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, s: str, color: tuple[int, int, int]) -> None:
        """``s`` with its top-left corner at (x, y)."""
        for k, ch in enumerate(s):
            for r, bits in enumerate(_FONT.get(ch, _BOX)):
                for c in range(5):
                    if bits >> (4 - c) & 1:
                        self.dot(x + (k * 6 + c) * _SCALE, y + r * _SCALE, color, _SCALE)

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return (struct.pack(">I", len(data)) + kind + data
                    + struct.pack(">I", zlib.crc32(kind + data)))
        row = self.w * 3
        raw = b"".join(b"\x00" + bytes(self.px[y * row:(y + 1) * row]) for y in range(self.h))
        ihdr = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def text_width(s: str) -> int:
    return len(s) * 6 * _SCALE


def _range(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    return (lo - 0.5, hi + 0.5) if hi <= lo else (lo, hi)  # a flat series: mid-height


def _series(canvas: _Canvas, points: list[tuple[float, float]], xr: tuple[float, float],
            color: tuple[int, int, int], right: bool,
            yr: tuple[float, float] | None = None, labels: bool = True) -> None:
    """One series, scaled to the plot box on its own y range (or ``yr``); its
    range's ends labelled on its side of the box."""
    left, top, rgt, bottom = PLOT_BOX
    if not points:
        return
    yr = yr or _range([y for _, y in points])

    def at(x: float, y: float) -> tuple[int, int]:
        return (round(left + (x - xr[0]) / (xr[1] - xr[0]) * (rgt - left)),
                round(bottom - (y - yr[0]) / (yr[1] - yr[0]) * (bottom - top)))
    pixels = [at(x, y) for x, y in points]
    for a, b in zip(pixels, pixels[1:]):
        canvas.line(a, b, color, 2)
    for p in pixels:
        canvas.dot(p[0] - 2, p[1] - 2, color, 5)
    for value, y in ((yr[1], top), (yr[0], bottom)) if labels else ():
        label = f"{value:.4g}"
        x = rgt + 6 if right else max(0, left - 6 - text_width(label))
        canvas.text(x, y - 7, label, color)


def render_curves(metrics: list[dict[str, Any]]) -> bytes:
    """The PNG of ``metrics`` (run.json's per-epoch records: step, train_loss,
    test_accuracy or test_loss; a missing or non-finite value is left out)."""
    canvas = _Canvas(WIDTH, HEIGHT)
    left, top, right, bottom = PLOT_BOX
    for i in range(1, 4):  # grid at quarters
        y, x = top + (bottom - top) * i // 4, left + (right - left) * i // 4
        canvas.line((left, y), (right, y), GREY)
        canvas.line((x, top), (x, bottom), GREY)
    for a, b in (((left, top), (right, top)), ((right, top), (right, bottom)),
                 ((right, bottom), (left, bottom)), ((left, bottom), (left, top))):
        canvas.line(a, b, BLACK)
    test = "test_accuracy" if metrics and "test_accuracy" in metrics[0] else "test_loss"

    def points(name: str) -> list[tuple[float, float]]:
        return [(float(m["step"]), float(m[name])) for m in metrics
                if isinstance(m.get(name), (int, float)) and math.isfinite(m[name])]
    steps = [float(m["step"]) for m in metrics]
    xr = _range(steps) if steps else (0.0, 1.0)
    _series(canvas, points("train_loss"), xr, BLUE, right=False)
    val = test.replace("test_", "val_", 1)
    both = [y for _, y in points(test) + points(val)]
    yr = _range(both) if both else None  # test and validation on one scale
    _series(canvas, points(test), xr, RED, right=True, yr=yr)
    _series(canvas, points(val), xr, GREEN, right=True, yr=yr, labels=False)  # test's scale
    canvas.text(left, top - 26, "train loss", BLUE)
    label = test.replace("_", " ")
    canvas.text(right - text_width(label), top - 26, label, RED)
    if points(val):
        vlabel = val.replace("_", " ")
        canvas.text(right - text_width(vlabel), bottom + 30, vlabel, GREEN)
    if steps:
        first, last = f"{xr[0]:.6g}", f"{xr[1]:.6g}"
        canvas.text(left, bottom + 8, first, BLACK)
        canvas.text(right - text_width(last), bottom + 8, last, BLACK)
    canvas.text((left + right - text_width("step")) // 2, bottom + 30, "step", BLACK)
    return canvas.png()


def plot_curves(path: Path, metrics: list[dict[str, Any]]) -> None:
    """Write ``render_curves(metrics)`` to ``path`` atomically."""
    atomic.write_bytes(path, render_curves(metrics))
