"""examples/resnet (model.py's ``resnet``) in exact mode, in the twin: a
classification network with BatchNorm, written from docs/exact-spec.md alone.

The stock module (``widths = (w0, w1, ...)``, ``blocks`` BasicBlocks a stage)::

    stem    Conv2d(c, w0, 3, padding=1, bias=False), BatchNorm2d(w0), ReLU,
            MaxPool2d(3, stride=2, padding=1)                    8x8 -> 4x4
    stages  BasicBlock(c_in, w, stride): stride 2 for the first block of
            every stage after the first, else 1:
              out = relu(bn1(conv1(x)))      conv1 3x3, stride, padding 1
              out = bn2(conv2(out))          conv2 3x3, stride 1, padding 1
              y   = relu(out + shortcut(x))  shortcut: the identity, or
                    Conv2d(c_in, w, 1, stride, bias=False) + BatchNorm2d(w)
                    where the stride or the width changes
    pool    AdaptiveAvgPool2d(1), flatten
    fc      Linear(w_last, classes)

What the twin covers, by section: 16 (layer numbers in the pre-order walk of
the module tree: convolutions, affine BatchNorms and the Linear take one;
Conv2d's uniform with fan_in = C KH KW, no bias draw for ``bias=False``;
BatchNorm ``w = 1``, ``b = 0``, running statistics 0 and 1, counter 0), 2 (the
digits, split and epoch order), 25 (Conv2d with a stride, padding and
dilation per dim and groups, by im2col and ``xmmb`` through
``twin_layers.XMMB``: ``conv2d_fwd``/``conv2d_bwd`` here; the example uses
stride 1 and 2, padding 1 and 0, one group), 14 (Linear), 23 (MaxPool2d with
padding, AdaptiveAvgPool2d: ``twin_ops``), 24 (BatchNorm2d in training: the
shard's own statistics per channel row, the f64 output, the backward; the
running statistics each shard moves from the step's values, averaged over the
shards in the tree of section 8; evaluation from the running statistics), 13
(residual additions; a value with two consumers, the block's input, gets the
f32 sum of its two gradients: no value here has three), 6 (ReLU), 7 (the
cross-entropy), 8/17 (shards of ``batch_size / shards`` rows, the shard tree),
9 (the optimiser), 10 (test accuracy) and 11 (the hash, buffers included:
``running_mean``, ``running_var`` f32 and ``num_batches_tracked`` int64 of
shape ``()``).
"""

from __future__ import annotations

import numpy as np

try:
    from . import numpy_twin as nt
    from . import twin_layers as L
    from . import twin_ops as P
    from . import twin_optim as O
except ImportError:  # run as a script from tests/twin/
    import numpy_twin as nt  # type: ignore[no-redef]
    import twin_layers as L  # type: ignore[no-redef]
    import twin_ops as P  # type: ignore[no-redef]
    import twin_optim as O  # type: ignore[no-redef]

F32 = np.float32
F64 = np.float64

__all__ = ["conv_padding", "conv2d_fwd", "conv2d_bwd", "bn_rows", "bn_unrows", "bn_train_fwd",
           "bn_train_bwd", "bn_running", "bn_eval_fwd", "bn_eval_bwd", "architecture",
           "init_state", "forward", "backward", "fan_in", "shard_step", "combine_stats", "train",
           "POOL", "EPS", "MOMENTUM"]

EPS = 1e-5        # nn.BatchNorm2d's defaults (Python floats)
MOMENTUM = 0.1
POOL = (3, 2, 1)  # the stem's MaxPool2d: kernel, stride, padding


# --------------------------------------------------------------- 24. BatchNorm2d
def bn_rows(x: np.ndarray) -> np.ndarray:
    """Section 24's channel rows ``X (C, n)``: ``x`` transposed to ``(C, N, *)``
    and flattened, channel c's entries in C order of ``(N, *)``."""
    return np.ascontiguousarray(np.moveaxis(x, 1, 0)).reshape(x.shape[1], -1)


def bn_unrows(X: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Rows back to ``shape`` the same way."""
    return np.ascontiguousarray(np.moveaxis(X.reshape((shape[1], shape[0]) + tuple(shape[2:])),
                                            0, 1))


def _affine64(x, centre, s, w, b):
    """RN32(((f64(x) - f64(centre)) / f64(s)) * f64(w) + f64(b)), per channel row;
    without ``w``/``b`` those steps are skipped."""
    v = (x.astype(F64) - centre.astype(F64)) / s.astype(F64)
    if w is not None:
        v = v * w.astype(F64)[:, None]
    if b is not None:
        v = v + b.astype(F64)[:, None]
    with np.errstate(over="ignore"):
        return v.astype(F32)


def bn_train_fwd(x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None, eps: float = EPS):
    """Training: per channel row ``x (n)``, ``mu = tree_sum(x) / f32(n)``, ``d = x -
    mu``, ``sq = tree_sum(d * d)``, ``var = sq / f32(n)``, ``s = sqrt32(var + ep)``,
    ``xh = d / s``, the output rounded once from f64. Returns
    ``(y, cache, mu, sq)``: ``mu`` and ``sq`` (C,) for the running statistics."""
    X = bn_rows(np.asarray(x, F32))
    n = X.shape[1]
    if n < 2:
        raise ValueError(f"batch_norm in training needs at least 2 entries a channel, got {n}")
    fn, ep = F32(n), F32(float(eps))
    mu = nt.tree_sum(X, 1) / fn
    d = X - mu[:, None]
    sq = nt.tree_sum(d * d, 1)
    var = sq / fn
    s = np.sqrt(var + ep)                                # sqrt32: IEEE sqrt on f32
    xh = d / s[:, None]
    Y = _affine64(X, mu[:, None], s[:, None], w, b)
    return bn_unrows(Y, x.shape), (xh, s, x.shape), mu, sq


def bn_train_bwd(g: np.ndarray, cache, w: np.ndarray | None, affine: bool = True):
    """``(gx, gw, gb)`` (``gw``, ``gb`` None without affine): per row ``gxh = g * w``
    (or ``g``), ``m1 = tree_sum(gxh) / f32(n)``, ``m2 = tree_sum(gxh * xh) /
    f32(n)``, ``gx = ((gxh - m1) - xh * m2) / s``; ``gw = tree_sum(g * xh)``,
    ``gb = tree_sum(g)``."""
    xh, s, shape = cache
    G = bn_rows(np.asarray(g, F32))
    fn = F32(G.shape[1])
    gxh = G * w[:, None] if w is not None else G
    m1 = nt.tree_sum(gxh, 1) / fn
    m2 = nt.tree_sum(gxh * xh, 1) / fn
    gX = ((gxh - m1[:, None]) - xh * m2[:, None]) / s[:, None]
    gw = nt.tree_sum(G * xh, 1) if affine else None
    gb = nt.tree_sum(G, 1) if affine else None
    return bn_unrows(gX, shape), gw, gb


def bn_running(rm: np.ndarray, rv: np.ndarray, count: int, mu: np.ndarray, sq: np.ndarray,
               n: int, momentum: float | None = MOMENTUM):
    """The running statistics a training forward leaves: ``(rm, rv, count + 1)``;
    ``f = momentum`` or ``1.0 / f64(count + 1)``; ``vu = sq / f32(n - 1)``;
    ``RN32((1.0 - f) * f64(old) + f * f64(new))`` (f64 ops in this order)."""
    t = count + 1
    f = float(momentum) if momentum is not None else 1.0 / float(t)
    vu = sq / F32(n - 1)
    new_rm = ((1.0 - f) * rm.astype(F64) + f * mu.astype(F64)).astype(F32)
    new_rv = ((1.0 - f) * rv.astype(F64) + f * vu.astype(F64)).astype(F32)
    return new_rm, new_rv, t


def bn_eval_fwd(x: np.ndarray, w, b, rm: np.ndarray, rv: np.ndarray, eps: float = EPS):
    """Evaluation: ``s = sqrt32(rv + ep)``, ``y`` rounded once from f64 with
    ``rm`` as the centre; ``(y, cache)``."""
    X = bn_rows(np.asarray(x, F32))
    s = np.sqrt(rv + F32(float(eps)))
    Y = _affine64(X, rm[:, None], s[:, None], w, b)
    xh = (X - rm[:, None]) / s[:, None]
    return bn_unrows(Y, x.shape), (xh, s, x.shape)


def bn_eval_bwd(g: np.ndarray, cache, w, affine: bool = True):
    """``gx = (g * w) / s`` (or ``g / s``); ``gw``, ``gb`` as in training."""
    xh, s, shape = cache
    G = bn_rows(np.asarray(g, F32))
    gX = (G * w[:, None] if w is not None else G) / s[:, None]
    gw = nt.tree_sum(G * xh, 1) if affine else None
    gb = nt.tree_sum(G, 1) if affine else None
    return bn_unrows(gX, shape), gw, gb


# --------------------------------------------------------------- 25. Conv2d
def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def conv_padding(padding, K, S, D) -> tuple[int, int]:
    """Section 25's padding: ``"valid"`` is (0, 0); ``"same"`` (stride 1 only) is
    ``D (K - 1) / 2`` per dim when both are whole, else refused; an int or a pair."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if S != (1, 1):
            raise ValueError("padding='same' needs stride 1")
        if any(d * (k - 1) % 2 for d, k in zip(D, K)):
            raise ValueError(f"padding='same' with kernel {K}, dilation {D} is not symmetric")
        return (D[0] * (K[0] - 1) // 2, D[1] * (K[1] - 1) // 2)
    return _pair(padding)


def conv2d_fwd(x, W, b, stride=1, padding=0, dilation=1, groups: int = 1):
    """Section 25's Conv2d on ``x (N, C, H, W)`` with ``W (O, C/G, KH, KW)``:
    ``cols[(n Ho + oh) Wo + ow, (c KH + i) KW + j] = xpad[n, c, oh SH + i DH,
    ow SW + j DW]``; per group ``Y_g = xmmb(cols_g, Wm_g^T)`` (through
    ``twin_layers.XMMB``), side by side, ``+ b`` per row, to ``(N, O, Ho, Wo)``.
    Returns ``(y, cache)``."""
    x = np.asarray(x, F32)
    N, C, H, Wd = x.shape
    O, Cg, KH, KW = W.shape
    G = int(groups)
    if C % G or O % G or Cg != C // G:
        raise ValueError(f"groups {G}: channels {C} -> {O} with a weight {W.shape}")
    S, D = _pair(stride), _pair(dilation)
    P = conv_padding(padding, (KH, KW), S, D)
    Ho = (H + 2 * P[0] - D[0] * (KH - 1) - 1) // S[0] + 1
    Wo = (Wd + 2 * P[1] - D[1] * (KW - 1) - 1) // S[1] + 1
    xpad = np.zeros((N, C, H + 2 * P[0], Wd + 2 * P[1]), F32)
    xpad[:, :, P[0]:P[0] + H, P[1]:P[1] + Wd] = x
    cols = np.empty((N, Ho, Wo, C, KH, KW), F32)
    for i in range(KH):
        for j in range(KW):
            h0, w0 = i * D[0], j * D[1]
            patch = xpad[:, :, h0:h0 + S[0] * (Ho - 1) + 1:S[0], w0:w0 + S[1] * (Wo - 1) + 1:S[1]]
            cols[:, :, :, :, i, j] = patch.transpose(0, 2, 3, 1)
    cols = cols.reshape(N * Ho * Wo, C * KH * KW)
    kk, og = Cg * KH * KW, O // G
    Y = np.empty((N * Ho * Wo, O), F32)
    for g in range(G):
        Wm = np.ascontiguousarray(W[g * og:(g + 1) * og].reshape(og, kk).T)
        Y[:, g * og:(g + 1) * og] = L.XMMB(np.ascontiguousarray(cols[:, g * kk:(g + 1) * kk]), Wm)
    if b is not None:
        Y = Y + b
    y = np.ascontiguousarray(Y.reshape(N, Ho, Wo, O).transpose(0, 3, 1, 2))
    return y, (cols, x.shape, W.shape, S, P, D, G, Ho, Wo)


def conv2d_bwd(gy, cache, W, has_bias: bool = True):
    """``(gW, gb or None, gx)``: per group ``gWm_g = xmmb(gY_g^T, cols_g)``,
    ``gcols_g = xmmb(gY_g, Wm_g)``; ``gb = tree_sum(gY, 0)``; the fold of
    ``gcols`` offset by offset (``i`` outer, ``j`` inner), the interior."""
    cols, (N, C, H, Wd), _, S, P, D, G, Ho, Wo = cache
    O, Cg, KH, KW = W.shape
    kk, og = Cg * KH * KW, O // G
    gY = np.ascontiguousarray(np.asarray(gy, F32).transpose(0, 2, 3, 1)).reshape(-1, O)
    gW = np.empty((O, kk), F32)
    gcols = np.empty_like(cols)
    for g in range(G):
        gYg = np.ascontiguousarray(gY[:, g * og:(g + 1) * og])
        cg = np.ascontiguousarray(cols[:, g * kk:(g + 1) * kk])
        gW[g * og:(g + 1) * og] = L.XMMB(np.ascontiguousarray(gYg.T), cg)
        gcols[:, g * kk:(g + 1) * kk] = L.XMMB(
            gYg, np.ascontiguousarray(W[g * og:(g + 1) * og].reshape(og, kk)))
    gb = nt.tree_sum(gY, 0) if has_bias else None
    g6 = gcols.reshape(N, Ho, Wo, C, KH, KW)
    gxpad = np.zeros((N, C, H + 2 * P[0], Wd + 2 * P[1]), F32)
    for i in range(KH):
        for j in range(KW):
            h0, w0 = i * D[0], j * D[1]
            sl = (slice(None), slice(None), slice(h0, h0 + S[0] * (Ho - 1) + 1, S[0]),
                  slice(w0, w0 + S[1] * (Wo - 1) + 1, S[1]))
            gxpad[sl] = gxpad[sl] + g6[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    gx = np.ascontiguousarray(gxpad[:, :, P[0]:P[0] + H, P[1]:P[1] + Wd])
    return gW.reshape(W.shape), gb, gx


# --------------------------------------------------------------- 16. the module tree
def architecture(widths=(16, 32), blocks: int = 1):
    """The blocks as ``(prefix, c_in, c_out, stride, projection)``, in forward
    (and registration) order."""
    out, c = [], int(widths[0])
    k = 0
    for i, w in enumerate(widths):
        for bi in range(blocks):
            stride = 2 if i > 0 and bi == 0 else 1
            out.append((f"stages.{k}", c, int(w), stride, stride != 1 or c != int(w)))
            c = int(w)
            k += 1
    return out


def init_state(seed: int, widths=(16, 32), blocks: int = 1, c: int = 1, classes: int = 10):
    """``(params, buffers)`` by section 16: the parametrised layers numbered in the
    pre-order walk of the module tree (stem.0, stem.1; per block conv1, bn1,
    conv2, bn2, then shortcut.0, shortcut.1; fc)."""
    p: dict[str, np.ndarray] = {}
    buf: dict[str, np.ndarray] = {}
    li = 0

    def conv(name, o, ci, k):
        nonlocal li
        p[f"{name}.weight"] = L.uniform_init(seed, li, 0, (o, ci, k, k), ci * k * k)
        li += 1

    def bn(name, ch):
        nonlocal li
        p[f"{name}.weight"] = np.ones(ch, F32)
        p[f"{name}.bias"] = np.zeros(ch, F32)
        buf[f"{name}.running_mean"] = np.zeros(ch, F32)
        buf[f"{name}.running_var"] = np.ones(ch, F32)
        buf[f"{name}.num_batches_tracked"] = np.array(0, dtype=np.int64)
        li += 1                                 # no draw, but a layer number

    conv("stem.0", int(widths[0]), c, 3)
    bn("stem.1", int(widths[0]))
    for pre, ci, co, _, proj in architecture(widths, blocks):
        conv(f"{pre}.conv1", co, ci, 3)
        bn(f"{pre}.bn1", co)
        conv(f"{pre}.conv2", co, co, 3)
        bn(f"{pre}.bn2", co)
        if proj:
            conv(f"{pre}.shortcut.0", co, ci, 1)
            bn(f"{pre}.shortcut.1", co)
    cl = int(widths[-1])
    p["fc.weight"] = L.uniform_init(seed, li, 0, (classes, cl), cl)
    p["fc.bias"] = L.uniform_init(seed, li, 1, (classes,), cl)
    return p, buf


# --------------------------------------------------------------- the network
def _bn(p, buf, name, x, training, stats, c):
    w, b = p[f"{name}.weight"], p[f"{name}.bias"]
    if training:
        y, c[name], mu, sq = bn_train_fwd(x, w, b)
        n = x.shape[0] * int(np.prod(x.shape[2:]))
        stats[name] = bn_running(buf[f"{name}.running_mean"], buf[f"{name}.running_var"],
                                 int(buf[f"{name}.num_batches_tracked"]), mu, sq, n)
    else:
        y, c[name] = bn_eval_fwd(x, w, b, buf[f"{name}.running_mean"],
                                 buf[f"{name}.running_var"])
    return y


def forward(p, buf, x, arch, training: bool = True):
    """Logits of ``x (N, c, 8, 8)``; ``(logits, cache, stats)`` with ``stats`` the
    running statistics each BatchNorm leaves (training only)."""
    c: dict = {"training": training}
    stats: dict = {}
    z, c["stem.0"] = conv2d_fwd(x, p["stem.0.weight"], None, 1, 1)
    h = _bn(p, buf, "stem.1", z, training, stats, c)
    c["stem.2"] = h
    h = nt.relu(h)
    h, c["stem.3"] = P.max_pool2d_fwd(h, *POOL)
    for pre, _, _, stride, proj in arch:
        x_in = h
        u, c[f"{pre}.conv1"] = conv2d_fwd(x_in, p[f"{pre}.conv1.weight"], None, stride, 1)
        u = _bn(p, buf, f"{pre}.bn1", u, training, stats, c)
        c[f"{pre}.relu1"] = u
        u = nt.relu(u)
        u, c[f"{pre}.conv2"] = conv2d_fwd(u, p[f"{pre}.conv2.weight"], None, 1, 1)
        u = _bn(p, buf, f"{pre}.bn2", u, training, stats, c)
        if proj:
            sc, c[f"{pre}.shortcut.0"] = conv2d_fwd(x_in, p[f"{pre}.shortcut.0.weight"], None,
                                                   stride, 0)
            sc = _bn(p, buf, f"{pre}.shortcut.1", sc, training, stats, c)
        else:
            sc = x_in                                    # nn.Identity: the value itself
        s = u + sc                                       # one f32 add
        c[f"{pre}.relu2"] = s
        h = nt.relu(s)
    c["pool_in"] = h.shape
    h, c["pool"] = P.adaptive_avg_pool2d_fwd(h, 1)
    flat = np.ascontiguousarray(h.reshape(h.shape[0], -1))
    c["fc_in"] = flat
    return L.linear_fwd(flat, p["fc.weight"], p["fc.bias"]), c, stats


def _bn_bwd(p, name, g, c, grads):
    w = p[f"{name}.weight"]
    bwd = bn_train_bwd if c["training"] else bn_eval_bwd
    gx, grads[f"{name}.weight"], grads[f"{name}.bias"] = bwd(g, c[name], w)
    return gx


def fan_in(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Section 13: a value with two consumers gets the f32 sum of their gradients
    (a seam for the tests' control)."""
    return a + b


def backward(p, g, c, arch):
    """Gradients of every parameter from the logits' gradient ``g``."""
    grads: dict[str, np.ndarray] = {}
    grads["fc.weight"], grads["fc.bias"], gflat = L.linear_bwd(g, c["fc_in"], p["fc.weight"])
    gh = P.adaptive_avg_pool2d_bwd(gflat.reshape(c["pool_in"][:2] + (1, 1)), c["pool"])
    for pre, _, _, stride, proj in reversed(arch):
        gs = nt.relu_bwd(gh, c[f"{pre}.relu2"])          # s = u + sc: both get gs
        gu = _bn_bwd(p, f"{pre}.bn2", gs, c, grads)
        gw, _, gu = conv2d_bwd(gu, c[f"{pre}.conv2"], p[f"{pre}.conv2.weight"], has_bias=False)
        grads[f"{pre}.conv2.weight"] = gw
        gu = nt.relu_bwd(gu, c[f"{pre}.relu1"])
        gu = _bn_bwd(p, f"{pre}.bn1", gu, c, grads)
        gw, _, gx1 = conv2d_bwd(gu, c[f"{pre}.conv1"], p[f"{pre}.conv1.weight"], has_bias=False)
        grads[f"{pre}.conv1.weight"] = gw
        if proj:
            gsc = _bn_bwd(p, f"{pre}.shortcut.1", gs, c, grads)
            gw, _, gx2 = conv2d_bwd(gsc, c[f"{pre}.shortcut.0"], p[f"{pre}.shortcut.0.weight"],
                                    has_bias=False)
            grads[f"{pre}.shortcut.0.weight"] = gw
        else:
            gx2 = gs
        gh = fan_in(gx1, gx2)             # the block's input: two consumers
    gh = P.max_pool2d_bwd(gh, c["stem.3"])
    gh = nt.relu_bwd(gh, c["stem.2"])
    gz = _bn_bwd(p, "stem.1", gh, c, grads)
    grads["stem.0.weight"], _, _ = conv2d_bwd(gz, c["stem.0"], p["stem.0.weight"], has_bias=False)
    return grads


def shard_step(p, buf, x, y, n_global, arch):
    """One shard of a training step: ``(grads, stats, loss sum)``."""
    logits, c, stats = forward(p, buf, x, arch, training=True)
    lse, g = nt.softmax_xent(logits, y, n_global)
    return backward(p, g, c, arch), stats, nt.tree_sum(lse, 0)


def _tree_over_shards(parts):
    return parts[0] if len(parts) == 1 else nt.tree_sum(np.stack(parts), 0)


def combine_stats(parts: list[np.ndarray]) -> np.ndarray:
    """Section 24: the shards' new running statistics summed in the shard tree,
    divided by f32(S) (a power of two: exact)."""
    return _tree_over_shards(parts) / F32(len(parts))


def train(cfg: dict, data_path: str, data_sha256: str):
    """Train examples/resnet's config (any ``widths``, ``blocks``, ``shards``,
    optimiser); ``(state, {"test_accuracy", "steps"})``, ``state`` the
    parameters and the buffers (what section 11 hashes)."""
    with nt._blas_single_thread():
        return _train(cfg, data_path, data_sha256)


def _train(cfg, data_path, data_sha256):
    seed = int(cfg.get("seed", 0))
    tr, oc = cfg["train"], cfg["optim"]
    a = {"widths": (16, 32), "blocks": 1, **cfg["model"].get("args", {})}
    arch = architecture(a["widths"], int(a["blocks"]))
    B, S = int(tr["batch_size"]), int(tr.get("shards", 8))
    if float(cfg["data"].get("val_fraction", 0.0)) != 0.0:
        raise NotImplementedError("the resnet twin has no validation split")
    X, y = nt.load_data(data_path)
    X = X.reshape(-1, 1, 8, 8)
    test_ids, train_ids = nt.split_ids(len(X), seed, data_sha256,
                                       cfg["data"].get("test_fraction", 0.2))
    p, buf = init_state(seed, a["widths"], int(a["blocks"]))
    opt = O.make_optimizer(oc)
    total, steps = nt.schedule(train_ids, seed, B, int(tr.get("epochs", 30)),
                               int(tr.get("max_steps", 0)))
    rows = B // S
    for t, idx in steps:
        parts = [shard_step(p, buf, X[idx[s * rows:(s + 1) * rows]],
                            y[idx[s * rows:(s + 1) * rows]], B, arch) for s in range(S)]
        grads = {k: _tree_over_shards([g[k] for g, _, _ in parts]) for k in p}
        # Section 24: each shard moved the running statistics from the step's
        # values; their sum in the shard tree, divided by f32(S) (exact), and
        # the counter every shard left.
        for name in parts[0][1]:
            rms = [st[name][0] for _, st, _ in parts]
            rvs = [st[name][1] for _, st, _ in parts]
            buf[f"{name}.running_mean"] = combine_stats(rms)
            buf[f"{name}.running_var"] = combine_stats(rvs)
            buf[f"{name}.num_batches_tracked"] = np.array(parts[0][1][name][2], dtype=np.int64)
        O.update(opt, p, grads, oc, t, total)
    logits, _, _ = forward(p, buf, X[test_ids], arch, training=False)
    acc = int(np.count_nonzero(np.argmax(logits, axis=1) == y[test_ids])) / len(test_ids)
    return {**p, **buf}, {"test_accuracy": acc, "steps": total}
