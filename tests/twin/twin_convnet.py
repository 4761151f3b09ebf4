"""The project ``pipeline new`` writes (model.py's ``convnet``) as the spec's
layers, in the twin: a classification network that exact mode converts from a
stock module, not one of the built-in factories of sections 3 and 6.

``nn.Sequential(Conv2d(c, ch, 3, padding=1), ReLU, Conv2d(ch, ch, 3, padding=1),
ReLU, Flatten, Dropout(q), Linear(ch*h*w, classes))``: parameter names
``0.*``, ``2.*``, ``6.*``, section 16's layer numbers 0, 1, 2; Conv2d and Linear
with xmmb (section 14), one dropout site (section 15, F = ch*h*w); the data,
split and epoch order of section 2; the step of section 17; section 9.
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

__all__ = ["init_params", "forward", "shard_grads", "train"]


def init_params(seed: int, ch: int, c: int = 1, hw: int = 64, classes: int = 10):
    shapes = [("0", (ch, c, 3, 3), c * 9), ("2", (ch, ch, 3, 3), ch * 9),
              ("6", (classes, ch * hw), ch * hw)]
    p = {}
    for li, (name, shape, fan_in) in enumerate(shapes):
        p[f"{name}.weight"] = L.uniform_init(seed, li, 0, shape, fan_in)
        p[f"{name}.bias"] = L.uniform_init(seed, li, 1, (shape[0],), fan_in)
    return p


def forward(p, x, keep, scale):
    """Logits of ``x (N, 1, 8, 8)``; ``keep`` the dropout mask ``(N, ch*64)`` or None."""
    z0, c0 = L.conv2d_fwd(x, p["0.weight"], p["0.bias"], 1, 1)
    a0 = nt.relu(z0)
    z1, c1 = L.conv2d_fwd(a0, p["2.weight"], p["2.bias"], 1, 1)
    a1 = nt.relu(z1)
    flat = np.ascontiguousarray(a1.reshape(a1.shape[0], -1))
    h = flat if keep is None else L.dropout_fwd(flat, keep, scale)
    logits = L.linear_fwd(h, p["6.weight"], p["6.bias"])
    return logits, (z0, c0, z1, c1, h)


def shard_grads(p, x, y, n_global, keep, scale):
    logits, (z0, c0, z1, c1, h) = forward(p, x, keep, scale)
    lse, g = nt.softmax_xent(logits, y, n_global)
    grads = {}
    grads["6.weight"], grads["6.bias"], gh = L.linear_bwd(g, h, p["6.weight"])
    gflat = gh if keep is None else L.dropout_bwd(gh, keep, scale)
    gz1 = nt.relu_bwd(gflat.reshape(z1.shape), z1)
    grads["2.weight"], grads["2.bias"], ga0 = L.conv2d_bwd(gz1, c1, p["2.weight"], 1, 1)
    gz0 = nt.relu_bwd(ga0, z0)
    grads["0.weight"], grads["0.bias"], _ = L.conv2d_bwd(gz0, c0, p["0.weight"], 1, 1)
    return grads, nt.tree_sum(lse, 0)


def train(cfg: dict, data_path: str, data_sha256: str):
    """Train the ``pipeline new`` project's config; (params, {"test_accuracy", "steps"})."""
    with nt._blas_single_thread():
        return _train(cfg, data_path, data_sha256)


def _train(cfg, data_path, data_sha256):
    seed = int(cfg.get("seed", 0))
    tr, oc = cfg["train"], cfg["optim"]
    a = {"channels": 16, "dropout": 0.1, **cfg["model"].get("args", {})}
    B, S = int(tr["batch_size"]), int(tr.get("shards", 8))
    X, y = nt.load_data(data_path)
    X = X.reshape(-1, 1, 8, 8)
    test_ids, train_ids = nt.split_ids(len(X), seed, data_sha256,
                                       cfg["data"].get("test_fraction", 0.2))
    p = init_params(seed, int(a["channels"]))
    opt = O.make_optimizer(oc)
    q = float(a["dropout"])
    T, scale = nt.dropout_consts(q) if q > 0 else (0, F32(1.0))
    total, steps = nt.schedule(train_ids, seed, B, int(tr.get("epochs", 30)),
                               int(tr.get("max_steps", 0)))
    rows = B // S
    for t, idx in steps:
        parts = []
        for s in range(S):
            xs, ys = X[idx[s * rows:(s + 1) * rows]], y[idx[s * rows:(s + 1) * rows]]
            F = int(a["channels"]) * 64
            keep = L.layer_mask(seed, t, 0, s * rows, (rows, F), T) if q > 0 else None
            parts.append(shard_grads(p, xs, ys, B, keep, scale)[0])
        grads = parts[0] if S == 1 else {
            k: nt.tree_sum(np.stack([g[k] for g in parts]), 0) for k in p}
        O.update(opt, p, grads, oc, t, total)
    logits, _ = forward(p, X[test_ids], None, scale)
    acc = int(np.count_nonzero(np.argmax(logits, axis=1) == y[test_ids])) / len(test_ids)
    return p, {"test_accuracy": acc, "steps": total}
