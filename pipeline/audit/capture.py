"""The child side of ``pipeline audit`` and ``pipeline exec``: imported at
start-up of a user's unchanged script (a ``sitecustomize.py`` that
``pipeline.audit.commands`` writes and puts first on the child's PYTHONPATH), it
watches every ``torch.optim.Optimizer.step`` through torch's global step
hooks and writes what it saw to ``$PIPELINE_AUDIT_RECORD``, atomically.

Read from the environment the parent set (never by a user):
- ``PIPELINE_AUDIT_RECORD``: where the record goes (unset: capture is off);
- ``PIPELINE_AUDIT_TRAIL=1``: a trail row per optimizer step (and step 0, the
  weights before the first update): 8 bytes of SHA-1 per parameter in sorted
  name order, the run trail's format (pipeline.core.hashing.tensor_digests);
- ``PIPELINE_AUDIT_STEPS=N``: after N steps write the record and end the
  process (os._exit: no framework can swallow it; the parent ends strays);
- ``PIPELINE_AUDIT_SEED=S``: seed Python's, NumPy's and torch's global
  generators at start-up from ``rng.key(S, rng.EXEC, i)`` (the script's own
  seeding, later, overrides it);
- ``PIPELINE_AUDIT_OWNER``: the pid of the one process that records. The first
  process sets it; DataLoader workers (forked or spawned) and any other child
  inherit it and record nothing.

Nothing here changes the script's arithmetic: hooks only read parameters.
torch is not imported here; the hooks are installed when the script imports it.
"""

from __future__ import annotations

import atexit
import gc
import importlib.abc
import importlib.util
import json
import os
import sys
from typing import Any

__all__ = ["boot"]

_ENV = os.environ
_state: dict[str, Any] = {"steps": 0, "optimizers": [], "names": [], "rows": [],
                          "observed": None, "done": False}


def boot(site_file: str) -> None:
    """Install the capture in this process (if it is the owner), then run the
    sitecustomize this one shadows."""
    try:
        if _ENV.get("PIPELINE_AUDIT_RECORD") and _claim():
            if _ENV.get("PIPELINE_AUDIT_SEED"):
                _seed_python_numpy(int(_ENV["PIPELINE_AUDIT_SEED"]))
            sys.meta_path.insert(0, _TorchFinder())
            atexit.register(_finish, "exit")
    finally:
        _chain(os.path.dirname(os.path.abspath(site_file)))


def _claim() -> bool:
    owner = _ENV.get("PIPELINE_AUDIT_OWNER")
    if owner is None:
        os.environ["PIPELINE_AUDIT_OWNER"] = str(os.getpid())
        return True
    return owner == str(os.getpid())


def _owner() -> bool:
    """False in a forked child (a DataLoader worker) of the recording process."""
    return _ENV.get("PIPELINE_AUDIT_OWNER") == str(os.getpid())


def _chain(here: str) -> None:
    """Import the sitecustomize module our directory shadows (a distribution's
    or a virtualenv's), as site.py would have."""
    saved, ours = sys.path[:], sys.modules.pop("sitecustomize", None)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    try:
        importlib.import_module("sitecustomize")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
        if ours is not None:  # the import system looks ours up when its body returns
            sys.modules["sitecustomize"] = ours


def _seed_python_numpy(seed: int) -> None:
    import random

    import numpy as np

    from ..core.rng import EXEC, key
    random.seed(key(seed, EXEC, 0))
    np.random.seed(key(seed, EXEC, 1) % 2**32)


class _TorchFinder(importlib.abc.MetaPathFinder):
    """Runs ``_on_torch`` once ``import torch`` has finished (a post-import hook)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None:
            return spec
        loader, original = spec.loader, spec.loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            _on_torch(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _on_torch(torch: Any) -> None:
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    if _ENV.get("PIPELINE_AUDIT_SEED"):
        from ..core.rng import EXEC, key
        torch.manual_seed(key(int(_ENV["PIPELINE_AUDIT_SEED"]), EXEC, 2) % 2**63)
    register_optimizer_step_pre_hook(_before_step)
    register_optimizer_step_post_hook(_after_step)


def _before_step(opt: Any, args: Any, kwargs: Any) -> None:
    if not _owner() or any(o is opt for o in _state["optimizers"]):
        return
    _state["optimizers"].append(opt)
    _state["names"].append(_name_parameters(opt))
    if _state["observed"] is None:
        import torch
        _state["observed"] = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                              "threads": torch.get_num_threads()}
    _row(len(_state["optimizers"]) - 1, 0)  # the weights before this optimizer's first update


def _after_step(opt: Any, args: Any, kwargs: Any) -> None:
    if not _owner() or _state["done"]:
        return
    k = next((i for i, o in enumerate(_state["optimizers"]) if o is opt), None)
    if k is None:
        return
    _state["steps"] += 1
    _row(k, _state["steps"])
    limit = int(_ENV.get("PIPELINE_AUDIT_STEPS") or 0)
    if limit and _state["steps"] >= limit:
        _finish("stopped")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(0)  # the audit has what it asked for; the parent ends any worker left


def _name_parameters(opt: Any) -> dict[str, Any]:
    """name -> parameter: the names of the module that holds the most of this
    optimizer's parameters (the outermost such module, so a LightningModule's
    own names), else ``group{g}.param{i}``."""
    import torch

    params = [p for g in opt.param_groups for p in g["params"]]
    wanted = {id(p) for p in params}
    best: tuple[Any, ...] = (0, 0, ())
    for obj in gc.get_objects():
        # type(), not isinstance(): no __class__ property of a stray object runs
        if issubclass(type(obj), torch.nn.Module):
            named = {id(p): n for n, p in obj.named_parameters() if id(p) in wanted}
            rank = (len(named), sum(map(len, named.values())), tuple(sorted(named.values())))
            if rank > best[:3]:
                best = (*rank, named, obj)
    names = best[3] if len(best) > 3 else {}
    _state.setdefault("modules", []).append(best[4] if len(best) > 4 else None)
    out: dict[str, Any] = {}
    for g, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            out[names.get(id(p), f"group{g}.param{i}")] = p
    return out


def _plain(t: Any) -> Any:
    """The tensor as NumPy can hash it: dtypes NumPy lacks (bfloat16, float8)
    as raw bytes of the same width."""
    import torch

    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16) or "float8" in str(t.dtype):
        return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.uint8)
    return t


def _row(k: int, step: int) -> None:
    if _ENV.get("PIPELINE_AUDIT_TRAIL") != "1":
        return
    from ..core.hashing import tensor_digests
    digests = tensor_digests({n: _plain(p) for n, p in _state["names"][k].items()})
    _state["rows"].append([step, k, digests.hex()])


def _final() -> tuple[str | None, dict[str, Any]]:
    """The canonical hash (pipeline.core.hashing.weights_sha256) of every optimised
    parameter and its module's buffers, and their layout."""
    if not _state["optimizers"]:
        return None, {}
    from ..core.hashing import weights_sha256

    tensors: dict[str, Any] = {}
    many = len(_state["optimizers"]) > 1
    for k, names in enumerate(_state["names"]):
        module = _state["modules"][k]
        named = dict(names)
        if module is not None:
            named.update(module.named_buffers())
        for n, t in named.items():
            tensors[f"opt{k}.{n}" if many else n] = _plain(t)
    layout = {n: [str(t.dtype).removeprefix("torch."), list(t.shape)]
              for n, t in sorted(tensors.items())}
    return weights_sha256(tensors), layout


def _finish(ended: str) -> None:
    if _state["done"] or not _owner():
        return
    _state["done"] = True
    sha, layout = _final()
    record = {"version": 1, "ended": ended, "pid": os.getpid(), "steps": _state["steps"],
              "torch_imported": "torch" in sys.modules, "observed": _state["observed"],
              "names": [sorted(n) for n in _state["names"]], "digest_bytes": 8,
              "rows": _state["rows"], "weights_sha256": sha, "layout": layout}
    from pathlib import Path

    from ..core.atomic import write_text
    write_text(Path(_ENV["PIPELINE_AUDIT_RECORD"]), json.dumps(record, sort_keys=True))
