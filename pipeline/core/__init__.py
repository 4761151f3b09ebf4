"""The leaves every other package builds on: the errors and exit codes, the
strict config, the numeric profile and toolchain fingerprint (environment),
the canonical weight hash, the counter-based generator, the learning-rate
schedule, atomic writes, bounded reads of regular files, file locks, and the
test-only switches (``_testing``, the one module that reads them)."""

from __future__ import annotations

from ._lazy import exports

__all__ = ["Config", "load_config", "config_sha256", "EXIT_CODES", "PipelineError",
           "UsageError", "ConfigError", "DataIntegrityError", "MismatchError", "ProfileError",
           "CheckpointError", "DistributedError", "weights_sha256", "load_profile",
           "toolchain_fingerprint", "code_sha256", "schedule_of"]

__getattr__ = exports(__name__, {
    "Config": "config", "load_config": "config", "config_sha256": "config",
    "EXIT_CODES": "errors", "PipelineError": "errors", "UsageError": "errors",
    "ConfigError": "errors", "DataIntegrityError": "errors", "MismatchError": "errors",
    "ProfileError": "errors", "CheckpointError": "errors", "DistributedError": "errors",
    "weights_sha256": "hashing", "load_profile": "environment",
    "toolchain_fingerprint": "environment", "code_sha256": "environment",
    "schedule_of": "schedule"})
