"""The per-step trail's cost against a training step, for a model of about
10M parameters (MLP 784-2048-2048-2048-10, batch 64): the sampled integer
fingerprint (pipeline.core.hashing.fingerprints, the trail now) and SHA-1 of
every tensor (tensor_digests, the trail before). Prints a table; the target
is a trail of at most 1% of the step.

    .venv/bin/python bench/bench_trail.py [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.core.hashing import fingerprints, tensor_digests  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                          nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
    params = dict(model.named_parameters())
    n = sum(p.numel() for p in params.values())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {"training step": [], "fingerprints (trail now)": [],
                                     "SHA-1 per tensor (trail before)": []}
    fns = {"training step": step, "fingerprints (trail now)": lambda: fingerprints(params),
           "SHA-1 per tensor (trail before)": lambda: tensor_digests(params)}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in fns.items():  # alternating
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["training step"])
    print(f"{n / 1e6:.1f}M parameters in {len(params)} tensors, batch 64, {args.threads} "
          f"thread(s), median of {args.repeats}")
    print(f"{'':34} {'ms':>8} {'/ step':>8}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:34} {1e3 * m:8.3f} {m / base:8.4f}")
    print("target: trail / step <= 0.01")


if __name__ == "__main__":
    main()
