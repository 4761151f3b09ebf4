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
    for rel in ("flake.nix", "flake.lock", "pyproject.toml", "pipeline/profile.json"):
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
    ("hard-coded ATEN_CPU_CAPABILITY", "makeWrapperArgs = ",
     'makeWrapperArgs = [ "--set" "ATEN_CPU_CAPABILITY" "avx2" ] ++ ',
     "spells ATEN_CPU_CAPABILITY"),
    ("hard-coded profile in a comment", "# One source of truth",
     "# PYTHONHASHSEED=0. One source of truth", "spells PYTHONHASHSEED"),
    ("profile not read from profile.json",
     "builtins.fromJSON (builtins.readFile ./pipeline/profile.json)",
     "builtins.fromJSON (builtins.readFile ./profile.json)", "does not read the profile"),
    ("wrapper sets PIPELINE_CACHE_DIR", "PIPELINE_LOCK_ID = lockId;",
     'PIPELINE_LOCK_ID = lockId; PIPELINE_CACHE_DIR = "/tmp";', "spells PIPELINE_CACHE_DIR"),
    ("system without a profile", '"aarch64-darwin" ]', '"aarch64-darwin" "riscv64-linux" ]',
     "riscv64-linux has no profile"),
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


BUILDER_ARG_CONTROLS: list[tuple[str, str, str, str]] = [
    ("misspelt pythonImportsCheck", "pythonImportsCheck = ", "pythonImportCheck = ",
     "buildPythonApplication argument 'pythonImportCheck'"),
    ("misspelt nativeBuildInputs in runCommand",
     'runCommand "pipeline-model" { nativeBuildInputs',
     'runCommand "pipeline-model" { nativeBuildInput',
     "runCommand argument 'nativeBuildInput'"),
    ("unknown streamLayeredImage argument", 'created = "1970-01-01T00:00:01Z";',
     'created = "1970-01-01T00:00:01Z"; mtime = "1970-01-01T00:00:01Z";',
     "dockerTools.streamLayeredImage argument 'mtime'"),
    ("misspelt mkShell packages", "packages = [ devPython ];", "package = [ devPython ];",
     "mkShell argument 'package'"),
]


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
     'pipeline train configs/digits-exact.toml --runs-dir "$TMPDIR/exact" --quiet', "true",
     "checks.golden: must train"),
    ("determinism check without util-linux", "(lib.getBin pkgs.util-linux) ", "",
     "util-linux-bin"),
    ("determinism check without localedef", " (lib.getBin pkgs.glibc)", "", "glibc-bin"),
    ("model copies only the weights", "{weights.safetensors,run.json,metrics.jsonl,curves.png,"
     "trail.bin}", "{weights.safetensors,run.json}", "packages.model: expected"),
]


@needs_nix
@pytest.mark.parametrize(("name", "old", "new", "expect"), SANDBOX_CONTROLS,
                         ids=[c[0] for c in SANDBOX_CONTROLS])
def test_sandbox_script_controls(tree: Path, name: str, old: str, new: str,
                                 expect: str) -> None:
    """The checks issue 14 asks of the sandbox scripts fail when one is undone."""
    _edit(tree / "flake.nix", old, new)
    problems = check_nix.check_outputs(tree, NIX)
    assert any(expect in p for p in problems), problems


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
