"""pipeline/exact/probe.py (issue 28): before exact mode trains on a device,
its float64 products of integer operands and the elementwise IEEE-754
operations the spec relies on are checked against results known in bits; a
device that fails is refused (exit 4, naming the operation). Without a GPU
here, the decision logic is fed deliberately inexact products."""

from __future__ import annotations

import pytest
import torch

from pipeline import modes
from pipeline.core.errors import ProfileError
from pipeline.exact import probe

CPU = torch.device("cpu")


def _narrow(bits: int):  # type: ignore[no-untyped-def]
    """A float64 product whose operands keep only ``bits`` mantissa bits (an
    emulation that splits each operand into fewer slices than float64 needs)."""
    def gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        def cut(t: torch.Tensor) -> torch.Tensor:
            m, e = torch.frexp(t)
            return torch.ldexp(torch.round(m * 2.0**bits) / 2.0**bits, e)
        return torch.matmul(cut(a), cut(b))
    return gemm


@pytest.mark.parametrize("name,gemm", [
    ("float32 accumulation", lambda a, b: (a.float() @ b.float()).double()),
    ("20-bit emulation", _narrow(20)),
    ("a long sum off by one", lambda a, b: torch.matmul(a, b) + (a.shape[-1] > 4000)),
    ("batched only", lambda a, b: torch.matmul(a, b) + (a.dim() == 3)),
])
def test_an_inexact_product_is_found_and_named(name: str, gemm: object) -> None:
    """Each kind of inexact float64 product is caught, naming the size."""
    problem = probe.gemm_problem(CPU, gemm)  # type: ignore[arg-type]
    assert problem is not None and "is not exact" in problem, name


def test_the_cpu_passes_and_flush_to_zero_does_not() -> None:
    """This machine's CPU computes as the spec assumes; with flush-to-zero
    on (the control), the elementwise check names it."""
    assert probe.device_problem(CPU) is None
    before = torch.set_flush_denormal(True)
    try:
        problem = probe.elementwise_problem(CPU)
    finally:
        torch.set_flush_denormal(False)
    assert before and problem is not None and "subnormal" in problem


def test_exact_mode_refuses_a_device_that_fails_with_exit_4(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """The mode asks the probe once per device; a failing answer is a
    ProfileError (exit 4) naming the operation, before any net is built."""
    monkeypatch.setattr(modes._Exact, "_probed", {})
    monkeypatch.setattr(probe, "device_problem",
                        lambda device: probe.gemm_problem(device, _narrow(20)))
    with pytest.raises(ProfileError, match="float64 matrix product") as e:
        modes.EXACT._check_device(CPU)
    assert e.value.exit_code == 4
    monkeypatch.setattr(modes._Exact, "_probed", {})
    monkeypatch.setattr(probe, "device_problem", lambda device: None)
    modes.EXACT._check_device(CPU)  # the control: a device that passes
