"""Pretrained weights for a model factory, verified like data.

A factory that starts from pretrained weights (a backbone to fine-tune) loads
them with ``pipeline.pretrained(name)``: ``name`` is a file entry of the
project's data manifest (a safetensors file with its sha256 and size), read
within its declared size, checked against the sha256 the run verified, and
parsed as safetensors (never unpickled). The files a run loads this way enter
its run key (``data.pretrained``), so another backbone is another run.

The recipe sets the run's verified manifest (``set_verified``) before it
builds the model; outside a run (a factory called by hand) ``pretrained``
raises.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from ..core.errors import ConfigError, DataIntegrityError
from ..core.safeio import read_regular

if TYPE_CHECKING:
    from .manifest import Verified

__all__ = ["pretrained", "set_verified", "loaded", "loaded_tensors"]

_state: dict[str, Any] = {"verified": None, "loaded": {}, "tensors": []}


def set_verified(verified: Verified) -> None:
    """Make ``verified``'s files the ones ``pretrained`` may load, from now on
    (a process prepares one run; the record of loaded files starts afresh)."""
    _state["verified"] = verified
    _state["loaded"], _state["tensors"] = {}, []


def loaded() -> dict[str, str]:
    """name -> sha256 of every file ``pretrained`` loaded since the run's
    manifest was set: what the run key's data input records of them."""
    return dict(sorted(_state["loaded"].items()))


def loaded_tensors() -> list[Any]:
    """Every tensor ``pretrained`` returned since: the values exact mode may
    keep as a factory set them (pipeline.exact.convert.seed_free_values)."""
    return list(_state["tensors"])


def pretrained(name: str) -> dict[str, Any]:
    """The tensors of manifest file ``name`` (a safetensors file), as torch
    tensors on the CPU; ConfigError if no run's manifest is in use or it has
    no such file, DataIntegrityError if the file is not what was verified."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    verified = _state["verified"]
    if verified is None:
        raise ConfigError("pipeline.pretrained", [
            f"pipeline.pretrained({name!r}): no run's data manifest is in use: call it from "
            f"a model factory that `pipeline train` runs"])
    if name not in verified.entries:
        raise ConfigError("pipeline.pretrained", [
            f"pipeline.pretrained({name!r}): the data manifest has no file entry {name!r} "
            f"(add it with `pipeline data add FILE --name {name}`); it has "
            f"{sorted(verified.entries)}"])
    entry = verified.entries[name]
    path = verified.root / entry.path
    try:
        blob = read_regular(path, entry.size)
    except OSError as e:
        raise DataIntegrityError(str(path), f"the {entry.size}-byte file the manifest lists",
                                 e.strerror or str(e)) from None
    found = hashlib.sha256(blob).hexdigest()
    if found != verified.hashes[name]:
        raise DataIntegrityError(str(path), f"sha256:{verified.hashes[name]} (verified)",
                                 f"sha256:{found}", "the file changed since it was verified")
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError) as e:
        raise DataIntegrityError(str(path), "a safetensors file", f"unreadable ({e})") from None
    _state["loaded"][name] = found
    _state["tensors"] += [t.detach().clone() for t in tensors.values()]
    return tensors
