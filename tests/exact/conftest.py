"""The twin's layer product follows the pipeline's text of spec section 12.

Section 12 (``xmmb``) changed from one slice of A and B to two; the twin
implements the new text (``twin_layers.xmmb``) and keeps the first one
(``twin_layers.xmmb_v1``). Every layer of the twin calls ``twin_layers.XMMB``;
for each test here it is set to whichever of the two the pipeline's public
``pipeline.exact.xmmb`` agrees with bit for bit on an input where the two
texts differ (a block whose two large entries cancel: the first text keeps
4 bits of their block-mates, the new one all of them). A pipeline agreeing
with neither fails every test that asks, rather than comparing against a
guess. The twin's own tests of ``xmmb`` and ``xmmb_v1`` call them by name.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import pytest

from ..twin import twin_layers as tl


def _probe() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2026)
    A = rng.standard_normal((4, 100)).astype(np.float32)
    B = rng.standard_normal((100, 3)).astype(np.float32)
    A[:, 0], A[:, 1] = np.float32(2.0**20), np.float32(-2.0**20)   # x and -x
    B[1] = B[0]                                                     # cancel exactly
    return A, B


@functools.lru_cache(maxsize=1)
def pipeline_xmmb_text() -> str:
    """``"xmmb"`` (section 12's two slices) or ``"xmmb_v1"`` (the first text):
    the twin product the pipeline's ``xmmb`` matches bit for bit on the probe."""
    import torch

    from pipeline.exact import xmmb

    A, B = _probe()
    got = xmmb(torch.from_numpy(A), torch.from_numpy(B)).numpy().view(np.uint32)
    texts = {name: getattr(tl, name)(A, B).view(np.uint32) for name in ("xmmb", "xmmb_v1")}
    assert (texts["xmmb"] != texts["xmmb_v1"]).any(), "the probe does not tell the texts apart"
    same = [name for name, want in texts.items() if np.array_equal(got, want)]
    if len(same) != 1:
        raise AssertionError("pipeline.exact.xmmb matches neither text of section 12 "
                             "(twin_layers.xmmb nor xmmb_v1) on the probe input")
    return same[0]


@pytest.fixture(autouse=True)
def twin_xmmb(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Sets ``twin_layers.XMMB`` to the text the pipeline implements; yields its name."""
    name = pipeline_xmmb_text()
    monkeypatch.setattr(tl, "XMMB", getattr(tl, name))
    yield name
