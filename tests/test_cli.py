"""The spine end to end, through the command line a user types."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from pipeline.record.schema import record_digest

from .support import (copy_source, pipeline_argv, pipeline_env, run_pipeline, start_pipeline,
                      train_json)

pytestmark = pytest.mark.process

SHORT = ["train.epochs=2"]
HASH_LINE = re.compile(r"^weights sha256:[0-9a-f]{64}$")


def _no_run_dirs(runs: Path) -> bool:
    return not runs.exists() or not [p for p in runs.iterdir() if not p.name.startswith(".")]


@pytest.mark.slow
def test_default_config_in_two_fresh_processes_is_identical_and_accurate(
        tmp_path: Path) -> None:
    """The README's train command's run, started twice at once: equal weight hashes, >= 97% accuracy."""
    env = pipeline_env(tmp_path)
    procs = [start_pipeline(["train", "--runs-dir", str(tmp_path / f"runs{i}"), "--quiet"], env)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    last = [o[0].strip().splitlines()[-1] for o in outs]
    assert HASH_LINE.match(last[0]) and last[0] == last[1]
    rec = json.loads(next((tmp_path / "runs0").glob("*/run.json")).read_text())
    assert rec["metrics"]["test_accuracy"] >= 0.97
    assert 0 < rec["loop_s"] <= rec["duration_s"]  # the loop, within get-or-train's time
    for f in ("weights.safetensors", "run.json", "metrics.jsonl", "curves.png", "trail.bin"):
        assert (tmp_path / "runs0" / rec["run_key"] / f).is_file()


def test_another_seed_gives_another_hash(tmp_path: Path) -> None:
    """Control: the hash depends on the seed (so equal hashes mean something)."""
    env = pipeline_env(tmp_path)
    a = train_json(SHORT, tmp_path / "runs", env)
    b = train_json([*SHORT, "seed=1"], tmp_path / "runs", env)
    assert a["weights_sha256"] != b["weights_sha256"] and a["run_key"] != b["run_key"]


def test_run_record_holds_the_inputs(tmp_path: Path) -> None:
    """run.json names the key, hash, config, data (files, decode specs), model
    factory and its source hash, toolchain, profile and accuracy."""
    rec = train_json(SHORT, tmp_path / "runs", pipeline_env(tmp_path))
    for k in ("run_key", "weights_sha256", "config", "data", "model", "toolchain", "profile",
              "code_sha256", "created_utc"):
        assert k in rec, k
    sha = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
    assert rec["data"]["files"] == {"digits": sha} and rec["data"]["dataset"] == "digits"
    assert rec["data"]["train"]["format"] == "csv"
    assert rec["model"]["factory"] == "pipeline.models:mlp"
    assert len(rec["model"]["factory_sha256"]) == 64
    assert rec["profile"]["name"] == "x86_64-avx2-1t"
    assert 0.0 <= rec["metrics"]["test_accuracy"] <= 1.0
    assert sorted(rec["key_inputs"]) == ["code", "config", "data", "model", "profile",
                                         "toolchain"]


def test_memoised_run_is_reused_and_rebuild_and_verify_agree(tmp_path: Path) -> None:
    """A complete run is reused without training; --rebuild and verify retrain and
    compare bit for bit, exit 0."""
    env, runs = pipeline_env(tmp_path), tmp_path / "runs"
    first = run_pipeline(["train", *SHORT, "--runs-dir", str(runs), "--quiet"], env)
    assert first.returncode == 0 and "trained" in first.stdout
    run_dir = next(p for p in runs.iterdir() if not p.name.startswith("."))
    mtime = (run_dir / "run.json").stat().st_mtime_ns
    again = run_pipeline(["train", *SHORT, "--runs-dir", str(runs), "--quiet"], env)
    assert "reused (memoised)" in again.stdout
    assert again.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]
    assert (run_dir / "run.json").stat().st_mtime_ns == mtime
    rebuild = run_pipeline(["train", *SHORT, "--runs-dir", str(runs), "--rebuild", "--quiet"],
                           env)
    assert rebuild.returncode == 0 and "rebuild identical" in rebuild.stdout
    assert "kept (a fresh retrain gave the same weights)" in rebuild.stdout
    verify = run_pipeline(["verify", str(run_dir), "--quiet"], env)
    assert verify.returncode == 0 and "verified" in verify.stdout


def test_verify_fails_with_exit_1_when_the_record_disagrees(tmp_path: Path) -> None:
    """Control for verify: a run record whose hash is not what training gives
    (here: its weights replaced by another seed's) is reported, exit 1."""
    env, runs = pipeline_env(tmp_path), tmp_path / "runs"
    a = train_json(SHORT, runs, env)
    b = train_json([*SHORT, "seed=1"], runs, env)
    da, db = runs / a["run_key"], runs / b["run_key"]
    (da / "weights.safetensors").write_bytes((db / "weights.safetensors").read_bytes())
    rec = json.loads((da / "run.json").read_text())
    rec["weights_sha256"] = b["weights_sha256"]
    rec["record_sha256"] = record_digest(rec)  # a forger who recomputes the digest
    (da / "run.json").write_text(json.dumps(rec))
    p = run_pipeline(["verify", str(da), "--quiet"], env)
    assert p.returncode == 1
    assert a["weights_sha256"] in p.stderr and b["weights_sha256"] in p.stderr


def test_tampered_weights_file_is_refused(tmp_path: Path) -> None:
    """A weights file that no longer matches its recorded hash: a bad weights
    file (exit 5), both hashes named."""
    env, runs = pipeline_env(tmp_path), tmp_path / "runs"
    rec = train_json(SHORT, runs, env)
    w = runs / rec["run_key"] / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0x40
    w.write_bytes(bytes(data))
    p = run_pipeline(["train", *SHORT, "--runs-dir", str(runs)], env)
    assert p.returncode == 5 and rec["weights_sha256"] in p.stderr


def _bad_tree(tmp_path: Path, mutate: str) -> Path:
    """A copy of the source tree with one thing broken."""
    root = copy_source(tmp_path / "src")
    data = root / "data" / "digits.csv.gz"
    manifest = root / "data-manifest.json"
    if mutate == "flip":
        b = bytearray(data.read_bytes())
        b[len(b) // 2] ^= 0x01
        data.write_bytes(bytes(b))
    elif mutate == "truncate":
        data.write_bytes(data.read_bytes()[:-100])
    elif mutate == "missing":
        data.unlink()
    elif mutate == "symlink_out":
        outside = tmp_path / "outside.csv.gz"
        outside.write_bytes(data.read_bytes())
        data.unlink()
        os.symlink(outside, data)
    elif mutate == "manifest_malformed":
        manifest.write_text("{not json")
    elif mutate == "manifest_escape":
        m = json.loads(manifest.read_text())
        m["files"]["digits"]["path"] = "../outside.csv.gz"
        manifest.write_text(json.dumps(m))
    return root


@pytest.mark.parametrize("mutate,needle", [
    ("flip", "sha256"), ("truncate", "57523 bytes"), ("missing", "digits.csv.gz"),
    ("symlink_out", "data root"), ("manifest_malformed", "data-manifest.json"),
    ("manifest_escape", "path"),
])
def test_bad_data_stops_before_training_with_exit_3(tmp_path: Path, mutate: str,
                                                    needle: str) -> None:
    """Each bad data input: a message naming the file, exit 3, no run directory."""
    root = _bad_tree(tmp_path, mutate)
    runs = tmp_path / "runs"
    p = run_pipeline(["train", *SHORT, "--runs-dir", str(runs)],
                     pipeline_env(tmp_path, PIPELINE_ROOT=str(root)), cwd=root)
    assert p.returncode == 3, p.stderr
    assert needle in p.stderr and "expected" in p.stderr, p.stderr
    assert _no_run_dirs(runs)


def test_flipped_byte_message_names_both_hashes(tmp_path: Path) -> None:
    """The data-integrity message carries the expected and the actual sha256."""
    root = _bad_tree(tmp_path, "flip")
    p = run_pipeline(["data", "verify"], pipeline_env(tmp_path, PIPELINE_ROOT=str(root)),
                     cwd=root)
    assert p.returncode == 3
    assert "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22" in p.stderr
    assert re.search(r"found [^\n]*[0-9a-f]{64}", p.stderr), p.stderr


@pytest.mark.parametrize("args,needle", [
    (["train.epochs=x"], "train.epochs: expected an integer"),
    (["colour=1"], "colour: unknown key"),
    (["optim.lr=-1", "train.epochs=0"], "optim.lr"),
    (["configs/none.toml"], "file not found"),
    (["optim.name=adam", "optim.nesterov=true"], "optim.nesterov: expected false unless"),
])
def test_bad_config_exits_2_and_writes_nothing(tmp_path: Path, args: list[str],
                                               needle: str) -> None:
    """Config errors: exit 2, the key named, no run directory."""
    runs = tmp_path / "runs"
    p = run_pipeline(["train", *args, "--runs-dir", str(runs)], pipeline_env(tmp_path))
    assert p.returncode == 2 and needle in p.stderr, p.stderr
    assert not runs.exists()


def test_data_verify_command_succeeds_on_the_shipped_data(tmp_path: Path) -> None:
    """`pipeline data verify` checks every manifest file."""
    p = run_pipeline(["data", "verify", "--full"], pipeline_env(tmp_path))
    assert p.returncode == 0 and "ok digits sha256:09f66e6d" in p.stdout


def test_runs_lists_and_diff_names_the_seed(tmp_path: Path) -> None:
    """`runs` lists complete runs; `diff` names the differing input and the
    first diverging step and tensor, exit 1 when weights differ."""
    env, runs = pipeline_env(tmp_path), tmp_path / "runs"
    a = train_json(SHORT, runs, env)
    b = train_json([*SHORT, "seed=3"], runs, env)
    listing = run_pipeline(["runs", "--runs-dir", str(runs)], env).stdout
    assert a["run_key"] in listing and b["run_key"] in listing
    d = run_pipeline(["diff", str(runs / a["run_key"]), str(runs / b["run_key"])], env)
    assert d.returncode == 1
    assert "config.seed: 0 != 3" in d.stdout
    assert "trails diverge at step 1" in d.stdout


@pytest.mark.process
def test_a_closed_output_pipe_is_exit_141_without_a_message(tmp_path: Path) -> None:
    """`pipeline ... | head`: the reader went away. It was exit 74, "file system
    error ... Broken pipe"; now 128 + SIGPIPE and nothing on stderr, as a shell
    tool stopped by SIGPIPE. Control: a full disk is still a file-system error."""
    import os
    import subprocess

    read, write = os.pipe()
    os.close(read)  # no reader: the first write fails with EPIPE
    try:
        p = subprocess.run(pipeline_argv("env"), stdout=write, stderr=subprocess.PIPE,
                           text=True, env=pipeline_env(tmp_path), timeout=120)
    finally:
        os.close(write)
    assert (p.returncode, p.stderr) == (141, "")
    with open("/dev/full", "w") as full:
        p = subprocess.run(pipeline_argv("env"), stdout=full, stderr=subprocess.PIPE,
                           text=True, env=pipeline_env(tmp_path), timeout=120)
    assert p.returncode == 74 and "No space left on device" in p.stderr


def test_output_is_written_whole_under_pythonunbuffered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under PYTHONUNBUFFERED stdout's text layer sits on the raw file, and a
    short write of the kernel's was dropped: `train --nproc 2 --json` of the
    images example printed 64 KiB of a 176 KB record, exit 0. The CLI puts a
    buffered writer between them, which writes the rest. Control: without it,
    the text is cut."""
    import io
    import sys

    from pipeline import cli

    class Short(io.RawIOBase):  # a pipe that takes at most 100 bytes per write
        def __init__(self) -> None:
            self.got = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: bytes) -> int:  # type: ignore[override]
            part = bytes(b[:100])
            self.got += part
            return len(part)

    text = "x" * 1000 + "\n"
    for fix in (False, True):
        raw = Short()
        stream = io.TextIOWrapper(raw, write_through=True)
        monkeypatch.setattr(sys, "stdout", stream)
        monkeypatch.setattr(sys, "__stdout__", stream)  # the process's own, as in `pipeline`
        if fix:
            cli._whole_writes()
        print(text, end="")
        sys.stdout.flush()
        assert (bytes(raw.got) == text.encode()) is fix
    monkeypatch.undo()  # pytest's own streams back before this test's are collected
