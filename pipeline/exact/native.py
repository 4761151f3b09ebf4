"""Native kernels for exact mode's elementwise chains (pipeline/exact/kernels.c):
the same IEEE-754 operations as the torch implementations, in one pass over
the data. They change speed, never bits: each group of kernels is used only
after its self-test (registered by pipeline/exact/refs.py) shows it
bit-equal to its torch reference on this machine; tests/test_native.py
compares them on many more inputs. This module builds, caches and loads the
library; pipeline/exact/fused.py calls it.

The C source is compiled on first use with the system's C compiler (``$CC``,
else ``cc``) with ``-std=c11 -ffp-contract=off`` (no fused multiply-add, no
fast-math), ``-march=native`` and OpenMP where the compiler takes them, and
loaded with ctypes (no Python headers, no torch C++ ABI). The build is cached
in ``$PIPELINE_NATIVE_DIR`` (else ``$XDG_CACHE_HOME/pipeline/native``, else
``~/.cache/pipeline/native``) under a key of the source with its constants,
the flags, the compiler's version and the CPU's feature flags, written
atomically under a file lock; a cached build is self-tested like a new one.

Without a compiler, or with ``PIPELINE_EXACT_NATIVE=0``, or for a group whose
self-test fails (a warning says which), exact mode runs its torch
implementations: the same bits, slower. ``status()`` says which, for run.json.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import consts

__all__ = ["kernels", "register", "status", "check_values", "same", "elf_problem", "torch_only"]

_SOURCE = Path(__file__).with_name("kernels.c")
_BASE_FLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-fPIC",
               "-shared"]
_OPTIONAL = (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], [])

_COMPILE_TIMEOUT_S = 120   # one compile of kernels.c takes a few seconds
_MAX_LIBRARY_BYTES = 64 << 20
_lock = threading.RLock()  # a group's check may load another group
_state: dict[str, Any] = {}  # "lib": CDLL | None, "status": str, "verdicts": {group: problem}
_checks: dict[str, Callable[[ctypes.CDLL], str | None]] = {}


def _constants() -> str:
    """The spec's constants as C ``#define``s (pipeline/exact/consts.py)."""
    def arr(vals: Any) -> str:
        return "{" + ", ".join(float(v).hex() for v in vals) + "}"

    defs = {"PX_LOG2E": consts.LOG2E.hex(), "PX_LN2_HI": consts.LN2_HI.hex(),
            "PX_LN2_LO": consts.LN2_LO.hex(), "PX_EXP_C": arr(consts.EXP_C),
            "PX_ERFC_C": arr(consts.ERFC_C), "PX_SQRT_HALF": consts.SQRT_HALF.hex(),
            "PX_INV_SQRT_2PI": consts.INV_SQRT_2PI.hex(),
            "PX_SQRT_2_PI": consts.SQRT_2_PI.hex(), "PX_TANH_SMALL": consts.TANH_SMALL.hex(),
            "PX_TANH_C": arr(consts.TANH_C)}
    return "".join(f"#define {k} {v}\n" for k, v in defs.items())


def _cache_dir() -> Path | None:
    """Where builds are cached (absolute), or None if no home is known."""
    if env := os.environ.get("PIPELINE_NATIVE_DIR"):
        return Path(env).absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec ignores relative values
        return Path(xdg) / "pipeline" / "native"
    try:
        return Path.home() / ".cache" / "pipeline" / "native"
    except RuntimeError:  # no HOME and no passwd entry
        return None


def _private_dir() -> Path:
    """A directory of this process's own (mode 0700), removed at exit (a
    loaded library stays mapped after its file is gone)."""
    if "private" not in _state:
        path = Path(tempfile.mkdtemp(prefix="pipeline-native-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _state["private"] = path
    return Path(_state["private"])


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler_version(cc: list[str]) -> str | None:
    try:
        p = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30,
                           check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def _build() -> tuple[ctypes.CDLL | None, str]:
    cc_text = os.environ.get("CC") or "cc"
    try:
        cc = shlex.split(cc_text)  # e.g. CC="ccache gcc"
    except ValueError:
        cc = []
    if not cc or shutil.which(cc[0]) is None or (version := _compiler_version(cc)) is None:
        return None, f"off: no C compiler ({cc_text})"
    source = _constants() + _SOURCE.read_text()
    cache = _cache_dir()
    try:
        if cache is None:
            raise PermissionError("no home directory")
        cache.mkdir(parents=True, exist_ok=True)
        if not os.access(cache, os.W_OK | os.X_OK):
            raise PermissionError(cache)
    except OSError:  # this process builds for itself
        cache = _private_dir()
    from filelock import FileLock, Timeout

    errors: list[str] = []
    machine = _cpu_flags() + "\0" + platform.machine()
    for extra in _OPTIONAL:
        flags = [*_BASE_FLAGS, *extra]
        # The whole of $CC is in the key: flags given inside it change the build.
        key = hashlib.sha256("\0".join([source, cc_text, " ".join(flags), version, machine])
                             .encode()).hexdigest()[:32]
        lib_path = cache / f"kernels-{key}.so"
        try:
            with FileLock(str(cache / f"kernels-{key}.lock"), timeout=_COMPILE_TIMEOUT_S * 2):
                lib, problem = _cached_or_built(cc, flags, source, lib_path)
        except Timeout:  # another process builds (or hangs): the torch implementation runs
            errors.append(f"timed out after {_COMPILE_TIMEOUT_S * 2} s waiting for another "
                          f"process's build ({cache / f'kernels-{key}.lock'})")
            break
        if lib is not None:
            return lib, f"on ({cc_text}, {' '.join(extra) or 'baseline flags'})"
        errors.append(problem)
        if problem.startswith(("timed out", "flushes")):
            break  # no other flags will help
    why = f"off: {cc_text} could not build kernels.c ({errors[-1] if errors else '?'})"
    print(f"warning: exact mode's native kernels are off: {why[5:]} (the torch implementation "
          f"runs: same bits, slower)", file=sys.stderr)
    return None, why


def _cached_or_built(cc: list[str], flags: list[str], source: str,
                     lib_path: Path) -> tuple[ctypes.CDLL | None, str]:
    """The library at ``lib_path`` (built if missing or not whole), loaded;
    or None and why. A cached build that fails its checks is rebuilt once."""
    problem = "?"
    for _ in range(2):
        blob, problem = _whole_build(lib_path)
        if blob is None:
            if (failed := _compile(cc, flags, source, lib_path)) is not None:
                return None, failed
            blob, problem = _whole_build(lib_path)
            if blob is None:
                return None, problem
        lib, problem = _load_copy(blob)
        if lib is not None:
            return lib, ""
        if problem.startswith("flushes"):
            return None, problem
        lib_path.unlink(missing_ok=True)
    return None, problem


def _whole_build(lib_path: Path) -> tuple[bytes | None, str]:
    """The bytes of a cached build, read like every file the pipeline did not
    just write (pipeline.core.safeio: a regular file within a bound, never a
    FIFO), if they hash to the sha256 recorded beside them and form a whole
    ELF file; else None and why."""
    from ..core.safeio import read_regular

    try:
        recorded = read_regular(lib_path.with_suffix(".sha256"), 256).decode().strip()
        blob = read_regular(lib_path, _MAX_LIBRARY_BYTES)
    except (OSError, UnicodeDecodeError) as e:
        return None, f"no whole cached build ({e})"
    if hashlib.sha256(blob).hexdigest() != recorded:
        return None, "the cached build does not match its recorded sha256"
    if (bad := elf_problem(blob)) is not None:
        return None, f"the cached build is not a whole library: {bad}"
    return blob, ""


def elf_problem(blob: bytes) -> str | None:
    """Why ``blob`` is not a whole 64-bit little-endian ELF file (every
    segment and the tables inside the file), or None. dlopen maps a file's
    segments without checking them against its size: a short file dies of
    SIGBUS on first touch."""
    if blob[:4] != b"\x7fELF" or len(blob) < 64:
        return "no ELF header"
    if blob[4] != 2 or blob[5] != 1:
        return "not a 64-bit little-endian ELF file"
    u16, u64 = (lambda o: int.from_bytes(blob[o:o + 2], "little")), \
        (lambda o: int.from_bytes(blob[o:o + 8], "little"))
    phoff, shoff, phsize, phnum, shsize, shnum = u64(32), u64(40), u16(54), u16(56), u16(58), \
        u16(60)
    if phoff + phsize * phnum > len(blob) or shoff + shsize * shnum > len(blob):
        return f"its header tables end past its {len(blob)} bytes"
    for i in range(phnum):
        h = phoff + i * phsize
        if u16(h) == 1 and u64(h + 8) + u64(h + 32) > len(blob):  # PT_LOAD: offset + filesz
            return f"segment {i} ends at byte {u64(h + 8) + u64(h + 32)} of {len(blob)}"
    return None


def _load_copy(blob: bytes) -> tuple[ctypes.CDLL | None, str]:
    """dlopen a private copy of ``blob`` (a cache file truncated or replaced
    later cannot touch the mapping), then check that loading it left this
    process's floating-point environment as exact mode needs it: a build that
    turns on flush-to-zero (a ``CC`` with -ffast-math or
    -funsafe-math-optimizations links start-up code that does) is refused and
    the setting undone."""
    from .fpenv import subnormal_problem

    fd, name = tempfile.mkstemp(prefix="kernels-", suffix=".so", dir=_private_dir())
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        lib = ctypes.CDLL(name)
        _declare(lib)
    except (OSError, AttributeError) as e:  # not a library, or not ours
        return None, str(e)
    finally:
        os.unlink(name)  # the mapping stays
    # Start-up code runs on this thread; threads started later inherit its
    # setting, so it is checked and undone here before any pool thread starts.
    if (problem := subnormal_problem(every_thread=False)) is not None:
        torch.set_flush_denormal(False)
        return None, f"flushes subnormals once loaded ({problem}): check $CC's flags"
    return lib, ""


def _compile(cc: list[str], flags: list[str], source: str, lib_path: Path) -> str | None:
    """Build ``lib_path`` and its ``.sha256`` (each written whole, synced, then
    renamed into place); None, or what went wrong."""
    with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
        src, out = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
        src.write_text(source)
        try:
            p = subprocess.run([*cc, *flags, "-o", str(out), str(src)], capture_output=True,
                               text=True, timeout=_COMPILE_TIMEOUT_S, check=False,
                               start_new_session=True)
        except subprocess.TimeoutExpired:
            return f"timed out after {_COMPILE_TIMEOUT_S} s ({' '.join(cc)})"
        except (OSError, subprocess.SubprocessError) as e:
            return str(e)
        if p.returncode != 0:
            return (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        if not out.is_file():
            return f"{cc[0]} exited 0 but wrote no library"
        sums = Path(tmp) / "kernels.sha256"
        sums.write_text(hashlib.sha256(out.read_bytes()).hexdigest() + "\n")
        for f in (out, sums):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        lib_path.with_suffix(".sha256").unlink(missing_ok=True)
        os.replace(out, lib_path)
        os.replace(sums, lib_path.with_suffix(".sha256"))
    return None


_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# kernels.c's exported functions and their arguments (all return void).
_SIGNATURES = {
    "px_gelu": [_P, _P, _P, _I64, _I32, _I32],
    "px_activation": [_P, _P, _P, _I64, _I32, _I32],
    "px_quantise_rows": [_P, _I64, _I64, _I64, _P, _I32, _I32, _I32],
    "px_quantise_cols": [_P, _I64, _I64, _I64, _I64, _I64, _P, _I32, _I32, _I32],
    "px_softmax": [_P, _P, _I64, _I64, _I64, _I32, _I32],
    "px_softmax_grad": [_P, _P, _P, _I64, _I64, _I64, _I32, _I32],
    "px_tree_rows": [_P, _P, _I64, _I64, _I32],
    "px_tree_cols": [_P, _P, _I64, _I64, _P, _I32],
    "px_layer_norm": [_P, _P, _P, ctypes.c_float, _P, _P, _P, _I64, _I64, _I32],
    "px_layer_norm_grad": [_P, _P, _P, _P, _P, _I64, _I64, _I32],
    "px_index_tree": [_P, _P, _P, _I64, _I64, _P, _I32],
}


def _declare(lib: ctypes.CDLL) -> None:
    """Every kernel's signature (AttributeError if the library lacks one)."""
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None


def _library() -> ctypes.CDLL | None:
    """The built and loaded library (no self-test yet), or None."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, why = None, "off: PIPELINE_EXACT_NATIVE=0"
                if os.environ.get("PIPELINE_EXACT_NATIVE", "1") != "0":
                    lib, why = _build()
                _state["verdicts"] = {}
                _state["status"], _state["lib"] = why, lib
    return _state["lib"]


def register(group: str, check: Callable[[ctypes.CDLL], str | None]) -> None:
    """``check(lib)``: None if the group's kernels equal their torch
    references bit for bit, else what differed (pipeline/exact/refs.py)."""
    _checks[group] = check


def kernels(group: str) -> ctypes.CDLL | None:
    """The library if ``group``'s self-test passed on this machine, else None
    (the torch path). Checked once per process; while a check runs, every
    caller gets None, so the torch references it compares against are the
    torch implementations."""
    lib = _library()
    if lib is None or _state.get("torch_only"):
        return None
    verdicts: dict[str, str | None] = _state["verdicts"]
    if group not in verdicts:
        with _lock:
            if group not in verdicts:
                verdicts[group] = "being checked"
                check = _checks.get(group)
                try:
                    problem = "no self-test registered" if check is None else check(lib)
                except Exception as e:  # noqa: BLE001 - any failure means: do not use them
                    problem = f"its self-test raised {type(e).__name__}: {e}"
                if problem:
                    print(f"warning: exact mode's native kernels for {group} are not used: "
                          f"{problem} (the torch implementation runs: same bits, slower)",
                          file=sys.stderr)
                verdicts[group] = problem
    return lib if verdicts[group] is None else None


@contextlib.contextmanager
def torch_only() -> Iterator[None]:
    """Within: every group runs its torch implementation (the same bits), in
    every thread. For tracing: torch.export cannot see into a ctypes call
    (the MLflow export, pipeline.export.to_mlflow)."""
    with _lock:
        _state["torch_only"] = _state.get("torch_only", 0) + 1
    try:
        yield
    finally:
        with _lock:
            _state["torch_only"] -= 1


def status() -> str:
    """How exact mode's elementwise chains run, for run.json: "on (compiler,
    flags)", with the groups whose self-test failed, or "off: why"."""
    if _library() is None:
        return str(_state["status"])
    failed = [f"{g} ({why})" for g in sorted(_checks) if (why := _verdict(g))]
    return str(_state["status"]) + (f"; not used: {', '.join(failed)}" if failed else "")


def _verdict(group: str) -> str | None:
    kernels(group)
    return _state["verdicts"][group]


# ---------------------------------------------------------------- self-test helpers
def check_values(n: int = 4096, seed: int = 20261201) -> Tensor:
    """A fixed f32 test set: special values, every binade, random bit
    patterns (NaN replaced by 0: which NaN a kernel returns is not part of
    the contract, docs/exact-spec.md)."""
    g = torch.Generator().manual_seed(seed)
    f32 = torch.float32  # whatever torch's default dtype is
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.17549435e-38, -1.17549435e-38,
                            3.4028235e38, -3.4028235e38, float("inf"), float("-inf"),
                            0.5, -0.5, 1.0, -1.0, 5.5, -5.5, 9.25, -9.25, 13.0, -13.0], dtype=f32)
    scaled = torch.randn(n, generator=g, dtype=f32) * torch.exp2(
        torch.randint(-140, 120, (n,), generator=g).to(f32))
    noise = torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int32)
    return torch.cat([special, scaled, noise.view(torch.float32).nan_to_num(0.0)])


def same(a: Tensor | None, b: Tensor | None) -> bool:
    """Equal shapes and bits (f32 or f64), or both None."""
    if a is None or b is None:
        return a is b
    def bits(t: Tensor) -> Tensor:
        return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))
