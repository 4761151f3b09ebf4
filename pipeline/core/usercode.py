"""The user's own code: which modules it loaded, their hash (the run key's
``model`` input), and its failures reported as the user's.

What is hashed is what was imported, whatever its package form (a plain
module, a regular package, a namespace package without ``__init__.py``, an
editable install): every module that loading the factory and loss, building
the model and running a forward pass added to ``sys.modules`` (``track``),
and every module their namespaces refer to (``closure``), that is user code:
its file lies outside the interpreter's own prefixes (the standard library,
this environment's site-packages: the toolchain, which the lock covers) and
outside this package (the code hash covers it). Never the working directory:
the hash is of module names and file contents, so the same project gives the
same key from any directory, and an edited imported module a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import sysconfig
import traceback
import types
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import ConfigError

__all__ = ["track", "closure", "modules_sha256", "is_user_file", "UserCodeError", "guarded",
           "user_error", "raised_in_user_code", "LateImports"]

_PACKAGE = Path(__file__).resolve().parents[1]  # pipeline/


def _toolchain_roots() -> tuple[Path, ...]:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             *(sysconfig.get_paths().get(k, "") for k in ("stdlib", "platstdlib", "purelib",
                                                           "platlib"))}
    return tuple(Path(p).resolve() for p in paths if p)


_ROOTS = _toolchain_roots()


def is_user_file(path: str | Path | None) -> bool:
    """A Python source file that is neither the toolchain's nor this package's."""
    if not path or not str(path).endswith(".py"):
        return False
    p = Path(path).resolve()
    if p.is_relative_to(_PACKAGE):
        return False
    return not any(p.is_relative_to(r) for r in _ROOTS)


@contextlib.contextmanager
def track(into: set[str]) -> Iterator[None]:
    """Add to ``into`` the names of the modules imported while the block runs."""
    before = set(sys.modules)
    try:
        yield
    finally:
        into.update(set(sys.modules) - before)


def _refers_to(module: types.ModuleType) -> Iterable[str]:
    """Modules a module's namespace holds or takes names from."""
    for value in list(vars(module).values()):
        if isinstance(value, types.ModuleType):
            yield value.__name__
        elif isinstance(getattr(value, "__module__", None), str):
            yield value.__module__


def closure(names: Iterable[str]) -> dict[str, Path]:
    """The user modules among ``names`` and all they refer to, recursively:
    module name -> its source file."""
    out: dict[str, Path] = {}
    todo = list(names)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        module = sys.modules.get(name)
        if module is None or not is_user_file(getattr(module, "__file__", None)):
            continue
        out[name] = Path(module.__file__).resolve()  # type: ignore[arg-type]
        parent = name.rpartition(".")[0]
        todo += [*_refers_to(module), *([parent] if parent else [])]
    return out


def modules_sha256(modules: dict[str, Path]) -> str:
    """sha256 over (name, source) of each module, in name order."""
    h = hashlib.sha256()
    for name in sorted(modules):
        data = modules[name].read_bytes()
        h.update(len(name).to_bytes(8, "little") + name.encode())
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _installed(path: str | None) -> bool:
    """A file of an installed distribution (under a site-packages or
    dist-packages directory), wherever that environment lies: a library the
    lock pins, lazily imported (torch.profiler under a wrapped interpreter
    whose prefixes do not hold the environment), not the user's own code."""
    return any(p in ("site-packages", "dist-packages") for p in Path(path or "").parts)


class LateImports:
    """User modules imported after the run key was computed (a model's
    forward that imports on a path the check forward did not take: a larger
    batch, training mode, a data-dependent branch): their code would not be
    in the key, so a memoised run could be served after they change.
    ``check`` raises UserCodeError naming them (exit 2, nothing written);
    it costs a length comparison while nothing new was imported."""

    def __init__(self) -> None:
        self.before = set(sys.modules)
        self.count = len(self.before)

    def check(self, what: str, step: int | None = None) -> None:
        if len(sys.modules) == self.count:
            return
        new = set(sys.modules) - self.before
        self.before |= new
        self.count = len(sys.modules)
        late = {n: getattr(sys.modules.get(n), "__file__", None) for n in sorted(new)}
        late = {n: f for n, f in late.items() if is_user_file(f) and not _installed(f)}
        if late:
            names = ", ".join(f"{n} ({f})" for n, f in late.items())
            raise UserCodeError("user code", (
                f"user code (model.factory, train.loss or data.augment.transform): {what}"
                f"{f' at step {step}' if step is not None else ''} imported {names}, which "
                f"loading that code and the model's first forward pass did not import, so its "
                f"code is not in the run key; import it at the top of the module that uses it "
                f"(the model's, the loss's or the transform's) so that it is hashed"))


class UserCodeError(ConfigError):
    """The user's code (the model factory, its forward, the loss) raised or
    exited: exit 2, reported as theirs, with where it failed."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(key, [problem])
        self.args = (f"the user's code failed: {problem}",)


def raised_in_user_code(e: BaseException) -> bool:
    """Whether a frame of ``e``'s traceback is in user code."""
    return any(is_user_file(f.filename) for f in traceback.extract_tb(e.__traceback__))


def _where(e: BaseException) -> str:
    """The last frame in user code, as file:line in function."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if is_user_file(f.filename)]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} in {f.name}()"


def _describe(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return f"called sys.exit({e.code!r})"
    text = str(e).splitlines()[0][:300] if str(e) else ""
    return f"raised {type(e).__name__}{': ' + text if text else ''}"


@contextlib.contextmanager
def guarded(what: str, key: str, *, step: int | None = None,
            always: bool = True) -> Iterator[None]:
    """Run user code: an exception it raises (or a ``sys.exit``) becomes a
    UserCodeError naming ``key`` (the config key: model.factory, train.loss),
    ``what`` was running, where, and the step. ``always=False``: only if a
    frame of the traceback is user code (the pipeline's own failures inside
    the block stay internal errors). KeyboardInterrupt passes through."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except (Exception, SystemExit) as e:  # noqa: BLE001 - user code: any failure is theirs
        if isinstance(e, ConfigError) and not isinstance(e, UserCodeError):
            raise
        if not always and not isinstance(e, SystemExit) and not raised_in_user_code(e):
            raise
        raise user_error(key, what, e, step) from None


def user_error(key: str, what: str, e: BaseException, step: int | None = None
               ) -> UserCodeError:
    """The one line for user code's failure ``e`` while ``what`` ran."""
    at = f" at step {step}" if step is not None else ""
    return UserCodeError(key, f"{key}: {what}{at} {_describe(e)}{_where(e)}")
