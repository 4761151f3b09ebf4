"""Tests for pipeline/modes.py: the one map from the mode string to a Mode,
and what each mode decides (key fields, golden key, nets from the dataset's
shapes, process preparation)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline import modes
from pipeline.core import _testing
from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError, UsageError
from pipeline.data.task import CLASSIFICATION
from pipeline.models import resolve
from pipeline.record.golden import golden_key
from pipeline.record.schema import RunRecord, Trail


def test_of_maps_each_mode_and_refuses_others() -> None:
    """`of` returns the one Mode per name and names the choices otherwise."""
    assert modes.of("pinned") is modes.PINNED and modes.of("exact") is modes.EXACT
    with pytest.raises(UsageError, match=r"\['exact', 'pinned'\].*'fast'"):
        modes.of("fast")


def test_key_fields_pinned_covers_the_machine_exact_does_not() -> None:
    """Pinned bits depend on the toolchain and profile; exact bits do not."""
    assert set(modes.PINNED.key_fields) == {"config", "data", "code", "model", "toolchain",
                                            "profile"}
    assert set(modes.EXACT.key_fields) == {"config", "data", "code", "model"}


def _record(mode: str, torch_version: str) -> RunRecord:
    return RunRecord(run_key="k", weights_sha256="w", weights_layout={}, mode=mode, config={},
                     data={}, toolchain={"torch": torch_version},
                     profile={"name": "p", "threads": 1},
                     key_inputs=tuple(modes.of(mode).key_fields), metrics={"steps": 0},
                     trail=Trail(("a",), 8), config_sha256="c" * 64)


def test_golden_key_exact_is_toolchain_free_pinned_is_not() -> None:
    """Two toolchains share one exact golden key and have two pinned ones: the
    golden key follows the key fields the mode gave the record."""
    a, b = _record("exact", "2.13.0"), _record("exact", "2.14.1")
    assert golden_key(a) == golden_key(b)
    assert golden_key(a)["toolchain"] == "any"
    pa, pb = _record("pinned", "2.13.0"), _record("pinned", "2.14.1")
    assert golden_key(pa) != golden_key(pb)
    assert golden_key(pa)["profile"].startswith("p:")


@pytest.mark.parametrize("mode", ["pinned", "exact"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_nets_take_their_shapes_from_the_dataset(mode: str, arch: str) -> None:
    """A dataset of 2x6x6 inputs and 3 classes gives a net with those shapes
    and (N, 3) logits: no model reads a digits constant."""
    factory = f"pipeline.models:{arch}"
    overrides = [f"mode={mode}", f"model.factory={factory}"]
    cfg = load_config(None, overrides)
    shapes = SimpleNamespace(shapes=lambda context: ((2, 6, 6), 3))
    parts = resolve(factory, "cross_entropy", None)
    net = modes.of(mode).make_net(cfg, shapes, torch.device("cpu"), parts)  # type: ignore
    first = "conv0.weight" if arch == "cnn" else "fc0.weight"
    assert net.params[first].shape[1] == (2 if arch == "cnn" else 72)
    assert net.predict(torch.rand(5, 2, 6, 6)).shape == (5, 3)
    opt = modes.of(mode).make_optimizer(cfg, net, 10)
    assert opt.state_scalars() is not None


def test_prepare_exact_pins_nothing_and_pinned_control_is_unpinned(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact mode never re-executes; pinned mode with the no-pin control
    records an unpinned profile and does not fix the thread count."""
    assert modes.EXACT.prepare(["train"])["name"] == "unpinned"
    monkeypatch.setattr(_testing, "SWITCHES", _testing.Switches(no_pin=True))
    assert modes.PINNED.prepare(["train"])["name"] == "unpinned"
    assert not modes.PINNED.pins_threads()
    monkeypatch.setattr(_testing, "SWITCHES", _testing.Switches())
    assert modes.PINNED.pins_threads() and not modes.EXACT.pins_threads()


def test_exact_mode_converts_a_user_factory_and_refuses_its_loss(tmp_path: Path) -> None:
    """Exact mode converts a user factory's module with from_torch (a Linear
    trains); a user loss other than torch's cross-entropy (section 27), or a
    module with a layer it has no exact version of, is a ConfigError (exit
    2) naming the key or the module path."""
    (tmp_path / "usernet_exact.py").write_text(
        "import torch\n"
        "def net(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))\n"
        "def bad(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Mish(),\n"
        "                               torch.nn.Linear(64, num_classes))\n"
        "def loss(logits, y):\n"
        "    return torch.nn.functional.cross_entropy(logits, y, reduction='none') * 2\n"
        "smoothed = torch.nn.CrossEntropyLoss(reduction='none', label_smoothing=0.1)\n")
    shapes = SimpleNamespace(shapes=lambda context: ((1, 8, 8), 10), task=CLASSIFICATION)
    cfg = load_config(None, ["mode=exact", "model.factory=usernet_exact:net"])
    parts = resolve(cfg.model.factory, cfg.train.loss, tmp_path)
    net = modes.EXACT.make_net(cfg, shapes, torch.device("cpu"), parts)  # type: ignore[arg-type]
    assert sorted(net.params) == ["1.bias", "1.weight"]
    assert net.predict(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    cfg = load_config(None, ["mode=exact", "model.factory=usernet_exact:net",
                             "train.loss=usernet_exact:loss"])
    parts = resolve(cfg.model.factory, cfg.train.loss, tmp_path)
    with pytest.raises(ConfigError, match="train.loss"):
        modes.EXACT.make_net(cfg, shapes, torch.device("cpu"), parts)  # type: ignore[arg-type]
    # torch's cross-entropy itself (label smoothing: spec section 27) is taken
    cfg = load_config(None, ["mode=exact", "model.factory=usernet_exact:net",
                             "train.loss=usernet_exact:smoothed"])
    parts = resolve(cfg.model.factory, cfg.train.loss, tmp_path)
    net = modes.EXACT.make_net(cfg, shapes, torch.device("cpu"), parts)  # type: ignore[arg-type]
    assert net._xent.smoothing == 0.1
    cfg = load_config(None, ["mode=exact", "model.factory=usernet_exact:bad"])
    parts = resolve(cfg.model.factory, cfg.train.loss, tmp_path)
    with pytest.raises(ConfigError, match=r"1 \(torch.nn.modules.activation.Mish\)"):
        modes.EXACT.make_net(cfg, shapes, torch.device("cpu"), parts)  # type: ignore[arg-type]
