"""The charlm example (examples/charlm/model.py) as the spec's layers, in the twin.

Sections 14-18 of docs/exact-spec.md: the network of section 18, initialised by
section 16, trained by section 17 (section 8's shards and tree) with section 9's
optimisers, on section 19's data: tokens are indices into the sorted code
points of the UTF-8 text, cut into non-overlapping windows of ``context``
tokens (example ``i`` is tokens ``[i*T, (i+1)*T)``, its targets the next
tokens); the split and epoch orders are section 2's over the ``(len - 1) // T``
windows, keyed by the file's sha256.
"""

from __future__ import annotations

import numpy as np

try:
    from . import numpy_twin as nt
    from . import twin_layers as L
    from . import twin_optim as O
except ImportError:  # run as a script from tests/twin/
    import numpy_twin as nt  # type: ignore[no-redef]
    import twin_layers as L  # type: ignore[no-redef]
    import twin_optim as O  # type: ignore[no-redef]

F32 = np.float32
LN_EPS = 1e-5

__all__ = ["load_text", "windows", "init_params", "forward", "backward", "shard_grads",
           "test_loss", "batch_grads", "train", "is_charlm", "Ctx"]


# ---------------------------------------------------------------- data
def load_text(path: str) -> tuple[np.ndarray, int]:
    """(tokens int64, vocabulary size): indices into the sorted code points."""
    with open(path, "rb") as fh:
        text = fh.read().decode("utf-8")
    codes = np.frombuffer(text.encode("utf-32-le"), "<u4")
    points = np.unique(codes)
    return np.searchsorted(points, codes).astype(np.int64), len(points)


def windows(tokens: np.ndarray, ids: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(ids, dtype=np.int64)[:, None] * T + np.arange(T)[None, :]
    return tokens[pos], tokens[pos + 1]


# ---------------------------------------------------------------- 16 / 18. parameters
def _layout(V: int, T: int, n_layer: int, D: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(module name, kind, weight shape) in section 16's pre-order numbering."""
    mods = [("tok", "emb", (V, D)), ("pos", "emb", (T, D))]
    for i in range(n_layer):
        p = f"blocks.{i}."
        mods += [(p + "ln1", "ln", (D,)), (p + "qkv", "lin", (3 * D, D)),
                 (p + "proj", "lin", (D, D)), (p + "ln2", "ln", (D,)),
                 (p + "fc", "lin", (4 * D, D)), (p + "fc_out", "lin", (D, 4 * D))]
    mods += [("ln_f", "ln", (D,)), ("head", "lin", (V, D))]
    return mods


def init_params(seed: int, V: int, T: int, n_layer: int, D: int) -> dict[str, np.ndarray]:
    params: dict[str, np.ndarray] = {}
    for li, (name, kind, shape) in enumerate(_layout(V, T, n_layer, D)):
        if kind == "emb":
            params[f"{name}.weight"] = L.normal_init(seed, li, shape)
        elif kind == "ln":
            params[f"{name}.weight"] = np.ones(shape, dtype=F32)
            params[f"{name}.bias"] = np.zeros(shape, dtype=F32)
        else:
            fan_in = shape[1]
            params[f"{name}.weight"] = L.uniform_init(seed, li, 0, shape, fan_in)
            params[f"{name}.bias"] = L.uniform_init(seed, li, 1, (shape[0],), fan_in)
    return params


# ---------------------------------------------------------------- 18. forward / backward
class Ctx:
    """What one shard's training forward needs to draw its masks (section 15)."""

    def __init__(self, seed: int, step: int, row0: int, q: float) -> None:
        self.seed, self.step, self.row0 = seed, step, row0
        self.q = float(q)
        self.T, self.scale = nt.dropout_consts(self.q) if self.q > 0 else (0, F32(1.0))
        self.site = 0
        self.drawn: list[np.ndarray] = []  # the masks in site order (for tests)

    def mask(self, shape: tuple[int, ...]) -> np.ndarray | None:
        if self.q <= 0.0:
            return None  # rate 0: the identity, no site number taken
        m = L.layer_mask(self.seed, self.step, self.site, self.row0, shape, self.T)
        self.site += 1
        self.drawn.append(m)
        return m


def _drop(x, keep, scale):
    return x if keep is None else L.dropout_fwd(x, keep, scale)


def _drop_bwd(g, keep, scale):
    return g if keep is None else L.dropout_bwd(g, keep, scale)


def _block_fwd(p: dict, pre: str, h: np.ndarray, H: int, ctx: Ctx):
    N, T, D = h.shape
    E = D // H
    c: dict = {}
    a, c["ln1"] = L.layernorm_fwd(h, p[pre + "ln1.weight"], p[pre + "ln1.bias"], LN_EPS)
    qkv = L.linear_fwd(a, p[pre + "qkv.weight"], p[pre + "qkv.bias"])       # (N, T, 3D)
    q, k, v = (np.ascontiguousarray(z.reshape(N, T, H, E).transpose(0, 2, 1, 3))
               for z in (qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]))
    keep_a = ctx.mask((N, H, T, T))
    y, c["attn"] = L.attention_fwd(q, k, v, True, None, keep_a, ctx.scale)
    y2 = np.ascontiguousarray(y.transpose(0, 2, 1, 3)).reshape(N, T, D)
    pr = L.linear_fwd(y2, p[pre + "proj.weight"], p[pre + "proj.bias"])
    c["k1"] = ctx.mask((N, T, D))
    h1 = h + _drop(pr, c["k1"], ctx.scale)
    b, c["ln2"] = L.layernorm_fwd(h1, p[pre + "ln2.weight"], p[pre + "ln2.bias"], LN_EPS)
    f = L.linear_fwd(b, p[pre + "fc.weight"], p[pre + "fc.bias"])
    act = L.gelu_fwd(f)
    o = L.linear_fwd(act, p[pre + "fc_out.weight"], p[pre + "fc_out.bias"])
    c["k2"] = ctx.mask((N, T, D))
    h2 = h1 + _drop(o, c["k2"], ctx.scale)
    c.update(a=a, y2=y2, b=b, f=f, act=act)
    return h2, c


def _block_bwd(p: dict, pre: str, g: np.ndarray, c: dict, H: int, scale, grads: dict):
    N, T, D = g.shape
    E = D // H
    # h2 = h1 + drop2(o): g reaches h1 directly and through the MLP branch
    go = _drop_bwd(g, c["k2"], scale)
    gW, gb, gact = L.linear_bwd(go, c["act"], p[pre + "fc_out.weight"])
    grads[pre + "fc_out.weight"], grads[pre + "fc_out.bias"] = gW, gb
    gf = L.gelu_bwd(gact, c["f"])
    gW, gb, gbn = L.linear_bwd(gf, c["b"], p[pre + "fc.weight"])
    grads[pre + "fc.weight"], grads[pre + "fc.bias"] = gW, gb
    gh1_ln, gw, gbb = L.layernorm_bwd(gbn, c["ln2"], p[pre + "ln2.weight"])
    grads[pre + "ln2.weight"], grads[pre + "ln2.bias"] = gw, gbb
    gh1 = g + gh1_ln                                     # fan-out: two consumers
    # h1 = h + drop1(proj(attn(ln1(h))))
    gpr = _drop_bwd(gh1, c["k1"], scale)
    gW, gb, gy2 = L.linear_bwd(gpr, c["y2"], p[pre + "proj.weight"])
    grads[pre + "proj.weight"], grads[pre + "proj.bias"] = gW, gb
    gy = np.ascontiguousarray(gy2.reshape(N, T, H, E).transpose(0, 2, 1, 3))
    gq, gk, gv = L.attention_bwd(gy, c["attn"])
    gqkv = np.concatenate([np.ascontiguousarray(z.transpose(0, 2, 1, 3)).reshape(N, T, D)
                           for z in (gq, gk, gv)], axis=-1)     # split's backward: cat
    gW, gb, ga = L.linear_bwd(gqkv, c["a"], p[pre + "qkv.weight"])
    grads[pre + "qkv.weight"], grads[pre + "qkv.bias"] = gW, gb
    gh_ln, gw, gbb = L.layernorm_bwd(ga, c["ln1"], p[pre + "ln1.weight"])
    grads[pre + "ln1.weight"], grads[pre + "ln1.bias"] = gw, gbb
    return gh1 + gh_ln


def forward(p: dict, x: np.ndarray, arch: dict, ctx: Ctx):
    """Logits ``(N, T, V)`` of tokens ``x (N, T)`` and what the backward needs;
    ``ctx.q = 0`` is evaluation (no dropout)."""
    H, n_layer = arch["n_head"], arch["n_layer"]
    T = x.shape[1]
    te = L.embedding_fwd(x, p["tok.weight"])                     # (N, T, D)
    pe = L.embedding_fwd(np.arange(T), p["pos.weight"])          # (T, D)
    h0 = te + pe                                                 # broadcast over N
    keep0 = ctx.mask(h0.shape)
    h = _drop(h0, keep0, ctx.scale)
    caches = []
    for i in range(n_layer):
        h, c = _block_fwd(p, f"blocks.{i}.", h, H, ctx)
        caches.append(c)
    lf, c_lnf = L.layernorm_fwd(h, p["ln_f.weight"], p["ln_f.bias"], LN_EPS)
    logits = L.linear_fwd(lf, p["head.weight"], p["head.bias"])  # (N, T, V)
    return logits, (keep0, caches, lf, c_lnf, pe.shape)


def backward(p: dict, x: np.ndarray, gz: np.ndarray, cache, arch: dict, scale):
    """Every parameter's gradient from the logits' gradient ``gz (N, T, V)``."""
    keep0, caches, lf, c_lnf, pe_shape = cache
    grads: dict[str, np.ndarray] = {}
    gW, gb, glf = L.linear_bwd(gz, lf, p["head.weight"])
    grads["head.weight"], grads["head.bias"] = gW, gb
    g, gw, gbb = L.layernorm_bwd(glf, c_lnf, p["ln_f.weight"])
    grads["ln_f.weight"], grads["ln_f.bias"] = gw, gbb
    for i in range(arch["n_layer"] - 1, -1, -1):
        g = _block_bwd(p, f"blocks.{i}.", g, caches[i], arch["n_head"], scale, grads)
    gh0 = _drop_bwd(g, keep0, scale)
    grads["tok.weight"] = L.embedding_bwd(gh0, x, p["tok.weight"].shape[0])
    gpe = L.sum_to(gh0, pe_shape)                                # (T, D): a tree over N
    grads["pos.weight"] = L.embedding_bwd(gpe, np.arange(x.shape[1]),
                                          p["pos.weight"].shape[0])
    return grads


def shard_grads(p: dict, x: np.ndarray, y: np.ndarray, n_global: int, arch: dict,
                ctx: Ctx) -> tuple[dict[str, np.ndarray], np.float32]:
    """One shard's gradients (section 17) and its loss tree_sum(lse)."""
    logits, cache = forward(p, x, arch, ctx)
    V = logits.shape[-1]
    lse, gz = nt.softmax_xent(logits.reshape(-1, V), y.reshape(-1), n_global)
    grads = backward(p, x, gz.reshape(logits.shape), cache, arch, ctx.scale)
    return grads, nt.tree_sum(lse, 0)


def test_loss(p: dict, tokens: np.ndarray, ids: np.ndarray, T: int, arch: dict,
              chunk: int = 256) -> float:
    """Section 17: per chunk of at most 256 test examples in split order,
    tree_sum(lse) over its rows; the chunks added in order in f64; / targets."""
    total = 0.0
    for i in range(0, len(ids), chunk):
        x, y = windows(tokens, ids[i:i + chunk], T)
        logits, _ = forward(p, x, arch, Ctx(0, 0, 0, 0.0))
        lse, _ = nt.softmax_xent(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), 1)
        total += float(nt.tree_sum(lse, 0))
    return total / (len(ids) * T)


def batch_grads(p, xb, yb, arch, seed, step, shards):
    """Section 8 / 17: per-shard gradients with N = every target of the batch,
    summed over shards by the tree; the step's loss."""
    B = len(xb)
    rows = B // shards
    n_global = B * xb.shape[1]
    parts, losses = [], []
    for s in range(shards):
        sl = slice(s * rows, (s + 1) * rows)
        ctx = Ctx(seed, step, s * rows, arch["dropout"])
        g, loss = shard_grads(p, xb[sl], yb[sl], n_global, arch, ctx)
        parts.append(g)
        losses.append(loss)
    grads = parts[0] if shards == 1 else {
        k: nt.tree_sum(np.stack([g[k] for g in parts]), 0) for k in p}
    return grads, nt.tree_sum(np.stack(losses), 0) / F32(n_global)


# ---------------------------------------------------------------- 17. training
def train(cfg: dict, data_path: str, data_sha256: str, steps_cb=None,
          with_test_loss: bool = False):
    """Train the charlm config ``cfg`` (the pipeline's TOML as a dict); returns
    (params, {"steps", "last_loss", ...; "test_loss" if asked})."""
    with nt._blas_single_thread():
        return _train(cfg, data_path, data_sha256, steps_cb, with_test_loss)


def _train(cfg, data_path, data_sha256, steps_cb, with_test_loss):
    seed = int(cfg.get("seed", 0))
    if nt.file_sha256(data_path) != data_sha256.lower():
        raise ValueError("data file does not match the given sha256")
    T = int(cfg["data"]["context"])
    tr = cfg.get("train", {})
    B, S = int(tr.get("batch_size", 64)), int(tr.get("shards", 8))
    epochs, max_steps = int(tr.get("epochs", 30)), int(tr.get("max_steps", 0))
    a = {"n_layer": 2, "n_head": 4, "d_model": 128, "dropout": 0.1,
         **cfg.get("model", {}).get("args", {})}
    tokens, V = load_text(data_path)
    n = (len(tokens) - 1) // T
    test_ids, train_ids = nt.split_ids(n, seed, data_sha256,
                                       cfg["data"].get("test_fraction", 0.2))
    params = init_params(seed, V, T, int(a["n_layer"]), int(a["d_model"]))
    oc = cfg.get("optim", {})
    opt = O.make_optimizer(oc)
    total, steps = nt.schedule(train_ids, seed, B, epochs, max_steps)
    loss = F32(np.nan)
    for t, batch in steps:
        xb, yb = windows(tokens, batch, T)
        grads, loss = batch_grads(params, xb, yb, a, seed, t, S)
        O.update(opt, params, grads, oc, t, total)
        if steps_cb is not None:
            steps_cb(t, params)
    metrics = {"steps": total, "last_loss": float(loss), "vocab": V,
               "test_windows": len(test_ids)}
    if with_test_loss:
        metrics["test_loss"] = test_loss(params, tokens, test_ids, T, a)
    return params, metrics


def is_charlm(cfg: dict) -> bool:
    return int(cfg.get("data", {}).get("context", 0) or 0) > 0

