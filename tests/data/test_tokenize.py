"""Tokenized text (pipeline/data/tokenize.py): a Hugging Face tokenizers JSON
file named by a text part's ``tokenizer`` key, verified by sha256, applied once
into the cache; the library's version keyed and recorded; bad tokenizers,
unrepresentable text and a missing extra refused; predict tokenizes alike."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import ConfigError, DataIntegrityError, UsageError
from pipeline.data import cache as datacache
from pipeline.data import dataset, manifest, tokenize
from pipeline.data.add import add
from tests.support import ROOT, cli_main

try:  # the text extra: the README's test command installs it (requirements-text.lock)
    import tokenizers
except ImportError:  # collected anyway (nix's check deselects these), never skipped
    tokenizers = None


@pytest.fixture(autouse=True)
def _the_text_extra() -> None:
    if tokenizers is None:
        pytest.fail("the text extra (Hugging Face tokenizers) is not installed: "
                    ".venv/bin/pip install --require-hashes -r requirements.lock "
                    "-r requirements-text.lock")

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife.\n\nHowever little known the feelings or views of "
        "such a man may be on his first entering a neighbourhood, this truth is so well fixed "
        "in the minds of the surrounding families.\n") * 6
MODEL = '''import torch
from torch import nn


def lm(input_shape, num_classes):
    return nn.Sequential(nn.Embedding(num_classes, 8), nn.Linear(8, num_classes))
'''
CONFIG = '''seed = 3
[data]
dataset = "novel"
context = 8
test_fraction = 0.1
[model]
factory = "model:lm"
[train]
epochs = 1
max_steps = 4
batch_size = 8
shards = 2
[optim]
name = "adam"
lr = 0.01
'''


def _bpe(text: str, vocab: int = 300) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok.to_str()


def _wordpiece(text: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordPieceTrainer(vocab_size=200,
                                                              special_tokens=["[UNK]"]))
    return tok.to_str()


def _project(root: Path, tokenizer: str, text: str = TEXT) -> Path:
    """A user's project: a text, a tokenizer, the manifest (as data add writes it),
    a model and a config."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "novel.txt").write_text(text, encoding="utf-8")
    (root / "data" / "tok.json").write_text(tokenizer, encoding="utf-8")
    path = root / "data-manifest.json"
    add(path, root / "data" / "tok.json", name="tok", source="", licence="", description="",
        fmt=None, options={}, force=True)
    add(path, root / "data" / "novel.txt", name="novel", source="", licence="", description="",
        fmt="text", options={"tokenizer": "tok"}, force=True)
    (root / "model.py").write_text(MODEL)
    (root / "config.toml").write_text(CONFIG)
    return path


def test_the_ids_are_the_tokenizers_own_and_the_vocabulary_its_tokens(tmp_path: Path) -> None:
    path = _project(tmp_path / "p", _bpe(TEXT))
    ds = dataset.load(manifest.verify(path), "novel", tmp_path / "cache")
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "p" / "data" / "tok.json"))
    want = tok.encode(TEXT, add_special_tokens=False).ids  # the library, called directly
    assert ds.x.dtype == np.int64 and ds.x.tolist() == want
    assert ds.n_classes == tok.get_vocab_size() and ds.vocabulary[want[0]] == tok.id_to_token(
        want[0])
    assert tok.decode(want) == TEXT  # byte level: nothing lost
    again = dataset.load(manifest.verify(path), "novel", tmp_path / "cache")  # from the cache
    assert again.x.tolist() == want and again.decoded_sha256() == ds.decoded_sha256()


def test_the_library_version_keys_the_cache_and_the_run(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.recipe import data_fields

    path = _project(tmp_path / "p", _bpe(TEXT))
    verified = manifest.verify(path)
    key, fields = datacache.key(verified, "novel"), data_fields(verified, "novel", "d")
    assert fields["decoder"] == {"tokenizers": tokenizers.__version__}
    assert fields["files"]["tok"] == verified.hashes["tok"]
    monkeypatch.setattr(tokenizers, "__version__", "0.0.1-other")
    assert datacache.key(verified, "novel") != key  # another library: another entry
    assert data_fields(verified, "novel", "d")["decoder"] != fields["decoder"]


def test_a_tokenizer_files_truncation_and_padding_do_not_cut_the_text(tmp_path: Path) -> None:
    """A model's tokenizer.json often asks for truncation to its length: the
    corpus is one stream, so it is turned off (it cut the text to 16 tokens)."""
    tok = tokenizers.Tokenizer.from_str(_bpe(TEXT))
    whole = tok.encode(TEXT, add_special_tokens=False).ids
    tok.enable_truncation(max_length=16)
    tok.enable_padding(length=16)
    assert len(tok.encode(TEXT, add_special_tokens=False).ids) == 16  # what it would do
    path = _project(tmp_path / "p", tok.to_str())
    assert dataset.load(manifest.verify(path), "novel", tmp_path / "cache").x.tolist() == whole


def test_another_tokenizer_gives_other_ids(tmp_path: Path) -> None:
    """Control: the tokenizer file decides the ids (and so the run)."""
    a = dataset.load(manifest.verify(_project(tmp_path / "a", _bpe(TEXT, 300))), "novel",
                     tmp_path / "cache")
    b = dataset.load(manifest.verify(_project(tmp_path / "b", _bpe(TEXT, 330))), "novel",
                     tmp_path / "cache")
    assert a.decoded_sha256() != b.decoded_sha256() and len(a.x) != len(b.x)


def test_text_the_tokenizer_cannot_represent_is_refused_naming_the_character(
        tmp_path: Path) -> None:
    path = _project(tmp_path / "p", _wordpiece(TEXT), TEXT)
    dataset.load(manifest.verify(path), "novel", tmp_path / "cache")  # control: it can
    with pytest.raises(DataIntegrityError, match=r"unknown token for '☃' at character "
                                                 rf"{len(TEXT) + 4}"):
        _project(tmp_path / "q", _wordpiece(TEXT), TEXT + "the ☃\n")
    assert not list((tmp_path / "cache").glob("*.tmp*"))


@pytest.mark.parametrize("content", ['{"version": "1.0", "model": 7}', "not json at all",
                                     '{"a": 1}'])
def test_a_file_that_is_not_a_tokenizer_is_refused_naming_it(tmp_path: Path,
                                                            content: str) -> None:
    with pytest.raises(DataIntegrityError, match=r"tok\.json: expected a Hugging Face "
                                                 "tokenizers JSON file"):
        _project(tmp_path / "p", content)
    assert not (tmp_path / "p" / "data-manifest.json").exists() or "novel" not in json.loads(
        (tmp_path / "p" / "data-manifest.json").read_text())["datasets"]


def test_a_changed_tokenizer_file_stops_the_run_exit_3(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    root = tmp_path / "p"
    _project(root, _bpe(TEXT))
    tok = root / "data" / "tok.json"
    tok.write_text(tok.read_text().replace('"Ġ"', '"Ġ" ', 1))  # one byte more, same JSON
    monkeypatch.chdir(root)
    assert cli_main(["train", "--quiet"], monkeypatch, tmp_path) == 3
    err = capsys.readouterr().err
    assert "tok.json" in err and not (root / "runs").exists()


@pytest.mark.parametrize(("spec", "found"), [
    ({"vocabulary": "chars", "tokenizer": "tok"}, "found both"),
    ({}, "found neither"),
    ({"tokenizer": "novel"}, "a file other than the text's"),
    ({"tokenizer": "nope"}, "a manifest file name"),
])
def test_text_takes_exactly_one_of_vocabulary_and_tokenizer(tmp_path: Path, spec: dict[str, str],
                                                           found: str) -> None:
    from pipeline.data.formats import spec_problems

    problems = spec_problems({"format": "text", "file": "novel", **spec}, "t", ["novel", "tok"])
    assert problems and found in " ".join(f"{e} found {f}" for _, e, f in problems)
    with pytest.raises(ConfigError):
        from pipeline.data.formats import decode
        decode({"format": "text", "file": "novel", **spec}, {"novel": tmp_path, "tok": tmp_path})


def test_without_the_extra_it_says_how_to_install_it(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "p"
    _project(root, _bpe(TEXT))
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers fails
    with pytest.raises(UsageError, match="requirements-text.lock"):
        tokenize.identity()
    monkeypatch.chdir(root)
    assert cli_main(["train", "--quiet"], monkeypatch, tmp_path) == 2
    err = capsys.readouterr().err
    assert "text extra" in err and "requirements-text.lock" in err and "Traceback" not in err
    assert not (root / "runs").exists()


def test_a_user_project_trains_records_the_decoder_and_predicts_with_the_tokenizer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "p"
    _project(root, _bpe(TEXT))
    monkeypatch.chdir(root)
    assert cli_main(["train", "--quiet", "--json"], monkeypatch, tmp_path) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["data"]["decoder"] == {"tokenizers": tokenizers.__version__}
    assert record["data"]["train"]["tokenizer"] == "tok"
    assert cli_main(["train", "--quiet", "--json", "seed=4"], monkeypatch, tmp_path) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["weights_sha256"] != record["weights_sha256"]  # control: the seed counts
    run = root / "runs" / record["run_key"]
    (tmp_path / "in.txt").write_text("a single man in possession of a good fortune")
    assert cli_main(["predict", str(run), str(tmp_path / "in.txt")], monkeypatch, tmp_path) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    tok = tokenizers.Tokenizer.from_file(str(root / "data" / "tok.json"))
    ids = tok.encode("a single man in possession of a good fortune").ids
    assert [x["token"] for x in lines] == [tok.id_to_token(i) for i in ids]
    from pipeline.export.card import input_space
    from pipeline.record.schema import load_record
    assert f"the tokenizer file 'tok', Hugging Face tokenizers {tokenizers.__version__}" in \
        input_space(load_record(run / "run.json"))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    assert cli_main(["predict", str(run), str(tmp_path / "bad.txt")], monkeypatch, tmp_path) == 3


def test_the_shipped_tokenizer_is_what_its_script_makes(tmp_path: Path) -> None:
    """data/shakespeare-bpe.json regenerates byte for byte (tools/train_tokenizer.py),
    and the manifest lists its sha256 and a dataset that uses it."""
    import hashlib
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_tokenizer",
                                                  ROOT / "tools" / "train_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    made = mod.build(ROOT / "data" / "shakespeare.txt")
    shipped = (ROOT / "data" / "shakespeare-bpe.json").read_text(encoding="utf-8")
    assert made == shipped
    m = json.loads((ROOT / "data-manifest.json").read_text())
    assert m["files"]["shakespeare-bpe"]["sha256"] == hashlib.sha256(
        shipped.encode()).hexdigest()
    assert m["datasets"]["shakespeare-bpe"]["train"]["tokenizer"] == "shakespeare-bpe"


def test_data_verify_without_the_extra_checks_the_files_and_names_what_it_skipped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped project lists a tokenized dataset; a machine without the text
    extra still verifies every file (exit 0) and says which decode cache it
    could not look at, instead of stopping with exit 2."""
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    monkeypatch.chdir(ROOT)
    assert cli_main(["data", "verify"], monkeypatch, tmp_path) == 0
    out = capsys.readouterr().out
    assert "ok shakespeare-bpe sha256:" in out
    assert "note: shakespeare-bpe: its decode cache not checked" in out
