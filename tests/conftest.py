"""Session fixtures shared by test modules.

Expensive artefacts (reference runs, a copied checkout, compiled locales) are
built once per test session, not once per xdist worker: the first worker to
ask builds it under a FileLock in the directory every worker shares and
leaves a JSON file there; the others wait on the lock and read the file
(pytest-xdist how-to, "Making session-scoped fixtures execute only once").
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.environment import host_isa_levels, load_profile

from .support import ROOT, build_once, run_pipeline
from .support.machines import (
    EXACT,
    FULL,
    SHORT,
    TRAIN_TIMEOUT_S,
    Places,
    Run,
    clean_env,
    compile_locales,
    copy_checkout,
    train_argv,
)


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One torch thread while a test trains in this process (two xdist workers
    share two cores); no test-only switch leaks in from the caller's environment."""
    import torch

    from pipeline.core import _testing

    monkeypatch.setattr(_testing, "SWITCHES", _testing.Switches())
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory every xdist worker of this session shares."""
    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's base temp is <session base>/popen-gwN; without
    # it, the base temp is already this session's own.
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def suite_env(shared_dir: Path) -> dict[str, str]:
    """The reference machine's environment, with the session's shared data cache."""
    return clean_env(shared_dir / "cache")


def _shared_run(root: Path, env: dict[str, str], name: str, overrides: list[str]) -> Run:
    def build() -> dict[str, Any]:
        runs = root / name
        p = run_pipeline(train_argv(overrides, runs), env, timeout=TRAIN_TIMEOUT_S)
        return {"returncode": p.returncode, "stdout": p.stdout, "stderr": p.stderr,
                "runs": str(runs)}

    got = build_once(root, name, build)
    if got["returncode"] == 4 and load_profile().requires_isa not in host_isa_levels():
        # Exit 4 on a CPU that really lacks the profile's ISA: nothing to compare
        # here. Exit 4 anywhere else means pinning is broken, and fails below.
        pytest.skip(f"reference run {name} refused here: {got['stderr'].strip()}")
    assert got["returncode"] == 0, f"reference run {name}: exit {got['returncode']}\n" \
                                   f"{got['stderr'][-3000:]}"
    record = json.loads(got["stdout"])
    return Run(Path(got["runs"]) / record["run_key"], record)


@pytest.fixture(scope="session")
def reference_run(shared_dir: Path, suite_env: dict[str, str]) -> Run:
    """configs/digits.toml as committed, pinned, on the reference machine."""
    return _shared_run(shared_dir, suite_env, "reference", FULL)


@pytest.fixture(scope="session")
def short_reference(shared_dir: Path, suite_env: dict[str, str]) -> Run:
    """The shortened config, pinned, on the reference machine."""
    return _shared_run(shared_dir, suite_env, "reference-short", SHORT)


@pytest.fixture(scope="session")
def exact_reference(shared_dir: Path, suite_env: dict[str, str]) -> Run:
    """The shortened config in exact mode on the reference machine."""
    return _shared_run(shared_dir, suite_env, "reference-exact", EXACT)


@pytest.fixture(scope="session")
def seed_run(shared_dir: Path, suite_env: dict[str, str]) -> Run:
    """The shortened pinned config with another seed (seed=1)."""
    return _shared_run(shared_dir, suite_env, "reference-seed-1", [*SHORT, "seed=1"])


@pytest.fixture(scope="session")
def places(shared_dir: Path) -> Places:
    """The copied checkout (under a path with spaces and non-ASCII characters)
    and the compiled locales, shared by the session."""
    def build() -> dict[str, Any]:
        checkout = copy_checkout(shared_dir / "chemin é ü" / "repo copy")
        failed = compile_locales(shared_dir / "locales")
        return {"checkout": str(checkout), "failed_locales": failed}

    got = build_once(shared_dir, "places", build)
    if got["failed_locales"]:  # the locale machines then run in an uninstalled locale
        warnings.warn(f"could not compile locales {got['failed_locales']} with localedef: "
                      f"the locale machines run in a locale this host lacks", stacklevel=1)
    return Places(ROOT, Path(got["checkout"]), shared_dir / "locales")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true",
                     help="run every test; the default lane leaves out tests marked "
                          "process or slow (under two minutes on two cores)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The quick lane: without --full (or an explicit -m), deselect tests marked
    ``process`` or ``slow``."""
    if config.getoption("--full") or config.getoption("markexpr"):
        return
    keep = [i for i in items if not (i.get_closest_marker("process")
                                     or i.get_closest_marker("slow"))]
    dropped = [i for i in items if i not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> str:
    return ("lane: full" if config.getoption("--full") else
            "lane: quick (tests marked process or slow left out; --full runs them)")
