"""Range observers: min/max, percentile clipping, the MSE clip search, and dispatch errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import (
    FP4_E2M1,
    FP8_E4M3,
    Format,
    Granularity,
    IntFormat,
    PerAxis,
    PerGroup,
    PerRow,
    PerTensor,
    compute_qparams,
    fake_quantize,
    fake_quantize_groups,
    granule_shape,
    minmax_range,
    mse_range,
    observe_range,
    percentile_range,
    reduce_minmax,
)

GRANS: list[Granularity] = [PerTensor(), PerRow(), PerGroup(8), PerGroup(5), PerAxis(0), PerAxis(-1)]
FORMATS: list[Format] = [IntFormat(4, True), IntFormat(3, False), IntFormat(8, True), FP8_E4M3, FP4_E2M1]


def _heavy_tailed(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Student-t-like data (normal / sqrt(chi2)) whose outliers make clipping worthwhile."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) / (torch.rand(shape, generator=gen) + 0.05).sqrt()


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(0, 2**16), st.sampled_from(FORMATS), st.sampled_from(GRANS))
def test_mse_error_never_above_minmax(seed: int, fmt: Format, gran: Granularity) -> None:
    """Per granule, the searched range's error (in the searched norm) is <= the min/max range's error."""
    x = _heavy_tailed((6, 21), seed)
    err_mm = (fake_quantize(x, fmt, gran) - x).pow(2)
    err_mse = (fake_quantize(x, fmt, gran, observer="mse", grid=20, norm=2.0) - x).pow(2)
    assert float(err_mse.sum()) <= float(err_mm.sum()) * (1 + 1e-6)
    lo, hi = mse_range(x, gran, fmt, grid=20, norm=2.0)
    mm_lo, mm_hi = minmax_range(x, gran)
    assert lo.shape == granule_shape(x.shape, gran)
    for clipped, full in ((lo, mm_lo), (hi, mm_hi)):  # both ends shrunk by one factor in [0.2, 1]
        assert bool((clipped.abs() <= full.abs()).all() & (clipped.abs() >= 0.2 * full.abs() * (1 - 1e-6)).all())


def test_mse_clips_outliers_and_helps() -> None:
    """On heavy-tailed rows the default search (norm 2.4, 100 points down to 0.2) shrinks ranges and cuts error."""
    x = _heavy_tailed((8, 128), 0)
    fmt = IntFormat(3, True)
    _, hi = mse_range(x, PerRow(), fmt)
    assert bool((hi < reduce_minmax(x.abs(), PerRow())[1]).any())
    err = (fake_quantize(x, fmt, PerRow(), observer="mse") - x).abs().pow(2.4).sum()
    assert float(err) < 0.9 * float((fake_quantize(x, fmt, PerRow()) - x).abs().pow(2.4).sum())


def test_mse_coarse_to_fine_matches_exhaustive() -> None:
    """The default coarse-to-fine search lands within 1% of the exhaustive grid's error, usually on its choice."""
    x = _heavy_tailed((64, 256), 3)
    fmt = IntFormat(4, True)
    full = mse_range(x, PerRow(), fmt, stride=1)
    fast = mse_range(x, PerRow(), fmt)
    assert float((full[1] == fast[1]).float().mean()) > 0.8

    def error(lo_hi) -> float:
        qp = compute_qparams(*lo_hi, fmt)
        return float((fake_quantize_groups(x, qp.scale, qp.zero_point, fmt) - x).abs().pow(2.4).sum())

    assert error(full) <= error(fast) <= 1.01 * error(full)
    with pytest.raises(ValueError, match="stride"):
        mse_range(x, PerRow(), fmt, stride=0)


def test_percentile_clips_below_max() -> None:
    """99th percentile of rows with outliers sits below the max (and above the min); nearest-rank is exact."""
    x = torch.arange(1.0, 101.0).repeat(3, 1)
    lo, hi = percentile_range(x, PerRow(), 90.0)
    assert hi.flatten().tolist() == [90.0] * 3 and lo.flatten().tolist() == [11.0] * 3
    y = _heavy_tailed((4, 1000), 1)
    lo, hi = percentile_range(y, PerRow(), 99.0)
    mm_lo, mm_hi = minmax_range(y, PerRow())
    assert bool((hi < mm_hi).all() & (lo > mm_lo).all())


def test_percentile_symmetric_uses_abs() -> None:
    """Symmetric formats get (-a, a) with a the percentile of |x|; observe_range picks this from the format."""
    x = torch.tensor([[-100.0, 1.0, 2.0, 3.0]])
    lo, hi = percentile_range(x, PerRow(), 100.0, symmetric=True)
    assert (lo.item(), hi.item()) == (-100.0, 100.0)
    lo, hi = observe_range(x, PerRow(), IntFormat(4, True), "percentile", percentile=75.0)
    assert (lo.item(), hi.item()) == (-3.0, 3.0)
    lo, hi = observe_range(x, PerRow(), IntFormat(4, False), "percentile", percentile=75.0)
    assert (lo.item(), hi.item()) == (1.0, 2.0)  # sorted x: -100, 1, 2, 3; ranks 2 and 3


@pytest.mark.parametrize("gran", GRANS)
def test_percentile_100_is_minmax_and_partial_groups(gran: Granularity) -> None:
    """At 100 the percentile range equals min/max for every granularity, partial groups included."""
    x = torch.randn(5, 13, generator=torch.Generator().manual_seed(2))
    lo, hi = percentile_range(x, gran, 100.0)
    mm_lo, mm_hi = minmax_range(x, gran)
    assert torch.equal(lo, mm_lo) and torch.equal(hi, mm_hi)


def test_percentile_handles_tensors_beyond_quantile_limit() -> None:
    """torch.quantile refuses more than 2^24 elements; the kthvalue-based observer does not."""
    x = torch.randn(2**24 + 8, generator=torch.Generator().manual_seed(3))
    lo, hi = percentile_range(x, PerTensor(), 99.9, symmetric=True)
    assert 3.0 < hi.item() < 3.6 and lo.item() == -hi.item()


def test_observer_argument_errors() -> None:
    """Unknown observers and bad options raise ValueErrors naming the valid choices or ranges."""
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="unknown observer 'kl'; valid observers: minmax, percentile, mse"):
        observe_range(x, PerRow(), FP8_E4M3, "kl")
    with pytest.raises(ValueError, match="unknown observer"):
        fake_quantize(x, FP8_E4M3, PerRow(), observer="max")
    with pytest.raises(ValueError, match="minmax observer takes no options"):
        observe_range(x, PerRow(), FP8_E4M3, "minmax", percentile=99.0)
    with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\], got 120"):
        percentile_range(x, PerRow(), 120.0)
    with pytest.raises(ValueError, match="grid must be >= 1"):
        mse_range(x, PerRow(), FP8_E4M3, grid=0)
    with pytest.raises(ValueError, match=r"max_shrink must be in \[0, 1\)"):
        mse_range(x, PerRow(), FP8_E4M3, max_shrink=1.0)


@pytest.mark.parametrize("gran", [PerRow(), PerGroup(16), PerGroup(24), PerTensor(), PerAxis(0)],
                         ids=["row", "g16", "g24-tail", "tensor", "axis0"])
def test_mse_search_in_pieces_equals_one_piece(monkeypatch, gran: Granularity) -> None:
    """The MSE search run on small pieces of rows gives exactly the ranges of one pass over the whole tensor."""
    import lowbit.quant.observers as observers

    x = torch.randn(3, 40, 80, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.2, 4.0, 80)
    fmt = IntFormat(bits=4, symmetric=False)
    monkeypatch.setattr(observers, "_PIECE_ELEMENTS", 1 << 30)
    whole = mse_range(x, gran, fmt)
    monkeypatch.setattr(observers, "_PIECE_ELEMENTS", 100)  # a row or two per piece
    pieces = mse_range(x, gran, fmt)
    for a, b in zip(whole, pieces):
        assert a.shape == b.shape == granule_shape(x.shape, gran)
        assert torch.equal(a, b)
