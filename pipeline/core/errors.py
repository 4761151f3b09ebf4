"""Every error the pipeline raises on purpose, one type per kind of failure.

Each error names the offending file or key, says what was expected and what
was found, and what to do; ``exit_code`` is the documented process exit code
(EXIT_CODES below). ``assert`` is kept for internal invariants only.
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
    """This machine or process cannot run the numeric mode: the pinned
    profile, or exact mode in a process that flushes subnormals."""

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


class DivergedError(PipelineError, ArithmeticError):
    """Training diverged: a non-finite loss or weight. Nothing is recorded
    (run directory or golden entry); the checkpoints before it remain."""

    exit_code = 7

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"training diverged at step {step}: {what} is not finite (NaN or "
                         f"inf); nothing was recorded. Lower optim.lr, clip with optim."
                         f"clip_norm, or check the data")
        self.step = step


class Preempted(PipelineError):
    """SIGTERM or SIGUSR1 (how Slurm and Kubernetes preempt, or warn before a
    time limit): every rank finished its step, rank 0 wrote a checkpoint, and
    the job stops with EXIT_PREEMPTED, which the schedulers' retry policies
    rerun (docs/how-to/cluster.md); the rerun resumes to the same bits."""

    exit_code = 143  # EXIT_PREEMPTED below: 128 + SIGTERM, as a shell reports it

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class WorkerError(PipelineError):
    """A launched worker's own error, passed on with the worker's exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# Exit codes beyond the PipelineError types' own; 70 and 74 are sysexits.h's
# EX_SOFTWARE and EX_IOERR.
EXIT_INTERNAL = 70
EXIT_IO = 74
EXIT_INTERRUPTED = 130
# The reader of standard output went away (`pipeline predict ... | head`):
# 128 + SIGPIPE, what a shell reports for a tool that SIGPIPE stopped.
EXIT_PIPE = 141
# Preempted: in 128..255, which a PyTorchJob's `restartPolicy: ExitCode` retries
# (1..127 are permanent there); 128 + SIGTERM, what a shell reports for a
# process that SIGTERM stopped.
EXIT_PREEMPTED = Preempted.exit_code

# Every exit code a command can return, and what it means: the one source for
# `pipeline --help` and docs/reference/exit-codes.md (tools/gen_reference.py).
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "ok"),
    (MismatchError.exit_code, "mismatch: rebuild, verify, golden check or diff found other "
                              "weights; `golden check --require` found no entry; eval scored "
                              "the run's own split otherwise than recorded; audit: a "
                              "divergence"),
    (ConfigError.exit_code, "usage or config error (also a model feature that cannot be "
                            "trained as written, or an optional extra that a command or "
                            "dataset needs not installed); nothing was trained"),
    (DataIntegrityError.exit_code, "data integrity: a file changed, truncated, missing or "
                                   "escaping the data root, a bad manifest; audit: the "
                                   "script could not be audited"),
    (ProfileError.exit_code, "this machine or process cannot run the numeric mode: the "
                             "pinned profile's ISA, or exact mode where subnormals are "
                             "flushed"),
    (CheckpointError.exit_code, "a bad checkpoint, weights or run file: corrupt, pickled, "
                                "edited, another run's"),
    (DistributedError.exit_code, "distributed failure: a peer died or timed out"),
    (DivergedError.exit_code, "training diverged: a non-finite loss or weight; nothing "
                              "recorded"),
    (EXIT_INTERNAL, "internal error: an exception no check anticipated (a bug); one line "
                    "naming it, --debug for the traceback"),
    (EXIT_IO, "file-system error: permission, no space, a read-only or missing directory; "
              "one line naming the path"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C); rerun the same command to resume"),
    (EXIT_PIPE, "standard output was closed early (a pipe into `head`): the output was cut "
                "short; nothing else is printed"),
    (EXIT_PREEMPTED, "preempted: SIGTERM or SIGUSR1 stopped the run after a step and "
                     "rank 0's checkpoint of it (or before its first step, with nothing to "
                     "keep); retry (Slurm --requeue, Kubernetes restart policies): the same "
                     "command resumes to the same weights"),
)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during training, at ``step``: a KeyboardInterrupt, so
    nothing that catches Exception swallows it."""

    def __init__(self, step: int) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step = step


def exit_status(e: BaseException) -> tuple[int, str]:
    """(exit code, the one line to print) for an exception that reached a
    command's top level. Deliberate errors carry their own code; an
    interrupt is 130; a file-system error 74, naming the path and the
    operation; anything else (RecursionError, OverflowError, MemoryError,
    a bug) is an internal error, 70, never the "mismatch" code 1."""
    import traceback

    if isinstance(e, PipelineError):
        return e.exit_code, f"error: {e}"
    if isinstance(e, KeyboardInterrupt):
        at = f" at step {e.step}" if isinstance(e, Interrupted) else ""
        return EXIT_INTERRUPTED, f"interrupted{at}; rerun the same command to resume"
    if isinstance(e, BrokenPipeError) and stdout_gone():
        return EXIT_PIPE, ""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" in {frames[-1].name}()" if frames else ""
    if isinstance(e, OSError):
        path = e.filename if e.filename is not None else "(no path)"
        extra = f" -> {e.filename2}" if e.filename2 is not None else ""
        return EXIT_IO, (f"error: file system error{where}: {path}{extra}: "
                         f"{e.strerror or type(e).__name__}")
    text = str(e).splitlines()[0][:300] if str(e) else ""
    return EXIT_INTERNAL, (f"internal error{where}: {type(e).__name__}"
                           f"{': ' + text if text else ''} (rerun with --debug for the "
                           f"traceback)")


def stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (and it is
    then pointed at /dev/null, so the interpreter's last flush does not fail
    again): a BrokenPipeError from anything else is a file-system error."""
    import select
    import sys

    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        gone = any(ev & select.POLLERR for _, ev in poll.poll(0))
    except (OSError, ValueError, AttributeError):
        return False
    if gone:
        discard_stdout()
    return gone


def discard_stdout() -> None:
    """Point standard output's descriptor at /dev/null: what is still buffered
    for a reader that is gone, or a disk that is full, is dropped."""
    import os
    import sys

    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, sys.stdout.fileno())
    finally:
        os.close(null)


def report(e: BaseException, debug: bool = False) -> int:
    """Print ``e``'s one line (and with ``debug`` its traceback) on stderr;
    return its exit code."""
    import sys
    import traceback

    code, line = exit_status(e)
    if debug:
        traceback.print_exception(e)
    if line:
        print(line, file=sys.stderr)
    return code


def split_debug(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether --debug is given, argv without it). Only before a ``--``:
    what follows (``pipeline exec -- script --debug``) is another program's."""
    cut = argv.index("--") if "--" in argv else len(argv)
    head = argv[:cut]
    return "--debug" in head, [a for a in head if a != "--debug"] + argv[cut:]
