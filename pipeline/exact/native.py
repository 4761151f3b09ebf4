"""Native kernels for exact mode's elementwise chains (pipeline/exact/kernels.c):
the same IEEE-754 operations as the torch implementations, in one pass over
the data. They change speed, never bits: a build is used only after a
self-test shows it bit-equal to the torch implementations on this machine,
and tests/test_native.py compares the two on many more inputs.

The C source is compiled on first use with the system's C compiler (``$CC``,
else ``cc``) with ``-std=c11 -ffp-contract=off`` (no fused multiply-add, no
fast-math), ``-march=native`` and OpenMP where the compiler takes them, and
loaded with ctypes (no Python headers, no torch C++ ABI). The build is cached
in ``$PIPELINE_NATIVE_DIR`` (else ``$XDG_CACHE_HOME/pipeline/native``, else
``~/.cache/pipeline/native``) under a key of the source with its constants,
the flags, the compiler's version and the CPU's feature flags, written
atomically under a file lock; a cached build is self-tested like a new one.

Without a compiler, or with ``PIPELINE_EXACT_NATIVE=0``, or on a failed
self-test (a warning says why), exact mode runs its torch implementations:
the same bits, slower. ``status()`` says which, for run.json.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["kernels", "status", "gelu", "quantise", "softmax", "softmax_grad", "tree_sum",
           "layer_norm", "layer_norm_grad"]

_SOURCE = Path(__file__).with_name("kernels.c")
_BASE_FLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-fPIC",
               "-shared"]
_OPTIONAL = (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], [])

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "lib": ctypes.CDLL | None, "status": str


def _constants() -> str:
    """The spec's constants as C ``#define``s, from the Python constants."""
    from . import functional, ops

    def arr(vals: Any) -> str:
        return "{" + ", ".join(float(v).hex() for v in vals) + "}"

    consts = {
        "PX_LOG2E": ops.LOG2E.hex(), "PX_LN2_HI": ops.LN2_HI.hex(),
        "PX_LN2_LO": ops.LN2_LO.hex(), "PX_EXP_C": arr(ops._E),
        "PX_ERFC_C": arr(functional._ERFC), "PX_SQRT_HALF": functional._SQRT_HALF.hex(),
        "PX_INV_SQRT_2PI": functional._INV_SQRT_2PI.hex(),
        "PX_SQRT_2_PI": functional._SQRT_2_PI.hex(),
    }
    return "".join(f"#define {k} {v}\n" for k, v in consts.items())


def _cache_dir() -> Path:
    if env := os.environ.get("PIPELINE_NATIVE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "pipeline" / "native"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler_version(cc: str) -> str | None:
    try:
        p = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30,
                           check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def _build() -> tuple[ctypes.CDLL | None, str]:
    cc = os.environ.get("CC") or "cc"
    version = _compiler_version(cc)
    if version is None or shutil.which(cc) is None:
        return None, f"off: no C compiler ({cc})"
    source = _constants() + _SOURCE.read_text()
    cache = _cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if not os.access(cache, os.W_OK | os.X_OK):
            raise PermissionError(cache)
    except OSError:  # this process builds for itself
        cache = Path(tempfile.mkdtemp(prefix="pipeline-native-"))
    from filelock import FileLock

    errors: list[str] = []
    for extra in _OPTIONAL:
        flags = [*_BASE_FLAGS, *extra]
        key = hashlib.sha256("\0".join([source, " ".join(flags), version, _cpu_flags(),
                                        platform.machine()]).encode()).hexdigest()[:32]
        lib_path = cache / f"kernels-{key}.so"
        with FileLock(str(cache / f"kernels-{key}.lock")):
            lib = None
            for attempt in range(2):  # a cached build that does not load is rebuilt once
                if not lib_path.exists():
                    problem = _compile(cc, flags, source, lib_path)
                    if problem:
                        errors.append(problem)
                        break
                try:
                    lib = ctypes.CDLL(str(lib_path))
                    break
                except OSError as e:
                    errors.append(str(e))
                    lib_path.unlink(missing_ok=True)
        if lib is not None:
            _declare(lib)
            return lib, f"on ({cc}, {' '.join(extra) or 'baseline flags'})"
    return None, f"off: {cc} could not build kernels.c ({errors[-1] if errors else '?'})"


def _compile(cc: str, flags: list[str], source: str, lib_path: Path) -> str | None:
    """Build ``lib_path`` (written whole, then renamed into place); None, or
    the compiler's last line of complaint."""
    with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
        src, out = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
        src.write_text(source)
        try:
            p = subprocess.run([cc, *flags, "-o", str(out), str(src)], capture_output=True,
                               text=True, timeout=300, check=False)
        except (OSError, subprocess.SubprocessError) as e:
            return str(e)
        if p.returncode != 0:
            return (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        os.replace(out, lib_path)
    return None


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in ("px_gelu_erf", "px_gelu_tanh"):
        getattr(lib, name).argtypes = [p, p, p, i64, i32]
    lib.px_quantise_rows.argtypes = [p, i64, i64, i64, p, i64, i32, i32]
    lib.px_quantise_cols.argtypes = [p, i64, i64, i64, i64, i64, p, i64, i32, i32]
    lib.px_softmax.argtypes = [p, p, i64, i64, i64, i32, i32]
    lib.px_tree_rows.argtypes = [p, p, i64, i64, i32]
    lib.px_tree_cols.argtypes = [p, p, i64, i64, p, i32]
    lib.px_layer_norm.argtypes = [p, p, p, ctypes.c_float, p, p, p, i64, i64, i32]
    lib.px_layer_norm_grad.argtypes = [p, p, p, p, p, i64, i64, i32]
    lib.px_softmax_grad.argtypes = [p, p, p, i64, i64, i64, i32, i32]
    for name in ("px_gelu_erf", "px_gelu_tanh", "px_quantise_rows", "px_quantise_cols",
                 "px_softmax", "px_softmax_grad", "px_tree_rows", "px_tree_cols",
                 "px_layer_norm", "px_layer_norm_grad"):
        getattr(lib, name).restype = None


def _self_test(lib: ctypes.CDLL) -> str | None:
    """None if the build equals the torch implementations bit for bit on a
    fixed set of inputs (special values, every binade, random bit patterns),
    else what differed."""
    from .attention import _allowed, _softmax, _softmax_grad
    from .functional import _gelu_parts_torch, _layer_norm_grad_torch, _layer_norm_torch
    from .ops import _tree_sum_torch
    from .product import _quantised_torch

    g = torch.Generator().manual_seed(20261201)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.17549435e-38, -1.17549435e-38,
                            3.4028235e38, -3.4028235e38, float("inf"), float("-inf"),
                            0.5, -0.5, 1.0, -1.0, 5.5, -5.5, 9.25, -9.25, 13.0, -13.0])
    scaled = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-140, 120, (4096,),
                                                                       generator=g).float())
    noise = torch.randint(-2**31, 2**31 - 1, (4096,), generator=g,
                          dtype=torch.int32).view(torch.float32)
    x = torch.cat([special, scaled, noise.nan_to_num(0.0)])

    def same(a: Tensor | None, b: Tensor | None) -> bool:
        if a is None or b is None:
            return a is b
        return a.shape == b.shape and torch.equal(a.view(torch.int32 if a.dtype == torch.float32
                                                          else torch.int64),
                                                   b.view(torch.int32 if b.dtype == torch.float32
                                                          else torch.int64))
    for tanh in (False, True):
        for grad in (False, True):
            want = _gelu_parts_torch(x, tanh, grad)
            got = _gelu(lib, x, tanh, grad)
            if not (same(want[0], got[0]) and same(want[1], got[1])):
                return f"GELU ({'tanh' if tanh else 'erf'}) differs from the torch implementation"
    for shape, dim in (((60, 130), -1), ((130, 60), -2), ((3, 64, 5), -2), ((5, 200), -1)):
        xs = x[:torch.Size(shape).numel()].reshape(shape)
        for p in (24, 23):
            if not same(_quantised_torch(xs, dim, p), _quantise(lib, xs, dim, p)):
                return f"quantisation of {shape} along {dim} differs from the torch implementation"
    for shape, dim in (((37, 21), 0), ((37, 21), 1), ((1, 5), 0), ((300, 2), 0), ((4, 3, 129), 2)):
        xs = scaled[:torch.Size(shape).numel()].reshape(shape).clamp(-1e30, 1e30)
        if not same(_tree_sum_torch(xs, dim), _tree_sum(lib, xs, dim)):
            return f"the fixed tree over dim {dim} of {shape} differs from the torch implementation"
    xl = scaled[:30 * 48].reshape(30, 48).clamp(-1e15, 1e15)
    wl, bl = scaled[-48:].clamp(-1e3, 1e3), scaled[-96:-48].clamp(-1e3, 1e3)
    for wb in ((wl, bl), (wl, None), (None, None)):
        want = _layer_norm_torch(xl, *wb, 1e-5)
        got = _layer_norm(lib, xl, *wb, 1e-5)
        if not all(same(a, b) for a, b in zip(want, got)):
            return "LayerNorm differs from the torch implementation"
        gl = scaled[100:100 + xl.numel()].reshape(xl.shape).clamp(-1e15, 1e15)
        if not same(_layer_norm_grad_torch(gl, want[1], want[2], wb[0]),
                    _layer_norm_grad(lib, gl, want[1], want[2], wb[0])):
            return "LayerNorm's gradient differs from the torch implementation"
    z = scaled[:2 * 3 * 10 * 12].reshape(2, 3, 10, 12).clamp(-80.0, 80.0)
    gp = noise[-z.numel():].reshape(z.shape).nan_to_num(0.0).clamp(-1e30, 1e30)
    for causal in (True, False):
        allowed = _allowed(z, causal)
        want = _softmax(z, allowed)[0]
        if not same(want, _softmax_native(lib, z, causal)):
            return "attention's softmax differs from the torch implementation"
        if not same(_softmax_grad(gp, want, allowed)[0],
                    _softmax_grad_native(lib, gp, want, causal)):
            return "attention's softmax gradient differs from the torch implementation"
    return None


def kernels() -> ctypes.CDLL | None:
    """The loaded, self-tested kernels, or None (exact mode's torch path)."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" not in _state:
            # Until the build passes, every caller (the self-test's torch
            # references included) gets None: the torch path.
            _state["status"], _state["lib"] = "off: being built", None
            lib, why = None, "off: PIPELINE_EXACT_NATIVE=0"
            if os.environ.get("PIPELINE_EXACT_NATIVE", "1") != "0":
                lib, why = _build()
                if lib is not None:
                    problem = _self_test(lib)
                    if problem:
                        print(f"warning: exact mode's native kernels are not used: {problem} "
                              f"(the torch implementations run: same bits, slower)",
                              file=sys.stderr)
                        lib, why = None, f"off: self-test failed: {problem}"
            _state["status"], _state["lib"] = why, lib
    return _state["lib"]


def status() -> str:
    """How exact mode's elementwise chains run: "on (...)" or "off: why"."""
    kernels()
    return str(_state["status"])


def usable(*xs: Tensor) -> ctypes.CDLL | None:
    """The kernels, if they apply to ``xs`` (CPU float32), else None."""
    if all(x.device.type == "cpu" and x.dtype == torch.float32 for x in xs):
        return kernels()
    return None


# ---------------------------------------------------------------- wrappers
def _gelu(lib: ctypes.CDLL, x: Tensor, tanh: bool, grad: bool) -> tuple[Tensor, Tensor | None]:
    xc = x.contiguous()
    y = torch.empty_like(xc)
    dy = torch.empty_like(xc) if grad else None
    fn = lib.px_gelu_tanh if tanh else lib.px_gelu_erf
    fn(xc.data_ptr(), y.data_ptr(), dy.data_ptr() if dy is not None else None, xc.numel(),
       torch.get_num_threads())
    return y, dy


def gelu(x: Tensor, tanh: bool, grad: bool) -> tuple[Tensor, Tensor | None] | None:
    """``functional._gelu_parts_torch`` natively (shape of ``x``), or None."""
    lib = usable(x)
    return None if lib is None else _gelu(lib, x, tanh, grad)


def _quantise(lib: ctypes.CDLL, x: Tensor, dim: int, p: int) -> Tensor:
    k = x.shape[dim]
    kp = -(-k // 64) * 64
    nt = torch.get_num_threads()
    if dim == -1:
        x2 = x.reshape(-1, k)
        if x2.numel() and x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = torch.empty(x2.shape[0], kp, dtype=torch.float64)
        lib.px_quantise_rows(x2.data_ptr(), x2.shape[0], k, x2.stride(0) if x2.numel() else k,
                             out.data_ptr(), kp, p, nt)
        return out.view(*x.shape[:-1], kp)
    n = x.shape[-1]
    x3 = x.reshape(-1, k, n)
    if x3.numel() and x3.stride(-1) != 1:
        x3 = x3.contiguous()
    out = torch.empty(x3.shape[0], kp, n, dtype=torch.float64)
    if x3.numel():
        lib.px_quantise_cols(x3.data_ptr(), x3.shape[0], k, n, x3.stride(1), x3.stride(0),
                             out.data_ptr(), kp, p, nt)
    return out.view(*x.shape[:-2], kp, n)


def quantise(x: Tensor, dim: int, p: int) -> Tensor | None:
    """``product._quantised`` (``dim`` -1 or -2) natively for a row-major
    layout, or None."""
    lib = usable(x)
    return None if lib is None else _quantise(lib, x, dim, p)


_MAXS = 4096  # kernels.c's MAXS: the longest row the softmax kernels take


def _softmax_native(lib: ctypes.CDLL, z: Tensor, causal: bool) -> Tensor:
    zc = z.contiguous()
    p = torch.empty_like(zc)
    s, t = zc.shape[-1], zc.shape[-2]
    lib.px_softmax(zc.data_ptr(), p.data_ptr(), zc.numel() // max(s, 1), s, t, int(causal),
                   torch.get_num_threads())
    return p


def _softmax_grad_native(lib: ctypes.CDLL, gp: Tensor, p: Tensor, causal: bool) -> Tensor:
    gc, pc = gp.contiguous(), p.contiguous()
    gz = torch.empty_like(pc)
    s, t = pc.shape[-1], pc.shape[-2]
    lib.px_softmax_grad(gc.data_ptr(), pc.data_ptr(), gz.data_ptr(), pc.numel() // max(s, 1),
                        s, t, int(causal), torch.get_num_threads())
    return gz


def softmax(z: Tensor, causal: bool) -> Tensor | None:
    """``attention._softmax`` over the last dim of ``z (..., T, S)`` (causal:
    query ``i`` sees keys ``j <= i``), natively, or None."""
    lib = usable(z)
    if lib is None or z.dim() < 2 or not 0 < z.shape[-1] <= _MAXS:
        return None
    return _softmax_native(lib, z, causal)


def softmax_grad(gp: Tensor, p: Tensor, causal: bool) -> Tensor | None:
    """``attention._softmax_grad`` natively, or None."""
    lib = usable(gp, p)
    if lib is None or p.dim() < 2 or not 0 < p.shape[-1] <= _MAXS or gp.shape != p.shape:
        return None
    return _softmax_grad_native(lib, gp, p, causal)


def _tree_sum(lib: ctypes.CDLL, x: Tensor, dim: int) -> Tensor:
    xc = x.contiguous()
    nt = torch.get_num_threads()
    if dim == xc.dim() - 1:
        s = xc.shape[-1]
        out = torch.empty(xc.shape[:-1], dtype=torch.float32)
        lib.px_tree_rows(xc.data_ptr(), out.data_ptr(), xc.numel() // s, s, nt)
        return out
    rows, n = xc.shape
    work = torch.empty(-(-n // 256) * ((rows + 1) // 2) * 256, dtype=torch.float32)
    out = torch.empty(n, dtype=torch.float32)
    lib.px_tree_cols(xc.data_ptr(), out.data_ptr(), rows, n, work.data_ptr(), nt)
    return out


def tree_sum(x: Tensor, dim: int) -> Tensor | None:
    """``ops.tree_sum`` of f32 ``x`` (``dim`` the last, at most 4096 long, or
    dim 0 of a 2-D ``x``; at least 2 long) natively, or None."""
    lib = usable(x)
    if lib is None or x.dim() == 0 or x.shape[dim] < 2 or 0 in x.shape:
        return None
    if dim == x.dim() - 1 and x.shape[dim] <= _MAXS or dim == 0 and x.dim() == 2:
        return _tree_sum(lib, x, dim)
    return None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _layer_norm(lib: ctypes.CDLL, x2: Tensor, w: Tensor | None, b: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
    xc = x2.contiguous()
    rows, d = xc.shape
    y, xh = torch.empty_like(xc), torch.empty_like(xc)
    s = torch.empty(rows, 1, dtype=torch.float32)
    lib.px_layer_norm(xc.data_ptr(), _ptr(w), _ptr(b), eps, y.data_ptr(), xh.data_ptr(),
                      s.data_ptr(), rows, d, torch.get_num_threads())
    return y, xh, s


def _layer_norm_grad(lib: ctypes.CDLL, g2: Tensor, xh: Tensor, s: Tensor,
                     w: Tensor | None) -> Tensor:
    gc = g2.contiguous()
    gx = torch.empty_like(gc)
    rows, d = gc.shape
    lib.px_layer_norm_grad(gc.data_ptr(), xh.data_ptr(), s.data_ptr(), _ptr(w), gx.data_ptr(),
                           rows, d, torch.get_num_threads())
    return gx


def _ln_ok(x2: Tensor, *params: Tensor | None) -> ctypes.CDLL | None:
    ps = [p for p in params if p is not None]
    if x2.dim() != 2 or not 0 < x2.shape[1] <= _MAXS or not all(
            p.is_contiguous() and p.shape == x2.shape[1:] for p in ps):
        return None
    return usable(x2, *ps)


def layer_norm(x2: Tensor, w: Tensor | None, b: Tensor | None,
               eps: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """``functional._layer_norm_torch`` (y, xh, s) for rows ``x2`` natively, or None."""
    lib = _ln_ok(x2, w, b)
    return None if lib is None else _layer_norm(lib, x2, w, b, eps)


def layer_norm_grad(g2: Tensor, xh: Tensor, s: Tensor, w: Tensor | None) -> Tensor | None:
    """``functional._layer_norm_grad_torch`` natively, or None."""
    lib = _ln_ok(g2, w)
    if lib is None or not (xh.is_contiguous() and s.is_contiguous()
                           and xh.shape == g2.shape and s.shape == (g2.shape[0], 1)):
        return None
    return _layer_norm_grad(lib, g2, xh, s, w)
