"""Every torch.distributed name the package uses exists in the Nix route's torch.

nixpkgs 25.11 ships torch 2.9.1, the pip route 2.13: a name added after 2.9
(``dist.all_gather_single``) passes every test here and crashes there (issue 25:
`--nproc 2` exited 70 under torch 2.9.1). The names each module of
torch.distributed had in 2.9.1 are in torch-2.9.1-distributed.json beside this
file, written by running this module under that torch:

    VENV/bin/python -m tests.train.test_torch_api     # VENV: a virtualenv with torch 2.9.1
"""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

from ..support import ROOT

SNAPSHOT = Path(__file__).with_name("torch-2.9.1-distributed.json")
DIST = "torch.distributed"


def distributed_names(source: str) -> set[tuple[str, str]]:
    """(module, name) for every torch.distributed attribute ``source`` uses: through an
    alias (``import torch.distributed as dist``; ``dist.X``), the full dotted path
    (``torch.distributed.X``) or ``from torch.distributed[.sub] import X``. A name read
    with ``getattr(dist, "X", default)`` is optional by construction and not listed;
    its fallback is (``... or dist.Y`` uses dist.Y)."""
    tree = ast.parse(source)
    aliases = {DIST: DIST}
    used: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(DIST) and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(DIST):
            used |= {(node.module or "", a.name) for a in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            base = ast.unparse(node.value)
            if base in aliases:
                used.add((aliases[base], node.attr))
    return used


def _used() -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        found |= distributed_names(path.read_text(encoding="utf-8"))
    return found


def _snapshot() -> dict[str, list[str]]:
    return dict(json.loads(SNAPSHOT.read_text(encoding="utf-8"))["modules"])


def test_the_scan_finds_every_spelling() -> None:
    """The scanner sees an alias, the full path and a from-import (and no other
    module's attributes)."""
    src = ("import torch.distributed as dist\nimport torch\n"
           "from torch.distributed.run import run\n"
           "dist.all_gather_single(a, b)\ntorch.distributed.broadcast(t, 0)\nx.get_rank()\n"
           "getattr(dist, 'all_to_all_single', None) or dist.all_to_all\n")
    assert distributed_names(src) == {(DIST, "all_gather_single"), (DIST, "broadcast"),
                                      ("torch.distributed.run", "run"), (DIST, "all_to_all")}


def test_every_name_used_exists_in_torch_2_9_1() -> None:
    """Each torch.distributed name the package uses is one torch 2.9.1 has
    (the snapshot), and one this process's torch has."""
    known = _snapshot()
    used = _used()
    assert (DIST, "all_gather_into_tensor") in used  # the scan sees the package's calls
    assert (DIST, "all_gather_single") not in used  # read only through getattr
    missing = sorted(f"{m}.{n}" for m, n in used if n not in known.get(m, []))
    assert not missing, f"not in torch 2.9.1 (nixpkgs 25.11's torch): {missing}"
    absent = sorted(f"{m}.{n}" for m, n in used if not hasattr(importlib.import_module(m), n))
    assert not absent, absent


def test_the_snapshot_lacks_what_2_9_1_lacks() -> None:
    """The control: the snapshot is 2.9.1's, without the name that crashed there."""
    known = _snapshot()
    assert "all_gather_single" not in known[DIST]
    assert {"all_gather_into_tensor", "all_reduce", "broadcast"} <= set(known[DIST])


if __name__ == "__main__":  # write the snapshot with this interpreter's torch
    import torch

    modules = sorted({m for m, _ in _used()} | {DIST})
    SNAPSHOT.write_text(json.dumps({
        "torch": torch.__version__,
        "comment": "dir() of each torch.distributed module the package uses, under PyPI's "
                   "torch 2.9.1 (nixpkgs 25.11's version); python -m tests.train.test_torch_api",
        "modules": {m: sorted(n for n in dir(importlib.import_module(m))
                              if not n.startswith("__")) for m in modules}}, indent=0) + "\n",
        encoding="utf-8")
