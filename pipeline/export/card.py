"""``pipeline card RUN_DIR``: a model card in Markdown, written from a
finished run's record alone (and the project's data manifest, for each data
file's source and licence): what was trained, on what data with its hashes
and licences, the metrics, and the config, command and toolchain that
reproduce it. Reads JSON only; imports no model code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .. import modes
from ..core.errors import DataIntegrityError
from ..data.manifest import FileEntry, load_manifest
from ..data.task import of as task_of
from ..record.metrics import Epoch
from ..record.schema import RunRecord

__all__ = ["card", "config_toml", "reproduce_command", "manifest_entries"]


def config_toml(config: dict[str, Any]) -> str:
    """The run's canonical config as a TOML file (``pipeline train`` reads it
    back to the same config and ``config_sha256``)."""
    lines: list[str] = []
    _table(config, "", lines)
    return "\n".join(lines).strip() + "\n"


def _table(table: dict[str, Any], name: str, lines: list[str]) -> None:
    plain = {k: v for k, v in table.items() if not isinstance(v, dict)}
    if name and plain:
        lines += ["", f"[{name}]"]
    lines += [f"{k} = {_value(v)}" for k, v in sorted(plain.items())]
    for k, v in sorted(table.items()):
        if isinstance(v, dict):
            _table(v, f"{name}.{k}" if name else k, lines)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, float) and not math.isfinite(v):
        return {math.inf: "inf", -math.inf: "-inf"}.get(v, "nan")
    return json.dumps(v, ensure_ascii=False)  # strings (JSON's escapes are TOML's), numbers


def reproduce_command(record: RunRecord) -> str:
    """The commands that retrain the run from its config and check it."""
    return (f"pipeline train config.toml   # -> run {record.run_key}, "
            f"weights sha256:{record.weights_sha256}")


def manifest_entries(path: Path, record: RunRecord) -> dict[str, FileEntry | str]:
    """Each data file of the run: its manifest entry, or why there is none
    (no manifest, no such entry, or an entry for other bytes)."""
    try:
        files = load_manifest(path).files
    except DataIntegrityError as e:
        return {name: f"not in a readable manifest ({e})" for name in record.data["files"]}
    out: dict[str, FileEntry | str] = {}
    for name, sha in record.data["files"].items():
        entry = files.get(name)
        out[name] = (entry if entry is not None and entry.sha256 == sha else
                     f"{path} lists other bytes (sha256:{entry.sha256[:16]}...)" if entry
                     else f"no entry in {path}")
    return out


def card(record: RunRecord, epochs: list[Epoch], files: dict[str, FileEntry | str]) -> str:
    """The card's Markdown."""
    parts = [_head(record), _trained(record), _data(record, files), _inputs(record),
             _metrics(record, epochs), _reproduce(record), _toolchain(record), _limits(record)]
    return "\n\n".join(p.strip() for p in parts) + "\n"


def _head(r: RunRecord) -> str:
    factory = r.config["model"]["factory"]
    return f"""# Model card: `{factory}` on `{r.data['dataset']}`

| | |
|---|---|
| run key | `{r.run_key}` |
| weights | `sha256:{r.weights_sha256}` (canonical hash of `weights.safetensors`) |
| mode | {r.mode} (profile `{r.profile.get('name')}`) |
| trained | {r.created_utc or '?'}, {r.steps} steps, world size {r.world_size or 1}, \
{r.device or 'cpu'} |"""


def _trained(r: RunRecord) -> str:
    cfg, model = r.config, r.model or {}
    n = sum(math.prod(t["shape"]) for t in r.weights_layout.values())
    args = json.dumps(cfg["model"].get("args", {}), sort_keys=True)
    optim = ", ".join(f"{k} {v}" for k, v in sorted(cfg["optim"].items()))
    train = ", ".join(f"{k} {v}" for k, v in sorted(cfg["train"].items()))
    return f"""## What was trained

- Model: factory `{cfg['model']['factory']}` (source sha256 \
`{model.get('factory_sha256', '?')}`), arguments `{args}`; \
{len(r.weights_layout)} tensors, {n:,} numbers.
- Training: seed {cfg['seed']}; {train}.
- Optimiser: {optim}.
- Code: the pipeline's code sha256 `{r.code_sha256}`."""


def _data(r: RunRecord, files: dict[str, FileEntry | str]) -> str:
    rows = []
    for name, sha in r.data["files"].items():
        e = files.get(name)
        if isinstance(e, FileEntry):
            rows.append(f"| `{name}` | `{e.path}` | `{sha}` | {e.size:,} | {_cell(e.licence)} "
                        f"| {_cell(e.source)} |")
        else:
            rows.append(f"| `{name}` | ? | `{sha}` | ? | {_cell(e or 'unknown')} | ? |")
    decoded = (r.data_decoded or {}).get(r.data["dataset"], "?")
    return f"""## Data

Dataset `{r.data['dataset']}` (task {r.data.get('task')}), test split: \
{r.config['data']['test_fraction']} of the examples, drawn from the seed. \
Decoded arrays sha256 `{decoded}`.

| file | path | sha256 | bytes | licence | source |
|---|---|---|---|---|---|
""" + "\n".join(rows)


def input_space(r: RunRecord) -> str:
    """One line: what the model's forward takes, from the raw data's values."""
    if task_of(str(r.data.get("task"))).windows:
        train = r.data["train"]
        vocab = (f"the tokenizer file {train['tokenizer']!r}, Hugging Face tokenizers "
                 f"{(r.data.get('decoder') or {}).get('tokenizers', '?')}"
                 if "tokenizer" in train else train.get("vocabulary", "?"))
        return f"int64 token ids (N, T): indices into the run's vocabulary ({vocab})"
    spec = r.data["train"]
    how = (f"pixel / {spec.get('divisor', 255)} (images decoded by Pillow)"
           if spec.get("format") == "images" else f"float32(raw) / {spec.get('divisor', 1)}")
    if r.data.get("standardize"):
        how += (", then standardised column by column: (x - mean) / std with the training "
                "split's statistics in run.json `data.standardize` (float64; "
                "`pipeline.load(...).standardizer.apply`)")
    return f"float32 rows: {how}"


def _inputs(r: RunRecord) -> str:
    return f"""## Inputs

The model's forward (and the exported model) takes {input_space(r)}. `pipeline
predict` maps raw rows to these itself; anything else feeding the model must
do the same, or it computes on other inputs than it was trained on."""


def _metrics(r: RunRecord, epochs: list[Epoch]) -> str:
    final = ", ".join(f"{k} {v:.4f}" for k, v in sorted(r.metrics.items())
                      if k != "steps" and v is not None)
    keys = sorted({k for e in epochs for k in e.values})
    head = "| step | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys)
    rows = [f"| {e.step} | " + " | ".join(_number(k, e.values.get(k)) for k in keys) + " |"
            for e in epochs]
    return f"## Metrics\n\nAt the end ({r.steps} steps): {final}.\n\n" + "\n".join([head, *rows])


def _reproduce(r: RunRecord) -> str:
    lock = r.toolchain.get("lock", "?")
    return f"""## Reproduce

Save this config as `config.toml` in the project the run was trained in (where
its model code and `data-manifest.json` are), with the toolchain below
(`{lock}`: `pip install --require-hashes -r requirements.lock`), and run:

```sh
{reproduce_command(r)}
pipeline verify runs/{r.run_key}   # retrain from the record, compare bit for bit
```

```toml
{config_toml(r.config).strip()}
```"""


def _toolchain(r: RunRecord) -> str:
    rows = [f"| {k} | `{v}` |" for k, v in sorted(r.toolchain.items())]
    env = ", ".join(f"`{k}={v}`" for k, v in sorted((r.profile.get("env") or {}).items()))
    return ("## Toolchain and numeric profile\n\n| | |\n|---|---|\n" + "\n".join(rows)
            + f"\n\nProfile `{r.profile.get('name')}`" + (f": {env}." if env else "."))


def _limits(r: RunRecord) -> str:
    portable = "toolchain" not in modes.of(r.mode).key_fields  # exact: no machine in the key
    where = ("any machine (exact mode: the arithmetic is fixed by IEEE-754)" if
             portable else f"a machine that runs profile `{r.profile.get('name')}` "
             "with this toolchain (pinned mode)")
    return f"""## Limits

The metrics are on one test split drawn from the seed, from the same data as
the training examples. The same weights come back from the commands above on
{where}. Intended use, risks and evaluation beyond this split are not in the
record: add them here."""


def _number(key: str, v: float | None) -> str:
    return "" if v is None else f"{v:.0f}" if key == "epoch" else f"{v:.4f}"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")
