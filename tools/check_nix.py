#!/usr/bin/env python3
"""Check the Nix side of the project without nixpkgs (stdlib only).

    python tools/check_nix.py [--root DIR] [--allow-missing-nix]

Checks (each returns a list of problems; an empty list is a pass):

parse    ``nix-instantiate --parse`` accepts flake.nix and every nix/*.nix.
lock     flake.lock is lock format 7 with a root node; every input of
         flake.nix has a lock node whose ``original`` equals the input URL
         exactly (otherwise Nix re-locks, which needs the network) and whose
         ``locked`` has type/owner/repo, a 40-hex rev, an SRI sha256 narHash
         and lastModified.
profile  flake.nix reads ./pipeline/profile.json with builtins.fromJSON,
         spells none of the profile's variable names itself (one source of
         truth), sets the wrapper with makeWrapperArgs --set, never sets
         PIPELINE_CACHE_DIR, and every system it lists has a profile.
deps     every name in pyproject.toml's [project].dependencies, the ``test``
         extra and [build-system].requires is a verified python3Packages
         attribute that flake.nix uses (by name, or by reading pyproject.toml
         with builtins.fromTOML).
outputs  (needs nix-instantiate) the flake's outputs, evaluated against the
         stand-in nixpkgs in nix/stub-nixpkgs.nix: the outputs each system
         must have; wrapper and dev-shell environments equal to the profile
         for that system's CPU; dependencies equal to pyproject.toml's; the
         sandbox scripts (exact-mode golden check with --require, the
         determinism check's util-linux and localedef, the model's files);
         every argument name passed to a nixpkgs builder is one that builder
         accepts (NIXPKGS_BUILDER_ARGS, read from the nixpkgs sources).

Nothing here builds or evaluates real nixpkgs. Exit status: 0 all pass,
1 a check failed, 2 nix-instantiate is missing (and --allow-missing-nix was
not given).
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
STUB = REPO / "nix" / "stub-nixpkgs.nix"

# python3Packages attribute names checked by hand against nixpkgs
# (pkgs/top-level/python-packages.nix and pkgs/development/python-modules/<name>).
# A new dependency fails the deps check until its nixpkgs name is verified here.
NIXPKGS_PYTHON_ATTRS = (
    "torch", "numpy", "filelock", "safetensors", "tqdm",
    "pytest", "pytest-xdist", "hypothesis", "setuptools",
    # pkgs/development/python-modules/pytest-timeout/default.nix (python3Packages.pytest-timeout)
    "pytest-timeout",
    # pkgs/development/python-modules/pillow/default.nix (python3Packages.pillow)
    "pillow",
)

# The argument names each nixpkgs builder the flake calls accepts, read from the nixpkgs
# sources (github:NixOS/nixpkgs, files named below; the flake locks nixos-25.11 at rev
# 3ceaaa8bc963ced4d830e06ea2d0863b6490ff03). The versions read were those the project's
# source search stores, not checked out at that rev: mk-python-derivation.nix with the
# PEP 621 names (dependencies, build-system: 24.05 and later), streamLayeredImage from an
# older release, so its list may lack names 25.11 added (a missing name fails here, which
# errs on the safe side). Most of these builders hand unknown names to
# stdenv.mkDerivation as environment variables, so a misspelt argument
# (`pythonImportCheck`) evaluates, builds and silently does nothing: this table is what
# catches it. An "ENV" entry: any ALL_CAPS environment variable name is accepted too.
NIXPKGS_BUILDER_ARGS: dict[str, tuple[str, ...]] = {
    # pkgs/development/interpreters/python/mk-python-derivation.nix: the named arguments
    # of the function (buildPythonApplication is it with namePrefix = ""), the attrs it
    # reads with `attrs ? ...` (pythonRelaxDeps, pythonRemoveDeps, disabledTests,
    # pytestFlags, checkPhase, postFixup, passthru); pythonImportsCheck is read by
    # hooks/python-imports-check-hook.sh, pypaBuildFlags by hooks/pypa-build-hook.sh;
    # pname, version, src, postPatch and preBuild are stdenv.mkDerivation's
    # (pkgs/stdenv/generic/make-derivation.nix).
    "buildPythonApplication": (
        "nativeBuildInputs", "buildInputs", "checkInputs", "nativeCheckInputs",
        "propagatedBuildInputs", "dependencies", "optional-dependencies", "build-system",
        "pythonPath", "strictDeps", "outputs", "disabled", "catchConflicts",
        "makeWrapperArgs", "dontWrapPythonPrograms", "dontUsePipInstall", "permitUserSite",
        "removeBinBytecode", "pyproject", "format", "meta", "doCheck", "disabledTestPaths",
        "stdenv", "pythonRelaxDeps", "pythonRemoveDeps", "disabledTests", "pytestFlags",
        "pytestFlagsArray", "checkPhase", "postFixup", "passthru", "pythonImportsCheck",
        "pypaBuildFlags", "pname", "version", "src", "name", "postPatch", "preBuild"),
    # pkgs/build-support/trivial-builders/default.nix: runCommand = name: env: buildCommand;
    # env goes to stdenv.mkDerivation (pkgs/stdenv/generic/make-derivation.nix).
    "runCommand": ("ENV", "nativeBuildInputs", "buildInputs", "passthru", "meta",
                   "preferLocalBuild", "allowSubstitutes"),
    # pkgs/build-support/mkshell/default.nix: its named arguments, and shellHook, which it
    # merges with the inputsFrom hooks.
    "mkShell": ("ENV", "name", "packages", "inputsFrom", "buildInputs", "nativeBuildInputs",
                "propagatedBuildInputs", "propagatedNativeBuildInputs", "shellHook"),
    # pkgs/build-support/docker/default.nix: streamLayeredImage's named arguments. It has no
    # `...`: an unknown name is an evaluation error there too.
    "dockerTools.streamLayeredImage": (
        "name", "tag", "fromImage", "contents", "config", "created", "extraCommands",
        "fakeRootCommands", "enableFakechroot", "maxLayers", "includeStorePaths", "passthru"),
    # writeShellScript = name: text (trivial-builders) and python.withPackages = f
    # (pkgs/development/interpreters/python/with-packages.nix) take positional arguments:
    # nothing to check by name.
}
ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]*")

PROFILE_READ = re.compile(
    r"builtins\.fromJSON\s*\(\s*builtins\.readFile\s+\./pipeline/profile\.json\s*\)")
PYPROJECT_READ = re.compile(
    r"builtins\.fromTOML\s*\(\s*builtins\.readFile\s+\./pyproject\.toml\s*\)")
SYSTEM = re.compile(r'"([a-z0-9_]+)-(linux|darwin)"')
REV = re.compile(r"[0-9a-f]{40}")
NAR_HASH = re.compile(r"sha256-[A-Za-z0-9+/]{43}=")
NOT_SET_BY_WRAPPER = ("PIPELINE_CACHE_DIR",)

Problems = list[str]


STUB_CC = "/stub/gcc-wrapper/bin/cc"  # nix/stub-nixpkgs.nix's stdenv.cc, bin/cc

def nix_files(root: Path) -> list[Path]:
    return [root / "flake.nix", *sorted((root / "nix").glob("*.nix"))]


def pyattr(requirement: str) -> str:
    """'pytest_xdist==3.8.0' -> 'pytest-xdist': the same rule flake.nix applies."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(0).lower().replace("_", "-").replace(".", "-")


def parse_flake_url(url: str) -> dict[str, str]:
    """The ``original`` node Nix writes for a github: flake URL.

    'github:NixOS/nixpkgs/nixos-25.11' ->
    {'type': 'github', 'owner': 'NixOS', 'repo': 'nixpkgs', 'ref': 'nixos-25.11'}
    """
    scheme, _, rest = url.partition(":")
    if scheme != "github":
        raise ValueError(f"{url!r}: only github: inputs are checked; pin others by hand")
    path, _, query = rest.partition("?")
    parts = path.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"{url!r}: expected github:OWNER/REPO[/REF-OR-REV]")
    node = {"type": "github", "owner": parts[0], "repo": parts[1]}
    if len(parts) == 3:
        node["rev" if REV.fullmatch(parts[2]) else "ref"] = parts[2]
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key not in ("ref", "rev", "dir"):
            raise ValueError(f"{url!r}: query parameter {key!r} is not checked")
        node[key] = value
    return node


def _inputs_from_text(text: str) -> dict[str, Any]:
    """Input URLs as written: `inputs.X.url = "..."` or inside `inputs = { ... };`."""
    found = dict(re.findall(r'\binputs\.([A-Za-z_][\w-]*)\.url\s*=\s*"([^"]*)"', text))
    block = re.search(r"\binputs\s*=\s*\{(.*?)\};", text, re.DOTALL)
    if block:
        body = block.group(1)
        found.update(re.findall(r'([A-Za-z_][\w-]*)\.url\s*=\s*"([^"]*)"', body))
        found.update(re.findall(r'([A-Za-z_][\w-]*)\s*=\s*\{[^{}]*?\burl\s*=\s*"([^"]*)"', body))
    return {name: {"url": url} for name, url in found.items()}


def flake_inputs(root: Path, nix: str | None) -> dict[str, Any]:
    """flake.nix's `inputs`: evaluated when Nix is present, else read from the text."""
    if nix is None:
        return _inputs_from_text((root / "flake.nix").read_text(encoding="utf-8"))
    expr = f'(import (/. + "{root / "flake.nix"}")).inputs or {{ }}'
    out = subprocess.run([nix, "--eval", "--strict", "--json", "-E", expr],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise ValueError(f"evaluating flake.nix's inputs failed: {out.stderr.strip()}")
    return dict(json.loads(out.stdout))


def check_parse(root: Path, nix: str) -> Problems:
    problems = []
    for path in nix_files(root):
        out = subprocess.run([nix, "--parse", str(path)], capture_output=True, text=True,
                             check=False)
        if out.returncode != 0:
            problems.append(f"{path.name}: nix-instantiate --parse failed: {out.stderr.strip()}")
    return problems


def _check_locked(name: str, locked: Any, original: dict[str, str]) -> Problems:
    where = f"flake.lock: nodes.{name}.locked"
    if not isinstance(locked, dict):
        return [f"{where}: missing"]
    problems = [f"{where}.{key}: expected {original[key]!r}, found {locked.get(key)!r}"
                for key in ("type", "owner", "repo") if locked.get(key) != original[key]]
    rev = locked.get("rev")
    if not (isinstance(rev, str) and REV.fullmatch(rev)):
        problems.append(f"{where}.rev: expected 40 lowercase hex digits, found {rev!r}")
    elif "rev" in original and rev != original["rev"]:
        problems.append(f"{where}.rev: expected {original['rev']!r} (pinned in the URL), "
                        f"found {rev!r}")
    nar = locked.get("narHash")
    if not (isinstance(nar, str) and NAR_HASH.fullmatch(nar)
            and len(base64.b64decode(nar[len("sha256-"):])) == 32):
        problems.append(f"{where}.narHash: expected an SRI hash 'sha256-<44 base64 chars>', "
                        f"found {nar!r}")
    modified = locked.get("lastModified")
    if isinstance(modified, bool) or not isinstance(modified, int) or modified <= 0:
        problems.append(f"{where}.lastModified: expected a positive integer, found {modified!r}")
    return problems


def check_lock(root: Path, inputs: dict[str, Any]) -> Problems:
    try:
        lock = json.loads((root / "flake.lock").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return [f"flake.lock: cannot read as JSON: {err}"]
    problems = []
    if lock.get("version") != 7:
        problems.append(f"flake.lock: version: expected 7, found {lock.get('version')!r}")
    nodes, root_name = lock.get("nodes"), lock.get("root")
    if not isinstance(nodes, dict) or root_name not in nodes:
        return [*problems, f"flake.lock: root node {root_name!r} is not in nodes"]
    locked_inputs = nodes[root_name].get("inputs", {})
    for name in sorted(set(locked_inputs) - set(inputs)):
        problems.append(f"flake.lock: root input {name!r} is not an input of flake.nix")
    for name, spec in sorted(inputs.items()):
        node_name = locked_inputs.get(name)
        if not isinstance(node_name, str) or node_name not in nodes:
            problems.append(f"flake.lock: no lock node for input {name!r} (root.inputs: "
                            f"{node_name!r})")
            continue
        try:
            expected = (parse_flake_url(spec["url"]) if "url" in spec else
                        {k: v for k, v in spec.items() if k not in ("flake", "inputs")})
        except ValueError as err:
            problems.append(f"flake.nix: input {name!r}: {err}")
            continue
        node = nodes[node_name]
        if node.get("original") != expected:
            problems.append(
                f"flake.lock: nodes.{node_name}.original is {json.dumps(node.get('original'))}, "
                f"but input {name!r} is {spec.get('url', spec)!r}, i.e. {json.dumps(expected)}; "
                f"they must match exactly or Nix re-locks (which needs the network)")
        problems += _check_locked(node_name, node.get("locked"), expected)
    return problems


def check_profile(root: Path) -> Problems:
    text = (root / "flake.nix").read_text(encoding="utf-8")
    profiles = json.loads((root / "pipeline" / "profile.json").read_text(encoding="utf-8"))
    profiles = profiles["profiles"]
    problems = []
    if not PROFILE_READ.search(text):
        problems.append("flake.nix: does not read the profile with "
                        "builtins.fromJSON (builtins.readFile ./pipeline/profile.json)")
    if "makeWrapperArgs" not in text or '"--set"' not in text:
        problems.append("flake.nix: the wrapper must set the profile with makeWrapperArgs --set")
    names = sorted({n for p in profiles.values() for n in p["env"]} | set(NOT_SET_BY_WRAPPER))
    for path in nix_files(root):
        body = path.read_text(encoding="utf-8")
        for name in names:
            if re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", body):
                why = ("the wrapper must leave it unset" if name in NOT_SET_BY_WRAPPER else
                       "profile variables come only from pipeline/profile.json")
                problems.append(f"{path.relative_to(root)}: spells {name}; {why}")
    systems = SYSTEM.findall(text)
    if not systems:
        problems.append("flake.nix: lists no systems")
    for cpu, kernel in systems:
        if cpu not in profiles:
            problems.append(f"flake.nix: system {cpu}-{kernel} has no profile in "
                            f"pipeline/profile.json (profiles: {sorted(profiles)})")
    return problems


def _requirements(root: Path) -> tuple[list[str], list[str], list[str]]:
    """(runtime, test extra, build-system) requirement strings of pyproject.toml."""
    data = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    project = data.get("project", {})
    return (list(project.get("dependencies", [])),
            list(project.get("optional-dependencies", {}).get("test", [])),
            list(data.get("build-system", {}).get("requires", [])))


def check_deps(root: Path) -> Problems:
    text = (root / "flake.nix").read_text(encoding="utf-8")
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_'-]*", text))
    derived = bool(PYPROJECT_READ.search(text))
    runtime, test, build = _requirements(root)
    problems = []
    for kind, reqs in (("dependencies", runtime), ("test extra", test),
                       ("build-system", build)):
        for req in reqs:
            attr = pyattr(req)
            if attr not in NIXPKGS_PYTHON_ATTRS:
                problems.append(
                    f"pyproject.toml {kind}: {req!r} -> python3Packages.{attr} is not a verified "
                    f"nixpkgs attribute; look its name up in nixpkgs, then add it to "
                    f"NIXPKGS_PYTHON_ATTRS in tools/check_nix.py (or map it in flake.nix)")
            elif (kind == "build-system" or not derived) and attr not in words:
                problems.append(f"flake.nix: does not use {attr} ({kind} {req!r})")
    if derived and not {"dependencies", "optional-dependencies"} <= words:
        problems.append("flake.nix: reads pyproject.toml but not both [project].dependencies "
                        "and the test extra")
    return problems


def _stub_outputs(root: Path, nix: str) -> dict[str, Any]:
    attrs = " ".join(f'"{a}"' for a in NIXPKGS_PYTHON_ATTRS)
    expr = (f'import (/. + "{STUB}") {{ flake = /. + "{root / "flake.nix"}"; '
            f"pythonAttrs = [ {attrs} ]; }}")
    out = subprocess.run([nix, "--eval", "--strict", "--json", "-E", expr],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise ValueError(out.stderr.strip())
    return dict(json.loads(out.stdout))


def _set_pairs(args: list[str]) -> dict[str, str] | None:
    if len(args) % 3 or any(flag != "--set" for flag in args[::3]):
        return None
    return dict(zip(args[1::3], args[2::3], strict=True))


def _exports(hook: str) -> dict[str, str]:
    """`export K=V` / `export K='V'` lines (lib.escapeShellArg quotes only unsafe values)."""
    pairs = re.findall(r"^export (\w+)=(?:'([^']*)'|([^\s'\\]*))$", hook, re.MULTILINE)
    return {k: quoted or bare for k, quoted, bare in pairs}


def _check_system(system: str, got: dict[str, Any], names: dict[str, Any],
                  want: dict[str, Any]) -> Problems:
    cpu = system.split("-")[0]
    env = dict(want["profiles"][cpu]["env"], PIPELINE_LOCK_ID=want["lock_id"])
    p = []
    expect_pkgs = {"default", "model"} | ({"image"} if system.endswith("-linux") else set())
    if set(names["packages"][system]) != expect_pkgs:
        p.append(f"packages: expected {sorted(expect_pkgs)}, found {names['packages'][system]}")
    for output, expected in (("apps", {"default", "train"}),
                             ("checks", {"determinism", "golden"}),
                             ("devShells", {"default"})):
        if not expected <= set(names[output].get(system, [])):
            p.append(f"{output}: expected at least {sorted(expected)}, found "
                     f"{names[output].get(system)}")
    wrapper = _set_pairs(got["wrapper"])
    # CC: nixpkgs' compiler for exact mode's native kernels (pipeline/exact/native.py).
    if wrapper != dict(env, PIPELINE_ROOT=want["source"], CC=STUB_CC):
        p.append(f"wrapper: expected --set for exactly the {cpu} profile, PIPELINE_LOCK_ID, "
                 f"PIPELINE_ROOT and CC (stdenv.cc's bin/cc), found {got['wrapper']}")
    if _exports(got["shellHook"]) != env:
        p.append(f"devShell: shellHook must export the {cpu} profile and PIPELINE_LOCK_ID, "
                 f"found {got['shellHook']!r}")
    for name, app in got["apps"].items():
        if app["type"] != "app" or not app["description"] or 'train "$@"' not in app["program"]:
            p.append(f"apps.{name}: expected a described app that runs `pipeline train`, "
                     f"found {app}")
    determinism = got["checks"].get("determinism", "")
    if not all(s in determinism for s in ("-m determinism", "export HOME=$TMPDIR")):
        p.append("checks.determinism: must run `pytest -m determinism` with HOME=$TMPDIR")
    if "golden check" not in got["checks"].get("golden", ""):
        p.append("checks.golden: must run `pipeline golden check`")
    if got["dependencies"] != want["runtime"] or got["shellPackages"] != [want["dev"]]:
        p.append(f"python packages: expected {want['runtime']} (+ {want['dev']} in the shell), "
                 f"found {got['dependencies']} / {got['shellPackages']}")
    if got["buildSystem"] != want["build"]:
        p.append(f"build-system: expected {want['build']}, found {got['buildSystem']}")
    p += _check_sandbox_scripts(got)
    p += _check_builder_args(got["calls"])
    image = got["image"]
    if image is not None and (image.get("created") in (None, "now")
                              or image["config"].get("WorkingDir") != "/work"
                              or image["config"].get("Entrypoint", [])[-1:] != ["train"]):
        p.append(f"image: expected a fixed `created`, WorkingDir /work and an entrypoint "
                 f"that trains, found {image}")
    return [f"{system}: {x}" for x in p]


def _check_sandbox_scripts(got: dict[str, Any]) -> Problems:
    """What issue 14 found a real nixpkgs would need from the derivations' scripts."""
    p = []
    golden = got["checks"].get("golden", "")
    if not re.search(r"pipeline train configs/digits-exact\.toml\b", golden) or \
            "golden check --require" not in golden:
        p.append("checks.golden: must train configs/digits-exact.toml in the sandbox and run "
                 "`pipeline golden check --require` on it (no entry must fail), found "
                 f"{golden!r}")
    inputs = got["checkInputs"].get("determinism", [])
    for tool, pkg in (("taskset, unshare", "util-linux-bin"), ("localedef", "glibc-bin")):
        if pkg not in inputs:
            p.append(f"checks.determinism: nativeBuildInputs must include {pkg} ({tool}; "
                     f"machine simulations skip without it), found {inputs}")
    if "LOCALE_ARCHIVE" not in got["checkEnv"].get("determinism", {}):
        p.append("checks.determinism: expected LOCALE_ARCHIVE (glibcLocales), found none")
    copied = re.search(r"/runs/\*/\{([^}]*)\} \$out/", got["model"])
    want = ["weights.safetensors", "run.json", "metrics.jsonl", "curves.png", "trail.bin"]
    if copied is None or sorted(copied.group(1).split(",")) != sorted(want):
        p.append(f"packages.model: expected `cp .../runs/*/{{{','.join(want)}}} $out/` "
                 f"(the files tests/system/test_nix.py proves identical across trainings), found "
                 f"{got['model']!r}")
    return p


def _check_builder_args(calls: dict[str, Any]) -> Problems:
    """Every argument name the flake passes is one nixpkgs' builder accepts."""
    p = []
    for builder, found in sorted(calls.items()):
        known = NIXPKGS_BUILDER_ARGS[builder]
        lists = found if found and isinstance(found[0], list) else [found]
        for names in lists:
            for name in names:
                if name in known or ("ENV" in known and ENV_NAME.fullmatch(name)):
                    continue
                p.append(f"flake.nix: {builder} argument {name!r} is not one nixpkgs accepts "
                         f"(expected one of {sorted(set(known) - {'ENV'})}; see "
                         f"NIXPKGS_BUILDER_ARGS in tools/check_nix.py for the sources)")
    return p


def check_outputs(root: Path, nix: str) -> Problems:
    try:
        out = _stub_outputs(root, nix)
    except ValueError as err:
        return [f"flake.nix: evaluating outputs against nix/stub-nixpkgs.nix failed: {err}"]
    runtime, test, build = _requirements(root)
    lock = json.loads((root / "flake.lock").read_text(encoding="utf-8"))
    want = {
        "profiles": json.loads((root / "pipeline" / "profile.json").read_text())["profiles"],
        "lock_id": "nix:" + lock["nodes"]["nixpkgs"]["locked"]["narHash"],
        "source": out["source"],
        "runtime": [pyattr(r) for r in runtime],
        "dev": [pyattr(r) for r in runtime + test],
        "build": [pyattr(r) for r in build],
    }
    problems = []
    for system in sorted(out["systems"]):
        problems += _check_system(system, out["systems"][system], out["names"], want)
    return problems


def run_checks(root: Path, nix: str | None) -> dict[str, Problems | None]:
    """Every check by name; None where it was skipped for want of Nix."""
    def lock() -> Problems:
        try:
            return check_lock(root, flake_inputs(root, nix))
        except ValueError as err:
            return [f"flake.nix: {err}"]

    checks: dict[str, Callable[[], Problems] | None] = {
        "parse": (lambda: check_parse(root, nix)) if nix else None,
        "lock": lock,
        "profile": lambda: check_profile(root),
        "deps": lambda: check_deps(root),
        "outputs": (lambda: check_outputs(root, nix)) if nix else None,
    }
    return {name: (fn() if fn else None) for name, fn in checks.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO, help="repository root")
    parser.add_argument("--allow-missing-nix", action="store_true",
                        help="skip the checks that need nix-instantiate instead of failing")
    args = parser.parse_args(argv)
    nix = shutil.which("nix-instantiate")
    if nix is None and not args.allow_missing_nix:
        print("error: nix-instantiate is not on PATH, so flake.nix cannot be parsed. Install "
              "Nix (Debian/Ubuntu: apt-get install nix-bin) or pass --allow-missing-nix to run "
              "only the checks that need no Nix.", file=sys.stderr)
        return 2
    results = run_checks(args.root.resolve(), nix)
    for name, problems in results.items():
        if problems is None:
            print(f"skip {name}: nix-instantiate is not on PATH")
        elif problems:
            print(f"FAIL {name}:")
            for problem in problems:
                print(f"  - {problem}")
        else:
            print(f"ok   {name}")
    return 1 if any(results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
