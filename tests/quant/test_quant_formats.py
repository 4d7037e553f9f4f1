"""Formats and float-grid rounding: integer ranges, validation, and exact agreement with torch's float8 casts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import (
    FORMAT_NAMES,
    FP4_E2M1,
    FP8_E4M3,
    FP8_E5M2,
    FloatFormat,
    IntFormat,
    parse_format,
    round_to_float_format,
)
from lowbit.quant.fp import emulate_float_format
from lowbit.quant.integer import magnitude

FP8_DTYPES = [(FP8_E4M3, torch.float8_e4m3fn), (FP8_E5M2, torch.float8_e5m2)]
FP4_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_ranges(bits: int) -> None:
    """Symmetric is the restricted mirror range; asymmetric is the full unsigned range."""
    sym, asym = IntFormat(bits, symmetric=True), IntFormat(bits, symmetric=False)
    assert (sym.qmin, sym.qmax) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert sym.qmin == -sym.qmax
    assert (asym.qmin, asym.qmax) == (0, 2**bits - 1)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -4])
def test_invalid_bits_name_value_and_range(bits: int) -> None:
    """A bad bit width raises a ValueError naming the value and the allowed range."""
    with pytest.raises(ValueError, match=rf"2\.\.8.*got {bits}"):
        IntFormat(bits, symmetric=True)


def test_formats_are_frozen() -> None:
    """Formats are immutable value objects."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        IntFormat(4, True).bits = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        FP8_E4M3.max_value = 1.0  # type: ignore[misc]


def test_float_format_constants() -> None:
    """Bit widths, maxima and that a layout error is rejected."""
    assert (FP8_E4M3.bits, FP8_E5M2.bits, FP4_E2M1.bits) == (8, 8, 4)
    assert (FP8_E4M3.max_value, FP8_E5M2.max_value, FP4_E2M1.max_value) == (448.0, 57344.0, 6.0)
    assert FP8_E4M3.max_value == torch.finfo(torch.float8_e4m3fn).max
    assert FP8_E5M2.max_value == torch.finfo(torch.float8_e5m2).max
    assert (FP8_E4M3.rounding_limit, FP4_E2M1.rounding_limit) == (464.0, 7.0)
    with pytest.raises(ValueError, match=r"exp_bits in 1\.\.6 and man_bits in 0\.\.10, got exp_bits=0"):
        FloatFormat("bad", exp_bits=0, man_bits=2, max_value=1.0)
    with pytest.raises(ValueError, match=r"on its own grid, got 450\.0"):
        FloatFormat("bad", exp_bits=4, man_bits=3, max_value=450.0)
    assert FloatFormat("fnuz-like", exp_bits=4, man_bits=3, max_value=240.0).rounding_limit == 248.0


def test_parse_format() -> None:
    """Every valid name parses; symmetric applies to ints only; bad names list the valid ones."""
    assert parse_format("int4") == IntFormat(4, True)
    assert parse_format("INT8", symmetric=False) == IntFormat(8, False)
    assert parse_format("fp8_e4m3", symmetric=False) is FP8_E4M3
    assert parse_format("fp8_e5m2") is FP8_E5M2 and parse_format("fp4_e2m1") is FP4_E2M1
    assert all(parse_format(n).bits in range(2, 9) for n in FORMAT_NAMES)
    for bad in ("int9", "int1", "fp16", "", "e4m3"):
        with pytest.raises(ValueError, match=r"valid names: int2, .*fp4_e2m1"):
            parse_format(bad)


def _all_finite(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of an 8-bit float dtype, as float32, sorted (+0 and -0 both kept)."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32)
    return torch.sort(values[torch.isfinite(values)]).values


@pytest.mark.parametrize(("fmt", "dtype"), FP8_DTYPES)
def test_fp8_matches_torch_exactly(fmt: FloatFormat, dtype: torch.dtype) -> None:
    """Representable values, all midpoints (ties), just-off-midpoints, random values and saturation match torch."""
    grid = _all_finite(dtype)
    mids = (grid[1:] + grid[:-1]) / 2
    gen = torch.Generator().manual_seed(0)
    randoms = torch.cat([torch.randn(20_000, generator=gen) * 10.0**e for e in range(-6, 6)])
    extremes = torch.tensor([math.inf, -math.inf, 1e30, -1e30, 1e-45, -1e-45, 0.0, -0.0])
    x = torch.cat([grid, mids, mids.nextafter(grid[1:]), mids.nextafter(grid[:-1]), randoms, extremes])
    expected = x.clamp(-fmt.max_value, fmt.max_value).to(dtype).to(torch.float32)
    for actual in (emulate_float_format(x, fmt), round_to_float_format(x, fmt)):  # the arithmetic and the fast path
        assert torch.equal(actual, expected)
        assert torch.equal(torch.signbit(actual), torch.signbit(expected))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32))
def test_fp8_e4m3_scalar_property(v: float) -> None:
    """Any float32 scalar rounds exactly like torch's float8_e4m3fn cast."""
    x = torch.tensor([v], dtype=torch.float32)
    expected = x.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32)
    assert torch.equal(emulate_float_format(x, FP8_E4M3), expected)


def _fp4_reference(v: float) -> float:
    """Nearest E2M1 magnitude with ties to the even code (codes 0..7 index FP4_GRID), saturating at 6."""
    mag = min(abs(v), 6.0)
    dists = [abs(mag - g) for g in FP4_GRID]
    best = min(dists)
    codes = [i for i, d in enumerate(dists) if d == best]
    code = codes[0] if len(codes) == 1 else next(i for i in codes if i % 2 == 0)
    return math.copysign(FP4_GRID[code], v)


def test_fp4_grid_and_ties() -> None:
    """E2M1 grid points are fixed, midpoints tie to the even code, beyond 6 saturates."""
    grid = torch.tensor(FP4_GRID)
    assert torch.equal(round_to_float_format(grid, FP4_E2M1), grid)
    assert torch.equal(round_to_float_format(-grid, FP4_E2M1), -grid)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert round_to_float_format(mids, FP4_E2M1).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    x = torch.linspace(-8.0, 8.0, 3201)
    expected = torch.tensor([_fp4_reference(v) for v in x.tolist()])
    assert torch.equal(round_to_float_format(x, FP4_E2M1), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_round_keeps_dtype_and_input(dtype: torch.dtype) -> None:
    """Output dtype equals input dtype; the input is not modified; NaN stays NaN."""
    x = torch.tensor([0.3, -1000.0, 7.7, float("nan")], dtype=dtype)
    before = x.clone()
    out = round_to_float_format(x, FP8_E4M3)
    assert out.dtype == dtype
    assert torch.equal(x[:3], before[:3])
    assert out[:3].tolist() == [0.3125, -448.0, 7.5] and torch.isnan(out[3])


@pytest.mark.parametrize(("fmt", "largest"), [(IntFormat(4, True), 7), (IntFormat(4, True, full_range=True), 8),
                                              (IntFormat(8, True, full_range=True), 128), (IntFormat(4, False), 15)])
def test_magnitude_is_the_largest_code_distance_from_zero(fmt, largest):
    """Exact integer sums size their blocks by it: the full grid's -2^(b-1) counts."""
    assert magnitude(fmt) == largest
