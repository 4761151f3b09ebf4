"""Every error the pipeline raises on purpose, one type per kind of failure.

Each error names the offending file or key, says what was expected and what
was found, and what to do; ``exit_code`` is the documented process exit code
(README, "Exit codes"). ``assert`` is kept for internal invariants only.
"""

from __future__ import annotations

from collections.abc import Sequence


class PipelineError(Exception):
    """Base of every deliberate pipeline failure."""

    exit_code = 2


class UsageError(PipelineError, ValueError):
    """A command line that cannot be carried out."""

    exit_code = 2


class ConfigError(PipelineError, ValueError):
    """One or more config keys are unknown, mistyped or out of range.

    All problems are collected and reported together, one line per key.
    """

    exit_code = 2

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config {source}: {len(self.problems)} problem(s)\n{lines}")


class DataIntegrityError(PipelineError, ValueError):
    """A data file or the data manifest is not what the manifest promises."""

    exit_code = 3

    def __init__(self, path: str, expected: str, found: str, hint: str = "") -> None:
        self.path, self.expected, self.found = path, expected, found
        msg = f"{path}: expected {expected}, found {found}"
        super().__init__(msg + (f"; {hint}" if hint else ""))


class MismatchError(PipelineError):
    """A rebuilt or verified run produced different weights."""

    exit_code = 1


class ProfileError(PipelineError, RuntimeError):
    """This machine or process cannot run the pinned numeric profile."""

    exit_code = 4


class CheckpointError(PipelineError, ValueError):
    """A checkpoint or weights file is corrupt, untrusted, or belongs to another run."""

    exit_code = 5

    def __init__(self, path: str, expected: str, found: str, hint: str = "") -> None:
        self.path, self.expected, self.found = path, expected, found
        msg = f"{path}: expected {expected}, found {found}"
        super().__init__(msg + (f"; {hint}" if hint else ""))


class DistributedError(PipelineError, RuntimeError):
    """A peer process failed or the world size cannot reproduce the run."""

    exit_code = 6


class WorkerError(PipelineError):
    """A launched worker's own error, passed on with the worker's exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
