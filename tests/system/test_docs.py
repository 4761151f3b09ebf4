"""The documentation: the README is a short door whose test command is CI's,
the site builds with ``mkdocs build --strict`` (and that build does fail on a
broken link), the generated reference pages match the code, and the
hand-written reference pages name what the code defines."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..support import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250


def _mkdocs_build(project: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` of ``project`` (its mkdocs.yml) into ``site``."""
    pytest.importorskip("mkdocs", reason="the docs extra (requirements-dev.lock)")
    pytest.importorskip("material", reason="the docs extra (requirements-dev.lock)")
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
         str(project / "mkdocs.yml"), "-d", str(site)],
        cwd=project, capture_output=True, text=True, timeout=300, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(site.parent), "NO_MKDOCS_2_WARNING": "1"})


def _copy_site_sources(dest: Path) -> Path:
    dest.mkdir()
    shutil.copy2(ROOT / "mkdocs.yml", dest / "mkdocs.yml")
    shutil.copytree(DOCS, dest / "docs")
    return dest


def test_readme_is_short() -> None:
    """The README is a door, not the manual: under 250 lines."""
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < MAX_README_LINES, f"README.md has {len(lines)} lines"


def test_readme_test_command_is_ci() -> None:
    """The README's test command is, character for character, the last line
    of .ci/run (what CI runs on a fresh clone)."""
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip()][-1]
    commands = [ln for ln in README.read_text(encoding="utf-8").splitlines()
                if ln.startswith("python3 -m venv .venv && ") and "pytest" in ln]
    assert commands == [ci], f"README test command(s) {commands!r} != .ci/run's {ci!r}"


def test_readme_train_command() -> None:
    """The README's train command installs from the runtime lock alone and trains."""
    text = README.read_text(encoding="utf-8")
    assert ("python3 -m venv .venv && .venv/bin/pip install --require-hashes -r "
            "requirements.lock && .venv/bin/pip install --no-deps --no-build-isolation -e . "
            "&& .venv/bin/pipeline train") in text.splitlines()


def test_readme_links_exist() -> None:
    """Every relative link in the README points at a file of the checkout."""
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links into the docs"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_tutorial_shows_the_scaffolded_files() -> None:
    """The tutorial shows exactly the model.py and config.toml that
    ``pipeline new`` writes."""
    from pipeline import scaffold

    page = (DOCS / "tutorial.md").read_text(encoding="utf-8")
    assert scaffold.MODEL_PY in page and scaffold.CONFIG_TOML in page


def test_test_switches_documented() -> None:
    """Every test-only switch that pipeline/core/_testing.py reads is listed
    in the environment-variable reference."""
    source = (ROOT / "pipeline" / "core" / "_testing.py").read_text(encoding="utf-8")
    names = set(re.findall(r"\b(PIPELINE_(?:TEST_[A-Z_]+|SIM_CPU_ISA))\b", source))
    page = (DOCS / "reference" / "environment.md").read_text(encoding="utf-8")
    assert names, "no switch found: has _testing.py moved?"
    assert not sorted(n for n in names if f"`{n}" not in page)


def test_profile_documented() -> None:
    """Every variable and value of pipeline/profile.json appears in the
    numeric-profile reference."""
    profiles = json.loads((ROOT / "pipeline" / "profile.json").read_text())["profiles"]
    page = (DOCS / "reference" / "profile.md").read_text(encoding="utf-8")
    missing = []
    for arch, prof in profiles.items():
        if f"`{prof['name']}`" not in page:
            missing.append(f"{arch}: name {prof['name']}")
        for var, value in prof["env"].items():
            if f"`{var}`" not in page or f"`{value}`" not in page:
                missing.append(f"{arch}: {var}={value}")
    assert not missing, f"docs/reference/profile.md lacks {missing}"


def test_golden_hashes_in_docs_are_committed() -> None:
    """Every full weight hash the golden how-to quotes is an entry of
    tests/golden/weights.json (the page is a copy for reading)."""
    golden = (ROOT / "tests" / "golden" / "weights.json").read_text()
    page = (DOCS / "how-to" / "golden.md").read_text(encoding="utf-8")
    quoted = re.findall(r"`([0-9a-f]{64})`", page)
    assert quoted
    assert not [h for h in quoted if h not in golden]


@pytest.mark.process
def test_site_builds_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict`` succeeds: every page is in the nav, every
    link and anchor resolves, no plugin needs the network."""
    out = _mkdocs_build(ROOT, tmp_path / "site")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
    # the offline plugin writes page.html, not page/index.html (file:// has no index)
    assert (tmp_path / "site" / "reference" / "cli.html").is_file()


@pytest.mark.process
def test_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    """Control: the same sources with one link to a missing page fail the
    strict build, naming the link (so the build test can fail)."""
    project = _copy_site_sources(tmp_path / "project")
    index = project / "docs" / "index.md"
    index.write_text(index.read_text(encoding="utf-8")
                     + "\nSee [a page that does not exist](no-such-page.md).\n",
                     encoding="utf-8")
    out = _mkdocs_build(project, tmp_path / "site")
    assert out.returncode != 0
    assert "no-such-page.md" in out.stderr


@pytest.mark.process
def test_generated_reference_is_current() -> None:
    """``tools/gen_reference.py --check`` passes: the CLI, config and exit-code
    pages match the code."""
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_reference.py"), "--check"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr


@pytest.mark.process
def test_generated_reference_check_catches_a_stale_page(tmp_path: Path) -> None:
    """Control: ``--check`` on a copy whose config page was edited exits 1 and
    names the page."""
    copy = tmp_path / "checkout"
    shutil.copytree(ROOT / "pipeline", copy / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tools", copy / "tools")
    shutil.copytree(DOCS / "reference", copy / "docs" / "reference")
    page = copy / "docs" / "reference" / "config.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nedited by hand\n", encoding="utf-8")
    out = subprocess.run([sys.executable, str(copy / "tools" / "gen_reference.py"), "--check"],
                         cwd=copy, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1
    assert "docs/reference/config.md" in out.stderr
    assert "docs/reference/cli.md" not in out.stderr
