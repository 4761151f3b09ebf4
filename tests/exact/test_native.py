"""Exact mode's native kernels (pipeline/exact/native.py, kernels.c) give the
bits of the torch implementations they replace: GELU (both forms, with and
without the derivative), xmmb's quantisation (rows and columns, every
layout), attention's softmax and its gradient, the fixed trees and
LayerNorm forward and backward, on special values, every binade and random bit patterns, at several
thread counts. Controls: a kernel that differs fails the self-test and is not
used (with a warning); without a compiler, or switched off, the torch path
runs and gives the same products."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeline.exact import fused, native, product
from pipeline.exact.product import _quantised_torch
from pipeline.exact.refs import gelu_parts_torch

from ..support import ROOT, run_pipeline

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc)")


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A private build directory and no loaded kernels; restored afterwards."""
    saved = dict(native._state)
    native._state.clear()
    monkeypatch.setenv("PIPELINE_NATIVE_DIR", str(tmp_path / "native"))
    monkeypatch.delenv("PIPELINE_EXACT_NATIVE", raising=False)
    monkeypatch.delenv("CC", raising=False)
    yield tmp_path / "native"
    native._state.clear()
    native._state.update(saved)


def _lib(group: str = "gelu") -> object:
    lib = native.kernels(group)
    assert lib is not None, native.status()
    return lib


def _values(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, -1.1754942e-38,
                            3.4028235e38, -3.4028235e38, float("inf"), float("-inf"),
                            float("nan"), 0.5, -0.5, 5.5, -5.5, 9.0, -9.0, 26.0, -26.0,
                            38.5, -38.5, 1e4, -1e4])
    scaled = torch.randn(n, generator=g) * torch.exp2(
        torch.randint(-150, 128, (n,), generator=g).float())
    bits = torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int32)
    return torch.cat([special, scaled, bits.view(torch.float32)])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit for bit, except which NaN a NaN result is (its sign and payload
    depend on operand order in compiled code, torch's own kernels included:
    docs/exact-spec.md, notation); NaN exactly where the reference has one."""
    nan = want.isnan()
    return bool(torch.equal(got.isnan(), nan)
                and torch.equal(_bits(got)[~nan], _bits(want)[~nan]))


@pytest.mark.parametrize("tanh", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_gelu_kernel_equals_the_torch_implementation(tanh: bool, grad: bool) -> None:
    x = _values(1 << 19, 1)
    lib = _lib()
    want = gelu_parts_torch(x, tanh, grad)
    got = fused._gelu(lib, x, tanh, grad)
    assert _same(got[0], want[0])
    if grad:
        assert _same(got[1], want[1])
    else:
        assert got[1] is None


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["silu", "sigmoid", "tanh"])
@pytest.mark.parametrize("grad", [False, True])
def test_activation_kernel_equals_the_torch_implementation(kind: int, grad: bool) -> None:
    """SiLU, sigmoid and tanh (spec section 20) natively: the torch
    implementation's bits on every binade, specials and random patterns."""
    from pipeline.exact.activations import KINDS, activation_parts_torch
    x = _values(1 << 18, 2)
    want = activation_parts_torch(KINDS[kind], x, grad)
    got = fused._activation(_lib("activation"), kind, x, grad)
    assert _same(got[0], want[0])
    if grad:
        assert got[1] is not None and _same(got[1], want[1])
    else:
        assert got[1] is None


SHAPES = [((512, 128), -1), ((512, 128), -2), ((7, 5), -1), ((7, 5), -2), ((1, 1), -1),
          ((3, 64), -1), ((65, 3), -2), ((3, 70, 130), -1), ((3, 130, 70), -2),
          ((2, 2, 100, 9), -2), ((300, 1000), -1)]


@pytest.mark.parametrize("shape,dim", SHAPES)
def test_quantisation_kernel_equals_the_torch_implementation(shape: tuple[int, ...],
                                                             dim: int) -> None:
    n = torch.Size(shape).numel()
    x = _values(n, 2)[:n].reshape(shape)
    x.view(-1)[::97] = 0.0
    x.view(-1)[1::89] = -0.0
    lib = _lib("quantise")
    for p, lo_first in ((24, True), (23, False), (23, True), (24, False)):
        assert _same(fused._quantise(lib, x, dim, p, lo_first),
                     _quantised_torch(x, dim, p, lo_first))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (3, 2, 10, 7), (1, 1, 5, 33), (2, 1, 1, 1)])
def test_softmax_kernels_equal_the_torch_implementation(causal: bool,
                                                        shape: tuple[int, ...]) -> None:
    """Attention's softmax and its gradient (rows of the score matrix; causal
    or not; more queries than keys and the reverse), on ordinary scores, on
    every binade and on random bit patterns (inf, NaN)."""
    from pipeline.exact.attention import _allowed, _softmax, _softmax_grad

    n = torch.Size(shape).numel()
    g = torch.Generator().manual_seed(5)
    lib = _lib("softmax")
    for z in (torch.randn(shape, generator=g) * 4, _values(n, 6)[-n:].reshape(shape),
              _values(n, 7)[23:23 + n].reshape(shape)):
        allowed = _allowed(z, causal)
        want = _softmax(z, allowed)[0]
        assert _same(fused._softmax(lib, z, causal), want)
        gp = _values(n, 8)[-n:].reshape(shape)
        assert _same(fused._softmax_grad(lib, gp, want, causal),
                     _softmax_grad(gp, want, allowed)[0])


@pytest.mark.parametrize("shape,dim", [((512, 128), 1), ((512, 128), 0), ((7, 3), 0), ((7, 3), 1),
                                       ((2, 1), 0), ((1, 9), 0), ((3, 5, 2), 2), ((5, 4096), 1),
                                       ((1000, 300), 0), ((4, 5000), 1), ((3, 4, 5), 0)])
def test_tree_kernels_equal_the_torch_implementation(shape: tuple[int, ...], dim: int) -> None:
    """The fixed tree along the last dim (rows) and along dim 0 (columns, the
    bias gradients), every length parity; the shapes the kernels do not take
    (rows longer than 4096, dim 0 of a 3-D tensor) fall back to the torch
    path: the same result either way through ops.tree_sum."""
    from pipeline.exact.ops import _tree_sum_torch, tree_sum

    n = torch.Size(shape).numel()
    for x in (torch.randn(shape, generator=torch.Generator().manual_seed(10)),
              _values(n, 11)[-n:].reshape(shape)):
        want = _tree_sum_torch(x, dim)
        assert _same(tree_sum(x, dim), want)
        if fused.tree_sum(x, dim) is not None:
            assert _same(fused._tree_sum(_lib("tree"), x, dim), want)


@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_layer_norm_kernels_equal_the_torch_implementation(affine: str) -> None:
    from pipeline.exact.refs import layer_norm_grad_torch, layer_norm_torch

    g = torch.Generator().manual_seed(12)
    lib = _lib("layer_norm")
    for x in (torch.randn(300, 128, generator=g) * 3 + 1, _values(64 * 77, 13)[-64 * 77:]
              .reshape(64, 77), torch.full((4, 8), 2.5), torch.randn(5, 1, generator=g)):
        d = x.shape[1]
        w = torch.randn(d, generator=g) if affine != "none" else None
        b = torch.randn(d, generator=g) if affine == "wb" else None
        for eps in (1e-5, 0.0):
            want = layer_norm_torch(x, w, b, eps)
            got = fused._layer_norm(lib, x, w, b, eps)
            assert all(_same(a, e) for a, e in zip(got, want))
            gy = torch.randn(x.shape, generator=g)
            assert _same(fused._layer_norm_grad(lib, gy, want[1], want[2], w),
                         layer_norm_grad_torch(gy, want[1], want[2], w))


def _index_cases() -> Iterator[tuple[str, torch.Tensor, int]]:
    g = torch.Generator().manual_seed(15)
    yield "one position", torch.tensor([3]), 5
    yield "all one index", torch.zeros(300, dtype=torch.int64), 2
    yield "all distinct", torch.randperm(257, generator=g), 300
    yield "uniform, 2-D (batch, context)", torch.randint(0, 84, (8, 64), generator=g), 84
    # Skewed like text: one index (a space) a sixth of the positions, runs of it.
    skewed = torch.randint(0, 65, (4096,), generator=g)
    skewed[torch.rand(4096, generator=g) < 0.17] = 1
    skewed[100:140] = 1
    yield "skewed, runs", skewed, 65
    yield "int32, odd count", torch.randint(0, 9, (1001,), generator=g, dtype=torch.int32), 9
    yield "no positions", torch.zeros(0, dtype=torch.int64), 4


@pytest.mark.parametrize("case", [c[0] for c in _index_cases()])
def test_index_tree_kernel_equals_the_torch_implementation(case: str) -> None:
    """Embedding's gradient, the tree per index over its positions: the
    kernel equals the torch path bit for bit (special values included) at 1,
    2 and 3 threads, through functional.index_tree_sum too. Control: pairing
    each index's entries by their rank instead of their positions (a
    plausible slip) gives other bits on the same data."""
    from pipeline.exact.functional import index_tree_sum
    from pipeline.exact.ops import _tree_sum_torch
    from pipeline.exact.refs import index_tree_sum_torch

    _, idx, rows = next(c for c in _index_cases() if c[0] == case)
    n = idx.numel()
    g = _values(n * 16, 16)[23 + n * 16:].reshape(n, 16)  # random bit patterns (23 special
    g[:, :8] = torch.randn(n, 8, generator=torch.Generator().manual_seed(17))  # values first)
    want = index_tree_sum_torch(idx, g, rows)
    assert _same(index_tree_sum(idx, g, rows), want)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert _same(fused._index_tree(_lib("index_tree"), idx, g, rows), want)
    finally:
        torch.set_num_threads(before)
    if case.startswith("skewed"):
        flat, finite = idx.reshape(-1), g[:, :8]
        by_rank = torch.stack([_tree_sum_torch(finite[flat == v].t().contiguous(), 1)
                               for v in range(rows)])
        assert not torch.equal(_bits(by_rank), _bits(want[:, :8]))


def test_index_tree_wrapper_refuses_what_its_kernel_cannot_take() -> None:
    """Indices out of range, negative or not integers, a gradient row count
    that does not match, a tensor that needs a graph: None (the torch path).
    Every integer dtype is taken (unsigned ones included), and a call under
    torch.func.vmap neither runs the kernel nor switches it off."""
    from pipeline.exact.refs import index_tree_sum_torch

    g = torch.randn(4, 3)
    assert fused.index_tree(torch.tensor([0, 1, 2, 1]), g, 3) is not None
    assert fused.index_tree(torch.tensor([0, 1, 3, 1]), g, 3) is None
    assert fused.index_tree(torch.tensor([0, -1, 2, 1]), g, 3) is None
    assert fused.index_tree(torch.tensor([0.0, 1.0, 2.0, 1.0]), g, 3) is None
    assert fused.index_tree(torch.tensor([0, 1, 2]), g, 3) is None
    assert fused.index_tree(torch.tensor([0, 1, 2, 1]), g.requires_grad_(), 3) is None
    g = g.detach()
    for dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int16, torch.bool):
        idx = torch.tensor([0, 1, 1, 0]).to(dtype)
        got = fused.index_tree(idx, g, 3)
        assert got is not None and _same(got, index_tree_sum_torch(idx, g, 3)), dtype
    seen: list[object] = []
    torch.func.vmap(lambda i: seen.append(fused.index_tree(i, g, 3)) or i)(  # wrapped indices
        torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]]))
    assert seen == [None] and native.kernels("index_tree") is not None


def test_quantisation_of_views_and_tiny_blocks_equals_the_torch_path(fresh: Path) -> None:
    """Through xmmb's own entry points (native on, then off): strided slices,
    transposed views (w.t()), batched operands, subnormal and all-zero blocks,
    and the products built from them."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(300, 260, generator=g)
    wide[5] *= 1e-40   # a row of subnormals
    wide[6] = -0.0
    wide[:, 7] *= 2.0**100
    cases = [wide[:, :130], wide.t(), wide[::2, 3:200], wide.view(3, 100, 260)]
    _lib("quantise")
    on = [(product.quantise_a(c), product.quantise_b(c)) for c in cases]
    prods = [product.xmmb(wide[:, :130], wide[:130]), product.xmmb(wide, wide.t())]
    native._state["lib"] = None  # the torch path
    off = [(product.quantise_a(c), product.quantise_b(c)) for c in cases]
    prods_off = [product.xmmb(wide[:, :130], wide[:130]), product.xmmb(wide, wide.t())]
    for (a1, b1), (a2, b2) in zip(on, off):
        assert torch.equal(_bits(a1), _bits(a2)) and torch.equal(_bits(b1), _bits(b2))
    for p1, p2 in zip(prods, prods_off):
        assert torch.equal(_bits(p1), _bits(p2))


def test_kernels_do_not_depend_on_the_thread_count() -> None:
    x = _values(1 << 20, 4)
    m = x[: 1024 * 515].reshape(1024, 515).nan_to_num(0.0)
    z = torch.randn(8, 4, 64, 64, generator=torch.Generator().manual_seed(9))
    lib = _lib()
    before = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got.append((fused._gelu(lib, x, False, True), fused._quantise(lib, m, -1, 24, True),
                        fused._quantise(lib, m, -2, 23, False), fused._softmax(lib, z, True)))
    finally:
        torch.set_num_threads(before)
    for (g, qa, qb, sm) in got[1:]:
        assert torch.equal(_bits(g[0]), _bits(got[0][0][0]))
        assert torch.equal(_bits(g[1]), _bits(got[0][0][1]))
        assert torch.equal(_bits(qa), _bits(got[0][1]))
        assert torch.equal(_bits(qb), _bits(got[0][2]))
        assert torch.equal(_bits(sm), _bits(got[0][3]))


def _status_in_a_new_process(build_dir: Path, cc: str | None = None) -> str:
    env = {**os.environ, "PIPELINE_NATIVE_DIR": str(build_dir)}
    env.pop("PIPELINE_EXACT_NATIVE", None)
    env.pop("CC", None)
    if cc is not None:
        env["CC"] = cc
    p = subprocess.run([sys.executable, "-c", "from pipeline.exact import native; "
                        "print(native.status())"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


@pytest.mark.process
def test_the_build_is_cached_and_a_corrupt_one_is_rebuilt(tmp_path: Path) -> None:
    """Separate processes (a loaded library is never replaced under a running
    one: builds are renamed into place)."""
    build_dir = tmp_path / "native"
    assert _status_in_a_new_process(build_dir).startswith("on")
    (built,) = build_dir.glob("kernels-*.so")
    stamp = built.stat().st_ino, built.stat().st_mtime_ns
    assert _status_in_a_new_process(build_dir).startswith("on")
    assert (built.stat().st_ino, built.stat().st_mtime_ns) == stamp  # reused
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a shared object")
    os.replace(junk, built)
    assert _status_in_a_new_process(build_dir).startswith("on")
    assert built.read_bytes() != b"not a shared object"  # rebuilt


def test_a_kernel_that_differs_is_refused_with_a_warning(fresh: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    """The control for the self-test: one coefficient of the erfc polynomial
    changed in the C source (the torch reference unchanged) compiles, fails
    GELU's self-test, and GELU runs its torch reference; the other groups,
    unchanged, still pass and run natively."""
    src = native._SOURCE.read_text()
    bad = tmp_path / "kernels.c"
    bad.write_text(src.replace("w = w * t + ERFC_C[n];", "w = w * t + ERFC_C[n] * 1.0000001;"))
    assert bad.read_text() != src
    monkeypatch.setattr(native, "_SOURCE", bad)
    assert native.kernels("gelu") is None and native.kernels("quantise") is not None
    assert "; not used: gelu (GELU (erf) differs from its torch reference)" in native.status()
    assert "native kernels for gelu are not used" in capsys.readouterr().err
    x = torch.linspace(-4, 4, 101)
    from pipeline.exact.functional import gelu
    with torch.no_grad():
        assert torch.equal(_bits(gelu(x)), _bits(gelu_parts_torch(x, False, False)[0]))


def test_a_self_test_that_raises_switches_its_group_off_with_a_warning(
        fresh: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A self-test that raises (say, run inside a transform it cannot run
    under) records why and leaves its group on the torch path; it does not
    leave the group "being checked" or raise into the caller."""
    def boom(lib: object) -> str | None:
        raise RuntimeError("no randomness here")
    monkeypatch.setitem(native._checks, "boom", boom)
    assert native.kernels("boom") is None and native.kernels("gelu") is not None
    assert "not used: boom (its self-test raised RuntimeError: no randomness here)" \
        in native.status()
    assert "native kernels for boom are not used" in capsys.readouterr().err


def test_switched_off_or_without_a_compiler_the_torch_path_runs(
        fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = torch.randn(70, 200), torch.randn(200, 90)
    on = product.xmmb(a, b)
    assert native.status().startswith("on")
    native._state.clear()
    monkeypatch.setenv("PIPELINE_EXACT_NATIVE", "0")
    assert native.kernels("quantise") is None
    assert native.status() == "off: PIPELINE_EXACT_NATIVE=0"
    assert torch.equal(_bits(product.xmmb(a, b)), _bits(on))
    native._state.clear()
    monkeypatch.delenv("PIPELINE_EXACT_NATIVE")
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    assert native.kernels("quantise") is None
    assert native.status().startswith("off: no C compiler")
    assert torch.equal(_bits(product.xmmb(a, b)), _bits(on))


@pytest.mark.process
def test_an_unusable_build_directory_builds_in_a_private_one(tmp_path: Path) -> None:
    """PIPELINE_NATIVE_DIR naming a file (or any place that cannot be made a
    writable directory): the process builds in a temporary directory of its
    own and still uses the kernels."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert _status_in_a_new_process(blocker / "native").startswith("on")
    assert blocker.read_text() == "not a directory"


def test_a_build_lock_held_too_long_switches_the_kernels_off(
        fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holding the build's lock past its time limit (a hung or slow
    build) switches the kernels off with why, and the torch implementation gives the
    same bits: the lock's Timeout escaped from the first exact product as a traceback."""
    import filelock

    a, b = torch.randn(20, 150), torch.randn(150, 9)
    on = product.xmmb(a, b)
    native._state.clear()

    class Held(filelock.FileLock):  # type: ignore[misc, valid-type]
        def acquire(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
            raise filelock.Timeout(self.lock_file)

    monkeypatch.setattr(filelock, "FileLock", Held)
    assert native.kernels("quantise") is None
    assert "waiting for another process's build" in native.status(), native.status()
    assert torch.equal(_bits(product.xmmb(a, b)), _bits(on))


def test_a_compiler_command_with_arguments_is_used(fresh: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """CC may be a command line (as for make): "env cc" builds as cc does."""
    monkeypatch.setenv("CC", "env cc")
    assert native.kernels("gelu") is not None and native.status().startswith("on (env cc,")


def test_a_tensor_that_needs_a_gradient_keeps_its_graph() -> None:
    """Outside exact layers' Functions a kernel would drop the autograd graph:
    such calls take the torch path (the same values)."""
    from pipeline.exact.ops import tree_sum

    x = torch.randn(6, 5, requires_grad=True)
    got = tree_sum(x, 1)
    assert got.grad_fn is not None
    with torch.no_grad():
        assert torch.equal(_bits(tree_sum(x, 1)), _bits(got.detach()))


# ---------------------------------------------------------------- hostile builds and inputs
@pytest.mark.process
def test_a_truncated_cached_build_is_rebuilt_not_loaded(tmp_path: Path) -> None:
    """A build cut short (a crash mid-write, a full disk) must never reach
    dlopen, which maps the file and dies of SIGBUS: its recorded sha256 no
    longer matches, so it is rebuilt."""
    build_dir = tmp_path / "native"
    assert _status_in_a_new_process(build_dir).startswith("on")
    (built,) = build_dir.glob("kernels-*.so")
    whole = built.read_bytes()
    with open(built, "r+b") as fh:
        fh.truncate(len(whole) // 2)
    assert _status_in_a_new_process(build_dir).startswith("on")
    assert built.read_bytes() == whole  # the same source, flags and compiler: the same build


def _fake_cc(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-cc"
    script.write_text("#!/bin/sh\n"
                      'if [ "$1" = "--version" ]; then echo "fake cc 1.0"; exit 0; fi\n'
                      'out=""; prev=""\n'
                      'for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done\n'
                      + body)
    script.chmod(0o755)
    return str(script)


@pytest.mark.process
@pytest.mark.parametrize("body,why", [
    ("exit 0\n", "wrote no library"),
    ("printf 'int nothing(void) { return 0; }\\n' > \"$out.c\" && "
     "cc -shared -fPIC -o \"$out\" \"$out.c\"\n", "undefined symbol"),
])
def test_a_compiler_that_builds_no_kernels_switches_them_off(tmp_path: Path, body: str,
                                                             why: str) -> None:
    """A "compiler" that succeeds without writing a library, or writes a
    library without the kernels: exact mode runs its torch path (status
    says why), in this process and the next (nothing broken is cached)."""
    env = {**os.environ, "PIPELINE_NATIVE_DIR": str(tmp_path / "native"),
           "CC": _fake_cc(tmp_path, body)}
    env.pop("PIPELINE_EXACT_NATIVE", None)
    for _ in range(2):
        p = subprocess.run([sys.executable, "-c", "from pipeline.exact import native; "
                            "print(native.status())"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300, check=False)
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith("off: ") and why in p.stdout, p.stdout
    assert not list((tmp_path / "native").glob("kernels-*.so"))


def test_empty_products_and_narrow_trees_match_the_torch_path() -> None:
    """xmmb with no output columns or no inner dimension, and the fixed tree
    over a million rows of one column (the kernel's work buffer is half the
    input, not padded to 256 columns)."""
    for a, b in ((torch.randn(3, 70), torch.randn(70, 0)),
                 (torch.randn(2, 3, 70), torch.randn(2, 70, 0)),
                 (torch.randn(3, 0), torch.randn(0, 5)), (torch.randn(0, 70), torch.randn(70, 4))):
        got = product.xmmb(a, b)
        assert got.shape == (*a.shape[:-1], b.shape[-1]) and not got.abs().sum()
    from pipeline.exact.ops import _tree_sum_torch, tree_sum

    col = torch.randn(1_000_000, 1, generator=torch.Generator().manual_seed(14))
    assert fused.tree_sum(col, 0) is not None
    assert _same(tree_sum(col, 0), _tree_sum_torch(col, 0))


def test_wrappers_refuse_what_their_kernels_cannot_take() -> None:
    """Wrong dtypes of saved tensors, forward-mode tangents and functorch
    batching: None (the torch path), never a silently wrong result."""
    from torch.autograd import forward_ad

    from pipeline.exact.ops import tree_sum

    g2, xh = torch.randn(8, 16), torch.randn(8, 16)
    s = torch.rand(8, 1) + 0.5
    assert fused.layer_norm_grad(g2, xh, s, None) is not None
    assert fused.layer_norm_grad(g2, xh.half(), s, None) is None
    assert fused.layer_norm_grad(g2, xh, s.double(), None) is None
    assert fused.layer_norm(g2, torch.randn(15), None, 1e-5) is None  # wrong weight shape
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(torch.ones(4, 4), torch.ones(4, 4))
        tangent = forward_ad.unpack_dual(tree_sum(dual, 1)).tangent
    assert tangent is not None and torch.equal(tangent, torch.full((4,), 4.0))
    batched = torch.func.vmap(lambda r: tree_sum(r, 0))(torch.ones(3, 5))
    assert torch.equal(batched, torch.full((3,), 5.0))


@pytest.mark.process
def test_self_tests_do_not_depend_on_the_default_dtype(tmp_path: Path) -> None:
    env = {**os.environ, "PIPELINE_NATIVE_DIR": str(tmp_path / "native")}
    env.pop("PIPELINE_EXACT_NATIVE", None)
    p = subprocess.run([sys.executable, "-c", "import torch; "
                        "torch.set_default_dtype(torch.float64); "
                        "from pipeline.exact import native; print(native.status())"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert p.returncode == 0 and p.stdout.startswith("on (") and "not used" not in p.stdout, \
        p.stdout + p.stderr


@pytest.mark.process
def test_a_truncated_build_with_a_matching_sha256_is_rebuilt_not_loaded(tmp_path: Path) -> None:
    """Issue 27: a library cut short together with its recorded sha256 (so the
    digest matches) killed every exact run with SIGBUS at dlopen. The ELF
    check sees segments past the end of the file; it is rebuilt."""
    build_dir = tmp_path / "native"
    assert _status_in_a_new_process(build_dir).startswith("on")
    (built,) = build_dir.glob("kernels-*.so")
    whole = built.read_bytes()
    cut = whole[: len(whole) // 2]
    built.write_bytes(cut)
    built.with_suffix(".sha256").write_text(hashlib.sha256(cut).hexdigest() + "\n")
    assert native.elf_problem(cut) is not None and native.elf_problem(whole) is None
    assert _status_in_a_new_process(build_dir).startswith("on")
    assert built.read_bytes() == whole


@pytest.mark.process
@pytest.mark.parametrize("which", ["library", "sha256"])
def test_a_fifo_planted_in_the_cache_is_replaced_not_read(tmp_path: Path, which: str) -> None:
    """Issue 27: a FIFO at the cached library's (or its digest's) path hung
    exact mode forever. Cache files are read like every other file the
    pipeline did not write (regular files only, never blocking)."""
    build_dir = tmp_path / "native"
    assert _status_in_a_new_process(build_dir).startswith("on")
    (built,) = build_dir.glob("kernels-*.so")
    target = built if which == "library" else built.with_suffix(".sha256")
    target.unlink()
    os.mkfifo(target)
    assert _status_in_a_new_process(build_dir).startswith("on")  # timeout=300 would fire
    assert target.is_file() and not stat.S_ISFIFO(target.stat().st_mode)


@pytest.mark.process
def test_flags_inside_cc_are_part_of_the_cache_key(tmp_path: Path) -> None:
    """CC="cc -O1" and CC="cc" are two builds, never one served for the other."""
    build_dir = tmp_path / "native"
    assert _status_in_a_new_process(build_dir).startswith("on")
    assert _status_in_a_new_process(build_dir, cc="cc -O1").startswith("on (cc -O1")
    assert len(list(build_dir.glob("kernels-*.so"))) == 2


@pytest.mark.process
def test_a_build_that_flushes_subnormals_is_refused_and_undone(tmp_path: Path) -> None:
    """Issue 27: CC="cc -funsafe-math-optimizations" links start-up code that
    turns on flush-to-zero when the library loads, after exact mode's first
    subnormal check. Loading it is now followed by a check: the kernels are
    refused with one warning, the setting is undone, and an exact run gives
    the weights of the torch path."""
    env = {**os.environ, "PIPELINE_NATIVE_DIR": str(tmp_path / "native"),
           "CC": "cc -funsafe-math-optimizations"}
    env.pop("PIPELINE_EXACT_NATIVE", None)
    code = ("from pipeline.exact import native, fpenv; print(native.status()); "
            "print(fpenv.subnormal_problem())")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    status, problem = p.stdout.strip().splitlines()
    assert status.startswith("off: ") and "flushes subnormals" in status, status
    assert problem == "None" and p.stderr.count("warning: exact mode's native kernels") == 1
    # Control: the same library loaded with no check leaves the process flushing.
    (built,) = (tmp_path / "native").glob("kernels-*.so")
    check = ("import ctypes, sys; ctypes.CDLL(sys.argv[1]); from pipeline.exact import fpenv; "
             "print(fpenv.subnormal_problem() is not None)")
    q = subprocess.run([sys.executable, "-c", check, str(built)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert q.stdout.strip() == "True", q.stderr
    hashes = []
    for extra in ({}, {"PIPELINE_EXACT_NATIVE": "0"}):
        t = run_pipeline(["train", "configs/digits.toml", "mode=exact", "train.epochs=1",
                          "--runs-dir", str(tmp_path / f"runs{len(extra)}"), "--json", "--quiet"],
                         {**env, **extra, "PIPELINE_CACHE_DIR": str(tmp_path / "cache")})
        assert t.returncode == 0, t.stderr[-2000:]
        hashes.append(json.loads(t.stdout)["weights_sha256"])
    assert hashes[0] == hashes[1]


def test_a_compiler_that_hangs_is_stopped_at_the_timeout(fresh: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    """Issue 27: a CC that never returns stalled exact mode for about 20
    minutes (a 300 s timeout per flag set). One timeout now switches the
    kernels off, with one warning, and tries no other flags."""
    monkeypatch.setattr(native, "_COMPILE_TIMEOUT_S", 2)
    monkeypatch.setenv("CC", _fake_cc(tmp_path, "sleep 60\n"))
    started = time.monotonic()
    assert native.kernels("gelu") is None
    assert time.monotonic() - started < 30
    assert native.status().startswith("off: ") and "timed out" in native.status()
    assert capsys.readouterr().err.count("warning: exact mode's native kernels are off") == 1
