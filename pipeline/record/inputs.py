"""What decides a run's weights (``RunInputs``), the run key derived from it,
and the one map from each input to its field in run.json (``INPUT_FIELDS``).

Writing a record, checking that a memoised run is this run (runs.reusable),
``pipeline verify``'s note of what differs here, and ``pipeline diff`` all
read the inputs through ``RunInputs.fields`` / ``INPUT_FIELDS``; nothing else
spells the mapping.

The key is the sha256 of the canonical JSON of the inputs the mode's bits
depend on (``key_fields``: pipeline.modes decides; exact mode leaves the
toolchain and profile out), plus any test-only switch in force that changes
bits (pipeline.core._testing.keyed).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from ..core.config import Config, canonical_json, config_to_dict

__all__ = ["RunInputs", "INPUT_FIELDS", "run_inputs"]

# input -> run.json field, for every input that can decide the weights.
INPUT_FIELDS: dict[str, str] = {
    "config": "config", "data": "data", "code": "code_sha256", "model": "model",
    "toolchain": "toolchain", "profile": "profile", "switches": "test_switches"}


@dataclass(frozen=True)
class RunInputs:
    """Everything that decides the weights, and the key derived from it."""

    config: Config
    data: dict[str, Any]
    code: str
    toolchain: dict[str, Any]
    profile: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)  # factory/loss names, source hashes
    # Not keyed (it follows from data and code): the canonical hash of the
    # decoded arrays trained on, recorded so that verify can re-decode and compare.
    decoded: dict[str, str] = field(default_factory=dict)
    # Test-only switches in force that change bits (empty for every real run).
    switches: dict[str, Any] = field(default_factory=dict)
    # The inputs the mode's bits depend on (pipeline.modes.Mode.key_fields).
    key_fields: tuple[str, ...] = field(kw_only=True)

    def values(self) -> dict[str, Any]:
        """input name -> its JSON value, for every input."""
        return {"config": config_to_dict(self.config), "data": self.data, "code": self.code,
                "model": self.model, "toolchain": self.toolchain, "profile": self.profile,
                "switches": self.switches}

    def keyed(self) -> dict[str, Any]:
        """The inputs the run key covers: the mode's, and switches when any is set."""
        every = self.values()
        out = {f: every[f] for f in self.key_fields}
        if self.switches:
            out["switches"] = self.switches
        return out

    @property
    def key(self) -> str:
        return hashlib.sha256(canonical_json(self.keyed())).hexdigest()

    def fields(self) -> dict[str, Any]:
        """run.json field -> value for every input, the key and what it covers."""
        every = self.values()
        out = {INPUT_FIELDS[name]: value for name, value in every.items()
               if name != "switches" or value}
        return {**out, "run_key": self.key, "key_inputs": sorted(self.keyed()),
                "data_decoded": self.decoded}


def run_inputs(cfg: Config, key_fields: tuple[str, ...], data: dict[str, Any],
               profile: dict[str, Any], model: dict[str, Any],
               decoded: dict[str, str] | None = None,
               switches: dict[str, Any] | None = None) -> RunInputs:
    """The inputs of a run in this process: the code and toolchain as found here."""
    from ..core.environment import code_sha256, toolchain_fingerprint
    return RunInputs(cfg, data, code_sha256(), toolchain_fingerprint(), profile, model,
                     decoded or {}, switches or {}, key_fields=key_fields)
