"""Strict config loading: every problem reported together, by key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.config import Config, config_sha256, load_config, parse_overrides
from pipeline.core.errors import ConfigError

from ..support import ROOT


def test_default_config_loads_with_expected_values() -> None:
    """configs/digits.toml is the documented default run."""
    cfg = load_config(ROOT / "configs" / "digits.toml")
    assert cfg.mode == "pinned" and cfg.model.factory == "pipeline.models:mlp"
    assert cfg.model.args == {"hidden": [128], "dropout": 0.1} and cfg.train.batch_size == 64
    assert cfg.train.shards == 8  # world sizes 1, 2, 4, 8


def test_every_shipped_config_opens_with_its_command_and_loads() -> None:
    """Each example config starts with the command that runs it, and is valid."""
    configs = sorted((ROOT / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# pipeline train configs/"), path
        load_config(path)


def test_unknown_wrong_type_and_range_are_reported_together(tmp_path: Path) -> None:
    """One error lists the unknown key, the mistyped key and the out-of-range key."""
    bad = tmp_path / "bad.toml"
    bad.write_text('seed = "zero"\ncolour = 1\n[optim]\nlr = -1.0\n[train]\nepochs = 1.5\n')
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    for key in ("seed:", "colour:", "optim.lr:", "train.epochs:"):
        assert key in msg, msg
    assert len(e.value.problems) == 4
    assert str(bad) in msg


def test_bool_is_not_a_number_and_tables_are_tables(tmp_path: Path) -> None:
    """TOML booleans are not integers; a scalar in place of a table is an error."""
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = true\ntrain = 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "seed: expected an integer" in str(e.value)
    assert "train: expected a table" in str(e.value)


def test_overrides_parse_toml_values_and_bare_words() -> None:
    """key=value overrides: TOML values, dotted keys, bare words as strings."""
    assert parse_overrides(["train.epochs=3", "mode=exact", "model.args.hidden=[64, 32]"]) == {
        "train": {"epochs": 3}, "mode": "exact", "model": {"args": {"hidden": [64, 32]}}}
    cfg = load_config(None, ["train.epochs=3", "model.args.hidden=[64,32]"])
    assert cfg.train.epochs == 3 and cfg.model.args == {"hidden": [64, 32]}


def test_override_errors_name_the_key() -> None:
    """A bad override is reported like a bad file key."""
    with pytest.raises(ConfigError, match="train.shards: expected a power of two"):
        load_config(None, ["train.shards=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["=3"])


def test_batch_must_divide_into_shards() -> None:
    """Shards cut the batch evenly or the config is refused."""
    with pytest.raises(ConfigError, match="train.batch_size: expected a multiple of"):
        load_config(None, ["train.shards=4", "train.batch_size=66"])


def test_missing_and_malformed_files_are_config_errors(tmp_path: Path) -> None:
    """A missing file and a file that is not TOML both name the file."""
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "x.toml").write_text("seed = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "x.toml")


def test_config_hash_is_stable_and_sensitive() -> None:
    """Equal configs hash equal; any changed value changes the hash."""
    a, b = Config(), load_config(None, [])
    assert config_sha256(a) == config_sha256(b)
    assert config_sha256(a) != config_sha256(load_config(None, ["optim.lr=0.05"]))


def test_model_factory_and_args_are_checked(tmp_path: Path) -> None:
    """model.factory must read "module:function"; model.args must be a table of
    plain values; train.loss a built-in name or "module:function"."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.factory=not-a-factory", "train.loss=mse"])
    msg = str(e.value)
    assert "model.factory:" in msg and "train.loss:" in msg
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nargs = 3\n[model.x]\n")
    with pytest.raises(ConfigError, match="model.args: expected a table"):
        load_config(bad)
    cfg = load_config(None, ["model.factory=my_pkg.nets:resnet", "train.loss=losses:focal"])
    assert cfg.model.factory == "my_pkg.nets:resnet" and cfg.train.loss == "losses:focal"


def test_optimiser_options_are_checked_by_key() -> None:
    """optim.nesterov is a boolean, and only for sgd with momentum;
    clip_norm, schedule and warmup_steps are bounded; adamw is a name. Every
    problem is reported together, each naming its key."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.nesterov=1", "optim.clip_norm=-1", "optim.schedule=linear",
                           "optim.warmup_steps=-2", "optim.name=rmsprop"])
    msg = str(e.value)
    assert len(e.value.problems) == 5, msg
    for needle in ("optim.nesterov: expected a boolean", "optim.clip_norm: expected a number in",
                   "optim.schedule: expected one of", "optim.warmup_steps: expected an integer",
                   'optim.name: expected one of "sgd", "adam", "adamw"'):
        assert needle in msg, msg
    for bad in (["optim.nesterov=true", "optim.momentum=0"],
                ["optim.nesterov=true", "optim.name=adamw"]):
        with pytest.raises(ConfigError, match="optim.nesterov: expected false unless"):
            load_config(None, bad)
    cfg = load_config(None, ["optim.name=adamw", "optim.nesterov=false", "optim.clip_norm=1",
                             "optim.schedule=cosine", "optim.warmup_steps=5"])
    assert (cfg.optim.name, cfg.optim.clip_norm, cfg.optim.warmup_steps) == ("adamw", 1.0, 5)
    load_config(None, ["optim.nesterov=true"])  # sgd with the default momentum 0.9


NEW_OPTIONS = ["optim.nesterov=true", "optim.clip_norm=1.0", "optim.schedule=cosine",
               "optim.warmup_steps=10", "optim.name=adamw"]


def test_optimiser_options_key_only_when_set() -> None:
    """Configs that do not set the optimiser keys added later keep the hash
    their golden entries are filed under; writing those keys' defaults out is
    the same config; setting any of them changes the hash."""
    golden = json.loads((ROOT / "tests" / "golden" / "weights.json").read_text())
    filed = {e["config_sha256"] for e in golden["entries"]}
    for name in ("digits.toml", "digits-exact.toml", "digits-cnn-exact.toml"):
        assert config_sha256(load_config(ROOT / "configs" / name)) in filed, name
    base = config_sha256(Config())
    defaults = ["optim.nesterov=false", "optim.clip_norm=0.0", "optim.schedule=constant",
                "optim.warmup_steps=0"]
    assert config_sha256(load_config(None, defaults)) == base
    hashes = {config_sha256(load_config(None, [o])) for o in NEW_OPTIONS}
    assert base not in hashes and len(hashes) == len(NEW_OPTIONS)


def test_a_table_given_whole_replaces_and_dotted_keys_merge() -> None:
    """Issue 21: `model.args={}` changed nothing (it was merged into the
    config's table); a table value now replaces the table, while dotted keys
    still merge into it."""
    from pipeline.core.config import load_config

    charlm = ROOT / "examples" / "charlm" / "config.toml"
    assert load_config(charlm, ["model.args={}"]).model.args == {}
    assert load_config(charlm, ["model.args={n_layer=1}"]).model.args == {"n_layer": 1}
    merged = load_config(charlm, ["model.args.n_layer=1"]).model.args
    assert merged["n_layer"] == 1 and merged["d_model"] == 128  # control: dotted merges
