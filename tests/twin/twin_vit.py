"""The vit example (examples/vit/model.py) as the spec's layers, in the twin.

Written from docs/exact-spec.md alone (nothing under ``pipeline/exact/`` read).
The stock model, modules in registration order with section 16's layer
numbers in brackets (``n_layer = 2``; ``pool = "cls"``, ``P = (8 / patch)^2``
patches, ``tokens = P + 1``):

    patch   Conv2d(1, D, patch, stride=patch)                      [0]
    cls     Embedding(1, D)                                        [1]
    pos     Embedding(tokens, D)                                   [2]
    drop    Dropout(q)
    encoder.layers.{i}  TransformerEncoderLayer(D, H, 2D, q, gelu, batch_first,
                        norm_first): self_attn MultiheadAttention  [3 + 6i]
                        (in_proj_weight (3D, D) uniform, fan_in D; in_proj_bias +0),
                        self_attn.out_proj Linear D -> D [4 + 6i] (its bias: torch's
                        constant +0, kept as the factory set it, section 26),
                        linear1 D -> 2D [5 + 6i], linear2 2D -> D [6 + 6i],
                        norm1 [7 + 6i], norm2 [8 + 6i] (LayerNorm, eps 1e-5)
    norm    LayerNorm(D)                                           [3 + 6 n_layer]
    head    Linear(D, 10)                                          [4 + 6 n_layer]

Forward on ``x (N, 1, 8, 8)`` (section 2's pixels / 16):
``h = patch(x).flatten(2).transpose(1, 2)`` (section 25's Conv2d, stride =
kernel, no padding); with ``pool = "cls"`` ``h = cat([cls(zeros(N, 1)), h], 1)``;
``h = drop(h + pos(arange(tokens)))`` (a broadcast: ``pos``'s gradient is a
tree over N, section 13); ``masked = k`` hides the last ``k`` tokens from
attention as keys (a bool key padding mask, section 26); the encoder layers
(section 26, pre-norm); ``norm``; the head on token 0 (``cls``) or on the
mean over the tokens (``pool = "mean"``, section 21). Dropout sites per
forward: ``drop``, then per layer the attention's, ``dropout1``, ``dropout``,
``dropout2``. Loss: section 27's label smoothing (``a = 0.1`` for
``model:smoothed``); training: section 17 (8's shards and tree), section 9's
AdamW; evaluation: section 10 (all test rows at once, no dropout).

Section 29 in this network: ``norm1(x)`` is the query, key and value of its
layer's self-attention (three consumer entries), and the packed projection is
one Linear whose input gradient is the only one given (``fan_in`` of
twin_vit_ops.py); every other value has at most two consumers.
"""

from __future__ import annotations

import math

import numpy as np

try:
    from . import numpy_twin as nt
    from . import twin_layers as L
    from . import twin_optim as O
    from . import twin_vit_ops as V
except ImportError:  # run as a script from tests/twin/
    import numpy_twin as nt  # type: ignore[no-redef]
    import twin_layers as L  # type: ignore[no-redef]
    import twin_optim as O  # type: ignore[no-redef]
    import twin_vit_ops as V  # type: ignore[no-redef]

F32 = np.float32

__all__ = ["ARGS", "arch_of", "layout", "init_params", "forward", "backward", "shard_grads",
           "predict", "batch_grads", "train"]

ARGS = {"patch": 2, "d_model": 32, "n_head": 4, "n_layer": 2, "dropout": 0.1, "pool": "cls",
        "masked": 0}
# The example registers ``cls`` only with ``pool = "cls"``; ``cls_always = True``
# is its earlier form, which registered it whatever ``pool`` is (unused with "mean":
# exact mode refuses a parameter no shard of a step uses, section 13).
SMOOTHING = 0.1  # model:smoothed = nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1)


def arch_of(cfg: dict, cls_always: bool = False) -> dict:
    a = {**ARGS, **cfg.get("model", {}).get("args", {}), "cls_always": cls_always}
    if a["pool"] not in ("cls", "mean"):
        raise ValueError(f"pool: expected 'cls' or 'mean', found {a['pool']!r}")
    if 8 % int(a["patch"]):
        raise ValueError("8x8 images need a patch size dividing 8")
    return a


def _tokens(a: dict) -> int:
    return (8 // int(a["patch"])) ** 2 + (a["pool"] == "cls")


# ---------------------------------------------------------------- 16. parameters
def layout(a: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(module name, kind, weight shape) in section 16's pre-order numbering."""
    D, k = int(a["d_model"]), int(a["patch"])
    mods = [("patch", "conv", (D, 1, k, k))]
    if a["pool"] == "cls" or a.get("cls_always", False):
        mods.append(("cls", "emb", (1, D)))
    mods.append(("pos", "emb", (_tokens(a), D)))
    for i in range(int(a["n_layer"])):
        p = f"encoder.layers.{i}."
        mods += [(p + "self_attn", "mha", (3 * D, D)), (p + "self_attn.out_proj", "lin0", (D, D)),
                 (p + "linear1", "lin", (2 * D, D)), (p + "linear2", "lin", (D, 2 * D)),
                 (p + "norm1", "ln", (D,)), (p + "norm2", "ln", (D,))]
    mods += [("norm", "ln", (D,)), ("head", "lin", (10, D))]
    return mods


def init_params(seed: int, a: dict) -> dict[str, np.ndarray]:
    params: dict[str, np.ndarray] = {}
    for li, (name, kind, shape) in enumerate(layout(a)):
        if kind == "emb":
            params[name + ".weight"] = L.normal_init(seed, li, shape)
        elif kind == "ln":
            params[name + ".weight"] = np.ones(shape, F32)
            params[name + ".bias"] = np.zeros(shape, F32)
        elif kind == "mha":
            params[name + ".in_proj_weight"] = L.uniform_init(seed, li, 0, shape, shape[1])
            params[name + ".in_proj_bias"] = np.zeros(shape[0], F32)
        else:
            fan_in = int(np.prod(shape[1:]))
            params[name + ".weight"] = L.uniform_init(seed, li, 0, shape, fan_in)
            params[name + ".bias"] = (np.zeros(shape[0], F32) if kind == "lin0" else
                                      L.uniform_init(seed, li, 1, (shape[0],), fan_in))
    return params


# ---------------------------------------------------------------- forward / backward
def _mask(a: dict, N: int):
    """The encoder's attention mask: None, or section 26's bool mask (True:
    takes part) from the key padding mask of the last ``masked`` tokens."""
    k, T, H = int(a.get("masked", 0)), _tokens(a), int(a["n_head"])
    if not k:
        return None
    pad = np.broadcast_to(np.arange(T) >= T - k, (N, T))
    return V.mha_mask(N, H, T, T, key_padding_mask=pad)


def forward(p: dict, x: np.ndarray, a: dict, drops: V.Drops):
    """Logits ``(N, 10)`` of images ``x (N, 1, 8, 8)``; ``drops.q = 0`` is
    evaluation."""
    N = x.shape[0]
    D, H, k = int(a["d_model"]), int(a["n_head"]), int(a["patch"])
    T = _tokens(a)
    c: dict = {}
    y, c["conv"] = L.conv2d_fwd(x, p["patch.weight"], p["patch.bias"], k, 0)   # (N, D, h, w)
    h = np.ascontiguousarray(y.reshape(N, D, -1).transpose(0, 2, 1))          # (N, P, D)
    if a["pool"] == "cls":
        cl = L.embedding_fwd(np.zeros((N, 1), np.int64), p["cls.weight"])    # (N, 1, D)
        h = np.concatenate([cl, h], axis=1)
    pe = L.embedding_fwd(np.arange(T), p["pos.weight"])                        # (T, D)
    h0 = h + pe
    c["k0"] = drops.next(h0.shape)
    h = V._drop(h0, c["k0"], drops.scale)
    mask = _mask(a, N)
    c["layers"] = []
    for i in range(int(a["n_layer"])):
        h, cl_ = V.encoder_layer_fwd(p, f"encoder.layers.{i}.", h, H, drops, mask)
        c["layers"].append(cl_)
    hn, c["norm"] = L.layernorm_fwd(h, p["norm.weight"], p["norm.bias"], V.LN_EPS)
    pooled = hn[:, 0] if a["pool"] == "cls" else V.xmean_fwd(hn, 1)
    c["pooled"], c["hn_shape"] = np.ascontiguousarray(pooled), hn.shape
    logits = L.linear_fwd(c["pooled"], p["head.weight"], p["head.bias"])
    return logits, c


def backward(p: dict, gz: np.ndarray, c: dict, a: dict, scale) -> dict[str, np.ndarray]:
    """Every parameter's gradient from the logits' gradient ``gz (N, 10)``."""
    grads: dict[str, np.ndarray] = {}
    D, H, k = int(a["d_model"]), int(a["n_head"]), int(a["patch"])
    gW, gb, gpool = L.linear_bwd(gz, c["pooled"], p["head.weight"])
    grads["head.weight"], grads["head.bias"] = gW, gb
    if a["pool"] == "cls":
        ghn = np.zeros(c["hn_shape"], F32)          # a slice's gradient: placed in +0
        ghn[:, 0] = gpool
    else:
        ghn = V.xmean_bwd(gpool, c["hn_shape"], 1)
    g, gw, gbb = L.layernorm_bwd(ghn, c["norm"], p["norm.weight"])
    grads["norm.weight"], grads["norm.bias"] = gw, gbb
    for i in range(int(a["n_layer"]) - 1, -1, -1):
        g = V.encoder_layer_bwd(p, f"encoder.layers.{i}.", g, c["layers"][i], H, scale, grads)
    gh0 = V._drop_bwd(g, c["k0"], scale)
    N, T = gh0.shape[:2]
    gpe = L.sum_to(gh0, (T, D))                      # broadcast over N: a tree over N
    grads["pos.weight"] = L.embedding_bwd(gpe, np.arange(T), T)
    if a["pool"] == "cls":
        grads["cls.weight"] = L.embedding_bwd(gh0[:, :1], np.zeros((N, 1), np.int64), 1)
        gh = gh0[:, 1:]
    else:
        if "cls.weight" in p:                        # registered, unused: +0 (section 13)
            grads["cls.weight"] = np.zeros_like(p["cls.weight"])
        gh = gh0
    gy = np.ascontiguousarray(gh.transpose(0, 2, 1)).reshape(N, D, 8 // k, 8 // k)
    gW, gb, _ = L.conv2d_bwd(gy, c["conv"], p["patch.weight"], k, 0)
    grads["patch.weight"], grads["patch.bias"] = gW, gb
    return grads


def shard_grads(p: dict, x: np.ndarray, y: np.ndarray, n_global: int, a: dict,
                drops: V.Drops, smoothing: float = SMOOTHING):
    """One shard's gradients (section 17) and its loss tree_sum(loss rows)."""
    logits, c = forward(p, x, a, drops)
    loss, gz = V.smoothed_xent(logits, y, n_global, smoothing)
    return backward(p, gz, c, a, drops.scale), nt.tree_sum(loss, 0)


def predict(p: dict, x: np.ndarray, a: dict) -> np.ndarray:
    return forward(p, x, a, V.Drops(0, 0, 0, 0.0))[0]


def batch_grads(p, xb, yb, a, seed, step, shards, smoothing: float = SMOOTHING):
    """Section 8 / 17: per-shard gradients (N = the batch), summed over the
    shards by the tree; the step's loss."""
    B = len(xb)
    rows = B // shards
    parts, losses = [], []
    for s in range(shards):
        sl = slice(s * rows, (s + 1) * rows)
        drops = V.Drops(seed, step, s * rows, float(a["dropout"]))
        g, loss = shard_grads(p, xb[sl], yb[sl], B, a, drops, smoothing)
        parts.append(g)
        losses.append(loss)
    grads = parts[0] if shards == 1 else {
        k: nt.tree_sum(np.stack([g[k] for g in parts]), 0) for k in p}
    return grads, nt.tree_sum(np.stack(losses), 0) / F32(B)


# ---------------------------------------------------------------- 17. training
def train(cfg: dict, data_path: str, data_sha256: str, steps_cb=None, cls_always: bool = False):
    """Train the vit config ``cfg`` (the pipeline's TOML as a dict, a
    ``model:vit`` factory and the ``model:smoothed`` loss); returns (params,
    {"steps", "losses", "test_accuracy"})."""
    with nt._blas_single_thread():
        return _train(cfg, data_path, data_sha256, steps_cb, cls_always)


def _train(cfg, data_path, data_sha256, steps_cb, cls_always):
    seed = int(cfg.get("seed", 0))
    if nt.file_sha256(data_path) != data_sha256.lower():
        raise ValueError("data file does not match the given sha256")
    a = arch_of(cfg, cls_always)
    tr, oc = cfg.get("train", {}), cfg.get("optim", {})
    B, S = int(tr.get("batch_size", 64)), int(tr.get("shards", 4))
    if S < 1 or S & (S - 1) or B % S:
        raise ValueError("shards must be a power of two dividing batch_size")
    X, y = nt.load_data(data_path)
    X = X.reshape(-1, 1, 8, 8)
    test_ids, train_ids = nt.split_ids(len(X), seed, data_sha256,
                                       cfg.get("data", {}).get("test_fraction", 0.2))
    p = init_params(seed, a)
    opt = O.make_optimizer(oc)
    total, steps = nt.schedule(train_ids, seed, B, int(tr.get("epochs", 8)),
                               int(tr.get("max_steps", 0)))
    losses = []
    for t, idx in steps:
        grads, loss = batch_grads(p, X[idx], y[idx], a, seed, t, S)
        losses.append(float(loss))
        O.update(opt, p, grads, oc, t, total)
        if steps_cb is not None:
            steps_cb(t, p)
    logits = predict(p, X[test_ids], a)
    correct = int(np.count_nonzero(np.argmax(logits, axis=1) == y[test_ids]))
    acc = correct / len(test_ids) if len(test_ids) else math.nan
    return p, {"steps": total, "losses": losses, "test_accuracy": acc}


def main(argv: list[str] | None = None) -> int:
    """``python tests/twin/twin_vit.py examples/vit/config.toml mode=exact
    train.max_steps=3 --data data/digits.csv.gz``: the weight hash."""
    import argparse
    import time

    ap = argparse.ArgumentParser(description="the vit example in the NumPy twin")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value (value parsed as TOML)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--cls-always", action="store_true",
                    help="the example's earlier model: the class token registered whatever pool is")
    args = ap.parse_args(argv)
    cfg = nt.load_config(args.config, args.overrides)
    t0 = time.perf_counter()
    params, m = train(cfg, args.data, nt.file_sha256(args.data),
                      cls_always=args.cls_always)
    print(f"test_accuracy: {m['test_accuracy']:.6f}")
    print(f"weights sha256:{nt.weights_sha256(params)}")
    print(f"steps: {m['steps']}  time: {time.perf_counter() - t0:.2f}s")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
