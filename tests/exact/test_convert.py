"""from_torch, the guard and LayerNet (pipeline/exact/convert, guard, modnet;
docs/exact-spec.md sections 13-17): a stock module tree converts with its
parameters, unsupported layers and calls are refused all together by path,
the backward graph is checked, and a transformer trains to the same bits on
any thread count and ISA (and to other bits with another seed)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import ConfigError
from pipeline.exact import ExactAdam, Guard, LayerNet, Linear, check_graph, check_module, from_torch
from pipeline.exact import layers as L

from ..support import ROOT


def _load_example() -> Any:
    """examples/charlm/model.py under a name of its own (a module named
    ``model`` in sys.modules would shadow other projects' model.py)."""
    spec = importlib.util.spec_from_file_location("charlm_example_model",
                                                  ROOT / "examples" / "charlm" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpt = _load_example().gpt


def _tiny_gpt(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return gpt((16,), 11, n_layer=1, n_head=2, d_model=16, dropout=0.1)


def test_from_torch_converts_charlm_and_copies_parameters() -> None:
    """The example transformer converts layer by layer (its own Block and GPT
    classes kept), with the same parameter names and values; in evaluation
    its exact forward is within 1e-5 of the stock one; the argument is left
    unchanged."""
    stock = _tiny_gpt()
    exact = from_torch(stock)
    assert isinstance(exact.blocks[0].qkv, L.Linear) and isinstance(exact.tok, L.Embedding)
    assert isinstance(exact.blocks[0].act, L.GELU) and isinstance(exact.ln_f, L.LayerNorm)
    assert isinstance(stock.blocks[0].qkv, nn.Linear)
    s, e = dict(stock.named_parameters()), dict(exact.named_parameters())
    assert sorted(s) == sorted(e) and all(torch.equal(s[k], e[k]) for k in s)
    x = torch.randint(0, 11, (3, 16))
    stock.eval()
    exact.eval()
    with torch.no_grad(), Guard():
        got = exact(x)
    assert (got - stock(x)).abs().max() < 1e-5


def test_from_torch_refuses_every_unsupported_module_by_path() -> None:
    """One ConfigError lists every unsupported layer (nested paths, types),
    a Conv2d option it cannot honour and a parameter held by a custom module;
    the control: the supported part alone converts."""
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))
            self.inner = nn.Sequential(nn.Linear(4, 4), nn.Mish())

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm3d(4), Custom(),
                          nn.Conv2d(1, 2, 3, padding_mode="circular"),
                          nn.MultiheadAttention(4, 2, add_bias_kv=True))
    with pytest.raises(ConfigError) as e:
        from_torch(model)
    text = str(e.value)
    for needle in ("1 (torch.nn.modules.batchnorm.BatchNorm3d)", "2.inner.1 (torch.nn.modules."
                   "activation.Mish)", "parameter 'scale'", "3 (torch.nn.modules.conv.Conv2d)"
                   ": padding_mode",
                   "4 (torch.nn.modules.activation.MultiheadAttention): add_bias_kv"):
        assert needle in text
    assert "5 problem(s)" in text
    ok = from_torch(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.2), nn.Flatten()))
    assert [type(m) for m in ok] == [L.Linear, L.ReLU, L.Dropout, nn.Flatten]


class _Uses(nn.Module):
    """A forward calling what the test asks for after an exact Linear."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.lin, self.what = Linear(4, 4), what

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.what == "erf":
            return torch.erf(h)
        if self.what == "prod":
            return h - h.prod(-1, keepdim=True)
        if self.what == "gather":
            return h[:, torch.tensor([0, 0, 1, 2])]
        if self.what == "three":
            return h * 2.0 + h + h
        return h * 2.0 + h[:, :1] - 1.0  # control: two consumers, basic indexing, broadcast


@pytest.mark.parametrize("what,needle", [
    ("erf", "calls torch.erf"), ("prod", "calls torch.Tensor.prod"),
    ("gather", "__getitem__, which docs/exact-spec.md does not define with a gradient"),
    ("three", None), ("ok", None)])
def test_guard_refuses_what_the_spec_does_not_define(what: str, needle: str | None) -> None:
    """check_module names each refused call with its module path; the
    controls (two consumers, basic indexing, a broadcast subtraction; three
    consumers, which section 29 sums in a fixed order) pass."""
    model = _Uses(what)
    if needle is None:
        check_module(model, torch.ones(2, 4))
        return
    with pytest.raises(ConfigError, match="<model> \\(_Uses\\)") as e:
        check_module(model, torch.ones(2, 4))
    assert needle in str(e.value)


def test_graph_check_sees_stock_backward_nodes() -> None:
    """A graph built outside the guard (stock torch ops) is reported by its
    node types; an exact one has no problem."""
    w = torch.ones(3, requires_grad=True)
    assert any("TanhBackward" in p for p in check_graph(torch.tanh(w * 2)))
    lin = Linear(3, 2)
    assert check_graph(lin(torch.ones(1, 3))) == []


def test_layer_net_weight_cache_follows_the_optimiser() -> None:
    """After Adam steps (and a copy_ into one parameter), LayerNet's
    predictions equal a fresh LayerNet's holding the same weights: the cache of
    quantised weights is never stale."""
    net = LayerNet(from_torch(_tiny_gpt()), 3, "cpu", torch.zeros(2, 16, dtype=torch.long))
    opt = ExactAdam(net.params, 0.01)
    x, y = torch.randint(0, 11, (4, 16)), torch.randint(0, 11, (4, 16))

    def check() -> None:
        fresh = LayerNet(from_torch(_tiny_gpt()), 0, "cpu")
        for k, v in net.params.items():
            fresh.params[k].copy_(v)
        assert torch.equal(net.predict(x), fresh.predict(x))

    for step in range(2):
        net.predict(x)
        opt.step(net.shard_grads(x, y, 64, None, step=step)[1])
        check()
    with torch.no_grad():
        net.params["head.weight"].copy_(torch.zeros(11, 16))
    check()


_TRAIN = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from model import gpt
from pipeline.exact import LayerNet, ExactAdam, from_torch
from pipeline.train.distributed import tree_reduce
from pipeline.core.hashing import weights_sha256
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
data = torch.randint(0, 11, (16, 17), generator=g)
out = [torch.backends.cpu.get_cpu_capability()]
for seed in (5, 6):
    net = LayerNet(from_torch(gpt((16,), 11, n_layer=1, n_head=2, d_model=16, dropout=0.2)),
                   seed, "cpu", data[:2, :16])
    opt = ExactAdam(net.params, 0.01)
    for t in range(4):
        x, y = data[:, :16], data[:, 1:]
        parts = [net.shard_grads(x[s:s + 8], y[s:s + 8], 256, None, step=t, row0=s)
                 for s in (0, 8)]
        opt.step({k: tree_reduce([p[1][k] for p in parts], torch.add) for k in net.params})
    out.append(weights_sha256(net.params))
print(" ".join(out))
"""


@pytest.mark.process
def test_transformer_training_bit_identical_across_threads_and_isa() -> None:
    """4 Adam steps of a 1-block transformer with dropout, two shards, give the
    same weights under (1 thread, no SIMD) and (2 threads, AVX2), each set
    before its interpreter starts; the control: seed 6 gives other weights."""
    procs = []
    for threads, isa in ((1, "default"), (2, "avx2")):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=isa, PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _TRAIN, str(threads), str(ROOT / "examples" / "charlm")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outs.append(out.split())
    (cap1, *h1), (cap2, *h2) = outs
    assert (cap1, cap2) == ("DEFAULT", "AVX2")
    assert h1 == h2
    assert h1[0] != h1[1]


# ------------------------------------------------- issue 21: faithful or refused
def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6),
                         nn.Linear(6, 3))


def test_from_torch_keeps_tied_parameters_one_tensor() -> None:
    """Two layers sharing one weight stay sharing one (after LayerNet too, and
    its gradient is the sum of both uses); control: an untied model has two."""
    m = _mlp()
    m[4].weight = nn.Parameter(torch.zeros(3, 6))
    m[3].weight = m[1].weight if m[1].weight.shape == m[3].weight.shape else m[3].weight
    tied = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    tied[2].weight = tied[0].weight
    ex = from_torch(tied)
    assert ex[2].weight is ex[0].weight
    assert len(list(ex.parameters())) == 3  # one weight, two biases
    net = LayerNet(ex, 0, "cpu", torch.zeros(2, 6))
    assert net.aliases == {"2.weight": "0.weight"} and "2.weight" not in net.params
    loss, grads = net.shard_grads(torch.randn(4, 6), torch.tensor([0, 1, 2, 3]), 4, None)
    assert set(grads) == {"0.weight", "0.bias", "2.bias"}
    untied = from_torch(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6)))
    assert untied[2].weight is not untied[0].weight


def test_from_torch_keeps_frozen_parameters_frozen() -> None:
    """requires_grad False survives conversion: LayerNet neither differentiates
    nor hands it to the optimiser; control: the unfrozen layer is trainable."""
    m = _mlp()
    m[1].requires_grad_(False)
    ex = from_torch(m)
    assert not ex[1].weight.requires_grad and ex[3].weight.requires_grad
    net = LayerNet(ex, 0, "cpu", torch.zeros(2, 1, 8))
    assert sorted(net.structure()["frozen"]) == ["1.bias", "1.weight"]
    assert "1.weight" in net.params and "1.weight" not in net.trainable
    _, grads = net.shard_grads(torch.randn(4, 1, 8), torch.tensor([0, 1, 2, 0]), 4, None)
    assert "1.weight" not in grads and grads["3.weight"] is not None


def test_from_torch_moves_forward_hooks_to_the_exact_layer() -> None:
    """A forward hook on a converted layer runs on its exact twin (it zeroes
    the output here); control: without the hook the output is not zero."""
    m = _mlp()
    m[1].register_forward_hook(lambda mod, inp, out: out * 0)
    x = torch.randn(2, 1, 8)
    hooked, plain = from_torch(m), from_torch(_mlp())
    with Guard():
        h, p = hooked[:3](x), plain[:3](x)
    assert torch.equal(h, torch.zeros_like(h))
    assert not torch.equal(p, torch.zeros(2, 6))


@pytest.mark.parametrize("what,needle", [
    ("parametrization", "parametrized (weight"),
    ("old weight_norm", "the old torch.nn.utils.weight_norm"),
    ("backward hook", "a backward hook"),
    ("computed buffer", "holds computed float values"),
])
def test_from_torch_refuses_what_it_cannot_keep_by_path(what: str, needle: str) -> None:
    """Parametrizations, the old weight_norm's extra parameters, backward
    hooks and a float table computed by torch's kernels are refused, naming
    the module path (exit 2 in a run), never converted into another model."""
    m = _mlp()
    if what == "parametrization":
        m[1] = nn.utils.parametrizations.weight_norm(m[1])
    elif what == "old weight_norm":
        m[1] = torch.nn.utils.weight_norm(m[1])
    elif what == "backward hook":
        m[3].register_full_backward_hook(lambda mod, gi, go: None)
    else:
        class Table(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.register_buffer("cos", torch.cos(torch.arange(8.0)))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x
        m.add_module("table", Table())
    with pytest.raises(ConfigError, match="exact mode") as e:
        from_torch(m)
    assert needle in str(e.value)


def test_constant_buffers_are_kept_and_training_state_is_refused() -> None:
    """A mask of whole numbers is a constant (kept, saved as a buffer); a
    buffer the forward updates is training-time state (refused by LayerNet)."""
    class Masked(nn.Module):
        def __init__(self, update: bool) -> None:
            super().__init__()
            self.lin, self.update = nn.Linear(4, 4), update
            self.register_buffer("mask", torch.tensor([1.0, 0.0, 1.0, float("-inf")]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.update:
                self.mask.add_(0.0)
            return self.lin(x)
    net = LayerNet(from_torch(Masked(False)), 0, "cpu", torch.zeros(2, 4))
    assert list(net.buffers) == ["mask"]
    with pytest.raises(ConfigError, match="calls torch.Tensor.add_"):  # the guard's refusal
        LayerNet(from_torch(Masked(True)), 0, "cpu", torch.zeros(2, 4))


def test_a_custom_function_named_like_an_exact_one_is_refused() -> None:
    """The backward check knows exact nodes by their Function class, not by
    name: a user's ``_Linear`` Function is refused; control: the real one passes."""
    from pipeline.exact import functional as XF

    class _Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x * 2

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            return g * 2

    fake = _Linear.apply(torch.ones(3, requires_grad=True))
    assert check_graph(fake) == ["the backward of _LinearBackward is not defined by "
                                 "docs/exact-spec.md"]
    real = XF.linear(torch.ones(2, 3), torch.ones(4, 3, requires_grad=True))
    assert check_graph(real) == []


def test_exact_layers_check_shapes_as_torch_does() -> None:
    """The blocked product pads the inner dimension to 64, so a Linear fed the
    wrong width used to compute something; it now raises as torch does."""
    from pipeline.exact import functional as XF

    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        XF.linear(torch.randn(2, 10), torch.randn(10, 32))
    with pytest.raises(RuntimeError, match="conv2d: expected input"):
        XF.conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 1, 3, 3))
    assert XF.linear(torch.randn(2, 32), torch.randn(10, 32)).shape == (2, 10)  # control


def test_seed_free_values_keep_constants_and_pretrained_and_refuse_the_rest() -> None:
    """Of two builds under two seeds: values drawn from the seed are the
    spec's to draw; a fill and a tensor loaded with pipeline.pretrained are
    kept; a value the factory fixed otherwise (its own seeded generator) is
    refused, since torch's draws are not the same on every machine."""
    from pipeline.exact.convert import seed_free_values

    loaded = torch.randn(6, 8)

    def build(seed: int, own: bool) -> nn.Module:
        torch.manual_seed(seed)
        m = _mlp()  # its own manual_seed(0): every value seed-free...
        torch.manual_seed(seed)
        m[3] = nn.Linear(6, 6)  # ... but this layer's, drawn from the seed
        with torch.no_grad():
            m[1].weight.copy_(loaded)
            m[1].bias.fill_(0.5)
        if not own:
            torch.manual_seed(seed)
            m[4] = nn.Linear(6, 3)
        return m

    kept = seed_free_values(build(1, False), build(2, False), [loaded])
    assert sorted(kept) == ["1.bias", "1.weight"]
    assert torch.equal(kept["1.weight"], loaded)
    with pytest.raises(ConfigError, match="4.weight: the factory sets it the same"):
        seed_free_values(build(1, True), build(2, True), [loaded])


# ------------------------------------------------- issue 22: more layers and functions
_ROUTED = {
    "F.silu": (lambda x: F.silu(x), "silu"), "torch.sigmoid": (torch.sigmoid, "sigmoid"),
    "Tensor.sigmoid": (lambda x: x.sigmoid(), "sigmoid"),
    "F.sigmoid": (lambda x: F.sigmoid(x), "sigmoid"),
    "special.expit": (lambda x: torch.special.expit(x), "sigmoid"),
    "torch.tanh": (torch.tanh, "tanh"), "Tensor.tanh": (lambda x: x.tanh(), "tanh"),
    "F.tanh": (lambda x: F.tanh(x), "tanh"),
    "F.softmax": (lambda x: F.softmax(x, dim=0), "softmax0"),
    "torch.softmax": (lambda x: torch.softmax(x, 1), "softmax1"),
    "Tensor.softmax": (lambda x: x.softmax(-1), "softmax-1"),
    "special.softmax": (lambda x: torch.special.softmax(x, 1), "softmax1"),
    "F.log_softmax": (lambda x: F.log_softmax(x, 0), "log_softmax0"),
    "torch.log_softmax": (lambda x: torch.log_softmax(x, dim=2), "log_softmax2"),
    "Tensor.log_softmax": (lambda x: x.log_softmax(1), "log_softmax1"),
    "torch.sum": (lambda x: torch.sum(x, (0, 2)), "sum02"),
    "Tensor.sum": (lambda x: x.sum(), "sum"), "Tensor.sum keepdim": (
        lambda x: x.sum(dim=1, keepdim=True), "sum1k"),
    "torch.mean": (lambda x: torch.mean(x, -1), "mean-1"), "Tensor.mean": (
        lambda x: x.mean(), "mean"),
    "F.rms_norm": (lambda x: F.rms_norm(x, (5,), eps=1e-6), "rms"),
}


def _direct(which: str, x: torch.Tensor) -> torch.Tensor:
    import pipeline.exact as X
    if which in ("silu", "sigmoid", "tanh"):
        return getattr(X, which)(x)
    if which.startswith(("softmax", "log_softmax")):
        name, dim = which.rsplit("x", 1)
        return getattr(X, name + "x")(x, int(dim))
    return {"sum02": lambda: X.xsum(x, (0, 2)), "sum": lambda: X.xsum(x),
            "sum1k": lambda: X.xsum(x, 1, True), "mean-1": lambda: X.xmean(x, -1),
            "mean": lambda: X.xmean(x), "rms": lambda: X.rms_norm(x, (5,), None, 1e-6)}[which]()


@pytest.mark.parametrize("spelling", list(_ROUTED))
def test_guard_routes_every_spelling_to_its_exact_function(spelling: str) -> None:
    """Under the guard each spelling of a new function (torch., Tensor.,
    F., torch.special.) is the exact one: the same bits forward and backward
    as calling it directly, and a backward graph the check accepts.
    Control: outside the guard the stock function gives a graph the check
    refuses."""
    f, which = _ROUTED[spelling]
    x = (torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1)) * 3)
    xg = x.clone().requires_grad_()
    with Guard():
        y = f(xg)
    assert check_graph(y) == []
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (gx,) = torch.autograd.grad(y, xg, g)
    xd = x.clone().requires_grad_()
    yd = _direct(which, xd)
    (gd,) = torch.autograd.grad(yd, xd, g)
    assert torch.equal(y.detach().view(torch.int32), yd.detach().view(torch.int32))
    assert torch.equal(gx.view(torch.int32), gd.view(torch.int32))
    assert check_graph(f(x.clone().requires_grad_())) != []


def test_guard_passes_integer_sums_and_refuses_what_the_new_functions_do_not_take() -> None:
    """An integer tensor's sum is torch's (exact in any order); a softmax
    without dim, and a reduction with another dtype, are refused."""
    with Guard():
        total = torch.arange(10).sum()
        rows = torch.ones(3, 4, dtype=torch.int64).sum(1)
        with pytest.raises(ValueError, match="give dim"):
            F.softmax(torch.ones(3, 4, requires_grad=True))
        with pytest.raises(TypeError, match="dtype"):
            torch.ones(3, requires_grad=True).sum(dtype=torch.float64)
    assert total.item() == 45 and rows.tolist() == [4, 4, 4]


def test_from_torch_converts_the_new_layers_and_refuses_softmax_without_dim() -> None:
    """nn.SiLU, Sigmoid, Tanh, Softmax, LogSoftmax and RMSNorm (weight
    copied) become their exact twins; the converted net is within 1e-5 of
    the stock one; nn.Softmax() with no dim is refused by path."""
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8), nn.SiLU(), nn.Linear(8, 8),
                          nn.Tanh(), nn.Sigmoid(), nn.Linear(8, 4), nn.LogSoftmax(dim=1),
                          nn.Softmax(-1))
    with torch.no_grad():
        stock[1].weight.uniform_(0.5, 1.5)
    exact = from_torch(stock)
    assert [type(m).__name__ for m in exact] == ["Linear", "RMSNorm", "SiLU", "Linear", "Tanh",
                                                 "Sigmoid", "Linear", "LogSoftmax", "Softmax"]
    assert torch.equal(exact[1].weight, stock[1].weight) and exact[7].dim == 1
    x = torch.randn(5, 6)
    assert (exact(x) - stock(x)).abs().max() < 1e-5
    with pytest.raises(ConfigError, match=r"1 \(torch.nn.modules.activation.Softmax\): dim is "
                                          r"None"):
        from_torch(nn.Sequential(nn.Linear(3, 3), nn.Softmax()))


class _NewOps(nn.Module):
    """Every function of spec sections 20-22 in one small net: RMSNorm and
    SiLU, a sigmoid gate, tanh, a mean subtracted, a softmax over the
    channel dim of a 3-D view, a sum and a log-softmax head."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.up, self.gate = nn.Linear(d, 96, bias=False), nn.Linear(d, 96)
        self.norm, self.act = nn.RMSNorm(96), nn.SiLU()
        self.head = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm(self.up(x))) * torch.sigmoid(self.gate(x))
        h = torch.tanh(h)
        h = h - h.mean(-1, keepdim=True)
        w = F.softmax(h.view(-1, 6, 16), dim=1).view(-1, 96)
        z = self.head(w * 4.0) + h.sum(-1, keepdim=True) * 0.0625
        return F.log_softmax(z, dim=-1)


class _Pooled(nn.Module):
    """A small CNN with the pooling of spec section 23 (on 1 x 16 x 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.MaxPool2d(3, 2, 1), nn.SiLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.AvgPool2d(3, 1, 1, count_include_pad=False),
            nn.Tanh(), nn.AdaptiveAvgPool2d((3, 3)), nn.Flatten(), nn.Linear(72, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.view(-1, 1, 16, 16)) + F.avg_pool2d(x.view(-1, 1, 16, 16), 4).sum(
            (1, 2, 3)).unsqueeze(1)


_TRAIN_NEW = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from tests.exact.test_convert import _NewOps, _Pooled
from pipeline.exact import LayerNet, ExactAdam, from_torch
from pipeline.train.distributed import tree_reduce
from pipeline.core.hashing import weights_sha256
torch.set_num_threads(int(sys.argv[1]))
import numpy as np
# NumPy's draws: torch.randn's own differ under ATEN_CPU_CAPABILITY=default (measured)
rng = np.random.default_rng(0)
x = torch.from_numpy((rng.standard_normal((512, 64)) * 2).astype(np.float32))
y = torch.from_numpy(rng.integers(0, 10, 512))
out = [torch.backends.cpu.get_cpu_capability()]
x16 = torch.from_numpy(rng.standard_normal((512, 256)).astype(np.float32))
for make, data, seed in ((_NewOps, x, 5), (_NewOps, x, 6), (_Pooled, x16, 5)):
    x = data
    net = LayerNet(from_torch(make()), seed, "cpu", x[:2])
    opt = ExactAdam(net.params, 0.01)
    for t in range(3):
        parts = [net.shard_grads(x[s:s + 256], y[s:s + 256], 512, None, step=t, row0=s)
                 for s in (0, 256)]
        opt.step({k: tree_reduce([p[1][k] for p in parts], torch.add) for k in net.params})
    out.append(weights_sha256(net.params))
print(" ".join(out))
"""


@pytest.mark.process
def test_new_ops_training_bit_identical_across_threads_and_isa() -> None:
    """3 Adam steps of a net using every new function (two shards of 256
    rows: the elementwise work is above ATen's grain size), and of a CNN
    with every pooling, give the same weights under (1 thread, no SIMD) and
    (2 threads, AVX2), each set before its interpreter starts; the control:
    seed 6 gives other weights."""
    procs = []
    for threads, isa in ((1, "default"), (2, "avx2")):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=isa, PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _TRAIN_NEW, str(threads), str(ROOT)], cwd=ROOT,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outs.append(out.split())
    (cap1, *h1), (cap2, *h2) = outs
    assert (cap1, cap2) == ("DEFAULT", "AVX2")
    assert h1 == h2
    assert h1[0] != h1[1]


def test_nets_of_the_new_layers_pass_the_module_check() -> None:
    """check_module (the guard in training and evaluation, and the graph
    check) accepts the converted nets of the ISA test above, run in this
    process: every torch call the new layers make is inside their trusted
    regions."""
    check_module(from_torch(_NewOps()), torch.ones(2, 64))
    check_module(from_torch(_Pooled()), torch.ones(2, 256))


@pytest.mark.parametrize("make", [_NewOps, _Pooled], ids=["functions", "pooling"])
def test_new_layers_train_like_stock_from_one_initialisation(make: type[nn.Module]) -> None:
    """The stock net and its conversion, from the same weights, trained 6
    Adam steps on the same batches (torch's optimiser for both: only the
    layers differ), give losses within 1e-5 (relative) at every step;
    control: the losses do move."""
    torch.manual_seed(0)
    stock = make()
    exact = from_torch(stock)
    g = torch.Generator().manual_seed(1)
    width = 64 if make is _NewOps else 256
    xs, ys = torch.randn(6, 32, width, generator=g), torch.randint(0, 10, (6, 32), generator=g)
    opts = [torch.optim.Adam(m.parameters(), 0.003) for m in (stock, exact)]
    losses = []
    for t in range(6):
        step = []
        for m, opt in zip((stock, exact), opts):
            with Guard() if m is exact else torch.enable_grad():
                out = m(xs[t])
            loss = F.nll_loss(out, ys[t]) if make is _NewOps else None
            if loss is None:  # _Pooled returns logits: cross-entropy outside the guard
                loss = F.cross_entropy(out, ys[t])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step.append(loss.item())
        assert abs(step[0] - step[1]) <= 1e-5 * abs(step[0]), (t, step)
        losses.append(step[0])
    assert losses[0] != losses[-1]
