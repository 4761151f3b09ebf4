"""Generate the reference pages that the code defines, so that each has one source.

    python tools/gen_reference.py           # rewrite the generated pages
    python tools/gen_reference.py --check   # exit 1 naming every stale page

- docs/reference/cli.md: every subcommand and option of ``pipeline.cli._parser()``
  (argparse's subparsers walked recursively), with its help text and default;
- docs/reference/config.md: every config key of the dataclass tree in
  ``pipeline.core.config`` with its type and default, the range it is checked
  against (``_RANGES``), whether it is keyed only when set (``_KEYED_WHEN_SET``),
  and the comments written beside it in the source;
- docs/reference/exit-codes.md: ``pipeline.core.errors.EXIT_CODES`` and the
  error types that carry each code.

Each page opens with a comment line saying it is generated and by what command.
Nothing here depends on the terminal width or the Python version's argparse
formatting: the pages are built from the parser's actions, not its help output.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import tokenize
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "reference"
COMMAND = "python tools/gen_reference.py"


def _header(source: str) -> str:
    return (f"<!-- Generated from {source} by `{COMMAND}`; do not edit by hand "
            f"(`{COMMAND} --check` fails when this page is stale). -->\n")


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


# --- the CLI ---------------------------------------------------------------------------

def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand, in the order they were added."""
    out = []
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            helps = {a.dest: a.help or "" for a in action._choices_actions}  # noqa: SLF001
            out += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return out


def _metavar(action: argparse.Action) -> str:
    if isinstance(action.metavar, str):
        return action.metavar
    if action.choices:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper()


def _spelling(action: argparse.Action) -> str:
    if action.option_strings:
        flags = ", ".join(action.option_strings)
        return flags if action.nargs == 0 else f"{flags} {_metavar(action)}"
    if action.nargs == argparse.REMAINDER:
        return "-- CMD ..."
    metavar = _metavar(action)
    return f"{metavar} ..." if action.nargs in ("*", "+") and " " not in metavar else metavar


def _default(action: argparse.Action) -> str:
    d = action.default
    if action.nargs == 0 or d is None or d == argparse.SUPPRESS or d in ([], ""):
        return ""
    return f"`{d}`"


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if isinstance(action, argparse._AppendAction):  # noqa: SLF001
        text = (text + " (repeatable)").strip()
    return text


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions  # noqa: SLF001
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]  # noqa: SLF001


def _usage(path: str, parser: argparse.ArgumentParser) -> str:
    words = [path]
    for a in _arguments(parser):
        spelled = _spelling(a)
        if a.option_strings:
            spelled = a.option_strings[-1] + spelled[len(", ".join(a.option_strings)):]
            words.append(spelled if a.required else f"[{spelled}]")
        else:
            words.append(spelled if a.nargs not in ("*", "?") or spelled.startswith("[")
                         else f"[{spelled}]")
    if _subparsers(parser):
        words.append("{" + ",".join(n for n, _, _ in _subparsers(parser)) + "} ...")
    return " ".join(words)


def _command_section(path: str, help_text: str, parser: argparse.ArgumentParser,
                     level: int) -> list[str]:
    lines = [f"{'#' * level} `{path}`", ""]
    if help_text:
        end = "" if help_text.endswith((".", "?", "!", ")")) else "."
        lines += [help_text[0].upper() + help_text[1:] + end, ""]
    lines += ["```", _usage(path, parser), "```", ""]
    args = _arguments(parser)
    if args:
        lines += ["| argument | default | what it does |", "|---|---|---|"]
        lines += [f"| `{_cell(_spelling(a))}` | {_default(a)} | {_cell(_help(a))} |"
                  for a in args]
        lines.append("")
    for name, sub_help, sub in _subparsers(parser):
        lines += _command_section(f"{path} {name}", sub_help, sub, min(level + 1, 4))
    return lines


def cli_page() -> str:
    from pipeline.cli import _parser

    parser = _parser()
    lines = [_header("pipeline.cli._parser()"), "# Command line", "",
             parser.description or "", "",
             "`python -m pipeline` is the same program. Every failure prints one line on "
             "stderr (`error: ...`) and exits with a code from the "
             "[exit code table](exit-codes.md); `--debug` anywhere before a `--` adds the "
             "Python traceback.", ""]
    for name, help_text, sub in _subparsers(parser):
        lines += _command_section(f"pipeline {name}", help_text, sub, 2)
    return "\n".join(lines).rstrip() + "\n"


# --- the config --------------------------------------------------------------------------

_TYPE_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean"}


def _type_name(tp: Any) -> str:
    if tp in _TYPE_NAMES:
        return _TYPE_NAMES[tp]
    if typing.get_origin(tp) is dict:
        return "table"
    return getattr(tp, "__name__", str(tp))


def _source_comments(module: Any) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comments written beside the field: the
    comment lines just above it and the one at the end of its line."""
    source = inspect.getsource(module)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above: list[str] = []
            n = stmt.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, comments.get(n, ""))
                n -= 1
            parts = above + ([comments[stmt.lineno]] if stmt.lineno in comments else [])
            out[(node.name, stmt.target.id)] = " ".join(p for p in parts if p)
    return out


def _fields(cls: type, prefix: str) -> list[tuple[str, type, str, Any]]:
    """(dotted key, type, class name, default) of every leaf key under ``cls``."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += _fields(tp, f"{key}.")  # type: ignore[arg-type]
            continue
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default)
        out.append((key, tp, cls.__name__, default))
    return out


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return repr(value)


def config_page() -> str:
    from pipeline.core import config

    ranges = {key: expected for key, _ok, expected in config._RANGES}  # noqa: SLF001
    keyed_when_set = {".".join(k) for k in config._KEYED_WHEN_SET}  # noqa: SLF001
    comments = _source_comments(config)
    lines = [_header("the dataclasses and _RANGES of pipeline/core/config.py"),
             "# Config keys", "",
             "A config is one TOML file; every key below may be set in it or on the command "
             "line as `KEY=VALUE` (the value parsed as TOML; a bare word is a string: "
             "`mode=exact`). Unknown keys, wrong types and out-of-range values are reported "
             "together, one line per key, with exit code 2. A key marked *keyed when set* "
             "enters the run key and `config_sha256` only when it differs from its default, "
             "so configs written before it existed keep their run keys and golden entries.",
             "", "| key | type | default | allowed | notes |", "|---|---|---|---|---|"]
    for key, tp, cls_name, default in _fields(config.Config, ""):
        note = comments.get((cls_name, key.rsplit(".", 1)[-1]), "")
        if key in keyed_when_set:
            note = ("*keyed when set.* " + note).strip()
        lines.append(f"| `{key}` | {_type_name(tp)} | `{_cell(_toml(default))}` | "
                     f"{_cell(ranges.get(key, ''))} | {_cell(note)} |")
    lines.append("")
    return "\n".join(lines)


# --- exit codes --------------------------------------------------------------------------

def exit_codes_page() -> str:
    from pipeline.core import errors

    raised: dict[int, list[str]] = {}
    for name, obj in vars(errors).items():
        code = getattr(obj, "exit_code", None)
        # Only types that declare their code; WorkerError passes on a worker's own.
        if (inspect.isclass(obj) and issubclass(obj, errors.PipelineError)
                and "exit_code" in vars(obj) and obj is not errors.PipelineError
                and isinstance(code, int)):
            raised.setdefault(code, []).append(f"`{name}`")
    lines = [_header("pipeline.core.errors.EXIT_CODES"), "# Exit codes", "",
             "Every command exits with one of these codes and, on failure, prints one line "
             "on stderr naming the file or key at fault (`--debug` adds the traceback). "
             "`pipeline exec` is the exception: it exits with the script's own status.", "",
             "| code | meaning | raised as |", "|---|---|---|"]
    for code, meaning in errors.EXIT_CODES:
        lines.append(f"| {code} | {_cell(meaning)} | {', '.join(sorted(raised.get(code, [])))} |")
    lines.append("")
    return "\n".join(lines)


PAGES: dict[str, Callable[[], str]] = {
    "cli.md": cli_page,
    "config.md": config_page,
    "exit-codes.md": exit_codes_page,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 naming every page that differs from the code")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    stale = []
    for name, build in PAGES.items():
        path = OUT / name
        text = build()
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            continue
        if args.check:
            stale.append(path.relative_to(ROOT).as_posix())
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT).as_posix()}")
    if stale:
        for s in stale:
            print(f"stale: {s} (regenerate with `{COMMAND}`)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
