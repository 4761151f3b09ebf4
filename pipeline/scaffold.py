"""``pipeline new DIR``: a project a user can train at once and then make
their own: a model factory (model.py), its config, a data manifest and a copy
of the shipped digits data. Nothing is overwritten."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .core.environment import project_root
from .core.errors import DataIntegrityError, UsageError

__all__ = ["new_project", "MODEL_PY", "CONFIG_TOML"]

MODEL_PY = '''\
"""My model: the pipeline calls factory(input_shape, num_classes, **[model.args])
and trains the stock torch.nn.Module it returns; forward(x) returns logits."""

from torch import nn


def convnet(input_shape, num_classes, channels=16, dropout=0.1):
    c, h, w = input_shape  # the dataset's shape, from data-manifest.json
    return nn.Sequential(
        nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Dropout(dropout),
        nn.Linear(channels * h * w, num_classes),
    )
'''

CONFIG_TOML = '''\
# pipeline train config.toml
seed = 0
mode = "pinned"

[data]
dataset = "digits"        # a dataset in data-manifest.json beside this file
test_fraction = 0.2

[model]
factory = "model:convnet" # model.py beside this file, function convnet

[model.args]
channels = 16
dropout = 0.1

[train]
epochs = 5
batch_size = 64
shards = 8                # --nproc 1, 2, 4 or 8: the same weights

[optim]
name = "adam"
lr = 0.003
'''


def new_project(dest: Path) -> list[Path]:
    """Write the project into ``dest`` (new or empty); return the files written."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"{dest}: expected a new or empty directory, found one with files; "
                         f"nothing was written")
    src = project_root()
    shipped = json.loads((src / "data-manifest.json").read_text(encoding="utf-8"))
    data = src / shipped["files"]["digits"]["path"]
    if not data.is_file():
        raise DataIntegrityError(str(data), "the shipped digits data", "no such file",
                                 "run from a checkout of the project (or set PIPELINE_ROOT)")
    manifest = {"version": shipped["version"],
                "files": {"digits": shipped["files"]["digits"]},
                "datasets": {"digits": shipped["datasets"]["digits"]}}
    (dest / "data").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data, dest / "data" / data.name)
    (dest / "data-manifest.json").write_text(json.dumps(manifest, indent=2) + "\n",
                                             encoding="utf-8")
    (dest / "model.py").write_text(MODEL_PY, encoding="utf-8")
    (dest / "config.toml").write_text(CONFIG_TOML, encoding="utf-8")
    return [dest / "model.py", dest / "config.toml", dest / "data-manifest.json",
            dest / "data" / data.name]
