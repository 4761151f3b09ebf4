"""Tests for pipeline/data/images.py, pipeline/data/folders.py and `data add DIR`:
image folders (and indexes) decode through Pillow to the pixels, in path order,
labelled by class folder; bad input is an error naming the file, exit 3, the
manifest untouched; the decoder is part of the cache key and the run's data."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import cache as datacache
from pipeline.data import dataset, images, manifest
from pipeline.recipe import data_fields

from ..support import cli_main


def _png(path: Path, pixels: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def _pixels(seed: int, h: int = 6, w: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    """A project with pics/{a,b}/ holding 3 and 2 PNG images (6x5 RGB)."""
    d = tmp_path / "proj"
    for i, (cls, k) in enumerate([("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]):
        _png(d / "pics" / cls / f"{k}.png", _pixels(i))
    return d


def _add(proj: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *extra: str) -> int:
    return cli_main(["data", "add", str(proj / "pics"), "--name", "pics", "--manifest",
                     str(proj / "data-manifest.json"), "--licence", "CC0", *extra],
                    monkeypatch, tmp_path)


def _load(proj: Path, tmp_path: Path) -> dataset.Dataset:
    v = manifest.verify(proj / "data-manifest.json")
    return dataset.load(v, "pics", tmp_path / "cache")


def test_folder_decodes_to_the_pixels_in_path_order(proj: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`data add DIR` lists every image with its sha256 and size; the dataset
    decodes to (n, C, H, W) float32 = pixel / 255, labels from the folders."""
    assert _add(proj, monkeypatch, tmp_path) == 0
    raw = json.loads((proj / "data-manifest.json").read_text())
    assert sorted(raw["files"]) == ["pics/a/0.png", "pics/a/1.png", "pics/a/2.png",
                                    "pics/b/0.png", "pics/b/1.png"]
    assert raw["datasets"]["pics"]["train"] == {"format": "images", "root": "pics",
                                                "classes": ["a", "b"]}
    ds = _load(proj, tmp_path)
    assert ds.x.shape == (5, 3, 6, 5) and ds.x.dtype == np.float32
    assert ds.y.tolist() == [0, 0, 0, 1, 1]
    want = _pixels(3).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    assert np.array_equal(ds.x[3], want)


def test_resize_and_grey(proj: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """size and channels: every image resized (bilinear) and converted to L."""
    assert _add(proj, monkeypatch, tmp_path, "--decode", "size=[4, 3]",
                "--decode", "channels=1") == 0
    ds = _load(proj, tmp_path)
    assert ds.x.shape == (5, 1, 4, 3)
    im = Image.fromarray(_pixels(0)).convert("L").resize((3, 4), Image.Resampling.BILINEAR,
                                                         reducing_gap=None)
    assert np.array_equal(ds.x[0, 0] * np.float32(255), np.asarray(im, dtype=np.float32))


def test_index_gives_order_and_labels(proj: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An index (CSV path,label) decides order and labels, not the folders."""
    (proj / "pics" / "index.csv").write_text("path,label\nb/1.png,x\na/0.png,y\n")
    m = str(proj / "data-manifest.json")
    assert cli_main(["data", "add", str(proj / "pics" / "index.csv"), "--name", "idx",
                     "--manifest", m], monkeypatch, tmp_path) == 0
    assert _add(proj, monkeypatch, tmp_path, "--decode", "index='idx'") == 0  # classes: its labels
    raw = json.loads((proj / "data-manifest.json").read_text())
    assert raw["datasets"]["pics"]["train"]["classes"] == ["x", "y"]
    ds = _load(proj, tmp_path)
    assert ds.y.tolist() == [0, 1] and len(ds.x) == 2
    assert np.array_equal(ds.x[0], _pixels(4).transpose(2, 0, 1) / np.float32(255))


def _corrupt(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-30])


def _jpeg_named_png(p: Path) -> None:
    _png(p, _pixels(9), "JPEG")


def _text(p: Path) -> None:
    p.write_text("not an image\n")


def _bomb(p: Path) -> None:  # a 5000x5000 grey PNG: a few KB, 25 M pixels
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")
    p.write_bytes(buf.getvalue())


@pytest.mark.parametrize("spoil, found", [
    (_corrupt, "a corrupt one"), (_jpeg_named_png, "not a PNG file"),
    (_text, "not a PNG file"), (_bomb, "5000x5000"),
])
def test_bad_image_is_named_and_nothing_written(proj: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str],
                                                spoil, found: str) -> None:  # noqa: ANN001
    """A corrupt image, a file of another type, a decompression bomb: exit 3
    naming the file, and no manifest written."""
    spoil(proj / "pics" / "b" / "1.png")
    assert _add(proj, monkeypatch, tmp_path, "--decode", "max_pixels=1000000") == 3
    err = capsys.readouterr().err
    assert "pics/b/1.png" in err and found in err, err
    assert not (proj / "data-manifest.json").exists()


def test_empty_class_folder_and_label_outside_classes(proj: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    """An empty class folder is named (exit 3); a folder outside the spec's
    classes is a label outside the classes (exit 3); nothing written either way."""
    (proj / "pics" / "c").mkdir()
    assert _add(proj, monkeypatch, tmp_path) == 3
    assert "pics/c" in capsys.readouterr().err
    (proj / "pics" / "c").rmdir()
    assert _add(proj, monkeypatch, tmp_path, "--decode", "classes=['a']") == 3
    err = capsys.readouterr().err
    assert "pics/b/0.png" in err and "outside the classes" in err
    assert not (proj / "data-manifest.json").exists()


def test_index_label_outside_classes(proj: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """An index row whose label is not a class: exit 3 naming the index line."""
    (proj / "pics" / "index.csv").write_text("path,label\nb/1.png,x\na/0.png,zebra\n")
    m = proj / "data-manifest.json"
    assert cli_main(["data", "add", str(proj / "pics" / "index.csv"), "--name", "idx",
                     "--manifest", str(m)], monkeypatch, tmp_path) == 0
    before = m.read_bytes()
    assert _add(proj, monkeypatch, tmp_path, "--decode", "index='idx'",
                "--decode", "classes=['x', 'y']") == 3
    err = capsys.readouterr().err
    assert "index.csv:3" in err and "zebra" in err
    assert m.read_bytes() == before


def test_changed_image_after_add_is_reported(proj: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An image re-encoded after it was listed fails verification, naming it."""
    assert _add(proj, monkeypatch, tmp_path) == 0
    p = proj / "pics" / "a" / "2.png"
    Image.open(p).save(p, format="PNG", compress_level=1)
    with pytest.raises(manifest.DataIntegrityError, match="pics/a/2.png"):
        manifest.verify(proj / "data-manifest.json")


def test_an_image_added_after_data_add_stops_the_run_not_left_out(
        proj: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder is its examples: an image copied into a class folder after
    ``data add`` is refused (exit 3 at verify, naming it and the command that
    adds it); it was left out of the next run, silently. Re-adding lists it."""
    assert _add(proj, monkeypatch, tmp_path) == 0
    manifest.verify(proj / "data-manifest.json")  # control: everything listed
    _png(proj / "pics" / "b" / "new.png", _pixels(9))
    with pytest.raises(manifest.DataIntegrityError,
                       match=r"pics/b/new\.png: expected only the images of dataset 'pics'"
                             r".*pipeline data add pics --name pics --force") as e:
        manifest.verify(proj / "data-manifest.json")
    assert e.value.exit_code == 3
    (proj / "pics" / "b" / "notes.txt").write_text("not an image: ignored")
    assert _add(proj, monkeypatch, tmp_path, "--force") == 0
    assert "pics/b/new.png" in {e.path for e in manifest.verify(
        proj / "data-manifest.json").entries.values()}


def test_re_adding_a_folder_after_images_were_removed_needs_force(
        proj: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert _add(proj, monkeypatch, tmp_path) == 0
    (proj / "pics" / "a" / "1.png").unlink()
    with pytest.raises(manifest.DataIntegrityError, match="pics/a/1.png"):
        manifest.verify(proj / "data-manifest.json")  # a listed file is missing
    assert _add(proj, monkeypatch, tmp_path) == 2
    assert "pics/a/1.png is no longer under pics/" in capsys.readouterr().err
    assert _add(proj, monkeypatch, tmp_path, "--force") == 0
    assert "removed: 1 image file entries" in capsys.readouterr().out
    assert len(_load(proj, tmp_path).y) == 4


def test_concurrent_data_adds_keep_every_entry(tmp_path: Path) -> None:
    """data add holds a lock while it reads, edits and writes the manifest:
    adds racing on threads keep all their entries (without it, the last
    writer's manifest dropped the others')."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data.add import add

    root = tmp_path / "race"
    (root / "data").mkdir(parents=True)
    for i in range(6):
        (root / "data" / f"f{i}.txt").write_text(f"file {i}\n")

    def one(i: int) -> None:
        add(root / "data-manifest.json", root / "data" / f"f{i}.txt", name=f"f{i}", source="",
            licence="", description="")

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(one, range(6)))
    assert sorted(manifest.verify(root / "data-manifest.json").entries) == [
        f"f{i}" for i in range(6)]


def test_decoder_is_in_the_cache_key_and_run_data(proj: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Another Pillow or codec gives another cache key and other run data
    (keyed), so a run never reuses pixels another decoder made."""
    assert _add(proj, monkeypatch, tmp_path) == 0
    v = manifest.verify(proj / "data-manifest.json")
    k, fields = datacache.key(v, "pics"), data_fields(v, "pics", "d" * 64)
    assert fields["decoder"]["pillow"] and fields["decoded_sha256"] == "d" * 64
    monkeypatch.setattr(images, "decoder_identity",
                        lambda: {**fields["decoder"], "jpeg": "other"})
    assert datacache.key(v, "pics") != k
    assert data_fields(v, "pics", "d" * 64) != fields


def test_hash_files_matches_and_uses_the_stat_cache(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """hash_files on threads (>= 64 files) gives each file's sha256 and size, and
    records them in the stat cache; an unchanged, non-racy file is not hashed again."""
    import hashlib
    files = []
    for i in range(70):
        p = tmp_path / "f" / f"{i}.bin"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(bytes([i]) * (i + 1))
        files.append(p)
    got = manifest.hash_files(files, tmp_path / "sc")
    assert got == [(hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size) for p in files]
    assert (tmp_path / "sc" / manifest.STAT_CACHE_NAME).exists()
    monkeypatch.setattr(manifest, "_RACY_NS", -10**18)  # every record trusted
    monkeypatch.setattr(manifest, "_sha256_file", lambda f, n: "0" * 64)
    assert manifest.hash_files(files, tmp_path / "sc") == got


def test_a_cached_decode_is_the_fresh_decode(proj: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """RGB pixels are transposed to (C, H, W): the arrays read back from the
    decode cache equal the fresh decode, bit for bit, and so do their hashes
    (safetensors.numpy.save alone writes a non-contiguous array's memory order)."""
    assert _add(proj, monkeypatch, tmp_path) == 0
    fresh, cached = _load(proj, tmp_path), _load(proj, tmp_path)
    assert fresh.x.tobytes() == cached.x.tobytes()
    assert fresh.decoded_sha256() == cached.decoded_sha256()


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "images"


def test_real_jpeg_photographs_decode_and_a_reencoded_one_is_changed_data(
        tmp_path: Path) -> None:
    """The example's JPEG photographs decode (resized to 32x32 RGB); the same
    photograph re-encoded is reported as changed data, naming the file."""
    import shutil
    d = tmp_path / "ex"
    shutil.copytree(EXAMPLE / "photos", d / "photos")
    raw = json.loads((EXAMPLE / "data-manifest.json").read_text())
    raw["files"] = {k: v for k, v in raw["files"].items() if k.startswith("photos/")}
    raw["datasets"] = {"photos": raw["datasets"]["photos"]}
    (d / "data-manifest.json").write_text(json.dumps(raw))
    v = manifest.verify(d / "data-manifest.json")
    ds = dataset.load(v, "photos", tmp_path / "cache")
    assert ds.x.shape == (2, 3, 32, 32) and ds.y.tolist() == [0, 1]
    p = d / "photos" / "person" / "hopper.jpg"
    Image.open(p).save(p, format="JPEG", quality=90)
    with pytest.raises(manifest.DataIntegrityError, match="photos/person/hopper.jpg"):
        manifest.verify(d / "data-manifest.json")


@pytest.mark.slow
def test_another_decoder_is_another_run_and_verify_reports_it(
        proj: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A run on an image folder, then a decoder that gives other pixels (another
    libjpeg, simulated): the same config is another run key (never the memoised
    run), and `pipeline verify` of the first run fails naming the decoded data."""
    assert _add(proj, monkeypatch, tmp_path) == 0
    capsys.readouterr()
    (proj / "config.toml").write_text(
        'seed = 0\n[data]\ndataset = "pics"\ntest_fraction = 0.2\n[model]\n'
        'factory = "pipeline.models:cnn"\n[train]\nepochs = 1\nbatch_size = 2\nshards = 1\n')
    runs = tmp_path / "runs"
    train = ["train", str(proj / "config.toml"), "--runs-dir", str(runs), "--quiet", "--json"]
    assert cli_main(train, monkeypatch, tmp_path) == 0
    first = json.loads(capsys.readouterr().out)
    one = images._one
    monkeypatch.setattr(images, "_one", lambda p, s: one(p, s) // 2)  # other pixels
    monkeypatch.setattr(images, "decoder_identity",
                        lambda: {**first["data"]["decoder"], "zlib": "other"})
    assert cli_main(train, monkeypatch, tmp_path) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["run_key"] != first["run_key"]
    assert second["data"]["decoded_sha256"] != first["data"]["decoded_sha256"]
    assert cli_main(["verify", str(runs / first["run_key"]), "--quiet", "--project", str(proj)],
                    monkeypatch,
                    tmp_path) != 0
    err = capsys.readouterr().err
    assert "data_decoded.pics" in err and "the image decoder differs" in err, err


def _png16(path: Path) -> None:
    """A 2x2 RGB PNG of 16 bits per sample (Pillow reads it as 8-bit RGB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    rows = b"".join(b"\0" + bytes(range(12)) for _ in range(2))  # filter 0, 2 px x 3 x 2 bytes
    blob = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)


def test_animations_and_deep_pngs_are_refused_naming_the_file(tmp_path: Path) -> None:
    """An animated PNG (which frame would be the image?) and a PNG of 16 bits per
    sample (Pillow would cut it to 8 bits): exit 3 naming the file. Control: a
    still 8-bit PNG decodes."""
    from pipeline.core.errors import DataIntegrityError

    still = tmp_path / "a" / "still.png"
    _png(still, _pixels(0))
    assert images._one(still, {"channels": 3}).shape == (3, 6, 5)
    anim = tmp_path / "a" / "anim.png"
    frames = [Image.fromarray(_pixels(i)) for i in range(3)]
    frames[0].save(anim, format="PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(DataIntegrityError, match="a still image.*3 frames") as e:
        images._one(anim, {"channels": 3})
    assert str(anim) in str(e.value) and e.value.exit_code == 3
    deep = tmp_path / "a" / "deep.png"
    _png16(deep)
    with Image.open(deep) as im:
        assert im.mode == "RGB"  # what Pillow would silently give
    with pytest.raises(DataIntegrityError, match="16 bits per sample"):
        images._one(deep, {"channels": 3})


def test_a_linked_class_folder_is_refused_not_left_out(proj: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """Hostile review round 2: `ln -s ../b pics/c` dropped class c silently
    (os.walk does not follow links) with a message about one skipped file;
    now `data add` refuses it naming the link, exit 3, nothing written.
    Control: without the link the folder is added."""
    (proj / "pics" / "c").symlink_to(proj / "pics" / "b")
    monkeypatch.chdir(proj)
    (proj / "config.toml").write_text("")
    assert cli_main(["data", "add", "pics", "--name", "pics"], monkeypatch, tmp_path) == 3
    assert "pics/c: expected a folder" in capsys.readouterr().err
    assert not (proj / "data-manifest.json").exists()
    (proj / "pics" / "c").unlink()
    assert cli_main(["data", "add", "pics", "--name", "pics"], monkeypatch, tmp_path) == 0
