"""Run a chosen set of the benchmarks and write their tables to bench/RESULTS.md.

    .venv/bin/python bench/results.py                 # every bench below (about 25 min on 2 cores)
    .venv/bin/python bench/results.py --only hash,matmul
    .venv/bin/python bench/results.py --list          # names, commands, rough times

Each bench runs as its own process from the checkout root, with this
interpreter, one after another (never two at once: they time things). What it
prints on stdout is copied into RESULTS.md under its name, with the command,
the exit status, the wall time, and the machine it ran on (CPU model from
/proc/cpuinfo, cores, torch and Python versions, the commit, the load
average). ``--only`` reruns the named sections and keeps the others as they
were, each with its own machine line, so a file may mix runs: read each
section's line. The options below are each bench's quick settings where it
has them, chosen so that the whole set takes well under half an hour on the
2-core development VMs; the benches' own docstrings say what they measure.

Not run here: ``cross_version.sh`` (needs the package registry and GBs of
disk) and ``gpu_check.sh`` (needs a GPU); ``peers`` needs the bench extra
(``bench/requirements-bench.lock``) and is skipped without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "RESULTS.md"


@dataclass(frozen=True)
class Bench:
    name: str
    argv: tuple[str, ...]   # after the interpreter, relative to the checkout root
    measures: str
    target: str
    minutes: float          # rough wall time on the 2-core VMs
    needs: str = ""         # a module that must be importable, else skipped


BENCHES = (
    Bench("hash", ("bench/bench_hash.py", "--repeats", "5"),
          "canonical weight hash / hashlib.sha256 over the same bytes", ">= 0.9", 0.5),
    Bench("matmul", ("bench/bench_matmul.py",),
          "error of the exact products (xmm, xmmb, matmul) and stock fp32 against fp64",
          "<= 2x fp32's", 1),
    Bench("data", ("bench/bench_data.py", "--mib", "128", "--runs", "5"),
          "cold data verify / sha256sum; the stat cache's warm path", ">= 0.9", 0.5),
    Bench("images", ("bench/bench_images.py", "10000"),
          "data add DIR, data verify (warm, --full) and the first decode, 10000 small PNG files",
          "files/s", 1),
    Bench("tables", ("bench/bench_tables.py", "200000"),
          "decode of one 200000 x 30 table as csv, parquet, arrow; bits equal to the csv's",
          "parquet faster than csv", 1, needs="pyarrow"),
    Bench("loader", ("bench/bench_loader.py", "--steps", "60"),
          "loader alone (gather + augmentation) / training step, examples/images; one hash",
          "loader below the step", 1),
    Bench("trail", ("bench/bench_trail.py", "--repeats", "10"),
          "the per-step trail / a training step, 10M parameters", "<= 0.01", 0.5),
    Bench("checkpoint", ("bench/bench_checkpoint.py", "--runs", "5"),
          "checkpoint cost / training time at the default policy, digits MLP",
          "<= 5%", 1.5),
    Bench("startup", ("bench/bench_startup.py", "--rounds", "3"),
          "a fresh pipeline train's time outside its loop / import torch", "<= 1.3", 1),
    Bench("train-digits", ("bench/bench_train.py", "--repeats", "3"),
          "pinned pipeline / plain PyTorch loop, digits MLP", "<= 1.05", 1),
    Bench("train-charlm", ("bench/bench_train.py", "--config", "examples/charlm/config.toml",
                           "--repeats", "3", "train.max_steps=40"),
          "pinned pipeline / plain PyTorch loop, charlm transformer", "<= 1.05", 3),
    Bench("threads", ("bench/bench_threads.py", "--quick"),
          "pinned ms per step at 1 and N threads and auto, one hash checked", "one hash", 2),
    Bench("distributed", ("bench/bench_distributed.py", "--steps", "60"),
          "invariant reduction / plain all-reduce, world size 2", "<= 1.3", 1),
    Bench("exact", ("bench/bench_exact.py", "--repeats", "2"),
          "exact / stock step time and peak memory, MLPs, 1 and 2 threads", "<= 3", 4),
    Bench("exact-layers", ("bench/bench_exact_layers.py", "--repeats", "2"),
          "exact / stock and exact / pinned step time and memory, charlm", "<= 3; memory <= 1.5",
          5),
    Bench("exact-llama", ("bench/bench_exact_layers.py", "--config",
                          "examples/llama/config.toml", "--repeats", "2"),
          "exact / stock and exact / pinned step time (wall and CPU) and memory, the LLaMA-style "
          "example", "<= 3; memory <= 1.5", 3),
    Bench("exact-ops", ("bench/bench_exact_ops.py", "--repeats", "5"),
          "each exact function of spec sections 20-23: error vs fp64 (exact and stock fp32), "
          "forward + backward time / stock at 1 and 2 threads", "error <= 2x fp32's", 1),
    Bench("exact-cnn", ("bench/bench_exact_cnn.py", "--repeats", "5"),
          "BatchNorm, var, Conv1d and the general Conv2d (spec sections 24-25): error vs fp64 "
          "(exact and stock fp32), forward + backward time / stock at 1 and 2 threads",
          "error <= fp32's", 2),
    Bench("exact-resnet", ("bench/bench_exact_layers.py", "--config",
                           "examples/resnet/config.toml", "--repeats", "3"),
          "exact / stock and exact / pinned step time (wall and CPU) and memory, the ResNet "
          "example", "<= 3; memory <= 1.5", 3),
    Bench("exact-vit", ("bench/bench_vit.py", "--steps", "20"),
          "examples/vit (nn.TransformerEncoderLayer, label smoothing): exact / stock step time "
          "at 1 and 2 threads (alternated), peak memory; where exact's time goes",
          "<= 3; memory <= 1.5", 3),
    Bench("stream", ("bench/bench_stream.py", "--mib", "256", "--runs", "3", "--steps", "50"),
          "a memory-mapped npy dataset: verify cold and warm, training RSS mapped vs in memory",
          "warm verify <= 50 ms", 1.5),
    Bench("stress-kill", ("bench/stress_kill.py", "--kills", "10"),
          "SIGKILL at random points, then resume: equal to the uninterrupted hash",
          "every kill point equal", 3),
    Bench("peers", ("bench/peers.py", "--quick"),
          "plain loop, Lightning, pinned and exact side by side", "pinned/plain <= 1.05",
          1.5, needs="lightning"),
    Bench("model-features", ("bench/model_features.py",),
          "tied, frozen, unused, hooked, BatchNorm, parametrized models in both modes at "
          "1/2 threads and 2 processes (issue 21)", "one hash per mode, or a refusal", 5),
)
BY_NAME = {b.name: b for b in BENCHES}
_SECTION = re.compile(r"<!-- bench:(?P<name>[\w-]+) -->\n.*?<!-- /bench:(?P=name) -->\n",
                      re.DOTALL)


def _run(argv: list[str], timeout: float = 60) -> str:
    try:
        out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                             timeout=timeout, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> str:
    """One line: CPU model, cores, torch, Python, OS, commit, load average."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch = _run([sys.executable, "-c", "import torch; print(torch.__version__)"]) or "no torch"
    commit = _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown commit"
    if _run(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += " with local changes"
    load = "%.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else "?"
    return (f"{cpu}, {os.cpu_count()} cores ({usable} usable), torch {torch}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}, "
            f"commit {commit}, load average {load} at the start")


def run_bench(b: Bench, timeout: float) -> tuple[str, bool]:
    """The bench's section of RESULTS.md (it runs now), and whether it exited 0."""
    command = "python " + " ".join(b.argv)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = machine()
    print(f"[{b.name}] {command}", flush=True)
    start = time.monotonic()
    try:
        out = subprocess.run([sys.executable, *b.argv], cwd=ROOT, capture_output=True,
                             text=True, timeout=timeout, check=False,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        status, stdout, stderr = f"exit {out.returncode}", out.stdout, out.stderr
    except subprocess.TimeoutExpired as e:
        status = f"killed after {timeout:.0f} s"
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    took = time.monotonic() - start
    print(f"[{b.name}] {status}, {took:.0f} s", flush=True)
    body = stdout.rstrip() or "(no output)"
    if status != "exit 0":
        tail = "\n".join(stderr.rstrip().splitlines()[-15:])
        body += f"\n\n--- stderr (last lines) ---\n{tail}" if tail else ""
    return _section(b, when, where, status, took, command, body), status == "exit 0"


def _section(b: Bench, when: str, where: str, status: str, took: float, command: str,
             body: str) -> str:
    fence = "````" if "```" in body else "```"
    return (f"<!-- bench:{b.name} -->\n## {b.name}\n\n"
            f"{b.measures}; target {b.target}.\n\n"
            f"Run {when} on {where}; {status}, {took:.0f} s.\n\n"
            f"```sh\n{command}\n```\n\n{fence}\n{body}\n{fence}\n"
            f"<!-- /bench:{b.name} -->\n")


def _skipped(b: Bench) -> str:
    return (f"<!-- bench:{b.name} -->\n## {b.name}\n\n{b.measures}; target {b.target}.\n\n"
            f"Not run: `{b.needs}` is not installed (`.venv/bin/pip install --require-hashes "
            f"-r bench/requirements-bench.lock`).\n<!-- /bench:{b.name} -->\n")


def existing_sections(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    return {m.group("name"): m.group(0) for m in _SECTION.finditer(path.read_text())}


def render(sections: dict[str, str]) -> str:
    rows = []
    for b in BENCHES:
        sec = sections.get(b.name, "")
        m = re.search(r"^Run (\S+ \S+ UTC)", sec, re.MULTILINE)
        state = m.group(1) if m else ("not run" if not sec or "Not run" in sec else "?")
        rows.append(f"| [{b.name}](#{b.name}) | `python {' '.join(b.argv)}` | {b.measures} | "
                    f"{b.target} | {state} |")
    head = ("<!-- Generated by `python bench/results.py`; do not edit by hand. -->\n"
            "# Benchmark results\n\n"
            "Measured figures of the benchmarks in `bench/`, as each printed them. Regenerate "
            "all with `.venv/bin/python bench/results.py` (about 25 minutes on 2 cores), or some "
            "with `--only NAME,NAME` (the other sections are kept). Each section names the "
            "machine and commit it ran on; timings on shared machines vary by 20-40% between "
            "runs, so the benches compare contenders side by side in one run. What the "
            "figures mean and their history: docs/explanation/performance.md.\n\n"
            "| bench | command | measures | target | last run |\n|---|---|---|---|---|\n")
    body = "\n".join(sections[b.name] for b in BENCHES if b.name in sections)
    return head + "\n".join(rows) + "\n\n" + body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated bench names (default: all)")
    ap.add_argument("--list", action="store_true", help="print the benches and exit")
    ap.add_argument("--out", type=Path, default=OUT, help="default bench/RESULTS.md")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per bench")
    args = ap.parse_args(argv)
    if args.list:
        for b in BENCHES:
            extra = f" (needs {b.needs})" if b.needs else ""
            print(f"{b.name:14} ~{b.minutes:g} min  python {' '.join(b.argv)}{extra}")
        print(f"all: ~{sum(b.minutes for b in BENCHES):g} min")
        return 0
    names = [n for n in args.only.split(",") if n] or [b.name for b in BENCHES]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"--only: unknown bench(es) {unknown}; known: {', '.join(BY_NAME)}")
    sections = existing_sections(args.out)
    failed = []
    for name in names:
        b = BY_NAME[name]
        if b.needs and importlib.util.find_spec(b.needs) is None:
            print(f"[{name}] skipped: {b.needs} is not installed", flush=True)
            sections.setdefault(name, _skipped(b))
            continue
        sections[name], ok = run_bench(b, args.timeout)
        if not ok:
            failed.append(name)
        args.out.write_text(render(sections))  # after each bench: a crash keeps what ran
    args.out.write_text(render(sections))
    print(f"wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
