"""The NumPy twin: an independent implementation of docs/exact-spec.md.

Written from the specification alone: nothing under ``pipeline/`` is imported,
and nothing under ``pipeline/exact/`` was read by its authors. Every
floating-point operation is one IEEE-754 operation on float32 or float64
arrays, rounded to nearest-even, in the order the spec gives; the only
multi-term sums are the fixed tree (``tree_sum``) and the integer-valued
float64 matrix products inside ``xmm``/``xmmb`` (exact by construction;
``xmmb`` then adds its block results left to right in float64, section 12).

Files: this one (sections 1-8, 10, 11: the counter RNG, data, the built-in MLP
and CNN, ``xmm``, trees, exp/log, cross-entropy, the training loop, the hash,
the CLI); ``twin_optim.py`` (9: SGD, Nesterov, Adam, AdamW, clipping, the
schedule); ``twin_layers.py`` (12-16: ``xmmb``, Linear, Conv2d, Embedding,
LayerNorm, GELU, dropout masks, attention, ``sum_to``, initialisation);
``twin_ops.py`` (20-23: SiLU, Sigmoid, Tanh, sum and mean over dims, softmax
and log-softmax on any dim, RMSNorm, max/avg/adaptive-avg pooling and their
fold); ``twin_charlm.py`` (17-19: examples/charlm as layers, its text data);
``twin_convnet.py`` (the model ``pipeline new`` writes, as layers);
``twin_opsnet.py`` (a project model using every op of sections 20-23).

Usage::

    python tests/twin/numpy_twin.py configs/digits.toml mode=exact \
        train.epochs=2 --data data/digits.csv.gz
    python tests/twin/numpy_twin.py examples/charlm/config.toml mode=exact \
        train.max_steps=3 --data data/shakespeare.txt
"""

from __future__ import annotations

import contextlib
import copy
import csv
import ctypes
import glob
import gzip
import hashlib
import io
import math
import os
import sys
import time
import tomllib
from typing import Any

import numpy as np

try:
    from . import twin_optim
except ImportError:  # run as a script from tests/twin/
    import twin_optim  # type: ignore[no-redef]

F32 = np.float32
F64 = np.float64

# --------------------------------------------------------------------------
# 1. SplitMix64 counter RNG
# --------------------------------------------------------------------------
M64 = (1 << 64) - 1
G = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB

SPLIT, SHUFFLE, INIT, DROPOUT = 1, 2, 3, 4


def mix(z: int) -> int:
    """SplitMix64 finaliser on a Python int (mod 2^64)."""
    z &= M64
    z = ((z ^ (z >> 30)) * _C1) & M64
    z = ((z ^ (z >> 27)) * _C2) & M64
    return z ^ (z >> 31)


def absorb(h: int, w: int) -> int:
    if not 0 <= w <= M64:
        raise ValueError(f"absorb word out of range: {w}")
    return mix(((h ^ w) + G) & M64)


def key(seed: int, *words: int) -> int:
    h = absorb(0, seed)
    for w in words:
        h = absorb(h, w)
    return h


def out_int(K: int, i: int) -> int:
    """Scalar reference of out(K, i) with Python ints."""
    return mix((K + (i + 1) * G) & M64)


def _mix_u64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_C1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_C2)
    return z ^ (z >> np.uint64(31))


def out(K: int, start: int, count: int) -> np.ndarray:
    """out(K, i) for i in [start, start + count) as a uint64 array."""
    i = np.arange(count, dtype=np.uint64) + np.uint64(start)
    with np.errstate(over="ignore"):
        z = np.uint64(K) + (i + np.uint64(1)) * np.uint64(G)
        return _mix_u64(z)


def u24(K: int, start: int, count: int) -> np.ndarray:
    """u24(K, i) = out(K, i) >> 40 for i in [start, start + count), int64."""
    return (out(K, start, count) >> np.uint64(40)).astype(np.int64)


# --------------------------------------------------------------------------
# Exact powers of two and basic exact ops
# --------------------------------------------------------------------------

def pow2(e) -> np.ndarray:
    """2**e as float64, exactly (ldexp of 1.0 by an integer exponent)."""
    return np.ldexp(F64(1.0), np.asarray(e, dtype=np.int32))


def _ceil_log2(k: int) -> int:
    """Smallest c >= 0 with 2^c >= k."""
    return max(0, (k - 1).bit_length())


# --------------------------------------------------------------------------
# 4. xmm
# --------------------------------------------------------------------------

def _quantize(M: np.ndarray, axis: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Integers round_half_even(f64(M) * 2^-s) with s = frexp_exp(max|.|) - p,
    the max taken along ``axis`` (kept as a broadcastable dim)."""
    Md = M.astype(F64)  # exact widening
    r = np.max(np.abs(Md), axis=axis, keepdims=True)
    _, e = np.frexp(r)  # frexp(0) -> exponent 0, as the spec requires
    s = e.astype(np.int32) - np.int32(p)
    q = np.rint(np.ldexp(Md, -s))  # the product by 2^-s is exact; rint is RNE
    return q, s


def xmm(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Exact-then-rounded f32 matrix product (spec section 4)."""
    A = np.asarray(A)
    B = np.asarray(B)
    if A.dtype != F32 or B.dtype != F32:
        raise TypeError(f"xmm wants float32, got {A.dtype}, {B.dtype}")
    m, k = A.shape
    k2, n = B.shape
    if k != k2:
        raise ValueError(f"xmm shape mismatch {A.shape} @ {B.shape}")
    c = _ceil_log2(k)
    p = min(24, (52 - c) // 2)
    a, sA = _quantize(A, 1, p)  # sA: (m, 1)
    b, sB = _quantize(B, 0, p)  # sB: (1, n)
    P = np.matmul(a, b)  # integers, |partial sums| <= 2^52: exact in any order
    C = np.ldexp(P, sA + sB)  # exact
    with np.errstate(over="ignore"):  # overflow to +-inf is the IEEE result
        return C.astype(F32)  # RN32


# --------------------------------------------------------------------------
# 5. Fixed tree
# --------------------------------------------------------------------------

def tree_sum(X: np.ndarray, dim: int) -> np.ndarray:
    """Neighbour-pairing tree sum over ``dim`` (the dim is removed)."""
    X = np.moveaxis(np.asarray(X), dim, 0)
    n = X.shape[0]
    if n == 0:
        return np.zeros(X.shape[1:], dtype=X.dtype)
    while n > 1:
        h = n // 2
        pairs = X[0:2 * h:2] + X[1:2 * h:2]
        if n % 2:
            X = np.concatenate([pairs, X[n - 1:n]], axis=0)
        else:
            X = pairs
        n = X.shape[0]
    return X[0].copy()


def tree_mean(X: np.ndarray, dim: int) -> np.ndarray:
    n = np.asarray(X).shape[dim]
    return tree_sum(X, dim) / np.asarray(n, dtype=np.asarray(X).dtype)


# --------------------------------------------------------------------------
# 7. xexp, xlog, softmax cross-entropy
# --------------------------------------------------------------------------
LOG2E = 1.4426950408889634
LN2_HI = 0.6931471803691238
LN2_LO = 1.9082149292705877e-10
SQRT_HALF = 0.7071067811865476

E_COEF = [1.0 / float(math.factorial(n)) for n in range(12)]  # n! exact in f64
D_COEF = [1.0 / float(2 * n + 1) for n in range(12)]
assert F64(LN2_HI).view(np.uint64) == np.uint64(0x3FE62E42FEE00000)
assert F64(LN2_LO).view(np.uint64) == np.uint64(0x3DEA39EF35793C76)


def xexp(x) -> np.ndarray:
    x = np.asarray(x, dtype=F32)
    d = x.astype(F64)
    d = np.minimum(np.maximum(d, F64(-110.0)), F64(90.0))  # NaN propagates
    k = np.rint(d * F64(LOG2E))
    r = (d - k * F64(LN2_HI)) - k * F64(LN2_LO)
    q = np.full_like(d, F64(E_COEF[11]))
    for n in range(10, -1, -1):
        q = q * r + F64(E_COEF[n])
    ki = np.where(np.isnan(k), F64(0.0), k).astype(np.int32)
    with np.errstate(over="ignore"):  # k up to 130: RN32 gives +inf, as IEEE says
        return np.ldexp(q, ki).astype(F32)


def xlog(s) -> np.ndarray:
    s = np.asarray(s, dtype=F32)
    d = s.astype(F64)
    with np.errstate(invalid="ignore", divide="ignore"):
        m0, e = np.frexp(d)
        small = m0 < F64(SQRT_HALF)
        m = np.where(small, m0 * F64(2.0), m0)
        e = np.where(small, e - 1, e)
        f = m - F64(1.0)
        u = f / (F64(2.0) + f)
        z = u * u
        w = np.full_like(d, F64(D_COEF[11]))
        for n in range(10, -1, -1):
            w = w * z + F64(D_COEF[n])
        lm = (u * w) * F64(2.0)
        ef = e.astype(F64)
        res = ((ef * F64(LN2_LO) + lm) + ef * F64(LN2_HI)).astype(F32)
    res = np.where(s == F32(0.0), F32(-np.inf), res)
    res = np.where(s == F32(np.inf), F32(np.inf), res)
    res = np.where((s < F32(0.0)) | np.isnan(s), F32(np.nan), res)
    return res.astype(F32)


def softmax_xent(z: np.ndarray, y: np.ndarray, n_global: int):
    """Per-row loss (lse - z_y) and gradient wrt logits, divided by N."""
    z = np.asarray(z, dtype=F32)
    y = np.asarray(y, dtype=np.int64)
    rows = np.arange(z.shape[0])
    mx = np.max(z, axis=1, keepdims=True)
    with np.errstate(over="ignore"):  # z - mx may overflow to -inf (IEEE)
        dz = z - mx
    e = xexp(dz)
    s = tree_sum(e, 1)
    lse = xlog(s) - dz[rows, y]
    g = e / s[:, None]
    g[rows, y] = g[rows, y] - F32(1.0)
    g = g / F32(n_global)
    return lse.astype(F32), g.astype(F32)


# --------------------------------------------------------------------------
# 2. Data
# --------------------------------------------------------------------------

def load_data(path: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rb") as fh:
        text = fh.read().decode("ascii")
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    arr = np.array([[int(v) for v in r] for r in rows], dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 65:
        raise ValueError(f"bad data shape {arr.shape}")
    X = arr[:, :64].astype(F32) / F32(16.0)
    y = arr[:, 64].copy()
    return X, y


def split_ids(n: int, seed: int, sha_hex: str, test_fraction: float):
    dh = int(sha_hex[:16], 16)
    K = key(seed, SPLIT, dh)
    perm = np.argsort(out(K, 0, n), kind="stable")
    n_test = int(math.floor(float(n) * float(test_fraction)))
    return perm[:n_test], perm[n_test:]


def epoch_order(train_ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    K = key(seed, SHUFFLE, epoch)
    return train_ids[np.argsort(out(K, 0, len(train_ids)), kind="stable")]


def schedule(train_ids: np.ndarray, seed: int, B: int, epochs: int, max_steps: int):
    """Sections 2 and 17: the number of training steps (whole batches of ``B`` per
    epoch, ``epochs`` epochs, at most ``max_steps`` if it is not 0) and an iterator
    of each step's ``(t, batch ids)``, the epoch's order drawn at its first step."""
    per_epoch = len(train_ids) // B
    total = per_epoch * epochs
    if max_steps:
        total = min(total, max_steps)

    def steps():
        order = None
        for t in range(total):
            epoch, bi = divmod(t, per_epoch)
            if order is None or bi == 0:
                order = epoch_order(train_ids, seed, epoch)
            yield t, order[bi * B:(bi + 1) * B]
    return total, steps()


# --------------------------------------------------------------------------
# 3. Parameters
# --------------------------------------------------------------------------

def _layer_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, weight shape, fan_in) per parametrised layer, forward order."""
    arch = cfg["model"]["arch"]
    if arch == "mlp":
        dims = [64] + [int(h) for h in cfg["model"]["hidden"]] + [10]
        return [(f"fc{i}", (dims[i + 1], dims[i]), dims[i]) for i in range(len(dims) - 1)]
    if arch == "cnn":
        return [
            ("conv0", (8, 1, 3, 3), 1 * 3 * 3),
            ("conv1", (16, 8, 3, 3), 8 * 3 * 3),
            ("fc0", (10, 256), 256),
        ]
    raise ValueError(f"unknown arch {arch!r}")


def _uniform(K: int, count: int, bound: np.float32) -> np.ndarray:
    u = u24(K, 0, count)
    f = (u - (1 << 23)).astype(F64) * pow2(-23)  # exact
    return f.astype(F32) * bound  # exact conversion, one f32 multiply


def init_params(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    params: dict[str, np.ndarray] = {}
    for li, (name, wshape, fan_in) in enumerate(_layer_specs(cfg)):
        bound = F32(1.0 / math.sqrt(float(fan_in)))
        nw = int(np.prod(wshape))
        params[f"{name}.weight"] = _uniform(key(seed, INIT, li, 0), nw, bound).reshape(wshape)
        nb = wshape[0]
        params[f"{name}.bias"] = _uniform(key(seed, INIT, li, 1), nb, bound)
    return params


# --------------------------------------------------------------------------
# 6. Layers
# --------------------------------------------------------------------------

def linear_fwd(x, W, b):
    return xmm(x, W.T) + b


def linear_bwd(gy, x, W, need_gx: bool):
    gW = xmm(np.ascontiguousarray(gy.T), x)
    gb = tree_sum(gy, 0)
    gx = xmm(gy, W) if need_gx else None
    return gW, gb, gx


def relu(x):
    return np.where(x > F32(0.0), x, F32(0.0)).astype(F32)


def relu_bwd(gy, x):
    return np.where(x > F32(0.0), gy, F32(0.0)).astype(F32)


def dropout_consts(q: float) -> tuple[int, np.float32]:
    T = math.floor(float(q) * 16777216.0 + 0.5)
    scale = F32(1.0 / (1.0 - float(q)))
    return int(T), scale


def im2col(x: np.ndarray, KH: int, KW: int, stride: int, pad: int):
    N, C, H, W = x.shape
    xpad = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    Ho = (H + 2 * pad - KH) // stride + 1
    Wo = (W + 2 * pad - KW) // stride + 1
    cols = np.empty((N, Ho, Wo, C, KH, KW), dtype=x.dtype)
    for i in range(KH):
        for j in range(KW):
            patch = xpad[:, :, i:i + stride * (Ho - 1) + 1:stride, j:j + stride * (Wo - 1) + 1:stride]
            cols[:, :, :, :, i, j] = patch.transpose(0, 2, 3, 1)
    return cols.reshape(N * Ho * Wo, C * KH * KW), Ho, Wo


def conv_fwd(x, Wt, b, stride, pad):
    Oc, C, KH, KW = Wt.shape
    N = x.shape[0]
    cols, Ho, Wo = im2col(x, KH, KW, stride, pad)
    Wm = Wt.reshape(Oc, C * KH * KW)
    Y = xmm(cols, np.ascontiguousarray(Wm.T)) + b
    y = Y.reshape(N, Ho, Wo, Oc).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(y), (cols, Ho, Wo)


def conv_bwd(gy, x_shape, cache, Wt, stride, pad, need_gx: bool):
    cols, Ho, Wo = cache
    Oc, C, KH, KW = Wt.shape
    N, _, H, W = x_shape
    gY = np.ascontiguousarray(gy.transpose(0, 2, 3, 1)).reshape(N * Ho * Wo, Oc)
    gWm = xmm(np.ascontiguousarray(gY.T), cols)
    gb = tree_sum(gY, 0)
    gx = None
    if need_gx:
        Wm = Wt.reshape(Oc, C * KH * KW)
        gcols = xmm(gY, np.ascontiguousarray(Wm)).reshape(N, Ho, Wo, C, KH, KW)
        gxpad = np.zeros((N, C, H + 2 * pad, W + 2 * pad), dtype=F32)
        for i in range(KH):
            for j in range(KW):
                sl = (slice(None), slice(None),
                      slice(i, i + stride * (Ho - 1) + 1, stride),
                      slice(j, j + stride * (Wo - 1) + 1, stride))
                gxpad[sl] = gxpad[sl] + gcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
        gx = np.ascontiguousarray(gxpad[:, :, pad:pad + H, pad:pad + W])
    return gWm.reshape(Wt.shape), gb, gx


# --------------------------------------------------------------------------
# Models: forward/backward on one shard
# --------------------------------------------------------------------------

def _mlp_n_layers(params):
    return sum(1 for k in params if k.startswith("fc") and k.endswith(".weight"))


def mlp_forward(params, x, masks=None, scale=None):
    """masks: list of boolean keep-masks (rows, F) per hidden site, or None."""
    L = _mlp_n_layers(params)
    h = x
    cache = []
    for li in range(L):
        W, b = params[f"fc{li}.weight"], params[f"fc{li}.bias"]
        z = linear_fwd(h, W, b)
        cache.append((h, z))
        if li < L - 1:
            a = relu(z)
            if masks is not None:
                a = np.where(masks[li], a * scale, F32(0.0)).astype(F32)
            h = a
        else:
            h = z
    return h, cache


def mlp_backward(params, g, cache, masks=None, scale=None):
    L = _mlp_n_layers(params)
    grads = {}
    for li in range(L - 1, -1, -1):
        h_in, _ = cache[li]
        W = params[f"fc{li}.weight"]
        gW, gb, gx = linear_bwd(g, h_in, W, need_gx=li > 0)
        grads[f"fc{li}.weight"] = gW
        grads[f"fc{li}.bias"] = gb
        if li > 0:
            if masks is not None:
                gx = np.where(masks[li - 1], gx * scale, F32(0.0)).astype(F32)
            z_prev = cache[li - 1][1]
            g = relu_bwd(gx, z_prev)
    return grads


def cnn_forward(params, x):
    x4 = x.reshape(x.shape[0], 1, 8, 8)
    z0, c0 = conv_fwd(x4, params["conv0.weight"], params["conv0.bias"], 1, 1)
    a0 = relu(z0)
    z1, c1 = conv_fwd(a0, params["conv1.weight"], params["conv1.bias"], 2, 1)
    a1 = relu(z1)
    flat = np.ascontiguousarray(a1.reshape(a1.shape[0], -1))
    logits = linear_fwd(flat, params["fc0.weight"], params["fc0.bias"])
    return logits, (x4, z0, c0, a0, z1, c1, flat)


def cnn_backward(params, g, cache):
    x4, z0, c0, a0, z1, c1, flat = cache
    grads = {}
    gW, gb, gflat = linear_bwd(g, flat, params["fc0.weight"], need_gx=True)
    grads["fc0.weight"], grads["fc0.bias"] = gW, gb
    ga1 = gflat.reshape(z1.shape)
    gz1 = relu_bwd(ga1, z1)
    gW, gb, ga0 = conv_bwd(gz1, a0.shape, c1, params["conv1.weight"], 2, 1, need_gx=True)
    grads["conv1.weight"], grads["conv1.bias"] = gW, gb
    gz0 = relu_bwd(ga0, z0)
    gW, gb, _ = conv_bwd(gz0, x4.shape, c0, params["conv0.weight"], 1, 1, need_gx=False)
    grads["conv0.weight"], grads["conv0.bias"] = gW, gb
    return grads


def predict_logits(cfg, params, X):
    if cfg["model"]["arch"] == "cnn":
        return cnn_forward(params, X)[0]
    return mlp_forward(params, X)[0]


# --------------------------------------------------------------------------
# 9. Optimisers, clipping, schedule: twin_optim.py
# --------------------------------------------------------------------------

# --------------------------------------------------------------------------
# Speed only: single-threaded BLAS during training
# --------------------------------------------------------------------------

@contextlib.contextmanager
def _blas_single_thread():
    """Best effort: run NumPy's OpenBLAS with one thread on the calling thread.

    Only speed is at stake (xmm's float64 product is of integers and exact in any
    order or split); on a busy 2-core box OpenBLAS's spinning threads make the
    many tiny products here 10-20x slower."""
    fn = None
    try:
        libdir = os.path.join(os.path.dirname(np.__file__) + ".libs")
        for path in glob.glob(os.path.join(libdir, "*openblas*")):
            lib = ctypes.CDLL(path)
            fn = getattr(lib, "openblas_set_num_threads_local", None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                break
    except OSError:
        fn = None
    if fn is None:
        yield
        return
    prev = fn(1)
    try:
        yield
    finally:
        fn(prev)


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "mode": "exact",
    "data": {"dataset": "digits", "test_fraction": 0.2},
    "model": {"arch": "mlp", "hidden": [128], "dropout": 0.1},
    "train": {"epochs": 30, "max_steps": 0, "batch_size": 64, "shards": 1,
              "checkpoint_every": 100},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0,
              "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "nesterov": False,
              "clip_norm": 0.0, "schedule": "constant", "warmup_steps": 0},
}


def _merge(base: dict, over: dict) -> dict:
    out_ = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out_.get(k), dict):
            out_[k] = _merge(out_[k], v)
        else:
            out_[k] = copy.deepcopy(v)
    return out_


def parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(cfg: dict, item: str) -> None:
    k, sep, v = item.partition("=")
    if not sep:
        raise ValueError(f"override must be key=value: {item!r}")
    parts = k.strip().split(".")
    d = cfg
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = parse_value(v.strip())


def load_config(path: str, overrides: list[str] = ()) -> dict:
    with open(path, "rb") as fh:
        cfg = tomllib.load(fh)
    for item in overrides:
        apply_override(cfg, item)
    return cfg


# --------------------------------------------------------------------------
# 8. Training
# --------------------------------------------------------------------------

def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def batch_grads(arch, params, xb, yb, masks=None, scale=F32(1.0), S=1):
    """One step's gradient (section 8): per-shard forward/backward with N = B,
    then the shard tree. ``masks``: the whole batch's keep-masks per dropout
    site (or None). Returns (grads, loss) with loss per section 7."""
    B = len(xb)
    rows_per = B // S
    shard_grads = []
    shard_losses = []
    for s in range(S):
        r0, r1 = s * rows_per, (s + 1) * rows_per
        xs, ys = xb[r0:r1], yb[r0:r1]
        if arch == "mlp":
            ms = [m[r0:r1] for m in masks] if masks is not None else None
            logits, cache = mlp_forward(params, xs, ms, scale)
            lse, g = softmax_xent(logits, ys, B)
            grads = mlp_backward(params, g, cache, ms, scale)
        else:
            logits, cache = cnn_forward(params, xs)
            lse, g = softmax_xent(logits, ys, B)
            grads = cnn_backward(params, g, cache)
        shard_grads.append(grads)
        shard_losses.append(tree_sum(lse, 0))
    if S == 1:
        grads = shard_grads[0]
    else:
        grads = {k: tree_sum(np.stack([sg[k] for sg in shard_grads]), 0) for k in params}
    loss = tree_sum(np.stack(shard_losses), 0) / F32(B)
    return grads, loss


def train(cfg: dict, data_path: str, data_sha256: str):
    """Train per the spec; returns (params, {"test_accuracy", "steps", ...})."""
    with _blas_single_thread():
        return _train(cfg, data_path, data_sha256)


def _train(cfg: dict, data_path: str, data_sha256: str):
    cfg = _merge(DEFAULTS, cfg)
    seed = int(cfg["seed"])
    if not 0 <= seed < (1 << 63):
        raise ValueError("seed must be in [0, 2^63)")
    if file_sha256(data_path) != data_sha256.lower():
        raise ValueError("data file does not match the given sha256")
    arch = cfg["model"]["arch"]
    B = int(cfg["train"]["batch_size"])
    S = int(cfg["train"]["shards"])
    epochs = int(cfg["train"]["epochs"])
    if S < 1 or (S & (S - 1)) or B % S:
        raise ValueError("shards must be a power of two dividing batch_size")
    q = float(cfg["model"]["dropout"]) if arch == "mlp" else 0.0
    use_dropout = q > 0.0
    T, scale = dropout_consts(q) if use_dropout else (0, F32(1.0))

    X, y = load_data(data_path)
    test_ids, train_ids = split_ids(len(X), seed, data_sha256, cfg["data"]["test_fraction"])
    params = init_params(cfg, seed)

    oc = cfg["optim"]
    opt = twin_optim.make_optimizer(oc)

    widths = [int(h) for h in cfg["model"]["hidden"]] if arch == "mlp" else []
    K_d = key(seed, DROPOUT)
    c = 0
    total, steps = schedule(train_ids, seed, B, epochs, int(cfg["train"]["max_steps"]))
    last_loss = float("nan")
    for t, idx in steps:
        xb, yb = X[idx], y[idx]
        masks = None
        if use_dropout:
            masks = []
            for F in widths:
                masks.append((u24(K_d, c, B * F) >= T).reshape(B, F))
                c += B * F
        grads, loss = batch_grads(arch, params, xb, yb, masks, scale, S)
        last_loss = float(loss)
        twin_optim.update(opt, params, grads, oc, t, total)

    logits = predict_logits(cfg, params, X[test_ids])
    pred = np.argmax(logits, axis=1)
    correct = int(np.count_nonzero(pred == y[test_ids]))
    acc = correct / len(test_ids) if len(test_ids) else float("nan")
    return params, {"test_accuracy": acc, "steps": total, "last_loss": last_loss}


# --------------------------------------------------------------------------
# 11. Canonical hash
# --------------------------------------------------------------------------

def weights_sha256(params: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(b"pipeline-weights-v1\n")
    for name in sorted(params):
        a = np.asarray(params[name])
        a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
        header = (name + "\n" + a.dtype.name + "\n"
                  + ",".join(str(d) for d in a.shape) + "\n").encode("utf-8")
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        data = a.tobytes(order="C")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="NumPy twin of the exact-mode pipeline")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value (value parsed as TOML)")
    ap.add_argument("--data", required=True)
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.get("mode", "exact") != "exact":
        print(f"note: config mode={cfg.get('mode')!r}; the twin only implements "
              "exact mode and computes that", file=sys.stderr)
    t0 = time.perf_counter()
    if int(cfg.get("data", {}).get("context", 0) or 0) > 0:  # a language model: charlm
        try:
            from . import twin_charlm
        except ImportError:
            import twin_charlm  # type: ignore[no-redef]
        params, metrics = twin_charlm.train(cfg, args.data, file_sha256(args.data))
    else:
        params, metrics = train(cfg, args.data, file_sha256(args.data))
        print(f"test_accuracy: {metrics['test_accuracy']:.6f}")
    dt = time.perf_counter() - t0
    print(f"weights sha256:{weights_sha256(params)}")
    print(f"steps: {metrics['steps']}  time: {dt:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
