"""The package's layout (docs/architecture-notes.md): packages by concern in
layers, imports only downwards and no cycle, one module that reads test
switches, one place that maps the mode string and one the task string,
nothing heavy imported before the process is pinned."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ..support import ROOT

PKG = ROOT / "pipeline"

# The units of the package (a subpackage, or a top-level module), lowest layer
# first. A unit may import its own modules and the units of lower layers only.
LAYERS: list[tuple[str, ...]] = [
    ("core",),             # leaves: errors, config, environment, hashing, rng, I/O, switches
    ("data", "exact"),     # the data path; exact arithmetic and layers
    ("train",),            # the loop, checkpoints, threads, the shard reduction, pinned nets
    ("record",),           # run.json, run directories, the key's inputs, diff, golden
    ("audit",),            # audit and exec of a user's script
    ("models", "project"),  # model factories; the user's project (manifest, config, runs/)
    ("modes",),            # pinned and exact: nets and optimisers for the loop
    ("recipe", "scaffold", "cluster"),  # cluster: which launcher started this process
    ("launch", "inference"),  # inference: load a finished run's model, eval, predict
    ("export",),           # read-only links outward: MLflow, TensorBoard, the model card
    ("cli",),
    ("__main__", "__init__"),
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


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
            mod = node.module.removeprefix("pipeline.")  # type: ignore[union-attr]
            for alias in node.names:
                found.add(f"{mod}.{alias.name}" if f"{mod}.{alias.name}" in known else mod)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("pipeline.") for a in node.names
                      if a.name.startswith("pipeline.")}
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


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


def _unit(module: str) -> str:
    return module.split(".")[0]


def _violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a unit to a unit of a higher layer (or an unlisted unit)."""
    out = []
    for mod, deps in sorted(graph.items()):
        for dep in sorted(deps):
            a, b = _unit(mod), _unit(dep)
            if a == b:
                continue
            if a not in LAYER_OF or b not in LAYER_OF:
                out.append(f"{mod} -> {dep}: {a if a not in LAYER_OF else b} is in no layer")
            elif LAYER_OF[b] >= LAYER_OF[a]:
                out.append(f"{mod} -> {dep}: layer {LAYER_OF[a]} ({a}) imports layer "
                           f"{LAYER_OF[b]} ({b})")
    return out


def test_no_import_cycle() -> None:
    """No module of pipeline/ imports, directly or through others, itself."""
    graph = _graph()
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_cycle_check_finds_a_cycle() -> None:
    """Control: the cycle check sees a cycle when there is one."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_packages_import_only_downwards() -> None:
    """Every import goes from a unit to its own modules or to a lower layer
    (LAYERS): the package map holds in the code."""
    assert _violations(_graph()) == []


def test_layer_check_finds_an_upward_import() -> None:
    """Control: an import from core up to record, and one between two units of
    one layer, are reported; an import down is not."""
    graph = {"core.hashing": {"record.trail"}, "data.dataset": {"exact.ops"},
             "record.runs": {"core.atomic"}}
    assert _violations(graph) == [
        "core.hashing -> record.trail: layer 0 (core) imports layer 3 (record)",
        "data.dataset -> exact.ops: layer 1 (data) imports layer 1 (exact)"]


def test_every_unit_has_a_layer() -> None:
    """A new subpackage or top-level module is placed in LAYERS (and so in the
    architecture notes) before it lands."""
    assert sorted({_unit(m) for m in _modules()} - set(LAYER_OF)) == []


def test_packages_name_their_public_surface() -> None:
    """Each subpackage's __init__ has a docstring and an __all__ (STYLE: a short
    __init__ naming its public surface)."""
    missing = []
    for init in sorted(PKG.glob("*/__init__.py")):
        tree = ast.parse(init.read_text(encoding="utf-8"))
        names = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                 if isinstance(t, ast.Name)}
        if ast.get_docstring(tree) is None or "__all__" not in names:
            missing.append(init.relative_to(ROOT).as_posix())
    assert missing == []


def test_only_one_module_reads_test_switches() -> None:
    """`PIPELINE_TEST_` appears in pipeline/core/_testing.py and nowhere else in the package."""
    holders = [p.relative_to(ROOT).as_posix() for p in _modules().values()
               if "PIPELINE_TEST_" in p.read_text(encoding="utf-8")]
    assert holders == ["pipeline/core/_testing.py"]


def test_mode_string_is_mapped_in_one_place() -> None:
    """No module compares a mode string; modes.of() is the one mapping."""
    pattern = re.compile(r"mode\s*[!=]=\s*[\"'](exact|pinned)[\"']")
    hits = [(p.name, m.group(0)) for p in _modules().values()
            for m in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert hits == []


def test_task_string_is_mapped_in_one_place() -> None:
    """No module compares a task name; pipeline.data.task.of() is the one mapping."""
    pattern = re.compile(r"[!=]=\s*[\"'](lm|classification)[\"']|[\"'](lm|classification)[\"']"
                         r"\s*[!=]=|in \([\"'](lm|classification)")
    hits = [(p.relative_to(ROOT).as_posix(), m.group(0)) for p in _modules().values()
            for m in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert hits == []


def test_architecture_notes_list_every_unit() -> None:
    """docs/architecture-notes.md names every package and top-level module."""
    notes = (ROOT / "docs" / "architecture-notes.md").read_text(encoding="utf-8")
    units = sorted({_unit(n) for n in _modules()} - {"__init__", "__main__"})
    missing = [u for u in units if f"`{u}.py`" not in notes and f"`{u}/`" not in notes]
    assert missing == []


@pytest.mark.process
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
# The export extra and what reads a finished run: never loaded by a run (DESIGN.md,
# "Links outward are read-only"). The CLI registers the commands of pipeline.export and
# pipeline.inference (their ``commands`` modules, which import nothing heavy); nothing
# else of those packages is loaded.
_EXTRA = ("mlflow", "tensorboard", "tensorboardX", "pandas", "sqlalchemy", "alembic")
_READERS = ("pipeline.export.", "pipeline.inference.")


def _never_in_training(modules: set[str]) -> list[str]:
    """The modules of the export extra, and of the packages that read a finished
    run (but their CLI registration), among ``modules``."""
    return sorted(m for m in modules if m.split(".")[0] in _EXTRA
                  or (m.startswith(_READERS) and not m.endswith(".commands")))


def test_never_in_training_finds_the_extra() -> None:
    """Control: the check names mlflow, tensorboard and the loader; not the CLI's
    registration of their commands, nor torch."""
    mods = {"mlflow.pytorch", "tensorboard", "pipeline.inference.loading",
            "pipeline.export.commands", "pipeline.inference.commands", "torch"}
    assert _never_in_training(mods) == ["mlflow.pytorch", "pipeline.inference.loading",
                                        "tensorboard"]
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


@pytest.mark.process
def test_train_imports_torch_once_and_only_after_the_reexec(tmp_path: Path) -> None:
    """`pipeline train` (pinned, the default config) runs in two processes: the
    one started re-executes itself with the profile having imported none of
    torch, numpy, matplotlib; the pinned one imports torch (once: a module is
    imported once per process) but not torch._dynamo or torch._inductor,
    whose import costs as much again, nor matplotlib (curves.png is drawn by
    pipeline/plots.py), nor MLflow, TensorBoard or the loader (links outward
    read finished runs); nothing else is started. One thread: with shards on
    the thread pool, torch's dispatch-mode machinery imports torch._dynamo
    itself (the shard generators route random ops through a dispatch mode),
    and "auto" picks the pool when the first step is slow, as on a loaded
    machine."""
    from pipeline.audit.machines import clean_env
    from pipeline.core.environment import host_isa_levels, load_profile

    env = {**clean_env(tmp_path / "cache"), "PYTHONPROFILEIMPORTTIME": "1"}
    p = subprocess.run([sys.executable, "-m", "pipeline", "train", "configs/digits.toml",
                        "train.max_steps=2", "--threads", "1", "--runs-dir",
                        str(tmp_path / "runs"), "--quiet"],
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
    assert _never_in_training(parent | child) == []
    assert any((tmp_path / "runs").glob("*/curves.png"))
