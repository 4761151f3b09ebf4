"""A project model that uses every op of Part III (docs/exact-spec.md sections
20-23), as the spec's layers, in the twin. The stock torch module (the test
writes it as the project's model.py, ``MODEL_PY``):

    conv  Conv2d(c, ch, 3, padding=1)                  [layer 0]
    act   SiLU
    pool  MaxPool2d(3, stride=2, padding=1)            8x8 -> 4x4, windows overlap
    avg   AvgPool2d(2, stride=1, padding=1, count_include_pad=False)   4x4 -> 5x5
    adapt AdaptiveAvgPool2d(3)                         5x5 -> 3x3, windows overlap
    norm  RMSNorm(ch * 9)                              [layer 1, w = 1]
    fc    Linear(ch * 9, 16)                           [layer 2]
    tanh  Tanh, gate Sigmoid
    head  Linear(16, classes)                          [layer 3]
    out   LogSoftmax(dim=1)

    forward(x):
        h = act(conv(x))
        h = h * F.softmax(h, dim=1)                    softmax over channels (not the last dim)
        h = adapt(avg(pool(h)))
        h = h - h.mean((2, 3), keepdim=True)           a broadcast operand: sum_to
        h = norm(h.flatten(1))
        u = fc(h)
        u = tanh(u) * gate(u)
        u = u + torch.sum(u, 1, keepdim=True) * 0.1    sum over a dim, a Python number
        return out(head(u))

Every value has at most two consumers; a value with two gets the f32 sum of
its two gradients (section 13). Training: the data, split and epoch order of
section 2, the step of section 17 (cross-entropy of section 7 on the
log-softmax outputs as logits), the shard tree and section 9's optimiser.
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

__all__ = ["MODEL_PY", "init_params", "forward", "shard_grads", "train"]

MODEL_PY = '''\
import torch
import torch.nn.functional as F
from torch import nn


class OpsNet(nn.Module):
    def __init__(self, c, classes, ch):
        super().__init__()
        self.conv = nn.Conv2d(c, ch, 3, padding=1)
        self.act = nn.SiLU()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.avg = nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False)
        self.adapt = nn.AdaptiveAvgPool2d(3)
        self.norm = nn.RMSNorm(ch * 9)
        self.fc = nn.Linear(ch * 9, 16)
        self.tanh = nn.Tanh()
        self.gate = nn.Sigmoid()
        self.head = nn.Linear(16, classes)
        self.out = nn.LogSoftmax(dim=1)

    def forward(self, x):
        h = self.act(self.conv(x))
        h = h * F.softmax(h, dim=1)
        h = self.adapt(self.avg(self.pool(h)))
        h = h - h.mean((2, 3), keepdim=True)
        h = self.norm(h.flatten(1))
        u = self.fc(h)
        u = self.tanh(u) * self.gate(u)
        u = u + torch.sum(u, 1, keepdim=True) * 0.1
        return self.out(self.head(u))


def opsnet(input_shape, num_classes, channels=4):
    return OpsNet(input_shape[0], num_classes, channels)
'''

POOL = (3, 2, 1)            # MaxPool2d kernel, stride, padding
AVG = (2, 1, 1)             # AvgPool2d kernel, stride, padding (count_include_pad=False)
ADAPT = 3
HIDDEN = 16
SCALE = F32(0.1)            # RN32 of the Python number


def init_params(seed: int, ch: int, c: int = 1, classes: int = 10):
    """Section 16: conv 0, norm 1 (w = 1, no draw), fc 2, head 3."""
    D = ch * ADAPT * ADAPT
    p = {"conv.weight": L.uniform_init(seed, 0, 0, (ch, c, 3, 3), c * 9),
         "conv.bias": L.uniform_init(seed, 0, 1, (ch,), c * 9),
         "norm.weight": np.ones(D, F32),
         "fc.weight": L.uniform_init(seed, 2, 0, (HIDDEN, D), D),
         "fc.bias": L.uniform_init(seed, 2, 1, (HIDDEN,), D),
         "head.weight": L.uniform_init(seed, 3, 0, (classes, HIDDEN), HIDDEN),
         "head.bias": L.uniform_init(seed, 3, 1, (classes,), HIDDEN)}
    return p


def forward(p, x):
    c = {}
    z, c["conv"] = L.conv2d_fwd(x, p["conv.weight"], p["conv.bias"], 1, 1)
    c["z"] = z
    h = P.silu_fwd(z)
    c["h1"] = h
    sm, c["sm"] = P.softmax_fwd(h, 1)
    c["smv"] = sm
    h = (h * sm).astype(F32)
    h, c["pool"] = P.max_pool2d_fwd(h, *POOL)
    h, c["avg"] = P.avg_pool2d_fwd(h, *AVG, count_include_pad=False)
    h, c["adapt"] = P.adaptive_avg_pool2d_fwd(h, ADAPT)
    c["h4"] = h.shape
    m = P.mean_fwd(h, (2, 3), True)
    h = (h - m).astype(F32)
    flat = np.ascontiguousarray(h.reshape(h.shape[0], -1))
    hn, c["norm"] = P.rmsnorm_fwd(flat, flat.shape[1:], p["norm.weight"], None)
    c["hn"] = hn
    u = L.linear_fwd(hn, p["fc.weight"], p["fc.bias"])
    c["u"] = u
    a, b = P.tanh_fwd(u), P.sigmoid_fwd(u)
    c["a"], c["b"] = a, b
    v = (a * b).astype(F32)
    c["v"] = v
    s = P.sum_fwd(v, 1, True)
    w = (v + (s * SCALE).astype(F32)).astype(F32)
    c["w"] = w
    o = L.linear_fwd(w, p["head.weight"], p["head.bias"])
    y, c["out"] = P.log_softmax_fwd(o, 1)
    return y, c


def backward(p, gy, c):
    grads = {}
    go = P.log_softmax_bwd(gy, c["out"])
    grads["head.weight"], grads["head.bias"], gw = L.linear_bwd(go, c["w"], p["head.weight"])
    # w = v + t, t = s * 0.1 broadcast: t's gradient sum_to(gw) (a tree over dim 1),
    # then s's gradient that times 0.1; v's gradients: gw and sum's broadcast of gs
    gs = (L.sum_to(gw, (gw.shape[0], 1)) * SCALE).astype(F32)
    gv = (gw + P.sum_bwd(gs, c["v"].shape, 1, True)).astype(F32)   # fan-out: two consumers
    ga = (gv * c["b"]).astype(F32)
    gb = (gv * c["a"]).astype(F32)
    gu = (P.tanh_bwd(ga, c["u"]) + P.sigmoid_bwd(gb, c["u"])).astype(F32)
    grads["fc.weight"], grads["fc.bias"], ghn = L.linear_bwd(gu, c["hn"], p["fc.weight"])
    gflat, grads["norm.weight"] = P.rmsnorm_bwd(ghn, c["norm"], p["norm.weight"])
    gh = gflat.reshape(c["h4"])
    # h - m: h's gradient gh; m's gradient sum_to(-gh) (dims 2, 3), then mean's backward
    gm = L.sum_to((-gh).astype(F32), c["h4"][:2] + (1, 1))
    gh = (gh + P.mean_bwd(gm, c["h4"], (2, 3), True)).astype(F32)
    gh = P.adaptive_avg_pool2d_bwd(gh, c["adapt"])
    gh = P.avg_pool2d_bwd(gh, c["avg"])
    gh = P.max_pool2d_bwd(gh, c["pool"])
    # h1 * sm: h1 gets gh * sm, sm gets gh * h1, back through softmax to h1
    g1 = (gh * c["smv"]).astype(F32)
    g2 = P.softmax_bwd((gh * c["h1"]).astype(F32), c["sm"])
    gz = P.silu_bwd((g1 + g2).astype(F32), c["z"])
    grads["conv.weight"], grads["conv.bias"], _ = L.conv2d_bwd(gz, c["conv"], p["conv.weight"],
                                                               1, 1)
    return grads


def shard_grads(p, x, y, n_global):
    logits, c = forward(p, x)
    lse, g = nt.softmax_xent(logits, y, n_global)
    return backward(p, g, c), nt.tree_sum(lse, 0)


def train(cfg: dict, data_path: str, data_sha256: str):
    """Train a config whose factory is MODEL_PY's ``opsnet``;
    (params, {"test_accuracy", "steps"})."""
    with nt._blas_single_thread():
        return _train(cfg, data_path, data_sha256)


def _train(cfg, data_path, data_sha256):
    seed = int(cfg.get("seed", 0))
    tr, oc = cfg["train"], cfg["optim"]
    a = {"channels": 4, **cfg["model"].get("args", {})}
    B, S = int(tr["batch_size"]), int(tr.get("shards", 8))
    X, y = nt.load_data(data_path)
    X = X.reshape(-1, 1, 8, 8)
    test_ids, train_ids = nt.split_ids(len(X), seed, data_sha256,
                                       cfg["data"].get("test_fraction", 0.2))
    p = init_params(seed, int(a["channels"]))
    opt = O.make_optimizer(oc)
    total, steps = nt.schedule(train_ids, seed, B, int(tr.get("epochs", 30)),
                               int(tr.get("max_steps", 0)))
    rows = B // S
    for t, idx in steps:
        parts = [shard_grads(p, X[idx[s * rows:(s + 1) * rows]], y[idx[s * rows:(s + 1) * rows]],
                             B)[0] for s in range(S)]
        grads = parts[0] if S == 1 else {
            k: nt.tree_sum(np.stack([g[k] for g in parts]), 0) for k in p}
        O.update(opt, p, grads, oc, t, total)
    logits, _ = forward(p, X[test_ids])
    acc = int(np.count_nonzero(np.argmax(logits, axis=1) == y[test_ids])) / len(test_ids)
    return p, {"test_accuracy": acc, "steps": total}
