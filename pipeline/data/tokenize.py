"""Text through a subword tokenizer: a Hugging Face ``tokenizers`` JSON file
listed in the manifest (its sha256 checked like any data file), applied once
to the whole text; the token ids go into the decode cache.

The library is the text extra (pyproject.toml ``text``, pinned with every file
hashed in requirements-text.lock); nothing imports it unless a dataset names
a tokenizer. What the tokens are depends on the tokenizer file (keyed by its
sha256) and on the library that applies it: its version is the dataset's
``decoder`` (``identity``), part of the cache key and of the run's keyed data,
as Pillow's is for images, and the ids' hash (``data_decoded``) is what the
run depends on. So another tokenizers version is another run, never a silent
change.

The whole text is encoded in one call, without special tokens and with the
file's truncation and padding turned off (a stream of documents, not one
sequence to cut to a model's length): the ids are exactly what
``Tokenizer.encode`` gives then, at any thread count or machine. A tokenizer that cannot
represent some of the text (its unknown token appears) is refused, naming the
character; ids must fill ``0 .. vocab_size - 1`` (the classes).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import DataIntegrityError, UsageError

if TYPE_CHECKING:  # NumPy only where ids are made: data verify's key alone imports none
    import numpy as np

__all__ = ["INSTALL", "MAX_TOKENIZER_BYTES", "uses_tokenizer", "identity", "load", "encode",
           "vocabulary"]

INSTALL = (".venv/bin/pip install --require-hashes -r requirements.lock "
           "-r requirements-text.lock")
MAX_TOKENIZER_BYTES = 64 << 20  # a tokenizer JSON larger than this is refused


def uses_tokenizer(specs: Sequence[Mapping[str, Any] | None]) -> bool:
    return any(s is not None and s.get("format") == "text" and "tokenizer" in s for s in specs)


def _library() -> Any:
    """The tokenizers module, or UsageError (exit 2) saying how to install the extra."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings, one thread
    try:
        import tokenizers
    except ImportError as e:
        raise UsageError(f"a dataset with a \"tokenizer\" needs the text extra (Hugging Face "
                         f"tokenizers), which is not installed ({e}); install it from its lock "
                         f"in the checkout: {INSTALL}") from None
    return tokenizers


def identity() -> dict[str, str]:
    """What decides the ids besides the tokenizer file: the library's version."""
    return {"tokenizers": str(_library().__version__)}


def load(path: Path, sha256: str | None = None) -> Any:
    """The tokenizer of the (verified) JSON file ``path``, whose bytes must have
    ``sha256`` if given; DataIntegrityError naming it if they do not, or if it
    is not one tokenizers can read."""
    from ..core.safeio import read_regular

    tokenizers = _library()
    try:
        blob = read_regular(path, MAX_TOKENIZER_BYTES)
    except OSError as e:
        raise DataIntegrityError(str(path), f"a readable tokenizer file of at most "
                                 f"{MAX_TOKENIZER_BYTES} bytes", e.strerror or str(e)) from None
    if sha256 is not None and (got := hashlib.sha256(blob).hexdigest()) != sha256:
        raise DataIntegrityError(str(path), f"sha256 {sha256} (the run's tokenizer)",
                                 f"sha256 {got}", "the tokenizer file changed since the run "
                                 "trained")
    try:
        tok = tokenizers.Tokenizer.from_str(blob.decode("utf-8"))
        # A file's truncation or padding (common in a model's tokenizer.json) would
        # cut the whole text to max_length tokens, silently: the text is a stream.
        tok.no_truncation()
        tok.no_padding()
        return tok
    except UnicodeDecodeError as e:
        raise DataIntegrityError(str(path), "a tokenizer JSON file (UTF-8)",
                                 f"invalid byte at offset {e.start}") from None
    except Exception as e:  # the library raises plain Exception on a bad file
        raise DataIntegrityError(str(path), "a Hugging Face tokenizers JSON file "
                                 "(Tokenizer.to_str / save)",
                                 f"{type(e).__name__}: {str(e)[:200]}") from None


def vocabulary(tok: Any, where: str) -> tuple[str, ...]:
    """The token of each id, 0 .. vocab_size - 1 (added tokens included);
    DataIntegrityError if an id in that range has no token."""
    n = tok.get_vocab_size(with_added_tokens=True)
    out = [tok.id_to_token(i) for i in range(n)]
    if n == 0 or None in out:
        gap = out.index(None) if None in out else 0
        raise DataIntegrityError(where, "a tokenizer whose ids are 0 .. vocab_size - 1",
                                 f"no token for id {gap} (of {n})")
    return tuple(out)


def encode(tok: Any, text: str, where: str, n_classes: int) -> np.ndarray:
    """The ids (T,) int64 of ``text``, encoded in one call without special tokens."""
    import numpy as np

    enc = tok.encode(text, add_special_tokens=False)
    ids = np.array(enc.ids, dtype=np.int64)
    unk = _unknown_id(tok)
    if unk is not None and (at := np.flatnonzero(ids == unk)).size:
        start = enc.offsets[int(at[0])][0]
        raise DataIntegrityError(where, "text the tokenizer can represent",
                                 f"its unknown token for {text[start:start + 1]!r} at character "
                                 f"{start} ({at.size} unknown tokens)",
                                 "use a byte-level tokenizer, or one trained on this text")
    if ids.size and (ids.min() < 0 or ids.max() >= n_classes):
        raise DataIntegrityError(where, f"token ids in 0..{n_classes - 1}",
                                 f"{int(ids.max())}")
    return ids


def _unknown_id(tok: Any) -> int | None:
    token = getattr(tok.model, "unk_token", None)
    return tok.token_to_id(token) if isinstance(token, str) else None
