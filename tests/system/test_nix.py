"""The Nix side, checked without nixpkgs: tools/check_nix.py and its controls.

The parse and outputs checks need `nix-instantiate` (Debian: nix-bin); they
are skipped, with the reason in the summary, only where it is not on PATH.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from pipeline.core.environment import load_profile
from pipeline.record import runs

from ..support import ROOT as REPO
from ..support import pipeline_argv, pipeline_env, run_pipeline

NIX = shutil.which("nix-instantiate")
needs_nix = pytest.mark.skipif(
    NIX is None, reason="nix-instantiate is not on PATH (apt-get install nix-bin); CI installs it")


def _load_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_nix", REPO / "tools" / "check_nix.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_nix = _load_checker()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the files the checker reads, to break one at a time."""
    for rel in ("flake.nix", "flake.lock", "pyproject.toml", "pipeline/profile.json",
                "README.md", "docs/nix.md", ".github/workflows/nix.yml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    shutil.copytree(REPO / "nix", tmp_path / "nix")
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"control is stale: {old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _edit_lock(root: Path, change: Callable[[dict], None]) -> None:
    lock = json.loads((root / "flake.lock").read_text(encoding="utf-8"))
    change(lock)
    (root / "flake.lock").write_text(json.dumps(lock, indent=2), encoding="utf-8")


def _lock_problems(root: Path) -> list[str]:
    return list(check_nix.check_lock(root, check_nix.flake_inputs(root, NIX)))


# --- the checks on the real tree -------------------------------------------------------------

@needs_nix
def test_nix_files_parse() -> None:
    """nix-instantiate --parse accepts flake.nix and nix/*.nix."""
    assert check_nix.check_parse(REPO, NIX) == []


def test_lock_matches_inputs() -> None:
    """flake.lock is version 7 and pins every flake input with a well-formed locked node."""
    assert _lock_problems(REPO) == []


def test_profile_single_source() -> None:
    """flake.nix reads pipeline/profile.json and spells none of its variable names."""
    assert check_nix.check_profile(REPO) == []


def test_python_deps_mapped() -> None:
    """Every pyproject.toml dependency, test extra and build requirement maps to a nixpkgs
    attribute the flake uses."""
    assert check_nix.check_deps(REPO) == []


@needs_nix
def test_outputs_against_stub_nixpkgs() -> None:
    """Evaluated against the stand-in nixpkgs, every system has the outputs the project
    promises, with the wrapper and shell environment of its CPU's profile."""
    assert check_nix.check_outputs(REPO, NIX) == []


@needs_nix
def test_input_reader_agrees_with_nix() -> None:
    """The text reader used without Nix finds the inputs Nix evaluates."""
    text = (REPO / "flake.nix").read_text(encoding="utf-8")
    assert check_nix._inputs_from_text(text) == check_nix.flake_inputs(REPO, NIX)


@pytest.mark.process
def test_cli_passes() -> None:
    """`python tools/check_nix.py` exits 0 on this tree."""
    args = [] if NIX else ["--allow-missing-nix"]
    out = subprocess.run([sys.executable, str(REPO / "tools" / "check_nix.py"), *args],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAIL" not in out.stdout


@pytest.mark.process
def test_cli_without_nix(tmp_path: Path) -> None:
    """Without nix-instantiate the checker refuses (exit 2) unless --allow-missing-nix, and then
    says which checks it skipped."""
    env = dict(os.environ, PATH=str(tmp_path))
    cmd = [sys.executable, str(REPO / "tools" / "check_nix.py")]
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and "--allow-missing-nix" in refused.stderr
    allowed = subprocess.run([*cmd, "--allow-missing-nix"], env=env, capture_output=True,
                             text=True, check=False)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "skip parse" in allowed.stdout and "skip outputs" in allowed.stdout


def test_parse_flake_url() -> None:
    """github: URLs become the `original` node Nix writes, ref and rev told apart."""
    rev = "3ceaaa8bc963ced4d830e06ea2d0863b6490ff03"
    assert check_nix.parse_flake_url("github:NixOS/nixpkgs/nixos-25.11") == {
        "type": "github", "owner": "NixOS", "repo": "nixpkgs", "ref": "nixos-25.11"}
    assert check_nix.parse_flake_url(f"github:NixOS/nixpkgs/{rev}")["rev"] == rev
    with pytest.raises(ValueError):
        check_nix.parse_flake_url("nixpkgs")


# --- negative controls: each must make the checker fail ------------------------------------

LOCK_CONTROLS: list[tuple[str, Callable[[dict], None], str]] = [
    ("wrong original URL",
     lambda lock: lock["nodes"]["nixpkgs"]["original"].update(ref="nixos-25.05"), ".original"),
    ("original without ref",
     lambda lock: lock["nodes"]["nixpkgs"]["original"].pop("ref"), ".original"),
    ("narHash not SRI",
     lambda lock: lock["nodes"]["nixpkgs"]["locked"].update(
         narHash="sha256:" + "0" * 52), ".narHash"),
    ("narHash truncated",
     lambda lock: lock["nodes"]["nixpkgs"]["locked"].update(
         narHash=lock["nodes"]["nixpkgs"]["locked"]["narHash"][:-2] + "="), ".narHash"),
    ("short rev",
     lambda lock: lock["nodes"]["nixpkgs"]["locked"].update(rev="3ceaaa8"), ".rev"),
    ("no lastModified",
     lambda lock: lock["nodes"]["nixpkgs"]["locked"].pop("lastModified"), ".lastModified"),
    ("lock version 6", lambda lock: lock.update(version=6), "version"),
    ("root node missing", lambda lock: lock["nodes"].pop("root"), "root node"),
    ("input not locked", lambda lock: lock["nodes"]["root"].update(inputs={}), "no lock node"),
]


@pytest.mark.parametrize(("name", "change", "expect"), LOCK_CONTROLS,
                         ids=[c[0] for c in LOCK_CONTROLS])
def test_lock_controls(tree: Path, name: str, change: Callable[[dict], None],
                       expect: str) -> None:
    """A broken flake.lock fails the lock check, naming what is wrong."""
    _edit_lock(tree, change)
    problems = _lock_problems(tree)
    assert any(expect in p for p in problems), problems


def test_input_moved_without_relock(tree: Path) -> None:
    """Changing the input URL without re-locking fails: `original` no longer matches."""
    _edit(tree / "flake.nix", "nixpkgs/nixos-25.11", "nixpkgs/nixos-unstable")
    assert any(".original" in p for p in _lock_problems(tree))


FLAKE_CONTROLS: list[tuple[str, str, str, str]] = [
    ("hard-coded ATEN_CPU_CAPABILITY", "makeWrapperArgs =\n",
     'makeWrapperArgs = [ "--set" "ATEN_CPU_CAPABILITY" "avx2" ] ++\n',
     "spells ATEN_CPU_CAPABILITY"),
    ("hard-coded profile in a comment", "# One source of truth",
     "# PYTHONHASHSEED=0. One source of truth", "spells PYTHONHASHSEED"),
    ("profile not read from profile.json",
     "builtins.fromJSON (builtins.readFile ./pipeline/profile.json)",
     "builtins.fromJSON (builtins.readFile ./profile.json)", "does not read the profile"),
    ("wrapper sets PIPELINE_CACHE_DIR", "PIPELINE_LOCK_ID = lockId;",
     'PIPELINE_LOCK_ID = lockId; PIPELINE_CACHE_DIR = "/tmp";', "spells PIPELINE_CACHE_DIR"),
    ("system without a profile", '"aarch64-linux" ]', '"aarch64-linux" "riscv64-linux" ]',
     "riscv64-linux has no profile"),
    ("darwin listed", '"aarch64-linux" ]', '"aarch64-linux" "aarch64-darwin" ]',
     "aarch64-darwin: the checks need util-linux and glibc"),
    ("lock id read from flake.lock", 'lockId = "nix:" + nixpkgs.narHash;',
     'lockId = "nix:" + (builtins.fromJSON (builtins.readFile ./flake.lock))'
     '.nodes.nixpkgs.locked.narHash;', "reads ./flake.lock"),
]


@pytest.mark.parametrize(("name", "old", "new", "expect"), FLAKE_CONTROLS,
                         ids=[c[0] for c in FLAKE_CONTROLS])
def test_profile_controls(tree: Path, name: str, old: str, new: str, expect: str) -> None:
    """A flake.nix that bypasses pipeline/profile.json fails the profile check."""
    _edit(tree / "flake.nix", old, new)
    problems = check_nix.check_profile(tree)
    assert any(expect in p for p in problems), problems


def test_unmapped_dependency(tree: Path) -> None:
    """A dependency whose nixpkgs name nobody has verified fails the deps check."""
    _edit(tree / "pyproject.toml", '"tqdm==4.70.1",', '"tqdm==4.70.1",\n    "opencv-python==4.12",')
    problems = check_nix.check_deps(tree)
    assert any("opencv-python" in p for p in problems), problems


def test_build_system_not_in_flake(tree: Path) -> None:
    """The build backend must be in the flake's build-system."""
    _edit(tree / "flake.nix", "build-system = [ ps.setuptools ];", "build-system = [ ];")
    problems = check_nix.check_deps(tree)
    assert any("does not use setuptools" in p for p in problems), problems


@needs_nix
def test_parse_control(tree: Path) -> None:
    """A syntax error in flake.nix fails the parse check."""
    _edit(tree / "flake.nix", "outputs = { self, nixpkgs }:", "outputs = { self, nixpkgs ")
    assert any("flake.nix" in p for p in check_nix.check_parse(tree, NIX))


@needs_nix
def test_outputs_wrong_profile(tree: Path) -> None:
    """A flake that gives every system the x86_64 profile fails the outputs check on aarch64."""
    _edit(tree / "flake.nix", "profiles.${pkgs.stdenv.hostPlatform.parsed.cpu.name}.env",
          "profiles.x86_64.env")
    problems = check_nix.check_outputs(tree, NIX)
    assert any(p.startswith("aarch64-linux: wrapper") for p in problems), problems
    assert not any(p.startswith("x86_64-linux") for p in problems), problems


@needs_nix
def test_outputs_missing_app(tree: Path) -> None:
    """Dropping apps.train fails the outputs check."""
    _edit(tree / "flake.nix", "apps = { inherit train; default = train; };",
          "apps = { default = train; };")
    problems = check_nix.check_outputs(tree, NIX)
    assert any("apps: expected" in p for p in problems), problems


# Each control passes an argument the nixpkgs builder really lacks: a misspelling, or a
# sibling builder's argument (runAsRoot and copyToRoot are dockerTools.buildImage's, not
# streamLayeredImage's: doc/build-helpers/images/dockertools.section.md).
BUILDER_ARG_CONTROLS: list[tuple[str, str, str, str]] = [
    ("misspelt pythonImportsCheck", "pythonImportsCheck = ", "pythonImportCheck = ",
     "buildPythonApplication argument 'pythonImportCheck'"),
    ("misspelt nativeBuildInputs in runCommand",
     'runCommand "pipeline-model" { nativeBuildInputs',
     'runCommand "pipeline-model" { nativeBuildInput',
     "runCommand argument 'nativeBuildInput'"),
    ("misspelt nativeBuildInputs in runCommandCC",
     'runCommandCC "pipeline-determinism" {\n              nativeBuildInputs',
     'runCommandCC "pipeline-determinism" {\n              nativeBuildInput',
     "runCommandCC argument 'nativeBuildInput'"),
    ("buildImage's runAsRoot in streamLayeredImage", 'created = "1970-01-01T00:00:01Z";',
     'created = "1970-01-01T00:00:01Z"; runAsRoot = "mkdir -p /data";',
     "dockerTools.streamLayeredImage argument 'runAsRoot'"),
    ("buildImage's copyToRoot in streamLayeredImage", 'created = "1970-01-01T00:00:01Z";',
     'created = "1970-01-01T00:00:01Z"; copyToRoot = [ ];',
     "dockerTools.streamLayeredImage argument 'copyToRoot'"),
    ("misspelt mkShell packages", "packages = [ devPython ];", "package = [ devPython ];",
     "mkShell argument 'package'"),
]


@needs_nix
def test_arguments_nixpkgs_added_since_2024_are_accepted(tree: Path) -> None:
    """streamLayeredImage's mtime (and the ownership and architecture arguments) are
    nixpkgs' now: the list before issue 25 rejected mtime, a real argument."""
    _edit(tree / "flake.nix", 'created = "1970-01-01T00:00:01Z";',
          'created = "1970-01-01T00:00:01Z"; mtime = "1970-01-01T00:00:01Z"; uid = 0; '
          'architecture = "amd64"; includeNixDB = false;')
    assert check_nix.check_outputs(tree, NIX) == []


@needs_nix
@pytest.mark.parametrize(("name", "old", "new", "expect"), BUILDER_ARG_CONTROLS,
                         ids=[c[0] for c in BUILDER_ARG_CONTROLS])
def test_builder_argument_controls(tree: Path, name: str, old: str, new: str,
                                   expect: str) -> None:
    """An argument name the nixpkgs builder does not accept fails the outputs check, on
    every system, naming the builder and the argument (nixpkgs itself would pass most of
    them on as inert environment variables)."""
    _edit(tree / "flake.nix", old, new)
    problems = check_nix.check_outputs(tree, NIX)
    assert any(expect in p for p in problems), problems


SANDBOX_CONTROLS: list[tuple[str, str, str, str]] = [
    ("golden check without --require", "golden check --require", "golden check",
     "checks.golden: must train"),
    ("golden check of the pinned model only",
     'pipeline train configs/digits-exact.toml --runs-dir "$TMPDIR/exact" --threads 1 --quiet',
     "true", "checks.golden: must train"),
    ("determinism check without util-linux", "(lib.getBin pkgs.util-linux) ", "",
     "util-linux-bin"),
    ("determinism check without localedef", " (lib.getBin pkgs.glibc)", "", "glibc-bin"),
    ("model copies only the weights", "{weights.safetensors,run.json,metrics.jsonl,curves.png,"
     "trail.bin}", "{weights.safetensors,run.json}", "packages.model: expected"),
    # Issue 25: what a real builder would do differently.
    ("determinism check without a C compiler", 'pkgs.runCommandCC "pipeline-determinism"',
     'pkgs.runCommand "pipeline-determinism"', "must be built with runCommandCC"),
    ("unbounded pytest workers", '-n "$workers" --maxprocesses 8', "-n $NIX_BUILD_CORES",
     "--maxprocesses at most 8"),
    ("model on auto threads", '--runs-dir "$TMPDIR/runs" --threads 1 --quiet',
     '--runs-dir "$TMPDIR/runs" --quiet', "explicit --threads N"),
    ("package built from the whole tree", "src = packageSrc;", "src = self;",
     "src must be a lib.fileset source"),
    ("package source with the docs", "packageSrc = files [ ./pyproject.toml",
     "packageSrc = files [ ./docs ./pyproject.toml", "src must be a lib.fileset source"),
    ("wrapper forces PIPELINE_ROOT and CC", '[ "--set-default" n v ]', '[ "--set" n v ]',
     "expected --set-default for"),
    ("no formatter", '"devShells" "formatter" ]', '"devShells" ]', "formatter: none"),
    ("overlay ignores the given nixpkgs",
     "overlays.default = final: _prev: { pipeline = pipelineFor final; };",
     'overlays.default = final: _prev: { pipeline = pipelineFor nixpkgs.legacyPackages'
     '."aarch64-linux"; };', "overlays.default: expected"),
    ("darwin back in the systems", '"aarch64-linux" ]', '"aarch64-linux" "aarch64-darwin" ]',
     "is not available on aarch64-darwin"),
    ("lock id from flake.lock", 'lockId = "nix:" + nixpkgs.narHash;',
     'lockId = "nix:" + (builtins.fromJSON (builtins.readFile ./flake.lock))'
     '.nodes.nixpkgs.locked.narHash;', "PIPELINE_LOCK_ID (the input's narHash)"),
]


@needs_nix
@pytest.mark.parametrize(("name", "old", "new", "expect"), SANDBOX_CONTROLS,
                         ids=[c[0] for c in SANDBOX_CONTROLS])
def test_sandbox_script_controls(tree: Path, name: str, old: str, new: str,
                                 expect: str) -> None:
    """What issues 14 and 25 ask of the flake's derivations, each undone, fails the
    outputs check (evaluated against the stand-in nixpkgs)."""
    _edit(tree / "flake.nix", old, new)
    problems = check_nix.check_outputs(tree, NIX)
    assert any(expect in p for p in problems), problems


def _determinism_script() -> str:
    out = check_nix._stub_outputs(REPO, NIX)
    return str(out["systems"]["x86_64-linux"]["checks"]["determinism"])


@needs_nix
@pytest.mark.parametrize(("cores", "want"), [("1", 1), ("3", 3), ("0", os.cpu_count()),
                                             (None, os.cpu_count())])
def test_the_check_runs_pytest_on_the_builders_cores(cores: str | None, want: int) -> None:
    """The determinism check's worker count, its own shell lines run here: NIX_BUILD_CORES
    as given, 0 or unset (Nix: every core) as the core count, never 0 (which xdist reads
    as no workers at all); --maxprocesses caps it at 8."""
    script = _determinism_script()
    lines = [ln for ln in script.splitlines() if ln.startswith(("workers=", "if [ \"$workers"))]
    assert len(lines) == 2, script
    env = {"PATH": os.environ["PATH"], **({"NIX_BUILD_CORES": cores} if cores else {})}
    p = subprocess.run(["bash", "-c", "\n".join([*lines, 'echo "$workers"'])], env=env,
                       capture_output=True, text=True, timeout=30, check=True)
    assert int(p.stdout) == want
    assert "--maxprocesses 8" in script


def test_docs_ask_for_a_build_before_rebuild() -> None:
    """README.md, docs/nix.md and the CI workflow run `nix build .#model` before
    `nix build .#model --rebuild`, and the workflow runs nix flake check first."""
    assert check_nix.check_docs(REPO) == []


DOCS_CONTROLS: list[tuple[str, str, str, str]] = [
    ("README: rebuild alone", "README.md", "nix build .#model && nix build .#model --rebuild",
     "nix build .#model --rebuild", "README.md:"),
    ("docs: rebuild alone", "docs/nix.md", "nix build .#model && nix build .#model --rebuild",
     "nix build .#model --rebuild", "docs/nix.md:"),
    ("workflow: no first build", ".github/workflows/nix.yml",
     "      - name: nix build .#model\n        run: nix build .#model -L\n", "",
     "no plain `nix build .#model` before it"),
    ("workflow: no flake check", ".github/workflows/nix.yml", "run: nix flake check -L",
     "run: true", "expected `nix flake check`"),
]


@pytest.mark.parametrize(("name", "rel", "old", "new", "expect"), DOCS_CONTROLS,
                         ids=[c[0] for c in DOCS_CONTROLS])
def test_docs_controls(tree: Path, name: str, rel: str, old: str, new: str,
                       expect: str) -> None:
    """A rebuild without a build before it, or a workflow without one of its steps,
    fails the docs check naming the file."""
    _edit(tree / rel, old, new)
    problems = check_nix.check_docs(tree)
    assert any(expect in p for p in problems), problems


def test_no_workflow_fails(tree: Path) -> None:
    (tree / ".github" / "workflows" / "nix.yml").unlink()
    assert any("missing" in p for p in check_nix.check_docs(tree))


@pytest.mark.process
def test_the_wrappers_root_is_enough_to_train_and_check(tmp_path: Path) -> None:
    """PIPELINE_ROOT holds only the runtime source the flake builds (ROOT_SOURCE:
    data, configs, examples, goldens; no code, no requirements.lock): from another
    directory, `pipeline train configs/digits-exact.toml` and `golden check --require`
    (what checks.golden runs) work against it. The control: without tests/golden the
    check finds no entry and fails."""
    root = tmp_path / "root"
    for rel in check_nix.ROOT_SOURCE:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (REPO / rel).is_dir() else shutil.copy2)(REPO / rel, root / rel)
    work = tmp_path / "work"
    work.mkdir()
    env = pipeline_env(tmp_path, clean=True, PIPELINE_ROOT=str(root),
                       PIPELINE_LOCK_ID="nix:sha256-test")
    p = run_pipeline(["train", "configs/digits-exact.toml", "--runs-dir", str(work / "runs"),
                      "--threads", "1", "--json", "--quiet"], env, cwd=work, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    run_dir = str(work / "runs" / json.loads(p.stdout)["run_key"])
    check = run_pipeline(["golden", "check", "--require", run_dir], env, cwd=work)
    assert check.returncode == 0 and check.stdout.startswith("golden match"), check
    shutil.rmtree(root / "tests" / "golden")
    missing = run_pipeline(["golden", "check", "--require", run_dir], env, cwd=work)
    assert missing.returncode == 1, missing


# --- what a real nixpkgs does with the flake's outputs (issue 14), run here -----------------

SHORT_TRAIN = ["train.epochs=2"]


def _train(cmd: list[str], runs: Path, env: dict[str, str], cwd: Path,
           extra: list[str] | None = None) -> dict:
    p = subprocess.run([*cmd, "train", "configs/digits.toml", *(extra or SHORT_TRAIN),
                        "--runs-dir", str(runs), "--json", "--quiet"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, \
        f"{cmd[-1]} train: exit {p.returncode}\n{p.stdout}\n{p.stderr[-4000:]}"
    return dict(json.loads(p.stdout))


@pytest.mark.process
def test_source_date_epoch_makes_two_trainings_byte_identical(tmp_path: Path) -> None:
    """With SOURCE_DATE_EPOCH set (nixpkgs' stdenv sets it in packages.model's sandbox),
    two trainings of one run write byte-identical files, every file the model derivation
    copies to $out included: run.json takes created_utc from it and leaves duration_s and
    loop_s out.
    This is what `nix build .#model --rebuild` compares."""
    env = dict(pipeline_env(tmp_path, clean=True), SOURCE_DATE_EPOCH="315532800")
    records = [_train(pipeline_argv(), tmp_path / f"runs{i}", env, REPO)
               for i in range(2)]
    assert records[0]["created_utc"] == "1980-01-01T00:00:00Z", records[0]["created_utc"]
    for key in ("duration_s", "loop_s"):
        assert key not in records[0], f"{key} is wall-clock time: two builds differ"
    dirs = [tmp_path / f"runs{i}" / r["run_key"] for i, r in enumerate(records)]
    for name in MODEL_FILES:
        a, b = ((d / name).read_bytes() for d in dirs)
        assert a == b, f"{name}: differs between two trainings with SOURCE_DATE_EPOCH set"


def test_source_date_epoch_leaves_out_the_timed_thread_choice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--threads auto` picks the shard pool by timing the first step: a busy machine
    chose 1 where a quiet one chose 2, and run.json differed between two builds (CI).
    Under SOURCE_DATE_EPOCH that outcome is left out; an asked-for count is kept, and
    without the variable everything is (the controls)."""
    auto = {"requested": "auto", "shard_threads": 2, "op_threads": 1}
    asked = {"requested": 2, "shard_threads": 2, "op_threads": 1}
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert runs._threads(auto) == auto and runs._threads(asked) == asked
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    assert runs._threads(auto) == {"requested": "auto", "op_threads": 1}
    assert runs._threads(asked) == asked and runs._threads(None) is None
    # A pool chosen by that timing that fell back to shards in order (a random op without
    # a generator argument) records why; a quiet machine never had the pool: left out too.
    fell = {**auto, "shard_threads": 1, "fallback": "aten.native_dropout draws ..."}
    assert runs._threads(fell) == {"requested": "auto", "op_threads": 1}
    assert runs._threads({**asked, "fallback": "x"}) == {**asked, "fallback": "x"}
    # Whether exact mode's native kernels compiled within their time limit (a loaded
    # builder can time out; the torch implementation gives the same bits): left out too.
    exact = {"requested": 2, "shard_threads": 1, "op_threads": 2,
             "exact_kernels": "off: cc could not build kernels.c (timed out after 120 s)"}
    assert runs._threads(exact) == {k: v for k, v in exact.items() if k != "exact_kernels"}
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert runs._threads(fell) == fell and runs._threads(exact) == exact


@pytest.mark.process
def test_source_date_epoch_must_be_an_integer(tmp_path: Path) -> None:
    """A malformed SOURCE_DATE_EPOCH is a usage error (exit 2) naming the variable."""
    env = dict(pipeline_env(tmp_path, clean=True), SOURCE_DATE_EPOCH="yesterday")
    p = run_pipeline(["train", "configs/digits.toml", "mode=exact", "train.epochs=1",
                      "--runs-dir", str(tmp_path / "runs"), "--quiet"], env, timeout=600)
    assert p.returncode == 2 and "SOURCE_DATE_EPOCH" in p.stderr, (p.returncode, p.stderr)


def _model_files() -> list[str]:
    """The files flake.nix's packages.model copies to $out (its `cp` line)."""
    text = (REPO / "flake.nix").read_text(encoding="utf-8")
    match = re.search(r'cp "\$TMPDIR"/runs/\*/\{([^}]*)\} \$out/', text)
    assert match, "flake.nix: packages.model's `cp .../runs/*/{...} $out/` line not found"
    return match.group(1).split(",")


MODEL_FILES = _model_files()


def _wrap_python(tmp: Path, env_set: dict[str, str]) -> Path:
    """`bin/pipeline` as nixpkgs' wrap-python writes it (pkgs/development/interpreters/python/
    wrap-python.nix and wrap.sh): a makeWrapper shell script that sets PYTHONNOUSERSITE (and
    the makeWrapperArgs --set variables) and execs `.pipeline-wrapped`, whose shebang is the
    bare interpreter and whose first line puts the dependencies on sys.path with
    site.addsitedir. The interpreter itself (a virtualenv without site packages here, the
    python3 store path there) knows none of them."""
    bare = tmp / "bare-python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True,
                   timeout=120)
    python = bare / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True,
                           cwd=tmp, check=False)
    assert probe.returncode != 0, "the bare interpreter imports torch: the test could not fail"
    sites = [str(REPO), *(p for p in sys.path if p.endswith("site-packages"))]
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    wrapped = bin_dir / ".pipeline-wrapped"
    wrapped.write_text(
        f"#!{python}\n"
        f"import sys;import site;import functools;sys.argv[0] = '{bin_dir / 'pipeline'}';"
        f"functools.reduce(lambda k, p: site.addsitedir(p, k), {sites!r}, "
        f"site._init_pathinfo())\n"
        "import sys\nfrom pipeline.cli import main\nif __name__ == '__main__':\n"
        "    sys.exit(main())\n", encoding="utf-8")
    sets = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env_set.items())
    wrapper = bin_dir / "pipeline"
    wrapper.write_text(f"#!{shutil.which('bash')} -e\nexport PYTHONNOUSERSITE='true'\n{sets}"
                       f'exec -a "$0" "{wrapped}" "$@"\n', encoding="utf-8")
    for f in (wrapped, wrapper):
        f.chmod(0o755)
    return wrapper


@pytest.mark.process
def test_wrapped_like_wrap_python_train_reexecs_into_the_profile(tmp_path: Path) -> None:
    """Under a wrap-python wrapper without the profile, `pipeline train` re-executes itself
    (sys.executable -m pipeline) into the pinned profile: the child gets the dependencies'
    paths and trains the same weights as the virtualenv's pipeline."""
    env = pipeline_env(tmp_path, clean=True)
    wrapper = _wrap_python(tmp_path, {})
    work = tmp_path / "work"  # not the checkout: the working directory imports nothing
    work.mkdir()
    wrapped = _train([str(wrapper)], work / "runs", env, work)
    assert wrapped["profile"]["name"] == load_profile().name, wrapped["profile"]
    plain = _train(pipeline_argv(), tmp_path / "plain", env, REPO)
    assert wrapped["weights_sha256"] == plain["weights_sha256"]


@pytest.mark.process
def test_wrapped_like_wrap_python_nproc_2_workers_import_the_package(tmp_path: Path) -> None:
    """Under a wrap-python wrapper that sets the profile (as flake.nix's makeWrapperArgs do,
    so nothing re-executes), `pipeline train --nproc 2` starts torchrun's workers
    (sys.executable -m pipeline.launch), and they import torch and the pipeline."""
    env = pipeline_env(tmp_path, clean=True)
    wrapper = _wrap_python(tmp_path, load_profile().env)
    work = tmp_path / "work"
    work.mkdir()
    record = _train([str(wrapper)], work / "runs", env, work,
                    [*SHORT_TRAIN, "train.shards=2", "--nproc", "2"])
    assert record["world_size"] == 2, record.get("world_size")


@pytest.mark.process
def test_golden_check_require_fails_without_an_entry(tmp_path: Path) -> None:
    """`golden check` passes with "no golden entry" (exit 0); with --require (what
    checks.golden runs) no entry is exit 1; a matching entry is exit 0 and a differing one
    exit 1 either way."""
    env = pipeline_env(tmp_path, clean=True)
    record = _train(pipeline_argv(), tmp_path / "runs", env, REPO,
                    ["mode=exact", "train.epochs=1"])
    run_dir = str(tmp_path / "runs" / record["run_key"])
    golden = tmp_path / "weights.json"

    def check(*flags: str) -> subprocess.CompletedProcess[str]:
        return run_pipeline(["golden", "check", *flags, run_dir, "--file", str(golden)], env)

    lax, strict = check(), check("--require")
    assert lax.returncode == 0 and lax.stdout.startswith("no golden entry"), lax
    assert strict.returncode == 1 and "--require" in strict.stderr, strict
    run_pipeline(["golden", "add", run_dir, "--file", str(golden)], env, check=True)
    match = check("--require")
    assert match.returncode == 0 and match.stdout.startswith("golden match"), match
    data = json.loads(golden.read_text(encoding="utf-8"))
    data["entries"][0]["weights_sha256"] = "0" * 64
    golden.write_text(json.dumps(data), encoding="utf-8")
    assert check().returncode == 1 and check("--require").returncode == 1


def test_clean_env_keeps_the_lock_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The determinism suite's reference environment keeps PIPELINE_LOCK_ID (set by the Nix
    check and dev shell: it names the toolchain) and drops the test-only switches."""
    from ..support.machines import clean_env

    monkeypatch.setenv("PIPELINE_LOCK_ID", "nix:sha256-test")
    monkeypatch.setenv("PIPELINE_TEST_NO_PIN", "1")
    env = clean_env(tmp_path)
    assert env.get("PIPELINE_LOCK_ID") == "nix:sha256-test", sorted(env)
    assert "PIPELINE_TEST_NO_PIN" not in env
