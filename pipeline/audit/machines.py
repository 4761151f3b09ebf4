"""Simulated machines: how one machine's process environment differs from
another's, shared by the determinism suite (tests/machines.py) and
``pipeline audit`` (pipeline/audit.py).

Each ``Machine`` changes what a real machine would change: the ISA its CPU
offers, its cores and stray thread variables, where the checkout lives, HOME
and friends, locale, time zone, umask, PYTHONHASHSEED, the order and noise of
its environment, its hostname. ``kind`` says which of those it is (the audit
names it as the cause of a divergence). torch-free: a machine is an
environment, argv and working directory for a process not yet started.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..core.environment import PROFILE_FILE

__all__ = ["Machine", "Places", "MACHINES", "LOCALES", "ISA_ORDER", "KEEP", "profile_variables",
           "clean_env", "uts_namespace_problem", "wrap", "environment", "compile_locales"]

# Compiled on the fly into a private LOCPATH (glibc honours it), so that the
# locale machines run in their locale even where it is not installed.
LOCALES = ["de_DE.UTF-8", "tr_TR.UTF-8"]
ISA_ORDER = ["default", "avx2", "avx512"]


@dataclass(frozen=True)
class Places:
    """Where a machine's paths point. Machine.env values may name them as
    ``{scratch}`` (a per-run directory), ``{checkout}`` (the odd-path copy or
    link of the working directory) and ``{locales}`` (the LOCPATH directory)."""
    repo: Path
    checkout: Path
    locales: Path


@dataclass(frozen=True)
class Machine:
    """One simulated machine: the ways its processes differ from the reference's."""
    name: str
    env: Mapping[str, str] = field(default_factory=dict)  # set by "the machine"
    cwd: str = "repo"               # "repo": this checkout; "checkout": the odd-path copy
    prefix: tuple[str, ...] = ()    # wraps the interpreter, e.g. taskset
    umask: int | None = None
    hostname: str | None = None     # set inside a private UTS namespace (unshare --uts)
    reverse_env: bool = False       # the environment block in reverse order
    numeric: bool = False           # changes kernel choice when nothing pins it
    kind: str = "environment"       # "ISA", "threads", "environment" or "several"
    what: str = ""                  # the difference, in words (the audit's report)

    @property
    def isa(self) -> str | None:
        """The best ISA level this machine's CPU offers, if simulated."""
        return self.env.get("PIPELINE_SIM_CPU_ISA")

    def can_run(self, requires_isa: str) -> bool:
        """Whether a numeric profile needing ``requires_isa`` can run here."""
        return self.isa is None or ISA_ORDER.index(self.isa) >= ISA_ORDER.index(requires_isa)

    def missing_tool(self) -> str | None:
        """Why this machine cannot be simulated here, or None."""
        for tool in [*self.prefix[:1], *(["unshare"] if self.hostname else [])]:
            if shutil.which(tool) is None:
                return f"{tool} not found on PATH (util-linux)"
        if self.hostname:
            return uts_namespace_problem()
        return None


def _isa(level: str) -> dict[str, str]:
    # A CPU with only this level: the pipeline's host check sees it through the
    # test-only PIPELINE_SIM_CPU_ISA, torch through ATEN_CPU_CAPABILITY.
    return {"PIPELINE_SIM_CPU_ISA": level, "ATEN_CPU_CAPABILITY": level}


def _threads(n: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}


def _locale(name: str) -> dict[str, str]:
    return {"LANG": name, "LC_ALL": name, "LOCPATH": "{locales}"}


_HOME = {"HOME": "{scratch}/home dir", "TMPDIR": "{scratch}/tmp dir",
         "XDG_CACHE_HOME": "{scratch}/xdg cache"}
_NOISE = {"EDITOR": "vi", "PAGER": "less", "ZZ_UNRELATED": "1", "AA_UNRELATED": "x y z",
          "LS_COLORS": "di=01;34:ln=01;36", "CI": "true", "SSH_CONNECTION": "10.0.0.1 22"}

MACHINES: list[Machine] = [
    Machine("isa-default", _isa("default"), numeric=True, kind="ISA",
            what="a CPU without AVX2 (ATen default kernels)"),
    Machine("isa-avx2", _isa("avx2"), numeric=True, kind="ISA", what="an AVX2 CPU"),
    Machine("isa-avx512", _isa("avx512"), numeric=True, kind="ISA", what="an AVX-512 CPU"),
    Machine("one-core", prefix=("taskset", "-c", "0"), numeric=True, kind="threads",
            what="one core (taskset)"),
    Machine("threads-1", _threads(1), numeric=True, kind="threads", what="1 thread"),
    Machine("threads-2", _threads(2), numeric=True, kind="threads", what="2 threads"),
    Machine("threads-7", _threads(7), numeric=True, kind="threads", what="7 threads"),
    Machine("checkout-path", cwd="checkout", what="another path (spaces, non-ASCII)"),
    Machine("home-tmp-cache", _HOME, what="other HOME, TMPDIR, XDG_CACHE_HOME"),
    Machine("locale-de", _locale("de_DE.UTF-8"), what="locale de_DE.UTF-8"),
    Machine("locale-c", {"LANG": "C", "LC_ALL": "C"}, what="locale C"),
    Machine("locale-tr", _locale("tr_TR.UTF-8"), what="locale tr_TR.UTF-8"),
    Machine("tz-chatham", {"TZ": "Pacific/Chatham"}, what="time zone Pacific/Chatham"),
    Machine("umask-027", umask=0o027, what="umask 027"),
    Machine("hashseed-random", {"PYTHONHASHSEED": "random"}, what="PYTHONHASHSEED=random"),
    Machine("hashseed-123", {"PYTHONHASHSEED": "123"}, what="PYTHONHASHSEED=123"),
    Machine("env-reversed-noise", _NOISE, reverse_env=True,
            what="environment in reverse order, unrelated variables"),
    Machine("hostname", hostname="other-host", what="another hostname"),
    # Every difference above that needs no namespace, at once, on one core.
    Machine("everything", {**_isa("avx512"), **_threads(7), **_HOME,
                           **_locale("tr_TR.UTF-8"), "TZ": "Pacific/Chatham",
                           "PYTHONHASHSEED": "random", **_NOISE},
            cwd="checkout", prefix=("taskset", "-c", "0"), umask=0o027, reverse_env=True,
            kind="several", what="every difference above at once"),
]


def profile_variables() -> list[str]:
    """Every variable any numeric profile in pipeline/profile.json sets."""
    data = json.loads(PROFILE_FILE.read_text(encoding="utf-8"))
    return sorted({k for p in data["profiles"].values() for k in p["env"]})


# Not switches: the toolchain's name (the Nix check and dev shell set it, and
# runs there must record the Nix lock, not requirements.lock's hash) and where
# exact mode's native kernels are built (pipeline.exact.native).
KEEP = ("PIPELINE_LOCK_ID", "PIPELINE_NATIVE_DIR")


def clean_env(cache: Path) -> dict[str, str]:
    """The reference machine's environment: this process's, without any
    PIPELINE_* switch (PIPELINE_LOCK_ID stays) or profile variable, with the
    shared data cache."""
    drop = set(profile_variables())
    env = {k: v for k, v in os.environ.items()
           if (k in KEEP or not k.startswith("PIPELINE_")) and k not in drop}
    env["PIPELINE_CACHE_DIR"] = str(cache)
    return env


# Sets the hostname in the new UTS namespace, then becomes the command. Python's
# socket.sethostname, not hostname(1): util-linux has no `hostname`, coreutils installs
# none unless configured to, and nixpkgs' stdenv brings no other, so in `nix flake
# check`'s sandbox the machine always skipped.
_SETHOST = ("import os, socket, sys; socket.sethostname(sys.argv[1]); "
            "os.execvp(sys.argv[2], sys.argv[2:])")
# A private UTS namespace: as root (or with CAP_SYS_ADMIN) `unshare --uts`; unprivileged,
# inside a new user namespace that maps this user to root (the Nix sandbox's builder
# is an unprivileged user in a user namespace of its own).
_UNSHARES = (("unshare", "--uts"), ("unshare", "--user", "--map-root-user", "--uts"))


@functools.cache
def _uts() -> tuple[tuple[str, ...] | None, str]:
    """(the unshare prefix that works here, or None; why none works)."""
    why = []
    for prefix in _UNSHARES:
        cmd = [*prefix, sys.executable, "-c", _SETHOST, "probe-host", sys.executable, "-c",
               "import socket, sys; sys.exit(socket.gethostname() != 'probe-host')"]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        except OSError as e:
            return None, f"{prefix[0]}: {e}"
        if p.returncode == 0:
            return prefix, ""
        why.append(f"`{' '.join(prefix)}`: {p.stderr.strip() or f'exit {p.returncode}'}")
    return None, "no private UTS namespace: " + "; ".join(why)


def uts_namespace_problem() -> str | None:
    """Why a private UTS namespace (for the hostname) is not available, or None."""
    prefix, why = _uts()
    return None if prefix else why


def wrap(machine: Machine, cmd: list[str]) -> list[str]:
    """The argv that runs ``cmd`` on ``machine`` (prefix, umask, hostname)."""
    cmd = [*machine.prefix, *cmd]
    if machine.umask is not None:  # the shell changes itself, then becomes the command
        cmd = ["sh", "-c", f'umask {machine.umask:03o} && exec "$@"', "sh", *cmd]
    if machine.hostname:
        prefix = _uts()[0] or _UNSHARES[0]
        cmd = [*prefix, sys.executable, "-c", _SETHOST, machine.hostname, *cmd]
    return cmd


def environment(machine: Machine, base: Mapping[str, str], places: Places,
                scratch: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` changed the way ``machine`` changes it, then ``extra`` (the caller's own)."""
    env = dict(base)
    for key, value in machine.env.items():
        env[key] = value.format(scratch=scratch, checkout=places.checkout,
                                locales=places.locales)
    for key in ("HOME", "TMPDIR", "XDG_CACHE_HOME"):
        if key in machine.env:
            Path(env[key]).mkdir(parents=True, exist_ok=True)
    if "LOCPATH" in machine.env and not (Path(env["LOCPATH"]) / env.get("LC_ALL", "")).is_dir():
        # localedef could not compile it (compile_locales): glibc then looks the locale
        # up in its archive, LOCALE_ARCHIVE where set (nixpkgs' glibc; the flake's
        # determinism check points it at glibcLocales). LOCPATH would hide the archive.
        del env["LOCPATH"]
    env.update(extra or {})
    return dict(reversed(list(env.items()))) if machine.reverse_env else env


def compile_locales(dest: Path) -> list[str]:
    """Compile LOCALES into ``dest`` (a LOCPATH); return the ones that failed."""
    dest.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in LOCALES:
        lang, charset = name.split(".")
        try:
            p = subprocess.run(["localedef", "-i", lang, "-f", charset, str(dest / name)],
                               capture_output=True, text=True, timeout=120, check=False)
            ok = (dest / name).is_dir() and p.returncode in (0, 1)  # 1: warnings only
        except OSError:
            ok = False
        if not ok:
            failed.append(name)
    return failed
