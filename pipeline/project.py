"""The user's project is the unit every command works on.

A project is the directory holding its ``config.toml`` and/or
``data-manifest.json``, found as git finds ``.git``: from the directory of the
CONFIG a command names, else from the working directory, upwards to the
nearest directory holding either; or given with ``--project DIR``. Its
manifest, its default config and its ``runs/`` are the ones a command uses.

Where none is found, the shipped digits project (the checkout, or
``$PIPELINE_ROOT``) is used, its runs in ``./runs``, and the command says so
on stderr. A project without a manifest of its own reads the shipped one (the
datasets the pipeline ships: digits, shakespeare), and says so too; its model
code is still its own (``model.factory`` resolves beside the config).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .core.environment import project_root
from .core.errors import UsageError

__all__ = ["MARKERS", "Project", "find", "resolve", "say", "check_out"]

MARKERS = ("config.toml", "data-manifest.json")
MANIFEST = "data-manifest.json"


@dataclass(frozen=True)
class Project:
    """A project directory. ``found`` is False for the shipped fallback (no
    project around the place the command looked from, ``origin``)."""

    root: Path
    found: bool = True
    origin: Path | None = None

    @property
    def shipped(self) -> bool:
        """Whether this is the pipeline's own (shipped) project."""
        return self.root == project_root().resolve()

    @property
    def config(self) -> Path | None:
        """Its default config: ``config.toml`` (there, even if it is not a
        readable file: reading it then says why); the shipped project's is
        ``configs/digits.toml``."""
        for path in (self.root / "config.toml",
                     *((self.root / "configs" / "digits.toml",) if self.shipped else ())):
            if os.path.lexists(path):
                return path
        return None

    @property
    def own_manifest(self) -> bool:
        """Whether it has a manifest: a ``data-manifest.json`` there, even a
        dangling link or a directory (verify then refuses it, never the shipped
        manifest in its place)."""
        return os.path.lexists(self.root / MANIFEST)

    @property
    def manifest(self) -> Path:
        """Its data manifest; without one of its own, the shipped project's."""
        return self.root / MANIFEST if self.own_manifest else project_root() / MANIFEST

    @property
    def runs(self) -> Path:
        """Where its runs live: ``<project>/runs``; ``./runs`` for the shipped
        project (its tree may be read-only: a Nix store path, a site-packages)."""
        return self.root / "runs" if self.found and not self.shipped else Path("runs")

    def describe(self) -> str:
        """One line: which project, and where its manifest is from."""
        if not self.found:
            return (f"project: none found from {self.origin} upwards (no "
                    f"{' or '.join(MARKERS)}); using the shipped project at {self.root}, "
                    f"runs in ./runs")
        if not self.own_manifest:
            return f"project: {self.root} (no {MANIFEST} of its own: the shipped one)"
        return f"project: {self.root}"


def find(start: Path) -> Path | None:
    """The nearest directory from ``start`` upwards holding a project marker
    (present even if it is a dangling link, a directory or a FIFO: a marker
    that cannot be read is an error when read, never a reason to look higher)."""
    start = _resolved(start, "the directory")
    for d in (start, *start.parents):
        if any(os.path.lexists(d / m) for m in MARKERS):
            return d
    return None


def resolve(explicit: Path | None = None, config: Path | None = None,
            start: Path | None = None) -> Project:
    """``--project DIR`` (a directory, or a config file in it), else the
    project of ``config`` (from its directory upwards: a config belongs to the
    project it sits in), else the project around ``start`` (default: the
    working directory), else the shipped one (``found`` False). A ``config``
    outside ``--project`` is refused: a run's code and data would then come
    from two projects, which nothing that uses the run can find again."""
    if explicit is not None:
        root = Path(explicit)
        if root.is_file():
            root = root.parent
        if not root.is_dir():
            raise UsageError(f"--project {explicit}: expected a project directory (or its "
                             f"config file), found {'a file' if root.exists() else 'nothing'}")
        project = Project(_resolved(root, "--project"))
        if config is not None:
            where = _resolved(config, "CONFIG").parent
            if not where.is_relative_to(project.root):
                raise UsageError(f"CONFIG {config}: expected a config inside --project "
                                 f"{project.root}, found one in {where}; move it into the "
                                 f"project, or drop --project")
        return project
    origin = (_resolved(config, "CONFIG").parent if config is not None
              else _resolved(start or Path.cwd(), "the working directory"))
    found = find(origin)
    if found is None:
        if config is not None:  # a lone config: its directory is the project
            return Project(origin)
        return Project(project_root().resolve(), found=False, origin=origin)
    return Project(found)


def _resolved(path: Path, what: str) -> Path:
    """``path`` made absolute with its links resolved; UsageError for a link loop."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before 3.13)
        raise UsageError(f"{what} {path}: expected a path that resolves, found "
                         f"{type(e).__name__}: {e}") from None


def check_out(out: Path, run_dir: Path) -> Path:
    """An ``--out FILE`` of a command that reads run ``run_dir``: a file path,
    outside every run directory (writing there would destroy the run);
    UsageError otherwise."""
    text, path = str(out), _resolved(Path(out), "--out")
    if text.endswith(os.sep) or path.is_dir():
        raise UsageError(f"--out {out}: expected a file to write, found a directory")
    run = _resolved(Path(run_dir), "the run directory")
    if path.is_relative_to(run) or (path.parent / "run.json").exists():
        raise UsageError(f"--out {out}: expected a file outside the run directory "
                         f"{path.parent} (it would change the run)")
    return path


def say(project: Project) -> None:
    """Tell the user on stderr where a command fell back on something it did
    not find (the shipped project, or its manifest)."""
    if not project.found or not project.own_manifest:
        print(project.describe(), file=sys.stderr)
