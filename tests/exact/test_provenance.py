"""Constants a model builds in ``__init__`` (pipeline/exact/provenance.py;
docs/exact-spec.md section 28): a buffer or tensor attribute computed with a
non-exact op is refused by from_torch, naming it and the exact helper;
tables from ``rotary_tables`` (or views of them), exact arithmetic of exact
values and whole numbers are kept; a refused model exits 2 from
``pipeline train`` with nothing trained."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.core.errors import ConfigError
from pipeline.exact import from_torch, rotary_tables
from pipeline.exact.recorder import recording

from ..support import run_pipeline


class _Holder(nn.Module):
    """A linear layer and one constant made by ``make`` (a buffer, or a
    plain attribute with ``attribute``)."""

    def __init__(self, make: Callable[[], torch.Tensor], attribute: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        if attribute:
            self.table = make()
        else:
            self.register_buffer("table", make(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _cos_table() -> torch.Tensor:
    return torch.cos(torch.arange(8.0)[:, None] * torch.ones(4))


REFUSED = {
    "torch.cos": _cos_table,
    "torch.linspace": lambda: torch.linspace(0.0, 1.0, 7),
    "torch.randn": lambda: torch.randn(3, 4),
    "torch.Tensor.__rpow__": lambda: 10000.0 ** (torch.arange(0, 8, 2).float() / 8),
    "torch.exp": lambda: torch.exp(torch.arange(4.0)),
    # whole numbers, but drawn from the global generator: named by the first op
    "torch.randn ": lambda: torch.round(torch.randn(6) * 10),
}


@pytest.mark.parametrize("op", list(REFUSED))
def test_a_constant_from_a_non_exact_op_is_refused(op: str) -> None:
    """Built under recording() (as the pipeline builds a factory), each
    table is refused naming its module path, the buffer, the op that made it
    and the exact helper to use."""
    with recording():
        m = _Holder(REFUSED[op])
    op = op.strip()
    with pytest.raises(ConfigError, match="exact mode") as e:
        from_torch(m)
    text = str(e.value)
    assert "buffer 'table'" in text and op in text and "pipeline.exact.rotary_tables" in text


def test_a_captured_tensor_attribute_is_checked_too() -> None:
    """A table held as a plain attribute (not a buffer) is refused alike;
    control: the same attribute from rotary_tables is kept."""
    with recording():
        bad = _Holder(_cos_table, attribute=True)
        good = _Holder(lambda: rotary_tables(8, 4)[0], attribute=True)
    with pytest.raises(ConfigError, match="tensor attribute 'table'"):
        from_torch(bad)
    from_torch(good)


def test_floats_from_outside_torch_are_not_trusted() -> None:
    """A table made from Python or NumPy floats (math.cos, np.cos: libm's
    bits) or scaled by a fraction is of unknown origin: refused unless
    whole; control: exact arithmetic with whole numbers is kept."""
    import math

    import numpy as np
    for make in (lambda: torch.tensor([math.cos(i) for i in range(4)]),
                 lambda: torch.as_tensor(np.cos(np.arange(4.0))),
                 lambda: torch.arange(4.0) * 0.1):
        with recording():
            m = _Holder(make)
        with pytest.raises(ConfigError, match="holds computed float values"):
            from_torch(m)
    with recording():
        ok = _Holder(lambda: (torch.arange(4.0) + 1) / 3)
    from_torch(ok)


def test_without_recording_computed_floats_are_still_refused() -> None:
    """from_torch alone (no recorded factory) refuses non-whole floats of
    unknown origin: the check never trusts what it cannot trace."""
    with pytest.raises(ConfigError, match="holds computed float values"):
        from_torch(_Holder(_cos_table))


@pytest.mark.parametrize("record", [True, False])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rotary_tables_and_their_views_are_kept(record: bool, layout: str) -> None:
    """rotary_tables' output (either layout), a view of it and exact
    arithmetic on exact values (recorded) are kept, whether or not the
    factory was recorded; the converted model holds the same bits."""
    def make() -> torch.Tensor:
        return rotary_tables(8, 16, layout=layout)[1][None, None, :10]
    if record:
        with recording():
            m = _Holder(make)
            scaled = _Holder(lambda: torch.arange(8.0) / 8)
        from_torch(scaled)
    else:
        m = _Holder(make)
    ex = from_torch(m)
    assert torch.equal(ex.table, rotary_tables(8, 10, layout=layout)[1][None, None])


def test_an_in_place_update_of_a_table_is_refused() -> None:
    """A table from the helper changed in place afterwards (here by torch's
    own exp) is no longer the helper's: refused."""
    with recording():
        m = _Holder(lambda: rotary_tables(8, 4)[0].exp_())
    with pytest.raises(ConfigError, match="buffer 'table'"):
        from_torch(m)
    cos, _ = rotary_tables(8, 4)
    held = _Holder(lambda: cos)
    cos.mul_(2)  # outside any recording: the version counter moves
    with pytest.raises(ConfigError, match="holds computed float values"):
        from_torch(held)


FACTORY = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, n_in, n_out, table):
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)
        if table == "cos":
            self.register_buffer("phase", torch.cos(torch.arange(n_in) * 0.5))
        else:
            from pipeline.exact import rotary_tables
            self.register_buffer("phase", rotary_tables(n_in, 1)[0][0])

    def forward(self, x):
        return self.fc(x.flatten(1) * self.phase)


def net(input_shape, num_classes, table="cos"):
    n = 1
    for d in input_shape:
        n *= d
    return Net(n, num_classes, table)
"""


@pytest.mark.process
@pytest.mark.slow
def test_pipeline_train_refuses_a_cos_table_with_exit_2(tmp_path: Path,
                                                        suite_env: dict[str, str]) -> None:
    """In a project of its own, exact mode refuses a factory whose buffer is a
    torch.cos table: exit 2 naming the buffer, the op and the helper, no run
    written; control: the same factory with rotary_tables trains (exit 0)."""
    (tmp_path / "tablenet.py").write_text(textwrap.dedent(FACTORY))
    (tmp_path / "config.toml").write_text(
        'seed = 0\nmode = "exact"\n[model]\nfactory = "tablenet:net"\n'
        '[train]\nepochs = 1\nmax_steps = 2\n')
    runs = tmp_path / "runs"
    base = ["train", "config.toml", "--runs-dir", str(runs), "--json", "--quiet"]
    env = dict(suite_env)
    bad = run_pipeline(base, env, tmp_path, timeout=300)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "buffer 'phase'" in bad.stderr and "torch.cos" in bad.stderr
    assert "pipeline.exact.rotary_tables" in bad.stderr
    assert not runs.exists() or not any(runs.iterdir())
    good = run_pipeline([*base[:2], 'model.args.table="rotary"', *base[2:]], env, tmp_path,
                        timeout=300)
    assert good.returncode == 0, good.stderr[-2000:]
    assert json.loads(good.stdout)["metrics"]["steps"] == 2
