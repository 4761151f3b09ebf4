"""Issue 13: integrity under hostile inputs, across modules, through the CLI.

Each numbered case of the issue has a test here (case 5's stat cache and
case 4's data files also in tests/data/test_manifest.py; case 6 in
tests/train/test_distributed.py). Most run the CLI in this process
(``cli.main(argv)``) with the no-pinning control, so the recipe's logic, not
the profile, is under test; a few start processes where only a process shows
the behaviour (exit status, traceback, signals).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.numpy

from pipeline import cli, recipe
from pipeline.core import _testing, atomic
from pipeline.core.config import load_config
from pipeline.data import cache as datacache
from pipeline.data import dataset, manifest
from pipeline.record import runs
from pipeline.record.schema import record_digest

from ..support import pipeline_env, run_pipeline, start_pipeline, unpin

TINY = ["train.epochs=1", "model.args.hidden=[16]"]


@pytest.fixture(autouse=True)
def unpinned(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    unpin(monkeypatch, tmp_path)


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail, rather than hang the suite, if a read blocks (a FIFO)."""
    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("blocked: a special file was opened or read")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def _train(capsys: pytest.CaptureFixture[str], runs_dir: Path, *extra: str
           ) -> tuple[int, str, str]:
    return _main(capsys, "train", *TINY, *extra, "--runs-dir", str(runs_dir), "--quiet")


def _key(*extra: str) -> str:
    """The run key `pipeline train` computes for TINY plus ``extra``."""
    path, overrides, _ = cli._config_args([*TINY, *extra], None)
    return recipe.prepare(load_config(path, overrides), ["train"],
                          path.resolve().parent).inputs.key


# --- case 1: a foreign or edited run is not reused ----------------------------------

def test_foreign_run_copied_under_a_key_is_refused_and_force_replaces_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Case 1: seed 1's run copied to seed 0's key: train exits 5 naming run.json
    and run_key (no reuse), verify exits 5, runs lists it as BAD; --force
    retrains it into seed 0's own run."""
    rd = tmp_path / "runs"
    assert _train(capsys, rd, "seed=1")[0] == 0
    k0, k1 = _key("seed=0"), _key("seed=1")
    shutil.copytree(rd / k1, rd / k0)
    code, out, err = _train(capsys, rd, "seed=0")
    assert code == 5 and "reused" not in out, (out, err)
    assert f"{k0}/run.json [run_key]" in err
    assert _main(capsys, "verify", str(rd / k0), "--quiet")[0] == 5
    code, out, _ = _main(capsys, "runs", "--runs-dir", str(rd))
    assert code == 0 and f"BAD {k0}: " in out and f"{k1}  " in out
    code, out, err = _train(capsys, rd, "seed=0", "--force")
    assert code == 0 and "trained" in out, err
    a, b = (json.loads((rd / k / "run.json").read_text()) for k in (k0, k1))
    assert a["run_key"] == k0 and a["weights_sha256"] != b["weights_sha256"]


@pytest.mark.parametrize("field,value", [("metrics.test_accuracy", 1.0),
                                         ("config.seed", 7), ("code_sha256", "0" * 64)])
def test_edited_record_is_refused_with_or_without_a_recomputed_digest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: object) -> None:
    """Case 1: an edited field of run.json is caught (record_sha256); a forger who
    also recomputes the digest is caught on any keyed input (the field named),
    never reused as is; an edited metric with a recomputed digest is caught by
    verify (the retrained metrics)."""
    rd = tmp_path / "runs"
    assert _train(capsys, rd)[0] == 0
    key = _key()
    path = rd / key / "run.json"
    rec = json.loads(path.read_text())
    top, _, sub = field.partition(".")
    if sub:
        rec[top][sub] = value
    else:
        rec[top] = value
    path.write_text(json.dumps(rec))
    code, out, err = _train(capsys, rd)
    assert code == 5 and "[record_sha256]" in err and "reused" not in out, err
    rec["record_sha256"] = record_digest(rec)
    path.write_text(json.dumps(rec))
    code, out, err = _train(capsys, rd)
    if top == "metrics":  # not an input: re-derived by verify, which retrains
        assert code == 0
        code, _, err = _main(capsys, "verify", str(rd / key), "--quiet")
        assert code == 1 and "[metrics]" in err, err
    else:
        assert code == 5 and f"run.json [{top}]" in err and "reused" not in out, err


# --- case 2: a forged decode-cache entry ------------------------------------------

def test_forged_decode_cache_entry_is_caught_by_verify_rebuild_and_data_verify(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Case 2: a self-consistent forged cache entry (labels changed, its own
    data_sha256 recomputed) is trusted by plain training (documented), but
    the run records the decoded arrays' hash: verify decodes from the file
    and exits 3 naming data_decoded; data verify exits 3 naming the entry;
    afterwards the forged run is not reused (exit 5), and --rebuild, which
    decodes from the file, replaces it."""
    rd = tmp_path / "runs"
    assert _train(capsys, rd, "seed=5")[0] == 0  # fills the cache
    (entry,) = (tmp_path / "cache").glob("*.safetensors")
    blob = entry.read_bytes()
    arrays = safetensors.numpy.load(blob)
    arrays["y"] = (arrays["y"] + 1) % 10
    meta = {k: v for k, v in datacache.st_data(blob)[0].items() if k != "data_sha256"}
    forged = datacache.encode_arrays(arrays, meta)  # its own data_sha256 recomputed
    entry.write_bytes(forged)
    assert _train(capsys, rd, "seed=6")[0] == 0  # trusts the cache: wrong labels
    key = _key("seed=6")
    entry.write_bytes(forged)  # _key's prepare trusted it too, nothing removed
    code, _, err = _main(capsys, "verify", str(rd / key), "--quiet")
    assert code == 3 and "[data_decoded.digits]" in err, err
    entry.write_bytes(forged)
    code, _, err = _main(capsys, "data", "verify")
    assert code == 3 and str(entry) in err, err
    assert not entry.exists()  # removed: the next decode is from the file
    code, _, err = _train(capsys, rd, "seed=6")
    assert code == 5 and "[data_decoded]" in err, err
    entry.write_bytes(forged)
    code, out, err = _train(capsys, rd, "seed=6", "--rebuild")  # replaces it, from the file
    assert code == 0 and "replacing" in err and "rebuild identical" in out, err
    assert _main(capsys, "verify", str(rd / key), "--quiet")[0] == 0


# --- case 3: exit codes -----------------------------------------------------------

def _deep_toml(tmp_path: Path) -> str:
    p = tmp_path / "deep.toml"
    p.write_text("a = " + "[" * 50000 + "]" * 50000 + "\n")
    return str(p)


@pytest.mark.parametrize("args,code,needle", [
    (lambda t: [str(t)], 2, "a directory, not a regular file"),
    (lambda t: ["/dev/zero"], 2, "a character device"),
    (lambda t: [_deep_toml(t)], 2, "nested too deeply"),
    (lambda t: ["optim.lr=1" + "0" * 400], 2, "optim.lr"),
    (lambda t: ["train.checkpoint_every=" + "9" * 30], 2, "train.checkpoint_every"),
    (lambda t: ["model.args.hidden=[" + ",".join(["1"] * 2000) + "]"], 2, "model.args"),
    (lambda t: ["data.test_fraction=0.0001"], 2, "data.test_fraction"),
    (lambda t: ["train.batch_size=4096"], 2, "train.batch_size"),
    (lambda t: ["--device", "cuda:7"], 2, "--device"),
    (lambda t: ["--device", "nonsense"], 2, "--device"),
])
def test_bad_input_exits_with_its_documented_code_and_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], alarm: None, args: object,
        code: int, needle: str) -> None:
    """Case 3: what crashed with exit 1 (a directory or /dev/zero as config,
    RecursionError, OverflowError, 65-bit ints, a tiny test split, a batch
    larger than the training rows, a device this machine lacks) is a config
    or usage error, exit 2, before anything trains: no run directory."""
    rd = tmp_path / "runs"
    got, out, err = _train(capsys, rd, *args(tmp_path))  # type: ignore[operator]
    assert (got, needle in err) == (code, True), err
    assert not rd.exists() or not [p for p in rd.iterdir() if not p.name.startswith(".")]


def test_file_system_errors_exit_74_naming_path_and_operation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Case 3: a runs directory that is a file, and ENOSPC while writing the
    run: exit 74, one line naming the path and the operation."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _train(capsys, blocker / "runs")
    assert code == 74 and str(blocker) in err and "in mkdir()" in err, err
    real = atomic.write_bytes

    def full(path: Path, data: bytes, before_replace: object = None) -> None:
        if path.name == "weights.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data, before_replace)  # type: ignore[arg-type]
    monkeypatch.setattr(atomic, "write_bytes", full)
    code, _, err = _train(capsys, tmp_path / "runs")
    assert code == 74 and "weights.safetensors" in err and "No space left" in err, err
    assert err.count("\n") == 1
    assert not list((tmp_path / "runs").glob(".tmp-*"))  # nothing half-written


def test_unexpected_exception_is_an_internal_error_70_traceback_only_with_debug(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Case 3: a bug is exit 70 with one line, never the mismatch code 1; --debug
    adds the traceback."""
    def boom(*a: object, **k: object) -> None:
        raise ZeroDivisionError("division by zero")
    monkeypatch.setattr(recipe, "get_or_train", boom)
    code, _, err = _train(capsys, tmp_path / "runs")
    assert code == 70 and err.startswith("internal error") and err.count("\n") == 1, err
    assert cli.main(["train", *TINY, "--runs-dir", str(tmp_path / "r"), "--debug"]) == 70
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.process
def test_subprocess_exit_codes_and_no_traceback(tmp_path: Path) -> None:
    """Case 3, as a user sees it: a directory as config is exit 2, a runs
    directory under a file exit 74, each one line, no traceback."""
    env = pipeline_env(tmp_path)
    p = run_pipeline(["train", str(tmp_path)], env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    (tmp_path / "f").write_text("")
    p = run_pipeline(["train", "train.epochs=1", "--runs-dir", str(tmp_path / "f" / "r")], env,
                     timeout=120)
    assert p.returncode == 74 and "Traceback" not in p.stderr, p.stderr


# --- case 4: special files --------------------------------------------------------

@pytest.mark.parametrize("victim,kind", [("run.json", "fifo"), ("weights.safetensors", "fifo"),
                                         ("run.json", "zero"), ("weights.safetensors", "zero"),
                                         ("trail.bin", "fifo")])
def test_special_files_in_a_run_directory_never_block(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], alarm: None, victim: str,
        kind: str) -> None:
    """Case 4: a FIFO, or a link to /dev/zero, as run.json, weights or trail:
    verify, diff, golden check and train refuse it (exit 5), at once."""
    rd = tmp_path / "runs"
    assert _train(capsys, rd)[0] == 0
    run = rd / _key()
    other = tmp_path / "other"
    shutil.copytree(run, other)
    (run / victim).unlink()
    os.mkfifo(run / victim) if kind == "fifo" else os.symlink("/dev/zero", run / victim)
    assert _main(capsys, "diff", str(run), str(other))[0] == 5
    if victim == "trail.bin":
        return
    assert _main(capsys, "verify", str(run), "--quiet")[0] == 5
    assert _main(capsys, "golden", "check", str(run), "--file", str(tmp_path / "g.json"))[0] == 5
    assert _train(capsys, rd)[0] == 5


def test_fifo_checkpoint_and_fifo_golden_file_never_block(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], alarm: None) -> None:
    """Case 4: a FIFO named as the newest checkpoint is skipped as corrupt (the
    run trains); a FIFO as the golden file is a usage error."""
    rd = tmp_path / "runs"
    ckpt = rd / f".ckpt-{_key()}"
    ckpt.mkdir(parents=True)
    os.mkfifo(ckpt / "ckpt-000000999.safetensors")
    code, _, err = _train(capsys, rd)
    assert code == 0 and "skipping corrupt checkpoint" in err, err
    os.mkfifo(tmp_path / "g.json")
    assert _main(capsys, "golden", "check", str(rd / _key()), "--file",
                 str(tmp_path / "g.json"))[0] == 2


# --- case 7: read-only reuse, foreign slots, listing, locks, size bounds ---------------

def test_complete_run_is_reused_from_a_read_only_runs_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Case 7: where the lock file cannot be created (read-only runs dir), a
    complete, re-derived run is reused; an incomplete one is exit 74 naming
    the lock file. (Root ignores permission bits, so read-only is simulated
    at the two calls that see it.)"""
    rd = tmp_path / "runs"
    assert _train(capsys, rd)[0] == 0

    def refused(runs_dir: Path, key: str) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(runs_dir / f".{key}.lock"))
    monkeypatch.setattr(runs, "run_lock", refused)
    monkeypatch.setattr(recipe.os, "access", lambda p, mode: False)
    code, out, err = _train(capsys, rd)
    assert code == 0 and "reused" in out, err
    code, _, err = _train(capsys, rd, "seed=3")
    assert code == 74 and ".lock" in err and "Read-only" in err, err


@pytest.mark.parametrize("kind", ["file", "symlink", "empty_dir"])
def test_foreign_thing_at_the_run_key_is_refused_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    """Case 7: runs/<key> that is a regular file, a symbolic link or an empty
    directory: exit 5 naming it, before training (no checkpoint directory);
    --force replaces it."""
    rd = tmp_path / "runs"
    rd.mkdir()
    key = _key()
    if kind == "file":
        (rd / key).write_text("x")
    elif kind == "symlink":
        os.symlink(tmp_path, rd / key)
    else:
        (rd / key).mkdir()
    code, _, err = _train(capsys, rd)
    assert code == 5 and key in err, err
    assert not (rd / f".ckpt-{key}").exists()
    assert _train(capsys, rd, "--force")[0] == 0 and runs.is_complete(rd / key)


def test_runs_lists_malformed_directories_as_bad_and_locks_are_removed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Case 7: `pipeline runs` prints `BAD <dir>: <why>` for a malformed run
    directory and lists the good ones (exit 0); no lock file is left."""
    rd = tmp_path / "runs"
    assert _train(capsys, rd)[0] == 0
    assert not list(rd.glob(".*.lock"))
    (rd / "junk").mkdir()
    (rd / "junk" / "run.json").write_text("[" * 100000)
    (rd / "junk" / "weights.safetensors").write_bytes(b"")
    (rd / "afile").write_text("x")
    code, out, _ = _main(capsys, "runs", "--runs-dir", str(rd))
    assert code == 0 and "BAD junk: " in out and "BAD afile: " in out and _key() in out


def test_oversized_config_is_refused_before_parsing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Case 7: a config over 1 MB is refused unparsed (exit 2), at once."""
    big = tmp_path / "big.toml"
    big.write_text("[model]\nhidden = [" + ",".join(["1"] * 1_000_000) + "]\n")
    code, _, err = _train(capsys, tmp_path / "runs", str(big))
    assert code == 2 and "more than the 1048576" in err, err


# --- interrupts ---------------------------------------------------------------------

def test_ctrl_c_prints_one_line_and_a_rerun_resumes_to_the_same_hash(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C at step 15: exit 130 and one line (interrupted at step 15; rerun
    the same command to resume); the rerun resumes and gives the hash of an
    uninterrupted run."""
    ref = tmp_path / "ref"
    assert _train(capsys, ref, "train.checkpoint_every=5", "train.checkpoint_seconds=0")[0] == 0
    want = json.loads(next(ref.glob("*/run.json")).read_text())["weights_sha256"]
    real = _testing.fault

    def ctrl_c(point: str, step: int, rank: int = 0, flush: object = None) -> None:
        if point == "step" and step == 15:
            raise KeyboardInterrupt
        real(point, step, rank, flush)  # type: ignore[arg-type]
    monkeypatch.setattr(_testing, "fault", ctrl_c)
    rd = tmp_path / "runs"
    code, _, err = _train(capsys, rd, "train.checkpoint_every=5", "train.checkpoint_seconds=0")
    assert (code, err) == (130, "interrupted at step 15; rerun the same command to resume\n")
    monkeypatch.setattr(_testing, "fault", real)
    code, out, err = _train(capsys, rd, "train.checkpoint_every=5", "train.checkpoint_seconds=0")
    assert code == 0 and "resuming from" in err and out.strip().endswith(want), err


@pytest.mark.process
def test_sigint_to_a_training_process_exits_130_with_one_line(tmp_path: Path) -> None:
    """Ctrl-C as a terminal sends it, to a real `pipeline train`: exit 130, one
    line, no traceback. The run is far longer than the test (100000 epochs), so
    the signal lands mid-training on any machine, however fast; it is sent once
    the first checkpoint shows training is under way."""
    env = pipeline_env(tmp_path, PIPELINE_TEST_NO_PIN="1")
    p = start_pipeline(["train", "train.epochs=100000", "train.checkpoint_seconds=0",
                        "--runs-dir", str(tmp_path / "runs"), "--quiet"], env, stdout=None)
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "runs").glob(".ckpt-*/ckpt-*")):
            assert p.poll() is None, f"exit {p.returncode} before any checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
    except BaseException:
        p.kill()
        p.communicate()
        raise
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().startswith("interrupted at step"), err


def test_verify_and_data_verify_read_no_cache_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify's and --rebuild's decode never take arrays from the cache: with
    trust_cache=False a cache read is only a comparison."""
    path, overrides, _ = cli._config_args(TINY, None)
    prep = recipe.prepare(load_config(path, overrides), ["train"], path.resolve().parent,
                          trust_cache=False)
    fresh = dataset.load(prep.verified, "digits", manifest.default_cache_dir())
    assert prep.ds.decoded_sha256() == fresh.decoded_sha256()


def test_debug_flag_is_ours_only_before_a_double_dash() -> None:
    """--debug anywhere before `--` turns on tracebacks; after it, it belongs to
    the program `pipeline exec`/`audit` runs and is passed on untouched."""
    from pipeline.core.errors import split_debug
    assert split_debug(["train", "--debug", "seed=1"]) == (True, ["train", "seed=1"])
    assert split_debug(["exec", "--", "s.py", "--debug"]) == (False,
                                                            ["exec", "--", "s.py", "--debug"])


# --------------------------------------------------------------- issue 27: a record is data
_NET = '''
from torch import nn


def small(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, num_classes))
'''
_PLANTED = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from torch import nn


def small(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, num_classes))
'''


@pytest.mark.process
def test_verify_never_imports_code_a_record_points_to(tmp_path: Path) -> None:
    """Issue 27: `pipeline verify DIR` imported and ran a model file inside DIR
    named by DIR/run.json's config_dir (its digest recomputed), then said
    "verified". Now verify imports the model only from the project the user
    names (--project) or stands in: from elsewhere it refuses (exit 2) and
    the planted file never runs; with --project it verifies."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "usernet.py").write_text(_NET)
    (proj / "config.toml").write_text('[model]\nfactory = "usernet:small"\n'
                                      "[train]\nmax_steps = 3\n")
    env = pipeline_env(tmp_path)
    p = run_pipeline(["train", str(proj / "config.toml"), "--runs-dir", str(tmp_path / "runs"),
                      "--json", "--quiet"], env, cwd=proj)
    assert p.returncode == 0, p.stderr[-2000:]
    key = json.loads(p.stdout)["run_key"]
    run = tmp_path / "runs" / key
    marker = tmp_path / "planted-code-ran"
    (run / "usernet.py").write_text(_PLANTED.format(marker=str(marker)))
    rec = json.loads((run / "run.json").read_text())
    rec["config_dir"] = str(run)
    rec["record_sha256"] = record_digest(rec)
    (run / "run.json").write_text(json.dumps(rec))
    neutral = tmp_path / "neutral"
    neutral.mkdir()
    v = run_pipeline(["verify", str(run), "--quiet"], env, cwd=neutral)
    assert v.returncode == 2 and "--project" in v.stderr, v.stderr[-2000:]
    inside = run_pipeline(["verify", str(run), "--quiet", "--project", str(run)], env,
                          cwd=neutral)
    assert inside.returncode == 2 and "holds data, not code" in inside.stderr
    assert not marker.exists()
    ok = run_pipeline(["verify", str(run), "--quiet", "--project", str(proj)], env, cwd=neutral)
    assert ok.returncode == 0 and "verified" in ok.stdout, ok.stderr[-2000:]
    assert not marker.exists()
