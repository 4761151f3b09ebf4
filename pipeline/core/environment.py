"""The toolchain fingerprint, the numeric profile, and the re-exec launcher.

The numeric profile (pipeline/profile.json, also read by flake.nix) is every
environment variable that changes which kernel runs: thread counts, the ATen
ISA level, oneDNN's ISA cap, MKL's conditional-numerical-reproducibility
branch, ... . They must be set before the interpreter starts: ATen reads
ATEN_CPU_CAPABILITY and OpenMP/MKL read their variables once, at load time,
and CUBLAS_WORKSPACE_CONFIG set inside a running process is too late
(pytorch issue 15359). So `pipeline train` re-executes itself with the pinned
environment when the current process does not already match.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _testing
from .errors import ProfileError

__all__ = ["Profile", "load_profile", "project_root", "host_isa_levels", "check_host",
           "pinning_disabled", "needs_reexec", "reexec", "child_pythonpath", "apply_in_process",
           "profile_record", "toolchain_fingerprint", "code_sha256", "blas_of_torch", "cpu_identity",
           "device_identity", "blas_from_config", "openblas_core", "check_blas_core",
           "PROFILE_FILE"]

PROFILE_FILE = Path(__file__).resolve().parents[1] / "profile.json"
_ISA_ORDER = ["default", "avx2", "avx512"]
_PINNED_MARK = "PIPELINE_PINNED_PROFILE"  # set by the launcher; stops re-exec loops


@dataclass(frozen=True)
class Profile:
    name: str
    threads: int
    requires_isa: str
    env: dict[str, str]


def load_profile(machine: str | None = None) -> Profile:
    """The pinned profile for this CPU architecture, from profile.json."""
    data = json.loads(PROFILE_FILE.read_text(encoding="utf-8"))
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(
        (machine or platform.machine()).lower(), (machine or platform.machine()).lower())
    if arch not in data["profiles"]:
        raise ProfileError(f"{PROFILE_FILE}: no numeric profile for CPU architecture {arch!r} "
                           f"(expected one of {sorted(data['profiles'])}); use mode=exact, "
                           f"which needs no profile")
    p = data["profiles"][arch]
    return Profile(p["name"], int(p["threads"]), p["requires_isa"], dict(p["env"]))


def project_root() -> Path:
    """Where data-manifest.json, data/ and configs/ live.

    $PIPELINE_ROOT (set by the Nix wrapper to the source in the store), else
    the checkout this package sits in, else the working directory.
    """
    if os.environ.get("PIPELINE_ROOT"):
        return Path(os.environ["PIPELINE_ROOT"])
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "data-manifest.json").is_file():
        return checkout
    return Path.cwd()


def host_isa_levels() -> list[str]:
    """ATen ISA levels this CPU can run, lowest first.

    The test-only switch PIPELINE_SIM_CPU_ISA (pipeline.core._testing) simulates a
    CPU whose best level is the given one, as a machine without AVX2 would be.
    """
    sim = _testing.SWITCHES.sim_isa
    if sim:
        if sim not in _ISA_ORDER:
            raise ProfileError(f"PIPELINE_SIM_CPU_ISA: expected one of {_ISA_ORDER}, "
                               f"found {sim!r}")
        return _ISA_ORDER[: _ISA_ORDER.index(sim) + 1]
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ["default"]
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    levels = ["default"]
    if {"avx2", "fma"} <= flags:
        levels.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            levels.append("avx512")
    return levels


def check_host(profile: Profile) -> None:
    """Refuse, naming the missing capability, a CPU below the profile's ISA."""
    levels = host_isa_levels()
    if profile.requires_isa not in levels:
        raise ProfileError(
            f"numeric profile {profile.name} needs a CPU with {profile.requires_isa.upper()} "
            f"(ATEN_CPU_CAPABILITY={profile.requires_isa}); this CPU offers only "
            f"{levels[-1].upper()}. Refusing to train with other kernels; run mode=exact, "
            f"whose weights do not depend on the CPU")


def pinning_disabled() -> bool:
    """The suite's no-pinning control is on (a test-only switch, pipeline.core._testing)."""
    return _testing.SWITCHES.no_pin


def needs_reexec(profile: Profile, environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return any(env.get(k) != v for k, v in profile.env.items())


def reexec(profile: Profile, argv: list[str]) -> None:
    """Replace this process by ``python -m pipeline ARGV`` with the profile set."""
    if os.environ.get(_PINNED_MARK) == profile.name:
        bad = [k for k, v in profile.env.items() if os.environ.get(k) != v]
        raise ProfileError(f"re-executed with profile {profile.name} but {', '.join(bad)} "
                           f"still differ; something resets the environment")
    env = dict(os.environ)
    env.update(profile.env)
    env[_PINNED_MARK] = profile.name
    if child_pythonpath():
        env["PYTHONPATH"] = child_pythonpath()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "pipeline", *argv], env)


def child_pythonpath() -> str:
    """PYTHONPATH for a child ``sys.executable`` (the re-exec, torchrun's workers): this
    process's sys.path entries that the bare interpreter would not have by itself.

    nixpkgs' wrap-python (pkgs/development/interpreters/python/wrap-python.nix) puts the
    dependencies on sys.path with site.addsitedir inside the wrapped script only; the
    interpreter it runs knows none of them, so a child started as ``sys.executable -m ...``
    could not import torch or this package. Entries under the interpreter's own prefixes
    (stdlib, a virtualenv's site-packages) come back by themselves and are left out; entries
    already on PYTHONPATH are kept, in sys.path order."""
    prefixes = {str(Path(p).resolve()) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    given = set(filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    keep: list[str] = []
    for entry in sys.path:
        if not entry or entry in keep:
            continue
        path = str(Path(entry).resolve())
        own = any(path == p or path.startswith(p + os.sep) for p in prefixes)
        if entry in given or not own:
            keep.append(entry)
    return os.pathsep.join(keep)


def apply_in_process(profile: Profile) -> None:
    """Settings that are only reachable through torch's API, then a check that
    the kernels torch picked are the profile's (ATen's ISA level; OpenBLAS's core
    type where torch uses OpenBLAS)."""
    import torch

    torch.set_num_threads(profile.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process: only allowed once, before parallel work
    got = torch.backends.cpu.get_cpu_capability().lower()
    blas = blas_of_torch()
    check_blas_core(profile, blas, openblas_core() if blas == "open" else None)
    if profile.requires_isa == "default" or got == profile.requires_isa:
        return
    if got in _ISA_ORDER and _ISA_ORDER.index(got) > _ISA_ORDER.index(profile.requires_isa):
        why = (f"the environment does not cap the ISA (ATEN_CPU_CAPABILITY="
               f"{os.environ.get('ATEN_CPU_CAPABILITY')!r}); check {PROFILE_FILE}")
    else:
        why = "this CPU lacks it"
    raise ProfileError(f"torch runs {got.upper()} kernels, profile {profile.name} needs "
                       f"{profile.requires_isa.upper()}: {why}")


def device_identity(device: str) -> dict[str, Any]:
    """What of the device a run trains on can change pinned mode's bits: the
    device type and, on CUDA, the GPU's name and compute capability, the
    CUDA, cuDNN and driver versions and the settings that choose kernels
    (deterministic algorithms, cuDNN benchmarking, TF32). Keyed in pinned
    mode (part of the profile record), recorded in exact mode."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return {"type": dev.type}
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    driver = getattr(torch._C, "_cuda_getDriverVersion", lambda: None)()
    return {"type": "cuda", "name": torch.cuda.get_device_name(index),
            "capability": f"{major}.{minor}", "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "driver": driver,
            "settings": {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                         "cudnn_deterministic": torch.backends.cudnn.deterministic,
                         "cudnn_benchmark": torch.backends.cudnn.benchmark,
                         "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                         "tf32_cudnn": torch.backends.cudnn.allow_tf32}}


def blas_from_config(config: str) -> str:
    """The BLAS named by a torch build configuration (``torch.__config__.show()``):
    its ``BLAS_INFO`` setting, lower case -- ``mkl`` (PyPI's x86-64 wheels),
    ``open`` (OpenBLAS: nixpkgs' torch, PyPI's aarch64 wheels), ``generic``
    (a reference-style libblas), ``accelerate``, ... -- or ``unknown`` where the
    text names none (a build that prints no settings)."""
    m = re.search(r"\bBLAS_INFO=([A-Za-z0-9_]+)", config)
    return m.group(1).lower() if m else "unknown"


def blas_of_torch() -> str:
    """The BLAS this process's torch was built against (``blas_from_config``)."""
    import torch

    return blas_from_config(torch.__config__.show())


# OpenBLAS built with DYNAMIC_ARCH (nixpkgs' x86_64-linux and aarch64-linux builds:
# pkgs/development/libraries/science/math/openblas/default.nix, `DYNAMIC_ARCH = true`)
# picks its kernels for the CPU at load time unless OPENBLAS_CORETYPE names one
# (OpenBLAS driver/others/dynamic.c, force_coretype). The profile pins it; this is the
# kernel set the library reports it runs (openblas_get_corename).
_CORENAME_SYMBOLS = ("openblas_get_corename", "openblas_get_corename64_",
                     "scipy_openblas_get_corename", "scipy_openblas_get_corename64_")


def openblas_core(maps: str | None = None) -> str | None:
    """The kernel set (core name) the OpenBLAS torch uses reports, lower case, or
    None where no OpenBLAS is loaded. Libraries are found in /proc/self/maps
    (``maps``: its text, for tests); a library bundled for NumPy alone
    (``scipy_openblas``) counts only when no other OpenBLAS is loaded."""
    import ctypes

    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    paths = sorted({line.split()[-1] for line in maps.splitlines()
                    if ".so" in line and "blas" in line.rsplit("/", 1)[-1].lower()},
                   key=lambda p: ("scipy_openblas" in p, p))
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in _CORENAME_SYMBOLS:
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                name = fn()
                return name.decode("ascii", "replace").strip().lower() if name else None
    return None


def check_blas_core(profile: Profile, blas: str, core: str | None) -> None:
    """Refuse an OpenBLAS torch whose kernels are not the profile's
    OPENBLAS_CORETYPE (a core this build lacks, or a variable that was reset)."""
    want = profile.env.get("OPENBLAS_CORETYPE")
    if blas != "open" or not want or core is None or core == want.lower():
        return
    raise ProfileError(f"{PROFILE_FILE}: profile {profile.name} pins OPENBLAS_CORETYPE="
                       f"{want}, but torch's OpenBLAS runs the {core!r} kernels: this OpenBLAS "
                       f"build lacks that core type or the variable did not reach it. Use "
                       f"mode=exact, whose weights do not depend on the BLAS")


def cpu_identity(cpuinfo: str | None = None) -> dict[str, str]:
    """What of the CPU can change a pinned profile's bits beyond its ISA level.

    Measured on the pip route (torch 2.13.0+cpu, MKL 2024.2), profile
    x86_64-avx2-1t, the default config: an AMD EPYC (Zen 4) and an Intel Xeon
    (AVX-512, AMX) give different weights, although both run ATen's AVX2
    kernels under MKL_CBWR=AVX2,STRICT: MKL honours its conditional numerical
    reproducibility branch on Intel CPUs and takes code paths of its own
    choosing on others. So the vendor is part of every pinned profile, and on
    a non-Intel x86 CPU under MKL so is the model (MKL promises nothing there
    across models). A key split too finely costs a retrain; too coarsely, a
    silent reuse of other bits."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        k, sep, v = line.partition(":")
        if sep and k.strip() not in fields:
            fields[k.strip()] = v.strip()
    vendor = fields.get("vendor_id") or fields.get("CPU implementer") or platform.processor()
    out = {"vendor": vendor or "unknown"}
    if vendor and vendor != "GenuineIntel" and "vendor_id" in fields:
        out["model"] = f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
    return out


def profile_record(profile: Profile | None) -> dict[str, Any]:
    """What decides the arithmetic in this process: the pinned profile and
    what torch and the CPU show of it (``cpu_identity``, the BLAS), or
    (unpinned) what torch observed, so that unpinned runs never share a key."""
    import torch

    cpu = cpu_identity()
    blas = blas_of_torch()
    if blas != "mkl":
        cpu.pop("model", None)  # the model matters for MKL's own dispatch (cpu_identity)
    observed = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads(), "cpu": cpu, "blas": blas}
    if blas == "open":  # the kernels OpenBLAS chose (DYNAMIC_ARCH): keyed with the profile
        observed["blas_core"] = openblas_core() or "unknown"
    if profile is None:
        return {"name": "unpinned", "observed": observed}
    return {"name": profile.name, "threads": profile.threads, "env": dict(profile.env),
            "requires_isa": profile.requires_isa, "observed": observed}


def _lock_id(root: Path) -> str:
    if os.environ.get("PIPELINE_LOCK_ID"):
        return os.environ["PIPELINE_LOCK_ID"]
    lock = root / "requirements.lock"
    if lock.is_file():
        return "pip:sha256:" + hashlib.sha256(lock.read_bytes()).hexdigest()
    return "unlocked"


def toolchain_fingerprint() -> dict[str, Any]:
    """Versions and builds of everything that computes: not the machine."""
    import numpy
    import safetensors
    import torch

    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "torch_cuda": torch.version.cuda,
        "torch_config_sha256": hashlib.sha256(torch.__config__.show().encode()).hexdigest(),
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "platform": f"{platform.system()}-{platform.machine()}",
        "libc": "-".join(platform.libc_ver()),
        "lock": _lock_id(project_root()),
    }


def code_sha256() -> str:
    """sha256 over the package's source files (sorted relative paths + bytes),
    exact mode's C kernels included."""
    pkg = Path(__file__).resolve().parents[1]  # pipeline/
    h = hashlib.sha256()
    for f in sorted(p for p in pkg.rglob("*") if p.suffix in (".py", ".json", ".c") and p.is_file()):
        rel = f.relative_to(pkg).as_posix().encode()
        data = f.read_bytes()
        h.update(len(rel).to_bytes(8, "little") + rel + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()
