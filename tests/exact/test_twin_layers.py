"""The twin's layers and the charlm network (tests/twin/twin_layers.py,
twin_charlm.py; docs/exact-spec.md sections 12-18) against the spec and the
pipeline.

1. self-checks: each op against a scalar (pure-Python) reading of the spec bit
   for bit where one is short, and against float64 references (math, mpmath,
   torch autograd in float64) within rounding;
2. the whole charlm network's gradient, dropout included, against float64
   torch autograd of the stock model in examples/charlm/model.py with the
   twin's weights and masks;
3. full runs: ``examples/charlm/config.toml mode=exact`` trained by ``python -m
   pipeline train`` (a subprocess: a black box) and by the twin, weight hash
   and test loss equal; a control: the twin with two dropout sites swapped
   gives another hash; the same for the project ``pipeline new`` writes (a
   stock convnet converted to the layers).
"""

from __future__ import annotations

import importlib.util
import json
import math
from fractions import Fraction

import numpy as np
import pytest

from ..support import ROOT as REPO
from ..support import f32_bits as _bits
from ..support import assert_close, run_pipeline, train_json
from ..twin import numpy_twin as tw
from ..twin import twin_charlm as tc
from ..twin import twin_convnet as tn
from ..twin import twin_layers as tl
from ..twin import twin_optim as to

CHARLM = REPO / "examples" / "charlm"
TEXT = REPO / "data" / "shakespeare.txt"
TEXT_SHA = "04decea0dd965df5e6cfc4a538b0c62623aaa3bfd848ac7fad6734e59c96624d"
F32 = np.float32
F64 = np.float64


def _same_bits(got, want, what=""):
    got, want = np.asarray(got, dtype=F32), np.asarray(want, dtype=F32)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    bad = np.nonzero(_bits(got).reshape(-1) != _bits(want).reshape(-1))[0]
    assert bad.size == 0, f"{what}: {bad.size} differ; first got {got.reshape(-1)[bad[:4]]!r} " \
                          f"want {want.reshape(-1)[bad[:4]]!r}"




# ------------------------------------------------------------------ 12. xmmb

def _xmmb_scalar(A: np.ndarray, B: np.ndarray, block: int = 64, fold: str = "left",
                 text: str = "two slices") -> np.ndarray:
    """Section 12 for one product: the slices and each block's sums H and X in
    Python integers and exact fractions, S as one correctly rounded f64 of the
    exact H * 2^(sA+sB) + X * 2^(sA+sB-23) (int / int division in Python rounds
    correctly, RNE), then the spec's f64 fold (Python floats, RNE) and
    RN32(Q + 0.0). ``block`` and ``fold`` ("left", "right" or "pairs") are the
    controls' deliberate misreadings; the spec's are 64 and "left".
    ``text="one slice"`` reads the first text of section 12 (``a``, ``b`` only,
    S = H * 2^(sA+sB)), which ``twin_layers.xmmb_v1`` keeps."""
    m, k = A.shape
    n = B.shape[1]
    C = np.zeros((m, n), dtype=F32)
    blocks = [range(s, min(s + block, k)) for s in range(0, k, block)]
    two = Fraction(2)

    def sliced(vals, bits):
        r = max(abs(Fraction(float(v))) for v in vals)
        s = (0 if r == 0 else math.frexp(float(r))[1]) - bits
        hi = [round(Fraction(float(v)) / two**s) for v in vals]               # RNE
        rem = [Fraction(float(v)) - h * two**s for v, h in zip(vals, hi)]     # exact
        assert all(abs(x) <= two ** (s - 1) for x in rem)
        lo = [round(x / two ** (s - 23)) for x in rem]                        # RNE
        return s, hi, lo

    qa = [[sliced([A[i, ll] for ll in ls], 24) for ls in blocks] for i in range(m)]
    qb = [[sliced([B[ll, j] for ll in ls], 23) for ls in blocks] for j in range(n)]
    for i in range(m):
        for j in range(n):
            S = []
            for (sa, a, a2), (sb, b, b2) in zip(qa[i], qb[j]):
                assert max(map(abs, a)) <= 2**24 and max(map(abs, b)) <= 2**23
                assert max(map(abs, a2)) <= 2**22 and max(map(abs, b2)) <= 2**22
                H = sum(x * y for x, y in zip(a, b))                   # exact integers
                X = sum(x * y2 + x2 * y for x, x2, y, y2 in zip(a, a2, b, b2))
                assert abs(H) <= 2**53 and abs(X) < 2**53
                if text == "one slice":
                    X = 0
                S.append(float(Fraction(H) * two ** (sa + sb)
                               + Fraction(X) * two ** (sa + sb - 23)))  # one rounding
            while fold == "pairs" and len(S) > 1:             # a control: another order
                S = [S[t] + S[t + 1] if t + 1 < len(S) else S[t] for t in range(0, len(S), 2)]
            Q = 0.0
            for t, s in enumerate(S if fold != "right" else S[::-1]):
                Q = s if t == 0 else Q + s                     # one f64 rounding each
            with np.errstate(over="ignore"):
                C[i, j] = F32(Q + 0.0)                         # RN32; a zero Q is +0
    return C


def _xmmb_cases(rng):
    """(name, A, B): k not a multiple of 64, zero blocks, one entry 2^20 times its
    row, -0 candidates, a fold whose order shows, extremes of the f32 range."""
    cases = [(f"k={k}", rng.standard_normal((m, k)).astype(F32),
              rng.standard_normal((k, n)).astype(F32))
             for m, k, n in [(3, 1, 4), (2, 63, 3), (3, 64, 2), (2, 65, 3), (2, 130, 2),
                             (2, 200, 3)]]
    A = rng.standard_normal((5, 130)).astype(F32)
    B = rng.standard_normal((130, 4)).astype(F32)
    A[0, 64:128] = 0                       # a zero block of a row
    A[1] = 0                               # a zero row
    B[:64, 1] = 0                          # a zero block of a column
    A[2, 70] = A[2, 70] * F32(2.0**20)     # one entry 2^20 times its row
    A[3, 5] = F32(2.0**20) * F32(np.abs(A[3]).max())
    A[4] = -np.abs(A[4]) * F32(0.0)        # -0 everywhere: -0 products, a -0 sum
    cases.append(("zero blocks, 2^20 entries, -0", A, B))
    # One product per block. Row 0: S = 1, 2^-53, 2^-53, -1; left to right
    # ((1 + 2^-53) + 2^-53) - 1 = +0 (each tie rounds to 1), while the exact
    # sum and the sum right to left are 2^-52 and the sum in pairs 2^-53.
    # Row 1: S = -1, 2^-53, 2^-53, 1 (exact steps): 2^-52. Row 2: row 0
    # negated: -1 - 2^-53 -> -1 (tie), ..., -1 + 1 = +0.
    A = np.zeros((3, 200), F32)
    B = np.zeros((200, 1), F32)
    A[0, [0, 64, 128, 192]] = [1.0, 2.0**-27, 2.0**-27, -1.0]
    A[1, [0, 64, 128, 192]] = [-1.0, 2.0**-27, 2.0**-27, 1.0]
    A[2] = -A[0]
    B[[0, 64, 128, 192], 0] = [1.0, 2.0**-26, 2.0**-26, 1.0]
    cases.append(("fold order", A, B))
    A = rng.standard_normal((6, 70)).astype(F32)
    A[0] *= F32(1e30)
    A[1] *= F32(1e-40)                     # subnormal
    A[2] = np.finfo(F32).smallest_subnormal
    A[3, :4] = F32(3e38)
    A[3, 4:] = F32(1e-30)
    A[4] = -np.finfo(F32).smallest_subnormal  # products underflow f32 (see below)
    B = rng.standard_normal((70, 3)).astype(F32)
    B[:, 1] = np.finfo(F32).smallest_subnormal
    B[3, 2] = F32(-2.0**40)
    cases.append(("extremes", A, B))
    # Where the low slices show: x and -x 2^20 times their block-mates, whose
    # products cancel exactly (the result is the block-mates' sum, of which
    # the high slice a keeps 4 bits); one column of A 2^10 times the rest with
    # its row of B 2^-10 times; entries below the high slice's unit (a = 0,
    # a' != 0); ties of both slices (RNE), a' at its bound 2^22.
    A = rng.standard_normal((4, 100)).astype(F32)
    B = rng.standard_normal((100, 3)).astype(F32)
    A[:2, 0], A[:2, 1] = F32(2.0**20), F32(-2.0**20)
    B[1] = B[0]
    A[2, 7] *= F32(2.0**10)
    B[7] *= F32(2.0**-10)
    A[3, 0] = F32(1.0)
    A[3, 1:64] = A[3, 1:64] * F32(2.0**-30)
    A[3, 64] = F32(1.0 + 2.0**-23)
    A[3, 65] = F32(2.5 * 2.0**-46)          # 2.5 units of a' (sA = -23): a tie, a' = 2
    A[3, 66] = F32(2.5 * 2.0**-23)          # a tie of the high slice: a = 2, a' = 2^22
    cases.append(("two slices", A, B))
    return cases


def test_xmmb_matches_integer_reading():
    """xmmb equals a transcription of section 12 (two slices of A and B, the
    block sums H and X, S rounded once, the f64 fold over blocks, then RN32)
    in Python integers and exact fractions bit for bit, on k = 1, 63, 64, 65,
    130, 200, zero blocks and rows, an entry 2^20 times its row, -0 products
    (+0 out), a fold whose order changes the result (left to right: +0 where
    the exact sum is 2^-52), huge, tiny and subnormal operands, cancelling
    outliers and entries below the high slice. Controls: a block of 32, the
    blocks added right to left or in pairs, or the one-slice first text, give
    other bits on some case, so the comparison can fail."""
    rng = np.random.default_rng(30)
    wrong = {"block 32": 0, "right to left": 0, "pairs": 0, "one slice": 0}
    for name, A, B in _xmmb_cases(rng):
        with np.errstate(over="ignore", under="ignore"):
            want = _xmmb_scalar(A, B)
            _same_bits(tl.xmmb(A, B), want, f"xmmb {name}")
            wrong["block 32"] += np.any(_bits(tl.xmmb(A, B, block=32)) != _bits(want))
            wrong["right to left"] += np.any(_bits(_xmmb_scalar(A, B, fold="right"))
                                             != _bits(want))
            wrong["pairs"] += np.any(_bits(_xmmb_scalar(A, B, fold="pairs")) != _bits(want))
            wrong["one slice"] += np.any(_bits(tl.xmmb_v1(A, B)) != _bits(want))
            if name == "fold order":
                assert want[:, 0].tolist() == [0.0, 2.0**-52, 0.0] and not _bits(want[[0, 2]]).any()
                assert float(_xmmb_scalar(A, B, fold="right")[0, 0]) == 2.0**-52
            if name.startswith("k=65"):   # the controls' own reading agrees with xmmb's
                _same_bits(tl.xmmb(A, B, block=32), _xmmb_scalar(A, B, block=32), "block 32")
    assert all(wrong.values()), f"a control gave the same bits on every case: {wrong}"


def test_xmmb_v1_matches_the_first_text():
    """xmmb_v1 (kept while the pipeline may implement the first text of section
    12, see tests/exact/conftest.py) equals the integer reading of that text
    (one slice: S = H * 2^(sA+sB)) bit for bit on the same cases."""
    rng = np.random.default_rng(30)
    for name, A, B in _xmmb_cases(rng):
        with np.errstate(over="ignore", under="ignore"):
            _same_bits(tl.xmmb_v1(A, B), _xmmb_scalar(A, B, text="one slice"), f"v1 {name}")


def test_pipeline_xmmb_is_section_12():
    """The pipeline's public xmmb is the current text of section 12 (the twin's
    ``xmmb``) bit for bit on a block whose two large entries cancel, where the
    first text (``xmmb_v1``: one slice, 4 bits of their block-mates) differs."""
    import torch

    from pipeline.exact import xmmb

    rng = np.random.default_rng(2026)
    A = rng.standard_normal((4, 100)).astype(F32)
    B = rng.standard_normal((100, 3)).astype(F32)
    A[:, 0], A[:, 1] = F32(2.0**20), F32(-2.0**20)   # x and -x
    B[1] = B[0]                                      # cancel exactly
    got = xmmb(torch.from_numpy(A), torch.from_numpy(B)).numpy()
    _same_bits(got, tl.xmmb(A, B), "pipeline vs section 12")
    assert np.any(_bits(tl.xmmb_v1(A, B)) != _bits(got)), "the probe does not tell the texts apart"


def test_xmmb_batched_empty_and_signed_zeros():
    """Each leading index of a batched xmmb is its own product (bit for bit);
    k = 0 gives +0; a product of -0 entries, and an exact cancellation, give
    +0; a nonzero Q below f32's range rounds to a signed zero (section 12
    normalises only a zero Q: the spec's words, kept literally)."""
    rng = np.random.default_rng(39)
    A = rng.standard_normal((3, 2, 5, 130)).astype(F32)
    B = rng.standard_normal((3, 2, 130, 4)).astype(F32)
    C = tl.xmmb(A, B)
    assert C.shape == (3, 2, 5, 4) and C.dtype == F32
    for i in range(3):
        for j in range(2):
            _same_bits(C[i, j], tl.xmmb(A[i, j], B[i, j]), "batched")
    _same_bits(C[1, 0], _xmmb_scalar(A[1, 0], B[1, 0]), "batched vs scalar")
    assert _bits(tl.xmmb(np.zeros((2, 0), F32), np.zeros((0, 3), F32))).tolist() == [[0] * 3] * 2
    assert tl.xmmb(np.zeros((4, 2, 0), F32), np.zeros((4, 0, 5), F32)).shape == (4, 2, 5)
    neg = np.full((2, 100), -0.0, F32)
    assert (_bits(tl.xmmb(neg, np.ones((100, 3), F32))) == 0).all()
    assert (_bits(tl.xmmb(np.ones((2, 100), F32), -np.ones((100, 3), F32) * F32(0))) == 0).all()
    a = np.array([[1.0, -1.0] * 40], F32)     # blocks 40 and 40: S_0 = 0, S_1 = 0
    assert (_bits(tl.xmmb(a, np.ones((80, 2), F32))) == 0).all()
    tiny = np.finfo(F32).smallest_subnormal
    with np.errstate(under="ignore"):
        c = tl.xmmb(np.array([[-tiny]], F32), np.array([[tiny]], F32))
    assert _bits(c).tolist() == [[0x80000000]]   # Q = -2^-298 != 0: RN32 gives -0
    with pytest.raises(ValueError):
        tl.xmmb(np.zeros((2, 3), F32), np.zeros((4, 2), F32))
    with pytest.raises(TypeError):
        tl.xmmb(np.zeros((2, 3), F64), np.zeros((3, 2), F32))


def _gemm_from_first_product(a, b):
    """A GEMM that starts each sum at its first product (not at +0): a sum of
    -0 products is then -0, as some BLAS give it."""
    prods = a[..., :, :, None] * b[..., None, :, :]      # (..., m, k, n)
    acc = prods[..., 0, :]
    for ll in range(1, prods.shape[-2]):
        acc = acc + prods[..., ll, :]
    return acc


def test_xmmb_bits_do_not_depend_on_the_gemm(monkeypatch):
    """xmmb gives the same bits whichever exact GEMM sums its blocks: with one
    that starts each sum at its first product (a -0 sum for -0 products) the
    results equal NumPy's matmul's, -0 candidates included (+0 out). Control:
    that GEMM does give -0 block sums on those cases, so without section 12's
    normalisation the bits would differ."""
    rng = np.random.default_rng(41)
    A = np.abs(rng.standard_normal((4, 128))).astype(F32)   # no padded block
    B = np.abs(rng.standard_normal((128, 3))).astype(F32)
    A[0] = F32(-0.0)                         # -0 * b > 0: -0 products in every block
    A[1, :64] = F32(-0.0)
    A[1, 64:] = 0                            # blocks -0, +0
    B[:, 2] = F32(-0.0)                      # rows 2, 3 times a -0 column
    want = tl.xmmb(A, B)
    assert not _bits(want[:2]).any() and not _bits(want[:, 2]).any()
    a, b = np.full((1, 64), -0.0), np.abs(B[:64, :1].astype(F64))
    assert np.signbit(_gemm_from_first_product(a, b)).all(), "the control GEMM gives +0"
    monkeypatch.setattr(tl, "_gemm", _gemm_from_first_product)
    _same_bits(tl.xmmb(A, B), want, "another GEMM")


def _rel_err(C, ref):
    return float(np.linalg.norm(np.asarray(C, F64) - ref) / np.linalg.norm(ref))


def _exact_product(A, B):
    """The product of the f32 operands rounded once to f64: each product of two
    f32 is exact in f64 and ``math.fsum`` rounds the exact sum once."""
    P = A.astype(F64)[:, :, None] * B.astype(F64)[None, :, :]
    return np.array([[math.fsum(P[i, :, j]) for j in range(P.shape[2])]
                     for i in range(P.shape[0])])


def _accuracy_inputs(kind, k, rng, m=16, n=16):
    A = rng.standard_normal((m, k)).astype(F32)
    B = rng.standard_normal((k, n)).astype(F32)
    if kind.startswith("column"):            # an outlier channel of A, its row of B small
        d = int(kind.split("^")[1])
        A[:, k // 2] *= F32(2.0**d)
        B[k // 2] *= F32(2.0**-d)
    elif kind == "entry 2^30":                 # one entry per row 2^30 times the rest
        A[np.arange(m), rng.integers(0, k, m)] *= F32(2.0**30)
    elif kind == "cancelling":                 # x and -x at the ends of the first block
        last = min(k, 64) - 1
        x = F32(2.0**20) * np.abs(A[:, 0]).max()
        A[:, 0], A[:, last] = x, -x
        B[last] = B[0]                         # their products cancel: the result is the tiny rest
    return A, B


ACCURACY_KINDS = ["normal", "column 2^10", "column 2^20", "entry 2^30", "cancelling"]


@pytest.mark.parametrize("kind", ACCURACY_KINDS)
def test_xmmb_accuracy_as_section_12_promises(kind):
    """Section 12's promise: from k = 17 on, the normwise error of xmmb against
    the exact product of the same f32 inputs is at most 2x stock fp32's
    (NumPy's float32 matmul), at k = 17, 1000, 4097 (M = N = 16), on normal
    inputs, a column of A 2^10 (and 2^20) times the rest with the matching row
    of B 2^-10 (2^-20) times, one entry per row 2^30 times the rest, and x and
    -x (2^20 times the rest) in one 64-block whose products cancel. Controls:
    the first text (one slice, ``xmmb_v1``) exceeds the bound on the outlier
    column at every k; A cut to 12 bits of its row's maximum exceeds it on
    normal inputs."""
    rng = np.random.default_rng(ACCURACY_KINDS.index(kind) + 12)
    for k in (17, 1000, 4097):
        A, B = _accuracy_inputs(kind, k, rng)
        ref = _exact_product(A, B)
        e32 = _rel_err(A @ B, ref)
        eb = _rel_err(tl.xmmb(A, B), ref)
        assert eb <= 2 * e32, f"{kind}, k={k}: xmmb {eb:.3g} > 2 x float32 {e32:.3g}"
        if kind.startswith("column"):
            assert _rel_err(tl.xmmb_v1(A, B), ref) > 2 * e32, "the control passed the bound"
        if kind == "normal":
            _, e = np.frexp(np.abs(A.astype(F64)).max(axis=1, keepdims=True))
            coarse = np.ldexp(np.rint(np.ldexp(A.astype(F64), 12 - e)), e - 12).astype(F32)
            assert _rel_err(tl.xmmb(coarse, B), ref) > 2 * e32, "the control passed the bound"


# ------------------------------------------------------------------ exp64, GELU

def test_exp64_is_xexp_without_its_conversions():
    """exp64 is within 1e-14 relative of exp (mpmath) on [-100, 85] (the degree-11
    polynomial's truncation, (ln 2 / 2)^12 / 12! = 6e-15); RN32(exp64(f64(x)))
    equals xexp(x) bit for bit; the clamp gives exp(90) and exp(-110)."""
    import mpmath

    rng = np.random.default_rng(31)
    t = np.concatenate([rng.uniform(-100, 85, 3000), rng.uniform(-1, 1, 1000)])
    got = tl.exp64(t)
    with mpmath.workdps(40):
        ref = np.array([float(mpmath.exp(mpmath.mpf(float(x)))) for x in t])
    assert (np.abs(got - ref) <= 1e-14 * np.abs(ref)).all()
    x = rng.uniform(-120, 95, 5000).astype(F32)
    with np.errstate(over="ignore"):
        _same_bits(tl.exp64(x.astype(F64)).astype(F32), tw.xexp(x), "xexp")
    assert tl.exp64(np.array([1e9]))[0] == tl.exp64(np.array([90.0]))[0]
    assert tl.exp64(np.array([-1e9]))[0] == tl.exp64(np.array([-110.0]))[0] > 0


def _gelu_scalar(x: np.float32):
    """Section 14's erf-form GELU and its derivative with Python floats."""
    d = float(x)
    z = d * (-0.7071067811865476)
    a = abs(z)
    t = 1.0 / (1.0 + 0.5 * a)
    C = [-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
         0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277]
    w = C[9]
    for n in range(8, -1, -1):
        w = w * t + C[n]
    ec = t * float(tl.exp64(np.array([w - a * a]))[0])
    Phi = 0.5 * ec if z >= 0 else 0.5 * (2.0 - ec)
    phi = float(tl.exp64(np.array([-((d * d) * 0.5)]))[0]) * 0.3989422804014327
    return F32(d * Phi), F32(Phi + d * phi)


def test_gelu_erf_matches_scalar_reading_and_erf():
    """GELU (erf form): forward and derivative equal a scalar reading of
    section 14 bit for bit; they are within the fit's 1.2e-7 (relative to
    Phi) of x * Phi(x) and Phi + x * phi computed with math.erf; large |x|
    gives x or +-0 and finite derivatives."""
    rng = np.random.default_rng(32)
    x = np.concatenate([rng.standard_normal(3000) * 3, rng.uniform(-40, 40, 500),
                        [0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38, 7.0, -7.0]]).astype(F32)
    g = np.ones_like(x)
    y, dy = tl.gelu_fwd(x), tl.gelu_bwd(g, x)
    ref = [_gelu_scalar(v) for v in x]
    _same_bits(y, [r[0] for r in ref], "gelu y")
    _same_bits(dy, [r[1] for r in ref], "gelu dy")
    d = x.astype(F64)
    Phi = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in d])
    phi = np.exp(-d * d / 2) / math.sqrt(2 * math.pi)
    fin = np.abs(d) < 1e18
    assert (np.abs(y[fin] - d[fin] * Phi[fin]) <= 1.3e-7 * np.abs(d[fin]) + 1e-37).all()
    assert (np.abs(dy[fin] - (Phi + d * phi)[fin]) <= 3e-7).all()
    assert y[-4] == x[-4] and _bits(y[-3]) in (0, 0x80000000)


def test_gelu_tanh_close_to_the_tanh_formula():
    """GELU (tanh form) and its derivative are within 1e-6 of the formula
    0.5 x (1 + tanh(u)) and its derivative in float64."""
    rng = np.random.default_rng(33)
    x = (rng.standard_normal(4000) * 4).astype(F32)
    d = x.astype(F64)
    u = math.sqrt(2 / math.pi) * (d + 0.044715 * d**3)
    th = np.tanh(u)
    ref = 0.5 * d * (1 + th)
    dref = 0.5 * (1 + th) + 0.5 * d * (1 - th**2) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * d**2)
    assert np.abs(tl.gelu_tanh_fwd(x) - ref).max() <= 1e-6 * max(1, np.abs(ref).max())
    assert np.abs(tl.gelu_tanh_bwd(np.ones_like(x), x) - dref).max() <= 1e-6


# ------------------------------------------------------------------ LayerNorm, Linear, attention

def _t64(a, grad=True):
    import torch

    return torch.tensor(np.asarray(a, dtype=F64), requires_grad=grad)


def test_layernorm_linear_conv_match_float64_autograd():
    """LayerNorm, Linear (3-D input) and Conv2d (xmmb) forward and backward are
    within float32 rounding of float64 torch autograd; LayerNorm's mean is the
    fixed tree (a row of [1e8, 1, -1e8, 1] gives mean 0.5 exactly)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(34)
    x = (rng.standard_normal((3, 5, 24)) * 2 + 1).astype(F32)
    w = (rng.standard_normal(24) * 0.5 + 1).astype(F32)
    b = rng.standard_normal(24).astype(F32)
    g = rng.standard_normal((3, 5, 24)).astype(F32)
    y, cache = tl.layernorm_fwd(x, w, b, 1e-5)
    gx, gw, gb = tl.layernorm_bwd(g, cache, w)
    tx, twt, tb = _t64(x), _t64(w), _t64(b)
    ty = F.layer_norm(tx, (24,), twt, tb, 1e-5)
    ty.backward(torch.tensor(g.astype(F64)))
    for got, ref, what in [(y, ty, "ln y"), (gx, tx.grad, "ln gx"), (gw, twt.grad, "ln gw"),
                           (gb, tb.grad, "ln gb")]:
        assert_close(got, ref.detach().numpy(), 1e-5, what)
    row = np.array([[1, 1e8, -1e8, 1]], dtype=F32)  # tree: (1 + 1e8) + (-1e8 + 1) = 0
    xh = tl.layernorm_fwd(row, None, None, 1e-5)[0]
    var = ((row[0, 0] * row[0, 0] + row[0, 1] * row[0, 1])
           + (row[0, 2] * row[0, 2] + row[0, 3] * row[0, 3])) / F32(4)
    _same_bits(xh, row / np.sqrt(var + F32(1e-5)), "tree mean 0 (a running sum gives 0.25)")

    W = rng.standard_normal((7, 24)).astype(F32)
    bl = rng.standard_normal(7).astype(F32)
    gl = rng.standard_normal((3, 5, 7)).astype(F32)
    yl = tl.linear_fwd(x, W, bl)
    gW, gbl, gxl = tl.linear_bwd(gl, x, W)
    tx, tW, tbl = _t64(x), _t64(W), _t64(bl)
    ty = F.linear(tx, tW, tbl)
    ty.backward(torch.tensor(gl.astype(F64)))
    for got, ref, what in [(yl, ty, "lin y"), (gW, tW.grad, "lin gW"), (gbl, tbl.grad, "lin gb"),
                           (gxl, tx.grad, "lin gx")]:
        assert_close(got, ref.detach().numpy(), 2e-6, what)

    xc = rng.standard_normal((2, 3, 6, 5)).astype(F32)
    Wc = rng.standard_normal((4, 3, 3, 3)).astype(F32)
    bc = rng.standard_normal(4).astype(F32)
    yc, cc = tl.conv2d_fwd(xc, Wc, bc, 2, 1)
    gc = rng.standard_normal(yc.shape).astype(F32)
    gWc, gbc, gxc = tl.conv2d_bwd(gc, cc, Wc, 2, 1)
    tx, tW, tb = _t64(xc), _t64(Wc), _t64(bc)
    ty = F.conv2d(tx, tW, tb, stride=2, padding=1)
    ty.backward(torch.tensor(gc.astype(F64)))
    for got, ref, what in [(yc, ty, "conv y"), (gWc, tW.grad, "conv gW"),
                           (gbc, tb.grad, "conv gb"), (gxc, tx.grad, "conv gx")]:
        assert_close(got, ref.detach().numpy(), 2e-6, what)


def _torch_attention(q, k, v, keep, scale_a, causal=True):
    import torch

    E = q.shape[-1]
    s = (q @ k.transpose(-1, -2)) * float(F32(1.0 / math.sqrt(E)))
    T, S = s.shape[-2:]
    if causal:
        s = s.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, dim=-1)
    if keep is not None:
        p = p * torch.as_tensor(keep, dtype=p.dtype) * float(scale_a)
    return p @ v


@pytest.mark.parametrize("causal,dropout", [(True, 0.0), (True, 0.25), (False, 0.1)])
def test_attention_matches_float64_autograd(causal, dropout):
    """Scaled dot-product attention (causal or not, with or without its dropout
    mask) forward and backward are within float32 rounding of float64 autograd;
    disallowed (future) positions get exactly +0 probability."""
    import torch

    rng = np.random.default_rng(35)
    N, H, T, E = 2, 3, 7, 4
    q, k, v = (rng.standard_normal((N, H, T, E)).astype(F32) for _ in range(3))
    gy = rng.standard_normal((N, H, T, E)).astype(F32)
    keep, scale = None, F32(1.0)
    if dropout:
        Tq, scale = tw.dropout_consts(dropout)
        keep = tl.layer_mask(5, 2, 1, 0, (N, H, T, T), Tq)
    y, cache = tl.attention_fwd(q, k, v, causal, None, keep, scale)
    gq, gk, gv = tl.attention_bwd(gy, cache)
    P = cache[3]
    if causal:
        assert (_bits(P[..., np.triu(np.ones((T, T), bool), 1)]) == 0).all()
    tq, tk, tv = _t64(q), _t64(k), _t64(v)
    ty = _torch_attention(tq, tk, tv, keep, scale, causal)
    ty.backward(torch.tensor(gy.astype(F64)))
    for got, ref, what in [(y, ty, "y"), (gq, tq.grad, "gq"), (gk, tk.grad, "gk"),
                           (gv, tv.grad, "gv")]:
        assert_close(got, ref.detach().numpy(), 5e-6, what)


def test_embedding_backward_tree_with_absent_entries():
    """Embedding: a copy forward (out-of-range indices refused); backward row v
    is the tree over positions holding v with the others absent: equal to a
    scalar reading of that tree bit for bit, an unused row is +0, a row whose
    only gradient is -0 stays -0; close to np.add.at in float64."""
    rng = np.random.default_rng(36)
    V, D = 6, 3
    idx = rng.integers(0, V - 1, (4, 9))          # row V-1 never occurs
    idx[0, 0] = 2
    g = rng.standard_normal((4, 9, D)).astype(F32) * F32(1e3)
    g[idx == 3] = F32(-0.0)                        # every occurrence of 3: a -0 gradient
    gW = tl.embedding_bwd(g, idx, V)

    def tree(vals):  # None is "absent"
        while len(vals) > 1:
            h = len(vals) // 2
            nxt = []
            for i in range(h):
                a, b = vals[2 * i], vals[2 * i + 1]
                nxt.append(b if a is None else a if b is None else F32(a + b))
            vals = nxt + ([vals[-1]] if len(vals) % 2 else [])
        return vals[0]

    flat_i, flat_g = idx.reshape(-1), g.reshape(-1, D)
    for vv in range(V):
        for dd in range(D):
            r = tree([flat_g[p, dd] if flat_i[p] == vv else None for p in range(len(flat_i))])
            _same_bits(gW[vv, dd], F32(0.0) if r is None else r, f"row {vv} col {dd}")
    assert (_bits(gW[V - 1]) == 0).all() and (_bits(gW[3]) == 0x80000000).all()
    ref = np.zeros((V, D))
    np.add.at(ref, flat_i, flat_g.astype(F64))
    assert_close(gW, ref, 1e-6, "embedding")
    W = rng.standard_normal((V, D)).astype(F32)
    assert np.array_equal(tl.embedding_fwd(idx, W), W[idx])
    with pytest.raises(IndexError):
        tl.embedding_fwd(np.array([V]), W)


def test_sum_to_follows_section_13():
    """sum_to: leading dims flattened and tree-summed, then size-1 dims of the
    operand in increasing order; equal to explicit trees bit for bit."""
    rng = np.random.default_rng(37)
    g = (rng.standard_normal((3, 4, 5, 6)) * 1e4).astype(F32)
    _same_bits(tl.sum_to(g, (5, 6)), tw.tree_sum(g.reshape(12, 5, 6), 0), "leading")
    want = np.expand_dims(tw.tree_sum(tw.tree_sum(g.reshape(12, 5, 6), 0), 0), 0)
    _same_bits(tl.sum_to(g, (1, 6)), want, "leading then dim 0")
    want = np.expand_dims(tw.tree_sum(g, 1), 1)
    want = np.expand_dims(tw.tree_sum(want, 3), 3)
    _same_bits(tl.sum_to(g, (3, 1, 5, 1)), want, "dims 1 then 3")


# ------------------------------------------------------------------ masks, init

def test_layer_masks_depend_on_global_row_step_and_site():
    """Section 15: a row's mask depends on (seed, step, site, global row) only:
    the shard holding rows [r0, r1) sees those rows of the whole batch's mask;
    another step or site gives another mask; the kept share is about 1 - q;
    element j of row g uses u24(key(seed, 7, t, site), g*F + j)."""
    T, _ = tw.dropout_consts(0.25)
    full = tl.layer_mask(3, 5, 2, 0, (8, 4, 6), T)
    for r0 in (0, 2, 4, 6):
        assert np.array_equal(tl.layer_mask(3, 5, 2, r0, (2, 4, 6), T), full[r0:r0 + 2])
    assert not np.array_equal(tl.layer_mask(3, 6, 2, 0, (8, 4, 6), T), full)
    assert not np.array_equal(tl.layer_mask(3, 5, 3, 0, (8, 4, 6), T), full)
    big = tl.layer_mask(0, 0, 0, 0, (64, 1000), T)
    assert abs(big.mean() - 0.75) < 0.01
    K = tw.key(3, 7, 5, 2)
    assert full[5, 1, 3] == ((tw.out_int(K, 5 * 24 + 1 * 6 + 3) >> 40) >= T)


def test_charlm_init_numbering_and_distributions():
    """Section 16/18: names and shapes of the stock model; layer numbers in
    registration order (qkv of block 1 is layer 9, the head 2 + 6 n_layer + 1);
    embeddings are Irwin-Hall N(0, 1) (mean ~0, std ~1, |w| <= 6, element 0 by
    hand); LayerNorm w = 1, b = 0; Linear uniform within its bound."""
    p = tc.init_params(0, 84, 64, 2, 32)
    gpt = _stock_model(d_model=32)
    assert {k: v.shape for k, v in p.items()} == {
        k: tuple(v.shape) for k, v in gpt.state_dict().items()}
    assert np.array_equal(p["blocks.1.qkv.weight"], tl.uniform_init(0, 9, 0, (96, 32), 32))
    assert np.array_equal(p["head.bias"], tl.uniform_init(0, 15, 1, (84,), 32))
    assert np.array_equal(p["pos.weight"], tl.normal_init(0, 1, (64, 32)))
    e = p["tok.weight"]
    assert abs(e.mean()) < 0.05 and abs(e.std() - 1) < 0.05 and np.abs(e).max() <= 6
    K = tw.key(0, tw.INIT, 0, 0)
    s = sum(tw.out_int(K, j) >> 40 for j in range(12))
    assert e[0, 0] == F32(s / 2**24 - 6.0)
    assert (p["blocks.0.ln2.weight"] == 1).all() and (_bits(p["ln_f.bias"]) == 0).all()
    bound = F32(1 / math.sqrt(128))
    assert (np.abs(p["blocks.0.fc_out.weight"]) <= bound).all()


# ------------------------------------------------------------------ the whole network

def _stock_model(**args):
    spec = importlib.util.spec_from_file_location("charlm_model_for_twin", CHARLM / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.gpt((64,), 84, **{"n_layer": 2, "n_head": 4, "d_model": 128, "dropout": 0.1,
                                 **args})


def test_charlm_gradient_matches_the_stock_model_in_float64():
    """The twin's charlm forward/backward (one shard, dropout 0.2) is within
    float32 rounding of float64 autograd through examples/charlm/model.py with
    the twin's weights, its nn.Dropout modules and its attention dropout fed the
    twin's masks in the order the stock model draws them (drop; per block the
    attention, drop1, drop2): loss, logits' gradient and every parameter."""
    import torch
    import torch.nn.functional as F

    arch = {"n_layer": 2, "n_head": 4, "d_model": 16, "dropout": 0.2}
    T, V, N = 8, 84, 3
    p = tc.init_params(4, V, 64, 2, 16)
    rng = np.random.default_rng(38)
    x = rng.integers(0, V, (N, T))
    y = rng.integers(0, V, (N, T))
    ctx = tc.Ctx(4, 7, 5, 0.2)
    grads, loss = tc.shard_grads(p, x, y, N * T, arch, ctx)
    assert ctx.site == 7 and [m.shape for m in ctx.drawn[:2]] == [(N, T, 16), (N, 4, T, T)]

    model = _stock_model(d_model=16, dropout=0.2).double()
    model.load_state_dict({k: torch.tensor(v.astype(F64)) for k, v in p.items()})
    model.train()
    masks = iter(ctx.drawn)
    scale = float(ctx.scale)

    def drop_forward(h):
        return h * torch.as_tensor(next(masks), dtype=h.dtype) * scale

    def sdpa(q, k, v, dropout_p=0.0, is_causal=False, **kw):
        assert is_causal and dropout_p == 0.2
        return _torch_attention(q, k, v, next(masks), scale)

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.forward = drop_forward
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa
    try:
        logits = model(torch.tensor(x))
    finally:
        F.scaled_dot_product_attention = real
    assert next(masks, None) is None
    ref_loss = F.cross_entropy(logits.reshape(-1, V), torch.tensor(y).reshape(-1))
    ref_loss.backward()
    assert abs(float(loss) / (N * T) - float(ref_loss.detach())) < 1e-5
    for k, prm in model.named_parameters():
        assert_close(grads[k], prm.grad.numpy(), 2e-5, k)


# ------------------------------------------------------------------ full runs

def _charlm_cfg(overrides):
    return tw.load_config(str(CHARLM / "config.toml"), ["mode=exact", *overrides])


def _pipeline(overrides, runs, env):
    return train_json(["mode=exact", *overrides], runs, env, config=CHARLM / "config.toml", timeout=600)


SMALL = ["train.max_steps=3", "model.args.d_model=32", "data.context=16",
         "data.test_fraction=0.0001"]
# AdamW's decay reaches LayerNorm and embedding weights; clipping's norm is a
# tree over 30 tensors in sorted-name order ("blocks.0..." before "head...").
OPTIONS = ["optim.name=adamw", "optim.weight_decay=0.1", "optim.clip_norm=0.5",
           "optim.schedule=cosine", "optim.warmup_steps=1"]
DEFAULT_SIZE = ["train.max_steps=3", "data.test_fraction=0.0002"]  # the example's own size


def _swap_drop_sites(monkeypatch):
    real = tl.layer_mask

    def swapped(seed, step, site, row0, shape, T):
        site = {2: 3, 3: 2}.get(site, site)  # block 0's drop1 and drop2
        return real(seed, step, site, row0, shape, T)

    monkeypatch.setattr(tl, "layer_mask", swapped)


def _no_clip(monkeypatch):
    monkeypatch.setattr(to, "clip_grads", lambda grads, c: F32(1.0))


@pytest.mark.process
@pytest.mark.parametrize("name,overrides,control", [
    pytest.param("small", SMALL, _swap_drop_sites, id="small"),
    pytest.param("options", SMALL + OPTIONS, _no_clip, id="small_adamw_clip_cosine"),
    pytest.param("default", DEFAULT_SIZE, None, id="default_size")])
def test_charlm_hash_and_test_loss_match_pipeline(name, overrides, control, tmp_path, suite_env,
                                                  monkeypatch):
    """The charlm example in exact mode (4 shards, dropout 0.1; Adam as
    configured, or AdamW with weight decay, clipping and a warm-up + cosine
    schedule): the twin's weight hash and test loss equal the pipeline's.
    Controls: the twin with drop1 and drop2 drawing each other's site numbers,
    or without clipping, gives another hash."""
    params, metrics = tc.train(_charlm_cfg(overrides), str(TEXT), TEXT_SHA, with_test_loss=True)
    want = tw.weights_sha256(params)
    run = _pipeline(overrides, tmp_path / "runs", suite_env)
    assert run["weights_sha256"] == want, (name, run["weights_sha256"], want)
    assert run["metrics"]["test_loss"] == metrics["test_loss"]
    if control is not None:
        control(monkeypatch)
        other, _ = tc.train(_charlm_cfg(overrides), str(TEXT), TEXT_SHA)
        assert tw.weights_sha256(other) != want, f"{name}: the control changed nothing"


@pytest.mark.process
def test_new_project_convnet_hash_matches_pipeline(tmp_path, suite_env):
    """The project ``pipeline new`` writes (a stock Conv2d/ReLU/Flatten/Dropout/
    Linear Sequential) trained in exact mode, 3 steps on 8 shards: the twin's
    weight hash and test accuracy equal the pipeline's (Conv2d with xmmb,
    ReLU, a dropout site on flattened rows, layer numbering of a Sequential).
    Control: the twin without the dropout mask gives another hash."""
    proj = tmp_path / "proj"
    p = run_pipeline(["new", str(proj)], suite_env)
    assert p.returncode == 0, p.stderr
    overrides = ["mode=exact", "model.args.channels=4", "train.max_steps=3"]
    cfg = tw.load_config(str(proj / "config.toml"), overrides)
    data = proj / "data" / "digits.csv.gz"
    params, metrics = tn.train(cfg, str(data), tw.file_sha256(str(data)))
    want = tw.weights_sha256(params)
    p = run_pipeline(["train", str(proj / "config.toml"), *overrides, "--runs-dir",
                      str(tmp_path / "runs"), "--json", "--quiet"], suite_env, timeout=600)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stderr[-3000:]}"
    run = json.loads(p.stdout)
    assert run["weights_sha256"] == want, (run["weights_sha256"], want)
    assert run["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    cfg["model"]["args"]["dropout"] = 0.0
    assert tw.weights_sha256(tn.train(cfg, str(data), tw.file_sha256(str(data)))[0]) != want
