"""``pipeline train|verify|diff|data|new|env|runs|golden|audit|exec|eval|predict|
export|card``: argument parsing and printing; the work is pipeline.recipe's (and
the record, data, audit, inference and export packages'). Every failure is one line on stderr (``--debug`` adds the
traceback) and an exit code from ``pipeline.core.errors.EXIT_CODES``; ``exec``
returns the script's own status. torch is imported only after the numeric
profile is in place (re-exec).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import modes
from .audit.commands import add_commands as _audit_commands
from .audit.commands import run as _audit
from .core.config import load_config
from .core.errors import EXIT_CODES, UsageError, discard_stdout, report, split_debug
from .data.task import TASKS
from .export.commands import add_commands as _export_commands
from .export.commands import run as _export
from .inference.commands import add_commands as _inference_commands
from .inference.commands import run as _inference

if TYPE_CHECKING:
    from .project import Project
    from .record.schema import RunRecord

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    epilog = "exit codes:\n" + "\n".join(f"  {c:>3}  {what}" for c, what in EXIT_CODES)
    p = argparse.ArgumentParser(prog="pipeline", description="A training run as a pure "
                                "function of its inputs: code, locked toolchain, data, "
                                "config, seed.", epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a config (memoised by run key)")
    t.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]",
                   help="a TOML config (default: the project's config.toml) and overrides")
    _project_option(t, "whose manifest and runs/ to use (default: the CONFIG's project, "
                       "else the one around the working directory)")
    t.add_argument("--runs-dir", type=Path, default=None,
                   help="where run directories live (default: the project's runs/)")
    t.add_argument("--rebuild", action="store_true",
                   help="retrain from the data files (no cache) and compare; implies --force")
    t.add_argument("--force", action="store_true", help="replace a runs/<key> that fails checks")
    t.add_argument("--json", action="store_true", help="print run.json instead of a summary")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    t.add_argument("--threads", type=int, default=None, metavar="N",
                   help="cores to use (default: all); the weights do not depend on N")
    t.add_argument("--loader-workers", type=int, default=0, metavar="N",
                   help="threads preparing batches (gather, augmentation) ahead of the step "
                        "(default 0: in the step); the weights do not depend on N")
    t.add_argument("--nproc", type=int, default=1,
                   help="processes (torch.distributed; a power of two dividing train.shards)")
    # Multi-node, passed through to torchrun (docs/how-to/distributed.md):
    t.add_argument("--nnodes", type=int, default=1, help="machines (world size nnodes*nproc)")
    t.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0..nnodes-1")
    t.add_argument("--master-addr", default=None, help="rank 0's machine (static rendezvous)")
    t.add_argument("--master-port", type=int, default=None, help="its free port")
    t.add_argument("--rdzv-endpoint", default=None,
                   help="HOST:PORT of a c10d rendezvous (instead of --master-addr/-port)")
    v = sub.add_parser("verify", help="retrain a run and compare its weights bit for bit")
    v.add_argument("run_dir", type=Path, help="a run directory (runs/<run_key>)")
    v.add_argument("--project", type=Path, default=None,
                   help="the project whose model code and manifest to use (default: the one "
                        "around the working directory; never a path the record names)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    d = sub.add_parser("diff", help="which inputs differ, and where the trails diverge")
    d.add_argument("run_a", type=Path, help="a run directory")
    d.add_argument("run_b", type=Path, help="another run directory")
    dv = sub.add_parser("data", help="data commands").add_subparsers(dest="data_cmd",
                                                                     required=True)
    ver = dv.add_parser("verify", help="check every file against data-manifest.json")
    _project_option(ver, "whose data-manifest.json to check (default: the one around the "
                         "working directory)")
    ver.add_argument("--manifest", type=Path, default=None,
                     help="the manifest to check (default: the project's data-manifest.json)")
    ver.add_argument("--full", action="store_true", help="ignore the stat cache")
    add = dv.add_parser("add", help="add a file (and a dataset part) to data-manifest.json")
    add.add_argument("file", type=Path, help="the data file, or a folder of images (inside the manifest's directory)")
    add.add_argument("--name", required=True, help="the file entry's name")
    _project_option(add, "whose data-manifest.json to write (default: the one around the "
                         "working directory; written there if it has none)")
    add.add_argument("--manifest", type=Path, default=None,
                     help="the manifest to write (default: the project's data-manifest.json)")
    add.add_argument("--format", dest="fmt", default=None,
                     help="csv, npy, npz, idx or text: also make it a dataset part (a folder is "
                          "always an images part)")
    add.add_argument("--decode", action="append", default=[], metavar="KEY=VALUE",
                     help="a decode option (pipeline/data/formats.py), value parsed as TOML")
    add.add_argument("--dataset", default=None, help="the dataset (default: --name)")
    add.add_argument("--part", choices=("train", "test"), default="train",
                     help="which part of the dataset the file is (default: train)")
    add.add_argument("--task", choices=TASKS, default=None,
                     help="the dataset's task (default: lm for text, else classification)")
    add.add_argument("--source", default="", help="where the file comes from (a URL)")
    add.add_argument("--licence", default="", help="its licence")
    add.add_argument("--description", default="", help="what the file holds")
    add.add_argument("--force", action="store_true", help="replace a differing entry")
    new = sub.add_parser("new", help="write a new project (model.py, config, data) into DIR")
    new.add_argument("dir", type=Path, help="a new or empty directory")
    sub.add_parser("env", help="print the toolchain fingerprint and numeric profile")
    r = sub.add_parser("runs", help="list runs")
    _project_option(r, "whose runs/ to list (default: the one around the working directory)")
    r.add_argument("--runs-dir", type=Path, default=None,
                   help="where run directories live (default: the project's runs/)")
    g = sub.add_parser("golden", help="golden weight hashes (tests/golden/weights.json)")
    gs = g.add_subparsers(dest="golden_cmd", required=True)
    for name in ("add", "check"):
        c = gs.add_parser(name)
        c.add_argument("run_dir", type=Path, help="a run directory")
        c.add_argument("--file", type=Path, default=None,
                       help="the golden file (default: tests/golden/weights.json)")
        if name == "add":
            c.add_argument("--force", action="store_true",
                           help="replace an entry that holds another hash")
            c.add_argument("--note", default="", help="where the hash came from (machine, date)")
        else:
            c.add_argument("--require", action="store_true",
                           help="no entry for this run's key is a failure (exit 1), not a pass")
    _audit_commands(sub)
    _inference_commands(sub)
    _export_commands(sub)
    return p


def _project_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--project", type=Path, default=None, metavar="DIR",
                   help=f"the project (a directory holding config.toml or "
                        f"data-manifest.json) {what}")


def main(argv: list[str] | None = None) -> int:
    _whole_writes()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, plain = split_debug(argv)  # argv keeps it: a pinned re-exec passes it on
    parser = _parser()
    args, extra = parser.parse_known_args(plain)
    # KEY=VALUE overrides may follow options: `train --quiet train.epochs=3`.
    if args.command in ("train", "eval") and extra and all("=" in a and not a.startswith("-")
                                                           for a in extra):
        args.args += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = _dispatch(args, argv)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then reported as one (141)
        return code
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - one handler: errors.report
        code = report(e, debug)
        _settle_stdout()
        return code


def _settle_stdout() -> None:
    """After a reported error: output still buffered that cannot be written
    (a full disk, a closed pipe) is dropped, so the interpreter's last flush
    does not fail again and turn the documented code into 120."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        try:
            discard_stdout()
            sys.stdout.flush()
        except (OSError, ValueError, AttributeError):
            pass


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    cmd = args.command
    if cmd in ("train", "verify"):
        return (_train if cmd == "train" else _verify)(args, argv)
    if cmd in ("eval", "predict"):
        return _inference(args, argv)
    if cmd == "data":
        return _data_verify(args) if args.data_cmd == "verify" else _data_add(args)
    if cmd == "env":
        return _env()
    handlers = {"diff": _diff, "new": _new, "runs": _runs, "audit": _audit, "exec": _audit,
                "export": _export, "card": _export}
    return handlers.get(cmd, _golden)(args)


def _config_args(items: list[str], explicit: Path | None) -> tuple[Path, list[str], Project]:
    """(CONFIG, overrides, project) from ``train``'s positional arguments and
    ``--project`` (pipeline.project.resolve). CONFIG defaults to the project's
    config.toml (the shipped project's configs/digits.toml where none is
    found). A relative CONFIG that is not here is looked up in the shipped
    project only where no project is around the working directory (it then
    trains as the shipped project, runs in ./runs): inside a user's project a
    missing config is an error, never the shipped one trained in its place."""
    from .core.environment import project_root
    from .project import Project, resolve

    config = [a for a in items if "=" not in a]
    overrides = [a for a in items if "=" in a]
    if len(config) > 1:
        raise UsageError(f"expected at most one CONFIG before KEY=VALUE overrides, found "
                         f"{config}")
    if config:
        path = Path(config[0])
        shipped = project_root() / path
        if (explicit is None and not os.path.lexists(path) and not path.is_absolute()
                and shipped.exists() and not resolve().found):
            return shipped, overrides, Project(project_root().resolve(), found=False,
                                               origin=Path.cwd())
        return path, overrides, resolve(explicit, config=path)
    project = resolve(explicit)
    if project.config is None:
        raise UsageError(f"no CONFIG given, and the project at {project.root} has no "
                         f"config.toml; name one: pipeline train CONFIG")
    return project.config, overrides, project


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    from . import recipe
    from .project import say

    path, overrides, project = _config_args(args.args, args.project)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads: expected an integer >= 1, found {args.threads}")
    if not 0 <= args.loader_workers <= 256:
        raise UsageError(f"--loader-workers: expected an integer in [0, 256], found "
                         f"{args.loader_workers}")
    cfg = load_config(path, overrides)
    if args.runs_dir is None:
        args.runs_dir = project.runs
    if not modes.of(cfg.mode).will_reexec():  # else the re-executed process says it
        say(project)  # only where it fell back on the shipped project or manifest
    from .cluster import detect

    if (worker := detect(os.environ)) is not None:  # started by torchrun, srun, a PyTorchJob
        return _launch(args, argv, cfg, path, overrides, project, worker)
    if args.nproc != 1 or args.nnodes != 1:
        return _launch(args, argv, cfg, path, overrides, project)
    prep = recipe.prepare(cfg, argv, path.resolve().parent, trust_cache=not args.rebuild,
                          threads=args.threads, device=args.device,
                          manifest_file=project.manifest)
    out = recipe.get_or_train(prep, args.runs_dir, device=args.device, quiet=args.quiet,
                              force=args.force or args.rebuild, threads=args.threads,
                              loader_workers=args.loader_workers)
    assert out.record is not None  # one process: rank 0
    reused = out.reused
    if args.rebuild:
        recipe.rebuild(prep, out.record, device=args.device, quiet=args.quiet)
        print(f"rebuild identical: run {out.record.run_key}")
    _report(out.record, args.json, reused, args.runs_dir,
            "kept (a fresh retrain gave the same weights)" if args.rebuild else None)
    return 0


def _launch(args: argparse.Namespace, argv: list[str], cfg: Any, path: Path,
            overrides: list[str], project: Project, worker: Any = None) -> int:
    """``--nproc``/``--nnodes``: start the workers; ``worker`` (pipeline.cluster):
    be one, started by another launcher."""
    from .launch import Spec, launch, serve

    if args.rebuild:
        raise UsageError("--rebuild trains in one process: drop --nproc/--nnodes, or run it "
                         "outside the launcher (the bits are the same at every world size)")
    spec = Spec(str(path.resolve()), overrides, str(args.runs_dir.resolve()), args.device,
                args.quiet, args.nproc, args.nnodes, args.node_rank, args.master_addr,
                args.master_port, args.rdzv_endpoint, force=args.force, threads=args.threads,
                manifest=str(project.manifest.resolve()), loader_workers=args.loader_workers)
    if worker is not None:
        given = [f"--{k.replace('_', '-')}" for k in _LAUNCH_OPTIONS
                 if getattr(args, k) != _parser_default(k)]
        if given:
            raise UsageError(f"{' '.join(given)}: this process was started by "
                             f"{worker.launcher} (rank {worker.rank} of "
                             f"{worker.world_size}), which sets the world; drop them, or "
                             f"unset the launcher's variables to launch workers here")
    out = serve(worker, spec, argv, cfg) if worker is not None else launch(spec, argv, cfg)
    if out.record is None:
        print(out.note)
    else:
        _report(out.record, args.json, out.reused, args.runs_dir)
    return 0


_LAUNCH_OPTIONS = ("nproc", "nnodes", "node_rank", "master_addr", "master_port", "rdzv_endpoint")


def _parser_default(dest: str) -> Any:
    return {"nproc": 1, "nnodes": 1, "node_rank": 0}.get(dest)


def _report(record: RunRecord, as_json: bool, reused: bool, runs_dir: Path,
            state: str | None = None) -> None:
    if as_json:
        print(json.dumps(record.to_json(), indent=2, sort_keys=True))
        return
    state = state or ("reused (memoised)" if reused else "trained")
    print(f"run {record.run_key} {state}: {runs_dir / record.run_key}")
    print(f"mode {record.mode}, profile {record.profile.get('name')}, {_metric(record)}")
    print(f"weights sha256:{record.weights_sha256}")
    if record.test_switches:
        print(f"note: test-only switches in force (keyed): {json.dumps(record.test_switches)}",
              file=sys.stderr)


def _whole_writes() -> None:
    """Standard output written whole. Under ``python -u`` or PYTHONUNBUFFERED
    (common in containers) its text layer sits on the raw file, and a pipe
    write the kernel cuts short (a signal pending as the launcher's workers
    exit) was dropped past the first 64 KiB: ``train --nproc 2 --json`` of an
    image dataset printed a cut run record, exit 0. A buffered writer retries
    the rest; line buffering keeps the output as prompt."""
    import io

    out = sys.stdout
    raw = getattr(out, "buffer", None)
    if out is sys.__stdout__ and isinstance(raw, io.RawIOBase) and \
            isinstance(out, io.TextIOWrapper):  # the process's own stream, not a capture
        out.flush()
        _REPLACED.append(out)  # kept: collected, it would close the file it shares
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(raw), encoding=out.encoding,
                                      errors=out.errors, line_buffering=True)


_REPLACED: list[Any] = []


def _metric(record: RunRecord) -> str:
    """The record's test metric: accuracy (classification) or loss (language model)."""
    m = record.metrics
    val = "".join(f", validation {k[4:]} {v:.4f}" for k, v in m.items()
                  if k.startswith("val_") and isinstance(v, (int, float)))
    if m.get("test_accuracy") is not None:
        return f"test accuracy {m['test_accuracy']:.4f}{val}"
    return f"test loss {m['test_loss']:.4f}{val}" if "test_loss" in m else "no test metric"


def _verify(args: argparse.Namespace, argv: list[str]) -> int:
    from . import recipe

    record, differences = recipe.verify_run(args.run_dir, argv, project=args.project,
                                            quiet=args.quiet)
    if differences:
        print("note: this environment's inputs differ from the record's:", file=sys.stderr)
        for line in differences:
            print(f"  {line}", file=sys.stderr)
    print(f"verified: weights sha256:{record.weights_sha256}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    from .record import runs
    from .record.diff import diff_runs
    from .record.trail import read_trail

    a, b = runs.read_run(args.run_a), runs.read_run(args.run_b)
    ta, tb = read_trail(args.run_a, a), read_trail(args.run_b, b)
    for line in diff_runs(a, b, ta, tb):
        print(line)
    same = a.weights_sha256 == b.weights_sha256
    print(f"weights: {'identical' if same else 'differ'} "
          f"(sha256:{a.weights_sha256[:16]}... vs sha256:{b.weights_sha256[:16]}...)")
    return 0 if same else 1


def _manifest_of(args: argparse.Namespace) -> Path:
    """``--manifest``, else the project's (``--project``, else the one around
    the working directory; the shipped one where none is found, said on
    stderr)."""
    from .project import resolve, say

    if args.manifest is not None:
        return Path(args.manifest)
    project = resolve(args.project)
    if args.data_cmd == "add":
        if not project.found:
            raise UsageError(f"data add: no project found from {Path.cwd()} upwards (no "
                             f"config.toml or data-manifest.json) to add the file to; "
                             f"`pipeline new DIR` writes one, or pass --project DIR or "
                             f"--manifest FILE")
        return project.root / "data-manifest.json"  # its own, written if it has none
    say(project)
    return project.manifest


def _data_verify(args: argparse.Namespace) -> int:
    from . import recipe
    from .data import manifest

    path = _manifest_of(args)
    print(f"manifest: {path}")
    verified = manifest.verify(path, full=args.full, stat_cache_dir=manifest.default_cache_dir())
    for name, sha in verified.hashes.items():
        print(f"ok {name} sha256:{sha}")
    # never trusted here; NumPy only where an entry needs a fresh decode (recipe.check_caches)
    recipe.check_caches(verified, manifest.default_cache_dir(), full=args.full)
    return 0


def _data_add(args: argparse.Namespace) -> int:
    from .data import add as manifest_edit

    path = _manifest_of(args)
    lines = manifest_edit.add(path, args.file, name=args.name, source=args.source,
                              licence=args.licence, description=args.description,
                              fmt=args.fmt, dataset=args.dataset, part=args.part,
                              task=args.task, options=manifest_edit.parse_options(args.decode),
                              force=args.force)
    for line in lines:
        print(line)
    print(f"wrote {path}")
    return 0


def _new(args: argparse.Namespace) -> int:
    from .scaffold import new_project

    for f in new_project(args.dir):
        print(f"wrote {f}")
    print(f"train it: pipeline train {args.dir / 'config.toml'}")
    return 0


def _env() -> int:
    from .core import environment as env

    prof = env.load_profile()
    out = {"toolchain": env.toolchain_fingerprint(), "profile": prof.__dict__,
           "host_isa": env.host_isa_levels(), "code_sha256": env.code_sha256(),
           "pinned_now": not env.needs_reexec(prof)}
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def _runs(args: argparse.Namespace) -> int:
    from .project import resolve
    from .record import runs

    if args.runs_dir is None:
        args.runs_dir = resolve(args.project).runs
    if not args.runs_dir.is_dir():
        return 0
    for name, rec, why in runs.list_runs(args.runs_dir):  # BAD: fails read_run's checks
        print(f"BAD {name}: {why}" if rec is None else
              f"{name}  {rec.mode:6}  {_metric(rec)}  "
              f"sha256:{rec.weights_sha256[:16]}  {rec.created_utc or ''}")
    return 0


def _golden(args: argparse.Namespace) -> int:
    from .record import golden, runs

    record = runs.read_run(args.run_dir)
    path = args.file or golden.default_path()
    if args.golden_cmd == "add":
        print(f"{golden.add(record, path, force=args.force, note=args.note)}: {path}")
        return 0
    ok, msg = golden.check(record, path)
    print(msg)
    if ok is None and args.require:
        print(f"error: --require: {path} has no entry for this run, so nothing was checked; "
              f"record one with `pipeline golden add {args.run_dir}` on a trusted machine",
              file=sys.stderr)
        return 1
    return 1 if ok is False else 0
