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

import sys
from dataclasses import dataclass
from pathlib import Path

from .core.environment import project_root
from .core.errors import UsageError

__all__ = ["MARKERS", "Project", "find", "resolve", "say"]

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
        """Its default config: ``config.toml``; the shipped project's is
        ``configs/digits.toml``."""
        for path in (self.root / "config.toml",
                     *((self.root / "configs" / "digits.toml",) if self.shipped else ())):
            if path.is_file():
                return path
        return None

    @property
    def own_manifest(self) -> bool:
        return (self.root / MANIFEST).is_file()

    @property
    def manifest(self) -> Path:
        """Its data manifest; without one of its own, the shipped project's."""
        return self.root / MANIFEST if self.own_manifest else project_root() / MANIFEST

    @property
    def runs(self) -> Path:
        """Where its runs live: ``<project>/runs``; ``./runs`` for the shipped
        fallback (the shipped tree may be read-only: a Nix store path)."""
        return self.root / "runs" if self.found else Path("runs")

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
    """The nearest directory from ``start`` upwards holding a project marker."""
    start = start.resolve()
    for d in (start, *start.parents):
        if any((d / m).is_file() for m in MARKERS):
            return d
    return None


def resolve(explicit: Path | None = None, config: Path | None = None,
            start: Path | None = None) -> Project:
    """``--project DIR`` (a directory holding a marker), else the project of
    ``config`` (from its directory upwards), else the project around ``start``
    (default: the working directory), else the shipped one (``found`` False)."""
    if explicit is not None:
        root = Path(explicit)
        if not root.is_dir():
            raise UsageError(f"--project {explicit}: expected a project directory, found "
                             f"{'a file' if root.exists() else 'nothing'}")
        if not any((root / m).is_file() for m in MARKERS):
            raise UsageError(f"--project {explicit}: expected a directory holding "
                             f"{' or '.join(MARKERS)}, found neither (`pipeline new DIR` "
                             f"writes a project)")
        return Project(root.resolve())
    origin = (config.resolve().parent if config is not None else (start or Path.cwd())).resolve()
    found = find(origin)
    if found is None:
        if config is not None:  # a lone config: its directory is the project
            return Project(origin)
        return Project(project_root().resolve(), found=False, origin=origin)
    return Project(found)


def say(project: Project) -> None:
    """Tell the user on stderr where a command fell back on something it did
    not find (the shipped project, or its manifest)."""
    if not project.found or not project.own_manifest:
        print(project.describe(), file=sys.stderr)
