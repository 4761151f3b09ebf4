"""The llama example (examples/llama/model.py) in exact mode, in the twin.

Written from docs/exact-spec.md alone (and the stock model's source, which says
which ops run): a LLaMA-style decoder of RMSNorm (section 22), separate
bias-free ``wq``/``wk``/``wv``/``wo`` projections (14), rotary position
embeddings from section 28's tables applied as ``x * cos + rotate_half(x) *
sin`` (data movement and section 13's elementwise ops), causal attention
(14; section 26's causal case), a SwiGLU MLP ``w2(silu(w1 x) * w3 x)`` (20),
the output head tied to the token embedding and its logits times the Python
number ``d_model ** -0.5`` (13), section 7's cross-entropy; initialised by
section 16 (the tied weight drawn once, by the embedding: section 29),
trained by section 17 (section 8's shards and tree) with section 9's
optimisers on section 19's data, hashed by section 11.

Values with several consumers (section 29), in forward order:
- the normalised input of ``wq``, ``wk``, ``wv`` (three): ``(g_q + g_k) + g_v``;
- the tied ``tok.weight`` (two: the embedding, then the head), each residual
  stream value (two: the norm, then the add), the MLP's normalised input (two:
  ``w1``, then ``w3``), the rotary input (two: ``* cos``, then ``chunk``):
  the f32 sum.

Section 16's numbering (pre-order, registration order; a layer is a module with
parameters of its own): ``tok`` 0; block ``i``: ``attn_norm`` 1 + 9i, ``attn.wq``
.. ``attn.wo`` 2 + 9i .. 5 + 9i, ``mlp_norm`` 6 + 9i, ``mlp.w1``, ``mlp.w3``,
``mlp.w2`` 7 + 9i .. 9 + 9i; ``norm`` 1 + 9 n_layer; ``head`` 2 + 9 n_layer
(tied: no draw). The weights (and the hash) hold the tied tensor once, as
``tok.weight`` (the name ``named_parameters`` keeps; the pipeline's run.json
lists ``head.weight`` under ``tied``).
"""

from __future__ import annotations

import numpy as np

try:
    from . import numpy_twin as nt
    from . import twin_charlm as tc
    from . import twin_layers as L
    from . import twin_llama_ops as R
    from . import twin_ops as P
    from . import twin_optim as O
except ImportError:  # run as a script from tests/twin/
    import numpy_twin as nt  # type: ignore[no-redef]
    import twin_charlm as tc  # type: ignore[no-redef]
    import twin_layers as L  # type: ignore[no-redef]
    import twin_llama_ops as R  # type: ignore[no-redef]
    import twin_ops as P  # type: ignore[no-redef]
    import twin_optim as O  # type: ignore[no-redef]

F32 = np.float32

__all__ = ["DEFAULT_ARGS", "arch_of", "layout", "init_params", "make_tables", "logit_scale",
           "forward", "backward", "shard_grads", "batch_grads", "test_loss", "train", "TIED"]

# the factory's defaults (examples/llama/model.py)
DEFAULT_ARGS = {"n_layer": 2, "n_head": 4, "d_model": 128, "hidden": 344,
                "rope_base": 10000.0, "eps": 1e-5}
TIED = {"head.weight": "tok.weight"}


def arch_of(cfg_args: dict, context: int) -> dict:
    a = {**DEFAULT_ARGS, **cfg_args}
    a = {"n_layer": int(a["n_layer"]), "n_head": int(a["n_head"]), "d_model": int(a["d_model"]),
         "hidden": int(a["hidden"]), "rope_base": float(a["rope_base"]), "eps": float(a["eps"]),
         "context": int(context)}
    D, H = a["d_model"], a["n_head"]
    if D % H or (D // H) % 2:
        raise ValueError(f"d_model {D} must be a multiple of n_head {H} with an even head size")
    return a


# ---------------------------------------------------------------- 16. parameters
def layout(V: int, a: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(module name, kind, weight shape) in section 16's order."""
    D, Hd = a["d_model"], a["hidden"]
    mods = [("tok", "emb", (V, D))]
    for i in range(a["n_layer"]):
        p = f"blocks.{i}."
        mods += [(p + "attn_norm", "rms", (D,)), (p + "attn.wq", "lin", (D, D)),
                 (p + "attn.wk", "lin", (D, D)), (p + "attn.wv", "lin", (D, D)),
                 (p + "attn.wo", "lin", (D, D)), (p + "mlp_norm", "rms", (D,)),
                 (p + "mlp.w1", "lin", (Hd, D)), (p + "mlp.w3", "lin", (Hd, D)),
                 (p + "mlp.w2", "lin", (D, Hd))]
    mods += [("norm", "rms", (D,)), ("head", "tied", (V, D))]
    return mods


def init_params(seed: int, V: int, a: dict) -> dict[str, np.ndarray]:
    params: dict[str, np.ndarray] = {}
    for li, (name, kind, shape) in enumerate(layout(V, a)):
        if kind == "emb":
            params[f"{name}.weight"] = L.normal_init(seed, li, shape)
        elif kind == "rms":
            params[f"{name}.weight"] = np.ones(shape, dtype=F32)
        elif kind == "lin":      # no biases: key(seed, INIT, l, 1) is never drawn
            params[f"{name}.weight"] = L.uniform_init(seed, li, 0, shape, shape[1])
        # "tied": the head keeps its number, draws nothing, holds tok.weight
    return params


# ---------------------------------------------------------------- forward / backward
def _heads(z: np.ndarray, H: int) -> np.ndarray:
    N, T, D = z.shape
    return np.ascontiguousarray(z.reshape(N, T, H, D // H).transpose(0, 2, 1, 3))


def _unheads(z: np.ndarray) -> np.ndarray:
    N, H, T, E = z.shape
    return np.ascontiguousarray(z.transpose(0, 2, 1, 3)).reshape(N, T, H * E)


def _block_fwd(p: dict, pre: str, h: np.ndarray, a: dict, tables):
    H, eps = a["n_head"], a["eps"]
    T = h.shape[1]
    cos, sin = tables[0][:T], tables[1][:T]
    c: dict = {}
    an, c["an"] = P.rmsnorm_fwd(h, (h.shape[-1],), p[pre + "attn_norm.weight"], eps)
    q, k, v = (_heads(L.linear_fwd(an, p[pre + f"attn.{w}.weight"], None), H)
               for w in ("wq", "wk", "wv"))
    qr, kr = R.rope_fwd(q, cos, sin), R.rope_fwd(k, cos, sin)
    y, c["attn"] = L.attention_fwd(qr, kr, v, True)         # no dropout, scale 1/sqrt(E)
    y2 = _unheads(y)
    h1 = h + L.linear_fwd(y2, p[pre + "attn.wo.weight"], None)
    m, c["mn"] = P.rmsnorm_fwd(h1, (h1.shape[-1],), p[pre + "mlp_norm.weight"], eps)
    u1 = L.linear_fwd(m, p[pre + "mlp.w1.weight"], None)
    u3 = L.linear_fwd(m, p[pre + "mlp.w3.weight"], None)
    s1 = P.silu_fwd(u1)
    pr = s1 * u3
    h2 = h1 + L.linear_fwd(pr, p[pre + "mlp.w2.weight"], None)
    c.update(an=(an, c["an"]), y2=y2, m=(m, c["mn"]), u1=u1, u3=u3, s1=s1, pr=pr,
             tables=(cos, sin))
    return h2, c


def _block_bwd(p: dict, pre: str, g: np.ndarray, c: dict, grads: dict):
    cos, sin = c["tables"]
    H = c["attn"][0].shape[1]
    # h2 = h1 + w2(pr)
    gW, _, gpr = L.linear_bwd(g, c["pr"], p[pre + "mlp.w2.weight"], has_bias=False)
    grads[pre + "mlp.w2.weight"] = gW
    gs1, gu3 = gpr * c["u3"], gpr * c["s1"]                    # a * b
    gu1 = P.silu_bwd(gs1, c["u1"])
    m, cm = c["m"]
    gW, _, gm1 = L.linear_bwd(gu1, m, p[pre + "mlp.w1.weight"], has_bias=False)
    grads[pre + "mlp.w1.weight"] = gW
    gW, _, gm3 = L.linear_bwd(gu3, m, p[pre + "mlp.w3.weight"], has_bias=False)
    grads[pre + "mlp.w3.weight"] = gW
    gm = R.consumers_grad([gm1, gm3])                          # w1, then w3
    gh1_n, grads[pre + "mlp_norm.weight"] = P.rmsnorm_bwd(gm, cm, p[pre + "mlp_norm.weight"])
    gh1 = R.consumers_grad([gh1_n, g])                         # mlp_norm, then the add
    # h1 = h + wo(attn(...))
    gW, _, gy2 = L.linear_bwd(gh1, c["y2"], p[pre + "attn.wo.weight"], has_bias=False)
    grads[pre + "attn.wo.weight"] = gW
    gqr, gkr, gv = L.attention_bwd(_heads(gy2, H), c["attn"])
    gq, gk = R.rope_bwd(gqr, cos, sin), R.rope_bwd(gkr, cos, sin)
    an, ca = c["an"]
    gas = []
    for w, gz in (("wq", gq), ("wk", gk), ("wv", gv)):
        gW, _, ga = L.linear_bwd(_unheads(gz), an, p[pre + f"attn.{w}.weight"], has_bias=False)
        grads[pre + f"attn.{w}.weight"] = gW
        gas.append(ga)
    ga = R.consumers_grad(gas)                                 # three: (q + k) + v
    gh_n, grads[pre + "attn_norm.weight"] = P.rmsnorm_bwd(ga, ca, p[pre + "attn_norm.weight"])
    return R.consumers_grad([gh_n, gh1])                       # attn_norm, then the add


def logit_scale(D: int) -> np.float32:
    """The model's ``d_model ** -0.5`` (a Python float) as an f32 operand."""
    return F32(float(D) ** -0.5)


def forward(p: dict, x: np.ndarray, a: dict, tables):
    """Logits ``(N, T, V)`` of tokens ``x (N, T)`` and the backward's cache."""
    if x.shape[1] > a["context"]:
        raise ValueError(f"sequence length {x.shape[1]} exceeds the context {a['context']}")
    h = L.embedding_fwd(x, p["tok.weight"])
    caches = []
    for i in range(a["n_layer"]):
        h, c = _block_fwd(p, f"blocks.{i}.", h, a, tables)
        caches.append(c)
    f, cf = P.rmsnorm_fwd(h, (h.shape[-1],), p["norm.weight"], a["eps"])
    lg = L.linear_fwd(f, p["tok.weight"], None)            # the tied head
    logits = lg * logit_scale(a["d_model"])
    return logits, (caches, f, cf)


def backward(p: dict, x: np.ndarray, gz: np.ndarray, cache, a: dict) -> dict:
    caches, f, cf = cache
    grads: dict[str, np.ndarray] = {}
    glg = gz * logit_scale(a["d_model"])
    g_head, _, gf = L.linear_bwd(glg, f, p["tok.weight"], has_bias=False)
    g, grads["norm.weight"] = P.rmsnorm_bwd(gf, cf, p["norm.weight"])
    for i in range(a["n_layer"] - 1, -1, -1):
        g = _block_bwd(p, f"blocks.{i}.", g, caches[i], grads)
    g_emb = L.embedding_bwd(g, x, p["tok.weight"].shape[0])
    grads["tok.weight"] = R.consumers_grad([g_emb, g_head])   # the embedding, then the head
    return grads


def make_tables(a: dict):
    return R.rotary_tables(a["d_model"] // a["n_head"], a["context"], a["rope_base"])


def shard_grads(p, x, y, n_global: int, a: dict, tables):
    """One shard's gradients and its loss ``tree_sum(lse)`` (section 17)."""
    logits, cache = forward(p, x, a, tables)
    V = logits.shape[-1]
    lse, gz = nt.softmax_xent(logits.reshape(-1, V), y.reshape(-1), n_global)
    return backward(p, x, gz.reshape(logits.shape), cache, a), nt.tree_sum(lse, 0)


def batch_grads(p, xb, yb, a: dict, tables, shards: int):
    """Section 8 / 17: shard ``s`` holds rows ``[s B/S, (s+1) B/S)``; N = B * T;
    each parameter's step gradient is the tree over the shards in shard order."""
    B = len(xb)
    if shards < 1 or B % shards or shards & (shards - 1):
        raise ValueError(f"shards {shards} must be a power of two dividing {B}")
    rows = B // shards
    n_global = B * xb.shape[1]
    parts, losses = [], []
    for s in range(shards):
        sl = slice(s * rows, (s + 1) * rows)
        g, loss = shard_grads(p, xb[sl], yb[sl], n_global, a, tables)
        parts.append(g)
        losses.append(loss)
    grads = {k: nt.tree_sum(np.stack([g[k] for g in parts]), 0) for k in p}
    return grads, nt.tree_sum(np.stack(losses), 0) / F32(n_global)


def test_loss(p, tokens, ids, a: dict, tables, chunk: int = 256) -> float:
    """Section 17: chunks of at most 256 test examples in split order, each
    ``tree_sum(lse)`` over its rows, added in order in f64, / the targets."""
    T = a["context"]
    total = 0.0
    for i in range(0, len(ids), chunk):
        x, y = tc.windows(tokens, ids[i:i + chunk], T)
        logits, _ = forward(p, x, a, tables)
        lse, _ = nt.softmax_xent(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), 1)
        total += float(nt.tree_sum(lse, 0))
    return total / (len(ids) * T)


# ---------------------------------------------------------------- 17. training
def train(cfg: dict, data_path: str, data_sha256: str, steps_cb=None,
          with_test_loss: bool = False):
    """Train the llama config ``cfg`` (the pipeline's TOML as a dict, e.g. from
    ``numpy_twin.load_config``); returns (params, metrics)."""
    with nt._blas_single_thread():
        return _train(cfg, data_path, data_sha256, steps_cb, with_test_loss)


def _train(cfg, data_path, data_sha256, steps_cb, with_test_loss):
    seed = int(cfg.get("seed", 0))
    if nt.file_sha256(data_path) != data_sha256.lower():
        raise ValueError("data file does not match the given sha256")
    T = int(cfg["data"]["context"])
    tr = cfg.get("train", {})
    B, S = int(tr.get("batch_size", 64)), int(tr.get("shards", 1))
    epochs, max_steps = int(tr.get("epochs", 1)), int(tr.get("max_steps", 0))
    a = arch_of(cfg.get("model", {}).get("args", {}), T)
    tokens, V = tc.load_text(data_path)
    n = (len(tokens) - 1) // T
    test_ids, train_ids = nt.split_ids(n, seed, data_sha256,
                                       cfg["data"].get("test_fraction", 0.2))
    tables = make_tables(a)
    params = init_params(seed, V, a)
    oc = cfg.get("optim", {})
    opt = O.make_optimizer(oc)
    total, steps = nt.schedule(train_ids, seed, B, epochs, max_steps)
    loss = F32(np.nan)
    for t, batch in steps:
        xb, yb = tc.windows(tokens, batch, T)
        grads, loss = batch_grads(params, xb, yb, a, tables, S)
        O.update(opt, params, grads, oc, t, total)
        if steps_cb is not None:
            steps_cb(t, params, loss)
    metrics = {"steps": total, "last_loss": float(loss), "vocab": V,
               "test_windows": len(test_ids)}
    if with_test_loss:
        metrics["test_loss"] = test_loss(params, tokens, test_ids, a, tables)
    return params, metrics
