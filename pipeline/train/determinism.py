"""Seeding and torch's determinism switches, and capture/restore of every
RNG state a checkpoint must carry."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Collection
from typing import Any

import numpy as np
import torch

__all__ = ["seed_everything", "strict_torch", "capture_rng", "restore_rng"]


def seed_everything(seed: int) -> int:
    """Check ``seed`` and seed Python, NumPy and torch (all devices); return it.

    The pipeline itself draws from explicit generators (pipeline.core.rng); the
    global ones are seeded so that any library code that uses them is fixed too.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed: expected an integer in [0, 2^63), found {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def strict_torch() -> None:
    """Deterministic kernels only, no TF32, no cuDNN autotuning.

    What ``torch.use_deterministic_algorithms(True)`` does (torch/__init__.py,
    2.13), without its ``import torch._inductor.config``: that import loads
    inductor and dynamo, about 1 s (a second ``import torch``) in a run that
    compiles nothing. ATen's flag is set directly; inductor's ``deterministic``
    through TORCHINDUCTOR_DETERMINISTIC, which its config reads when it is
    imported (torch/_inductor/config.py), or on the module if it already is;
    child processes inherit the variable, as they inherit the pinned profile.
    """
    torch._C._set_deterministic_algorithms(True, warn_only=False)
    os.environ["TORCHINDUCTOR_DETERMINISTIC"] = "1"
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.deterministic = True  # type: ignore[attr-defined]
    if not torch.are_deterministic_algorithms_enabled():  # a torch that moved the flag
        raise RuntimeError("torch did not enable deterministic algorithms")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def capture_rng(dropout_counter: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG state: (tensors for safetensors, JSON-able metadata)."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {
        "python": {"version": version, "state": list(state), "gauss": gauss},
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": [int(k) for k in np_state["state"]["key"]],
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "dropout_counter": int(dropout_counter),
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                skip: Collection[str] = ()) -> int:
    """Restore what capture_rng saved; return the dropout counter. ``skip``
    names states left alone (the resume test's control, pipeline.core._testing)."""
    if "python" not in skip:
        py = meta["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "numpy" not in skip:
        n = meta["numpy"]
        np.random.set_state({"bit_generator": n["bit_generator"],
                             "state": {"key": np.array(n["key"], dtype=np.uint32),
                                       "pos": n["pos"]},
                             "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if "torch_cpu" not in skip:
        torch.set_rng_state(tensors["rng.torch_cpu"])
    if torch.cuda.is_available() and "cuda" not in skip:
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return 0 if "dropout" in skip else int(meta["dropout_counter"])
