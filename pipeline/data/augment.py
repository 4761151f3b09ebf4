"""Augmentation by key: each training example's transform is a pure function of
(seed, epoch, example id) and its pixels (docs/reference/augment.md).

Random numbers come from the counter generator (pipeline.core.rng): example
``e`` of epoch ``t`` draws ``out(key(seed, AUGMENT, t, e), i)`` for fixed slots
``i`` (``_SLOTS``), so no generator state exists: neither the world size, the
thread count, a loader worker nor a resumed checkpoint can change a draw. The
arithmetic is fixed: positions are integers (``(u24 * n) >> 24`` picks among
``n``), the resized crop's size is computed in float64 ``+ - * / sqrt`` (each
correctly rounded, IEEE 754) and sampled by nearest index in integers, and the
photometric steps are single float32 operations (each correctly rounded; NumPy
fuses none), so the bits are the same in pinned and exact mode, on any machine.

Order, each step only if configured: random resized crop, random crop with
zero padding, horizontal flip, brightness, contrast, the user's ``transform``.
Evaluation (test metrics) sees the inputs unaugmented.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..core import rng
from ..core.usercode import UserCodeError
from ..core.config import AugmentConfig

__all__ = ["Augmenter", "Draws", "augmenter", "SLOTS"]

# slot -> what it draws (out(key, slot)); the user's transform has its own stream
SLOTS = {"resized_scale": 0, "resized_ratio": 1, "resized_y": 2, "resized_x": 3,
         "crop_y": 4, "crop_x": 5, "flip": 6, "brightness": 7, "contrast": 8}
_N_SLOTS = 9
_TWO24 = float(1 << 24)


class Draws:
    """The random numbers of one example for the user's transform: the counter
    stream ``key(seed, AUGMENT, epoch, example, 1)`` read in order."""

    def __init__(self, key: int) -> None:
        self.key, self.counter = key, 0

    def u24(self, count: int) -> np.ndarray:
        """``count`` integers in [0, 2^24) (int64)."""
        out = rng.u24(self.key, self.counter, count)
        self.counter += count
        return out

    def integers(self, n: int, count: int) -> np.ndarray:
        """``count`` integers in [0, n): ``(u24 * n) >> 24``, exact for n < 2^39."""
        return (self.u24(count) * n) >> 24

    def uniform(self, count: int) -> np.ndarray:
        """``count`` float64 in [0, 1): u24 / 2^24 (exact)."""
        return self.u24(count) / _TWO24


def _pick(u: int, n: int) -> int:
    """One of ``n`` choices from a 24-bit draw, in integers."""
    return (u * n) >> 24


def _resized_crop(img: np.ndarray, u: np.ndarray, scale: tuple[float, ...],
                  ratio: tuple[float, ...]) -> np.ndarray:
    """A crop of area ``scale`` and aspect ``ratio`` (uniform in each range),
    sampled back to (H, W) by nearest index: row i reads y0 + (i * ch) // H."""
    _, h, w = img.shape
    area = (scale[0] + (scale[1] - scale[0]) * (u[SLOTS["resized_scale"]] / _TWO24)) * (h * w)
    r = ratio[0] + (ratio[1] - ratio[0]) * (u[SLOTS["resized_ratio"]] / _TWO24)
    ch = min(h, max(1, math.floor(math.sqrt(area / r) + 0.5)))
    cw = min(w, max(1, math.floor(math.sqrt(area * r) + 0.5)))
    y0 = _pick(int(u[SLOTS["resized_y"]]), h - ch + 1)
    x0 = _pick(int(u[SLOTS["resized_x"]]), w - cw + 1)
    rows = y0 + (np.arange(h) * ch) // h
    cols = x0 + (np.arange(w) * cw) // w
    return img[:, rows][:, :, cols]


def _padded_crop(img: np.ndarray, u: np.ndarray, p: int) -> np.ndarray:
    """The (H, W) window at a uniform offset in [0, 2p] of the image padded by p zeros."""
    c, h, w = img.shape
    padded = np.zeros((c, h + 2 * p, w + 2 * p), dtype=img.dtype)
    padded[:, p:p + h, p:p + w] = img
    oy, ox = _pick(int(u[SLOTS["crop_y"]]), 2 * p + 1), _pick(int(u[SLOTS["crop_x"]]), 2 * p + 1)
    return padded[:, oy:oy + h, ox:ox + w]


def _factor(u: int, spread: float) -> np.float32:
    """float32(1 - s + 2 s (u / 2^24)): float64 steps, one rounding to float32."""
    return np.float32(1.0 - spread + 2.0 * spread * (u / _TWO24))


# The user's transform runs twice for this many examples of each process, and
# must give the same bits both times (a transform drawing from a global
# generator or the clock is refused at its first examples, exit 2).
CHECK_TWICE = 64


class Augmenter:
    """The configured transforms of ``seed``'s run; ``user`` the loaded
    ``transform`` function, or None."""

    def __init__(self, cfg: AugmentConfig, seed: int, user: Callable[..., Any] | None) -> None:
        self.cfg, self.seed, self.user = cfg, seed, user
        self.checked = 0  # user transforms run twice and compared, for the first examples

    def one(self, img: np.ndarray, example: int, epoch: int) -> np.ndarray:
        """Example ``example``'s input (C, H, W) float32 as epoch ``epoch`` sees it."""
        cfg = self.cfg
        u = rng.u24(rng.key(self.seed, rng.AUGMENT, epoch, example, 0), 0, _N_SLOTS)
        if img.ndim != 3 and (cfg.resized_crop_scale or cfg.crop_padding or cfg.hflip):
            raise ValueError(f"data.augment: crops and flips need (C, H, W) inputs, found "
                             f"shape {img.shape}")
        if cfg.resized_crop_scale:
            img = _resized_crop(img, u, cfg.resized_crop_scale, cfg.resized_crop_ratio)
        if cfg.crop_padding:
            img = _padded_crop(img, u, cfg.crop_padding)
        if cfg.hflip and u[SLOTS["flip"]] >> 23:
            img = img[:, :, ::-1]
        if cfg.brightness:
            img = img * _factor(int(u[SLOTS["brightness"]]), cfg.brightness)
        if cfg.contrast:
            half = np.float32(0.5)
            img = (img - half) * _factor(int(u[SLOTS["contrast"]]), cfg.contrast) + half
        img = np.ascontiguousarray(img, dtype=np.float32)
        if self.user is not None:
            img = self._user(img, example, epoch)
        return img

    def _user(self, img: np.ndarray, example: int, epoch: int) -> np.ndarray:
        key = rng.key(self.seed, rng.AUGMENT, epoch, example, 1)
        out = self._call(img, key)
        if self.checked < CHECK_TWICE:  # the same key must give the same bits, always
            self.checked += 1
            again = self._call(img, key)
            if out.tobytes() != again.tobytes():
                raise UserCodeError("data.augment.transform", (
                    f"data.augment.transform: example {example} of epoch {epoch}, transformed "
                    f"twice with the same key and generator, came out different: it draws "
                    f"from somewhere else (Python's random, NumPy's or torch's global "
                    f"generator, the clock, state it keeps); draw only from the generator it "
                    f"is given, so that the weights do not depend on when it runs"))
        return out

    def _call(self, img: np.ndarray, key: int) -> np.ndarray:
        from ..core.usercode import guarded

        with guarded("transforming an example", "data.augment.transform"):
            out = self.user(img.copy(), key, Draws(key))  # type: ignore[misc]
        if not (isinstance(out, np.ndarray) and out.dtype == np.float32
                and out.shape == img.shape):
            got = f"{type(out).__name__} {getattr(out, 'dtype', '')} {getattr(out, 'shape', '')}"
            raise UserCodeError("data.augment.transform", (
                f"data.augment.transform: expected a float32 array of shape {img.shape} "
                f"returned, found {got}"))
        return out

    def batch(self, x: np.ndarray, ids: np.ndarray, epoch: int) -> np.ndarray:
        """Every example of a batch (B, ...) by its id: each one's own key."""
        return np.stack([self.one(x[i], int(e), epoch) for i, e in enumerate(ids)])


def augmenter(cfg: AugmentConfig, seed: int, user: Callable[..., Any] | None = None
              ) -> Augmenter | None:
    """The run's Augmenter, or None when nothing is configured."""
    on = (cfg.resized_crop_scale or cfg.crop_padding or cfg.hflip or cfg.brightness
          or cfg.contrast or cfg.transform)
    return Augmenter(cfg, seed, user) if on else None
