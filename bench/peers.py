"""Peers side by side: the same model, data, optimiser and steps trained by a
plain PyTorch loop, PyTorch Lightning (``Trainer(deterministic=True)``), and
the pipeline in pinned and in exact mode, on the digits MLP
(configs/digits.toml, configs/digits-exact.toml) and the charlm transformer
(examples/charlm/config.toml). Prints a table per model, then one line:
``pinned/plain=X pinned/lightning=Y exact/plain=Z``. Targets: X <= 1.05,
Y <= 0.35.

    .venv/bin/pip install --require-hashes -r bench/requirements-bench.lock  # Lightning
    .venv/bin/python bench/peers.py [--quick] [--rounds N] [--models digits,charlm]

How it measures. All four run in one process, re-executed under the pinned
numeric profile (x86_64-avx2-1t), so every contender runs at one thread with
the same kernels, with deterministic algorithms on. Each contender trains
from scratch twice per round, for a short and a long number of steps, timed
inside the process from building the model to the end of training (data
verification and interpreter start-up are outside); its time per step is
(long - short) / (long steps - short steps), so what every run does once
(building the model, Lightning's fit set-up, the final evaluation over the
test split) cancels and the epoch-end evaluations count per step alike.
charlm runs on a 79-window validation split (data.test_fraction=0.001), not
its 1580 windows, whose evaluation (1-2 s here) would drown the difference
in its jitter. Rounds alternate the contenders (rotating who goes first);
the table gives medians over rounds.

The contenders: the plain loop and the Lightning module use the config's
factory (initialised as the pipeline initialises it), its optimiser
(``stock_optim.TorchOptimizer``), whole batches in one shuffled order, the stock
mean cross-entropy, and evaluate where the pipeline does (bench/loops.py);
each table says whether their warm-up runs ended with the same weights, bit
for bit (they do: the same work). Lightning gets the batches as an iterable
(no per-row collation), no logger, no checkpoints, no progress bar: its own
loop is what is measured. Exact mode runs charlm converted to its exact
layers (``mode=exact``, pipeline.exact.from_torch).

The last line is the digits MLP's (the default config, 8 shards, against the
shipped exact config, 1 shard); charlm's ratios are in its table.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import loops  # bench/loops.py: the script's directory is first on sys.path

INSTALL = ".venv/bin/pip install --require-hashes -r bench/requirements-bench.lock"
EXACT_NA = "n/a (no exact config for this model)"
NAMES = ("plain", "lightning", "pinned", "exact")
LABELS = {"plain": "plain PyTorch loop", "lightning": "Lightning Trainer(deterministic=True)",
          "pinned": "pipeline, pinned mode", "exact": "pipeline, exact mode"}


@dataclass(frozen=True)
class Model:
    title: str
    config: str
    exact_config: str | None
    quick: tuple[int, int]  # (short, long) steps
    full: tuple[int, int]   # long = 0: the config's own steps
    overrides: tuple[str, ...] = ()
    exact_overrides: tuple[str, ...] = ()


MODELS = {
    "digits": Model("digits MLP", "configs/digits.toml", "configs/digits-exact.toml",
                    quick=(22, 220), full=(22, 0)),
    # A validation split of 79 windows, not 1580: the pipeline evaluates it
    # after the last step, 1-2 s here (20 steps' worth), whose jitter on a
    # shared machine would drown the per-step difference; the same for all.
    "charlm": Model("charlm transformer", "examples/charlm/config.toml",
                    "examples/charlm/config.toml", quick=(2, 12), full=(5, 45),
                    overrides=("data.test_fraction=0.001",),
                    exact_overrides=("mode=exact", "data.test_fraction=0.001")),
}


@dataclass(frozen=True)
class Timing:
    whole: float     # median seconds of the long run
    per_step: float  # median over rounds of (long - short) / (long steps - short steps)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/peers.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds (about 1 min)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="alternating rounds (default 3 with --quick, else 5)")
    ap.add_argument("--models", default="digits,charlm",
                    help=f"comma-separated, of {', '.join(MODELS)}")
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        ap.error(f"--models: expected names from {list(MODELS)}, found {bad or args.models}")
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    if args.rounds < 1:
        ap.error(f"--rounds: expected an integer >= 1, found {args.rounds}")
    return args


def measure(runners: dict[str, Callable[[int], float]], short: int, long: int,
            rounds: int) -> dict[str, Timing]:
    """Each runner trains ``short`` then ``long`` steps per round and returns
    its seconds; runners alternate, the first of each round rotating. The
    caller has warmed each up."""
    whole: dict[str, list[float]] = {n: [] for n in runners}
    step: dict[str, list[float]] = {n: [] for n in runners}
    names = list(runners)
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t_short, t_long = runners[n](short), runners[n](long)
            whole[n].append(t_long)
            step[n].append((t_long - t_short) / (long - short))
    return {n: Timing(statistics.median(whole[n]), statistics.median(step[n])) for n in names}


def ratio(t: dict[str, Timing], a: str, b: str) -> float | None:
    return t[a].per_step / t[b].per_step if a in t and b in t else None


def table(title: str, head: str, t: dict[str, Timing]) -> list[str]:
    """The model's table: whole long run, ms per step, ratios to plain and Lightning."""
    lines = [f"{title}: {head}",
             f"  {'contender':38} {'long run s':>10} {'ms/step':>8} {'/ plain':>8} "
             f"{'/ lightning':>11}"]
    for n in NAMES:
        if n not in t:
            lines.append(f"  {LABELS[n]:38} {EXACT_NA}")
            continue
        rp, rl = ratio(t, n, "plain"), ratio(t, n, "lightning")
        lines.append(f"  {LABELS[n]:38} {t[n].whole:10.3f} {1000 * t[n].per_step:8.3f} "
                     f"{_fmt(rp):>8} {_fmt(rl):>11}")
    return lines


def summary(t: dict[str, Timing]) -> str:
    """The last line."""
    return (f"pinned/plain={_fmt(ratio(t, 'pinned', 'plain'))} "
            f"pinned/lightning={_fmt(ratio(t, 'pinned', 'lightning'))} "
            f"exact/plain={_fmt(ratio(t, 'exact', 'plain'))}")


def _fmt(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}"


def lightning(b: Any, steps: int) -> loops.Run:
    """The same training as a LightningModule under ``Trainer(deterministic=True)``."""
    import lightning as L

    t0 = time.perf_counter()
    loop = loops.UserLoop(b)
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1,
                        deterministic=True, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    module = _module_class()(loop, steps)
    trainer.fit(module, train_dataloaders=loop.batches())
    return loops.Run(time.perf_counter() - t0, module.net.state_dict())


def _module_class() -> type:
    import lightning as L

    class UserModule(L.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self, loop: Any, steps: int) -> None:
            super().__init__()
            self.loop, self.steps, self.done = loop, steps, 0
            self.net = loop.model()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return self.loop.loss(self.net(x), y)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.done += 1
            if self.loop.due(self.done, self.steps):
                self.loop.evaluate(self.net)

        def configure_optimizers(self) -> Any:
            return self.loop.optimizer(self.net)

    return UserModule


def _quiet_lightning() -> None:
    """Lightning's start-up notes (accelerator, seed) are not the table."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning(\..*)?")


def _run_model(key: str, quick: bool, rounds: int, profile: Any) -> dict[str, Timing]:
    import torch

    m = MODELS[key]
    b = loops.load(loops.ROOT / m.config, list(m.overrides))
    short, long = m.quick if quick else m.full
    long = long or b.steps
    runners: dict[str, Callable[[int], loops.Run]] = {
        "plain": lambda n: loops.plain(b, n), "lightning": lambda n: lightning(b, n),
        "pinned": lambda n: loops.pipeline(b, n)}
    shards = f"{b.cfg.train.shards} shards"
    if m.exact_config:
        e = loops.load(loops.ROOT / m.exact_config, list(m.exact_overrides))
        runners["exact"] = lambda n: loops.pipeline(e, n)
        shards += f", exact mode {e.cfg.train.shards}"
    warm = {n: run(short) for n, run in runners.items()}  # warm-up, and the check below
    same = _same(warm["plain"].weights, warm["lightning"].weights)
    t = measure({n: (lambda k, run=run: run(k).seconds) for n, run in runners.items()},
                short, long, rounds)
    threads = torch.get_num_threads()
    if threads != profile.threads:
        raise SystemExit(f"error: torch runs {threads} threads after the runs, "
                         f"expected the profile's {profile.threads}")
    cfg = b.cfg
    head = (f"{' '.join((m.config, *m.overrides))}: {cfg.model.factory} {cfg.model.args}, batch {cfg.train.batch_size}, "
            f"{cfg.optim.name}; {short} vs {long} steps ({shards}); {threads} thread for "
            f"every contender (profile {profile.name}, the pipeline at --threads 1); "
            f"median of {rounds} alternating rounds")
    for line in table(m.title, head, t):
        print(line, flush=True)
    print(f"  plain loop and Lightning after {short} steps: "
          + ("the same weights, bit for bit (the same work)" if same else
             "DIFFERENT weights: they do not train the same way; the ratios compare "
             "different work"), flush=True)
    return t


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if importlib.util.find_spec("lightning") is None:
        print(f"error: bench/peers.py needs PyTorch Lightning, the bench extra (not a runtime "
              f"dependency); install it with: {INSTALL}", file=sys.stderr)
        raise SystemExit(2)
    profile = loops.pin()
    import torch

    torch.use_deterministic_algorithms(True)  # Lightning's deterministic=True sets the same
    _quiet_lightning()
    results = {k: _run_model(k, args.quick, args.rounds, profile) for k in args.models}
    print("ms/step: (long run - short run) / (long steps - short steps), each run timed "
          "inside the process from building the model to the end of training")
    print("targets: pinned/plain <= 1.05, pinned/lightning <= 0.35")
    last = "digits" if "digits" in results else args.models[0]
    why = ("the default config's model; charlm's ratios are in its table"
           if last == "digits" and len(results) > 1 else "the only model run")
    print(f"last line: the {MODELS[last].title}'s ratios ({why})")
    print(summary(results[last]))


if __name__ == "__main__":
    main()
