"""Tests for pipeline/data/augment.py: each example's augmentation is a pure
function of (seed, epoch, example id) and its pixels, whatever batch, shard,
rank or order it arrives in; its arithmetic is the documented one; the user's
transform runs under the same key. Controls: another seed or epoch changes the
draws, and an augmentation drawn from torch's global generator (seeded per
rank, as stock loaders do) changes with the world size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core import rng
from pipeline.core.config import AugmentConfig, load_config
from pipeline.core.errors import ConfigError
from pipeline.core.usercode import UserCodeError
from pipeline.data.augment import CHECK_TWICE, SLOTS, Augmenter, Draws, augmenter

ALL = AugmentConfig(resized_crop_scale=(0.5, 1.0), crop_padding=2, hflip=True, brightness=0.3,
                    contrast=0.3)


def _x(n: int = 8, c: int = 3, h: int = 9, w: int = 7) -> np.ndarray:
    return np.random.default_rng(0).random((n, c, h, w), dtype=np.float32)


def test_an_example_is_the_same_in_any_batch_or_shard() -> None:
    """Augmenting a batch, its halves (two ranks) or any reordering gives each
    example the same bits: the key is (seed, epoch, example) alone."""
    aug, x, ids = Augmenter(ALL, 7, None), _x(), np.arange(100, 108)
    whole = aug.batch(x, ids, 3)
    halves = np.concatenate([aug.batch(x[:4], ids[:4], 3), aug.batch(x[4:], ids[4:], 3)])
    rev = aug.batch(x[::-1], ids[::-1], 3)[::-1]
    assert whole.tobytes() == halves.tobytes() == rev.tobytes()
    assert whole.shape == x.shape and whole.dtype == np.float32


def test_seed_epoch_and_example_change_the_draws() -> None:
    """Control: another seed, epoch or example id gives other augmented inputs."""
    x, ids = _x(), np.arange(8)
    base = Augmenter(ALL, 7, None).batch(x, ids, 0)
    assert not np.array_equal(base, Augmenter(ALL, 8, None).batch(x, ids, 0))
    assert not np.array_equal(base, Augmenter(ALL, 7, None).batch(x, ids, 1))
    assert not np.array_equal(base, Augmenter(ALL, 7, None).batch(x, ids + 1, 0))


def test_padded_crop_and_flip_are_windows_of_the_padded_image() -> None:
    """crop_padding p: a window at offset ((u * (2p + 1)) >> 24) of the image
    with p zeros each side; hflip: reversed columns when the draw's top bit is set."""
    cfg = AugmentConfig(crop_padding=2, hflip=True)
    img = _x(1)[0]
    for e in range(20):
        u = rng.u24(rng.key(5, rng.AUGMENT, 0, e, 0), 0, 9)
        oy, ox = (int(u[SLOTS["crop_y"]]) * 5) >> 24, (int(u[SLOTS["crop_x"]]) * 5) >> 24
        padded = np.pad(img, ((0, 0), (2, 2), (2, 2)))
        want = padded[:, oy:oy + 9, ox:ox + 7]
        if u[SLOTS["flip"]] >> 23:
            want = want[:, :, ::-1]
        assert np.array_equal(Augmenter(cfg, 5, None).one(img, e, 0), want)


def test_photometric_steps_are_single_float32_operations() -> None:
    """brightness: x * f32(1 - b + 2b u/2^24); contrast: (x - 0.5) * f + 0.5,
    each a correctly rounded float32 step."""
    img = _x(1)[0]
    u = rng.u24(rng.key(1, rng.AUGMENT, 2, 3, 0), 0, 9)
    fb = np.float32(1 - 0.3 + 0.6 * (int(u[SLOTS["brightness"]]) / 2**24))
    fc = np.float32(1 - 0.2 + 0.4 * (int(u[SLOTS["contrast"]]) / 2**24))
    want = (img * fb - np.float32(0.5)) * fc + np.float32(0.5)
    got = Augmenter(AugmentConfig(brightness=0.3, contrast=0.2), 1, None).one(img, 3, 2)
    assert got.tobytes() == want.astype(np.float32).tobytes()


def test_resized_crop_samples_the_input() -> None:
    """A resized crop keeps (C, H, W) and every output pixel is an input pixel."""
    img = np.arange(3 * 9 * 7, dtype=np.float32).reshape(3, 9, 7)
    aug = Augmenter(AugmentConfig(resized_crop_scale=(0.2, 0.5)), 0, None)
    outs = [aug.one(img, e, 0) for e in range(10)]
    assert all(o.shape == img.shape and np.isin(o, img).all() for o in outs)
    assert len({o.tobytes() for o in outs}) > 1


def test_user_transform_gets_its_key_and_draws() -> None:
    """transform(x, key, draws): key = key(seed, AUGMENT, epoch, example, 1);
    draws read that stream; a wrong return is refused."""
    seen = []

    def t(x: np.ndarray, key: int, draws: Draws) -> np.ndarray:
        seen.append(key)
        return x + np.float32(draws.integers(3, 1)[0])

    aug = Augmenter(AugmentConfig(transform="m:t"), 4, t)
    out = aug.one(np.zeros((1, 2, 2), np.float32), 9, 1)
    assert seen == [rng.key(4, rng.AUGMENT, 1, 9, 1)] * 2  # run twice: the same bits
    assert out[0, 0, 0] == (rng.u24(seen[0], 0, 1)[0] * 3) >> 24
    bad = Augmenter(AugmentConfig(transform="m:t"), 4, lambda x, k, d: x.astype(np.float64))
    with pytest.raises(UserCodeError, match="expected a float32 array") as e:
        bad.one(np.zeros((1, 2, 2), np.float32), 0, 0)
    assert e.value.exit_code == 2


def _global_numpy(x: np.ndarray, key: int, draws: Draws) -> np.ndarray:
    return x + np.float32(np.random.rand())


def _clock(x: np.ndarray, key: int, draws: Draws) -> np.ndarray:
    import time

    return x + np.float32(time.perf_counter_ns() % 997)


def _counter(x: np.ndarray, key: int, draws: Draws, seen: list[int] = []) -> np.ndarray:  # noqa: B006
    seen.append(1)
    return x + np.float32(len(seen))


@pytest.mark.parametrize("t", [_global_numpy, _clock, _counter])
def test_a_transform_that_draws_elsewhere_is_refused(t: object) -> None:
    """A transform drawing from a global generator, the clock or its own state
    gives other bits for the same key, so the weights would depend on when it
    ran (loader workers, world size): the twice-run check refuses it, exit 2.
    Control: one drawing only from its generator passes the same check."""
    with pytest.raises(UserCodeError, match="came out different"):
        Augmenter(AugmentConfig(transform="m:t"), 0, t).one(  # type: ignore[arg-type]
            np.zeros((1, 2, 2), np.float32), 3, 0)
    ok = Augmenter(AugmentConfig(transform="m:t"), 0,
                   lambda x, k, d: x + np.float32(d.integers(5, 2)[1]))
    for i in range(CHECK_TWICE + 3):
        ok.one(np.zeros((1, 2, 2), np.float32), i, 0)
    assert ok.checked == CHECK_TWICE


def test_nothing_configured_is_no_augmenter_and_keeps_the_config_hash() -> None:
    """The defaults augment nothing and leave [data.augment] out of the config's
    canonical form (older configs keep their hash); bad values are named."""
    from pipeline.core.config import config_to_dict
    cfg = load_config(None)
    assert augmenter(cfg.data.augment, 0) is None
    assert "augment" not in config_to_dict(cfg)["data"]
    assert "augment" in config_to_dict(load_config(None, ["data.augment.hflip=true"]))["data"]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.augment.brightness=2.0", "data.augment.resized_crop_scale=[0.9]",
                           "data.augment.transform=nope"])
    text = str(e.value)
    assert all(k in text for k in ("data.augment.brightness", "resized_crop_scale",
                                   "data.augment.transform"))


def _torch_global_flip(x: np.ndarray, rank_seed: int) -> np.ndarray:
    """A stock augmentation: flips drawn from torch's global generator,
    seeded per rank (seed + rank), one draw per row in arrival order."""
    torch.manual_seed(rank_seed)
    flips = torch.rand(len(x)) < 0.5
    return np.stack([r[:, :, ::-1] if f else r for r, f in zip(x, flips.tolist())])


def test_control_torch_global_generator_changes_with_world_size() -> None:
    """Control: the stock way gives other inputs on two ranks than on one, where
    keyed draws give the same (test_an_example_is_the_same_in_any_batch_or_shard)."""
    x = _x(16)
    one = _torch_global_flip(x, 0)
    two = np.concatenate([_torch_global_flip(x[:8], 0), _torch_global_flip(x[8:], 1)])
    assert not np.array_equal(one, two)
    aug, ids = Augmenter(AugmentConfig(hflip=True), 0, None), np.arange(16)
    keyed_two = np.concatenate([aug.batch(x[:8], ids[:8], 0), aug.batch(x[8:], ids[8:], 0)])
    assert np.array_equal(aug.batch(x, ids, 0), keyed_two)


def test_control_per_worker_generators_change_with_the_worker_count() -> None:
    """Control: as a stock DataLoader does, worker w draws from a torch generator
    seeded seed + w and batch b goes to worker b % N: the flips then change with
    N. The keyed augmentation through pipeline.data.loader does not."""
    from pipeline.data.loader import Loader

    x, n_batches = _x(8), 6

    def stock(workers: int) -> list[np.ndarray]:
        gens = [torch.Generator().manual_seed(100 + w) for w in range(workers)]
        out = []
        for b in range(n_batches):
            flips = torch.rand(len(x), generator=gens[b % workers]) < 0.5
            out.append(np.stack([r[:, :, ::-1] if f else r for r, f in zip(x, flips.tolist())]))
        return out

    assert any(not np.array_equal(a, b) for a, b in zip(stock(1), stock(3)))
    aug = Augmenter(AugmentConfig(hflip=True), 0, None)

    def keyed(workers: int) -> list[np.ndarray]:
        loader = Loader(lambda b: aug.batch(x, np.arange(8) + 8 * b, 0), 0, n_batches, workers)
        try:
            return [loader.get(b) for b in range(n_batches)]
        finally:
            loader.close()

    assert all(np.array_equal(a, b) for a, b in zip(keyed(0), keyed(3)))
