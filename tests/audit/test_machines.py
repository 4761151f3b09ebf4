"""The simulated machines' own mechanics (pipeline/audit/machines.py): the hostname
machine without hostname(1) and without root, the locale machines without localedef."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.audit import machines
from pipeline.audit.machines import MACHINES, Places, environment, wrap

from ..support import ROOT

HOSTNAME = next(m for m in MACHINES if m.name == "hostname")
LOCALE_DE = next(m for m in MACHINES if m.name == "locale-de")
PRINT_HOST = [sys.executable, "-c", "import socket; print(socket.gethostname())"]


def _bin_without_hostname(tmp: Path) -> str:
    """A PATH with unshare and sh but no hostname(1), as in nixpkgs' stdenv plus util-linux."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for tool in ("unshare", "sh"):
        found = shutil.which(tool)
        assert found, f"{tool} not on PATH"
        (bin_dir / tool).symlink_to(found)
    assert shutil.which("hostname", path=str(bin_dir)) is None
    return str(bin_dir)


def test_the_hostname_machine_needs_no_hostname_binary(tmp_path: Path) -> None:
    """The hostname machine sets its hostname with Python inside the namespace, so it
    runs where no hostname(1) is on PATH (the Nix sandbox); the command sees it."""
    why = machines.uts_namespace_problem()
    if why:
        pytest.skip(why)
    env = dict(os.environ, PATH=_bin_without_hostname(tmp_path))
    p = subprocess.run(wrap(HOSTNAME, PRINT_HOST), env=env, capture_output=True, text=True,
                       timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "other-host"


@pytest.mark.process
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to become an unprivileged user (setpriv)")
def test_the_hostname_machine_runs_unprivileged() -> None:
    """As an unprivileged user (the Nix sandbox's builder) plain `unshare --uts` is
    refused; the machine then uses a user namespace of its own and still runs, while
    with only the plain form (the control) it reports the refusal."""
    code = ("import subprocess, sys; from pipeline.audit import machines as m\n"
            "if sys.argv[1] == 'plain': m._UNSHARES = m._UNSHARES[:1]\n"
            "why = m.uts_namespace_problem()\n"
            "if why: print('problem:', why); sys.exit(0)\n"
            "print(subprocess.run(m.wrap(m.MACHINES[[x.name for x in m.MACHINES]"
            ".index('hostname')], [sys.executable, '-c', 'import socket; "
            "print(socket.gethostname())']), capture_output=True, text=True).stdout.strip())")
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    # An interpreter the unprivileged user may run (the code needs no torch).
    python = next((py for py in ("/usr/bin/python3", sys.executable) if subprocess.run(
        [*as_nobody, py, "-c", "import pipeline.audit.machines; print('ok')"], cwd=ROOT,
        capture_output=True, text=True, timeout=60, check=False).stdout.strip() == "ok"), None)
    if python is None:
        pytest.skip("no Python interpreter here that an unprivileged user can run")
    out = {}
    for variant in ("fallback", "plain"):
        p = subprocess.run([*as_nobody, python, "-c", code, variant], cwd=ROOT,
                           capture_output=True, text=True, timeout=120, check=False,
                           env=dict(os.environ, HOME="/tmp", PYTHONDONTWRITEBYTECODE="1"))
        assert p.returncode == 0, p.stderr
        out[variant] = p.stdout.strip()
    if out["fallback"].startswith("problem:") and "--user" in out["fallback"]:
        pytest.skip(f"user namespaces are off here: {out['fallback']}")
    assert out["fallback"] == "other-host", out
    assert out["plain"].startswith("problem:") and "unshare --uts" in out["plain"], out


def test_no_private_namespace_is_reported_with_every_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no form works, the reason names each form tried."""
    monkeypatch.setattr(machines, "_UNSHARES", (("false",), ("sh", "-c", "exit 3", "sh")))
    machines._uts.cache_clear()
    try:
        why = machines.uts_namespace_problem()
    finally:
        machines._uts.cache_clear()
    assert why is not None and "`false`" in why and "exit 3" in why, why


def test_a_locale_localedef_could_not_compile_comes_from_the_archive(tmp_path: Path) -> None:
    """A locale machine points LOCPATH at its compiled locale; where localedef could not
    compile it, LOCPATH is left unset so glibc finds the locale in its archive
    (LOCALE_ARCHIVE: nixpkgs' glibcLocales in the flake's check), not nowhere."""
    places = Places(ROOT, ROOT, tmp_path / "locales")
    (tmp_path / "locales").mkdir()
    env = environment(LOCALE_DE, {"PATH": "/bin"}, places, tmp_path)
    assert "LOCPATH" not in env and env["LC_ALL"] == "de_DE.UTF-8", env
    (tmp_path / "locales" / "de_DE.UTF-8").mkdir()
    env = environment(LOCALE_DE, {"PATH": "/bin"}, places, tmp_path)
    assert env["LOCPATH"] == str(tmp_path / "locales"), env
