"""Write the shipped UCI digits (data/digits.csv.gz, 1797 8x8 images, 0..16 per
pixel) out as PNG files in class folders: digits/<label>/<row>.png, 8-bit grey,
pixel = value * 255 // 16 (integers: 0 -> 0, 16 -> 255), row = the CSV's line
number (0-based, 4 digits). Run from anywhere:

    python make_pngs.py [DEST]      # DEST defaults to ./digits

examples/images/digits/ was written by this script (Pillow 13.0.0, zlib 1.2.13);
another zlib may compress differently, so the committed files and their
manifest entries are the reference, this script their provenance.
"""

from __future__ import annotations

import csv
import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import pipeline

CSV = Path(pipeline.__file__).resolve().parent.parent / "data" / "digits.csv.gz"


def main(dest: Path) -> None:
    with gzip.open(CSV, "rt", newline="") as f:
        rows = [list(map(int, r)) for r in csv.reader(f)]
    for i, r in enumerate(rows):
        pixels = (np.array(r[:64], dtype=np.int64).reshape(8, 8) * 255 // 16).astype(np.uint8)
        out = dest / str(r[64]) / f"{i:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(out, format="PNG", optimize=False)
    print(f"wrote {len(rows)} PNG files under {dest}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("digits"))
