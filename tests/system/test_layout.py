"""The package's layout (docs/architecture-notes.md): no import cycle, one
module that reads test switches, one place that maps the mode string, small
modules, nothing heavy imported before the process is pinned."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pipeline"
MAX_LINES = 310  # "roughly 300 lines or fewer per module" (house style)


def _modules() -> dict[str, Path]:
    """Dotted name (relative to the package) -> file, for every module."""
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(PKG).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__") or "__init__"
        out[name] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports anywhere in its file (module level or
    inside functions: a lazy import cycle is still a cycle)."""
    pkg = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        pkg = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            for alias in node.names:
                sub = f"{mod}.{alias.name}" if mod else alias.name
                found.add(sub if sub in known else mod)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
            found.add(node.module.removeprefix("pipeline."))  # type: ignore[union-attr]
    return {m for m in found if m in known and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle() -> None:
    """No module of pipeline/ imports, directly or through others, itself."""
    mods = _modules()
    graph = {n: _imports(n, p, set(mods)) for n, p in mods.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_cycle_check_finds_a_cycle() -> None:
    """Control: the cycle check sees a cycle when there is one."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_only_one_module_reads_test_switches() -> None:
    """`PIPELINE_TEST_` appears in pipeline/_testing.py and nowhere else in the package."""
    holders = [p.relative_to(ROOT).as_posix() for p in _modules().values()
               if "PIPELINE_TEST_" in p.read_text(encoding="utf-8")]
    assert holders == ["pipeline/_testing.py"]


def test_mode_string_is_mapped_in_one_place() -> None:
    """No module compares a mode string; modes.of() is the one mapping."""
    pattern = re.compile(r"mode\s*[!=]=\s*[\"'](exact|pinned)[\"']")
    hits = [(p.name, m.group(0)) for p in _modules().values()
            for m in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert hits == []


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_is_small(name: str) -> None:
    """Every module stays near 300 lines (house style)."""
    n = len(_modules()[name].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"pipeline/{name}: {n} lines"


def test_architecture_notes_list_every_module() -> None:
    """docs/architecture-notes.md names every top-level module and package."""
    notes = (ROOT / "docs" / "architecture-notes.md").read_text(encoding="utf-8")
    tops = sorted({n.split(".")[0] for n in _modules()} - {"__init__", "__main__"})
    missing = [t for t in tops if f"`{t}.py`" not in notes and f"`{t}/`" not in notes
               and f"`{t}.py`," not in notes]
    assert missing == []


def test_cli_path_imports_no_torch_before_pinning() -> None:
    """The modules a command loads before the pinned re-exec import neither
    torch nor numpy (their thread and ISA settings are read when they load), nor
    matplotlib (test_train_imports_torch_once_and_only_after_the_reexec: what a
    run imports when it runs)."""
    code = ("import sys; import pipeline.cli, pipeline.recipe, pipeline.modes, pipeline.record.runs, "
            "pipeline.record.golden, pipeline.data.manifest, pipeline.launch, pipeline.data.cache; "
            "print(sorted(m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


_HEAVY = ("torch", "numpy", "matplotlib")
# Parts of torch that cost about as much as ``import torch`` again, and that a
# run which compiles nothing need not load (pipeline/determinism.py, pinned.py).
_SECOND_TORCH = ("torch._dynamo", "torch._inductor")


def _imports_per_process(stderr: str) -> list[set[str]]:
    """The modules each Python process imported, in the order the processes
    started, from PYTHONPROFILEIMPORTTIME's lines on stderr (each process
    prints its header first; a re-executed process starts a new list)."""
    procs: list[set[str]] = []
    for line in stderr.splitlines():
        if line.startswith("import time:") and "imported package" in line:
            procs.append(set())
        elif line.startswith("import time:") and procs:
            procs[-1].add(line.rsplit("|", 1)[1].strip())
    return procs


def test_import_parser_splits_processes() -> None:
    """Control: the parser assigns each import to its process."""
    text = ("import time: self [us] | cumulative | imported package\n"
            "import time:        5 |          5 | os\n"
            "import time: self [us] | cumulative | imported package\n"
            "import time:      900 |       1200 |   torch._dynamo\n")
    assert _imports_per_process(text) == [{"os"}, {"torch._dynamo"}]


def test_train_imports_torch_once_and_only_after_the_reexec(tmp_path: Path) -> None:
    """`pipeline train` (pinned, the default config) runs in two processes: the
    one started re-executes itself with the profile having imported none of
    torch, numpy, matplotlib; the pinned one imports torch (once: a module is
    imported once per process) but not torch._dynamo or torch._inductor,
    whose import costs as much again, nor matplotlib (curves.png is drawn by
    pipeline/plots.py); nothing else is started."""
    from pipeline.audit.machines import clean_env
    from pipeline.core.environment import host_isa_levels, load_profile

    env = {**clean_env(tmp_path / "cache"), "PYTHONPROFILEIMPORTTIME": "1"}
    p = subprocess.run([sys.executable, "-m", "pipeline", "train", "configs/digits.toml",
                        "train.max_steps=2", "--runs-dir", str(tmp_path / "runs"), "--quiet"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if p.returncode == 4 and load_profile().requires_isa not in host_isa_levels():
        pytest.skip(f"this CPU cannot run the pinned profile: {p.stderr[-300:]}")
    assert p.returncode == 0, p.stderr[-3000:]
    procs = _imports_per_process(p.stderr)
    assert len(procs) == 2, f"expected the started process and its pinned re-exec, found " \
                            f"{len(procs)} processes"
    parent, child = procs
    assert "pipeline.cli" in parent and "torch" in child  # the lists are the right ones
    assert sorted(m for m in parent if m.split(".")[0] in _HEAVY) == []
    assert sorted(m for m in child if m.split(".")[0] == "matplotlib"
                  or m.startswith(_SECOND_TORCH)) == []
    assert any((tmp_path / "runs").glob("*/curves.png"))
