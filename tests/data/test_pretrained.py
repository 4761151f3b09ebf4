"""pipeline/data/pretrained.py: a factory's pretrained weights come from a file
the run's manifest lists, checked against the sha256 the run verified, parsed
as safetensors, and recorded; anything else is refused by name."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from pipeline.core.errors import ConfigError, DataIntegrityError
from pipeline.data import manifest, pretrained


def _project(tmp_path: Path, blob: bytes) -> manifest.Verified:
    (tmp_path / "w.safetensors").write_bytes(blob)
    (tmp_path / "data-manifest.json").write_text(
        '{"version": 2, "files": {"w": {"path": "w.safetensors", "sha256": "%s", "size": %d, '
        '"source": "", "licence": "", "description": ""}}, "datasets": {}}'
        % (hashlib.sha256(blob).hexdigest(), len(blob)))
    return manifest.verify(tmp_path / "data-manifest.json")


def test_a_listed_file_loads_and_is_recorded(tmp_path: Path) -> None:
    blob = save({"a": torch.arange(3.0)})
    pretrained.set_verified(_project(tmp_path, blob))
    got = pretrained.pretrained("w")
    assert torch.equal(got["a"], torch.arange(3.0))
    assert pretrained.loaded() == {"w": hashlib.sha256(blob).hexdigest()}
    assert len(pretrained.loaded_tensors()) == 1


def test_refusals_name_the_file(tmp_path: Path) -> None:
    """No run's manifest; an unlisted name; a file changed since it was
    verified (same size); a listed file that is not safetensors."""
    pretrained._state["verified"] = None
    with pytest.raises(ConfigError, match="no run's data manifest"):
        pretrained.pretrained("w")
    blob = save({"a": torch.ones(4)})
    verified = _project(tmp_path, blob)
    pretrained.set_verified(verified)
    with pytest.raises(ConfigError, match="no file entry 'other'"):
        pretrained.pretrained("other")
    changed = bytearray(blob)
    changed[-1] ^= 1
    (tmp_path / "w.safetensors").write_bytes(bytes(changed))
    with pytest.raises(DataIntegrityError, match="changed since it was verified"):
        pretrained.pretrained("w")
    pretrained.set_verified(_project(tmp_path / "x" if (tmp_path / "x").mkdir() is None
                                     else tmp_path, b"not safetensors at all"))
    with pytest.raises(DataIntegrityError, match="a safetensors file"):
        pretrained.pretrained("w")
