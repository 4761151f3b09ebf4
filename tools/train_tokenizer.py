"""Regenerates data/shakespeare-bpe.json, the shipped subword tokenizer: a
byte-level BPE (Hugging Face ``tokenizers``, the text extra) of 1024 tokens
trained on data/shakespeare.txt. The committed file is what runs depend on
(the manifest lists its sha256); this script only says how it was made, and
tests/data/test_tokenizer.py checks that it still makes the same file.

    .venv/bin/python tools/train_tokenizer.py [OUT]   (default data/shakespeare-bpe.json)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 1024


def build(text_path: Path) -> str:
    """The tokenizer's JSON (sorted keys are not used: it is tokenizers' own form)."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(text_path)], trainer)
    return tok.to_str(pretty=True) + "\n"


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "data" / "shakespeare-bpe.json"
    out.write_text(build(ROOT / "data" / "shakespeare.txt"), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
