"""Granularities: grouped views, stats shapes, partial groups and mergeable calibration statistics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import (
    Granularity,
    PerAxis,
    PerGroup,
    PerRow,
    PerTensor,
    expand_to_elements,
    from_groups,
    granule_shape,
    reduce_minmax,
    to_groups,
)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def tensor_and_gran(draw: st.DrawFn) -> tuple[torch.Tensor, Granularity]:
    """A small random tensor (1-4 dims) and a granularity valid for it, PerGroup sizes often not dividing."""
    shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    gran = draw(
        st.one_of(
            st.just(PerTensor()),
            st.just(PerRow()),
            st.builds(PerGroup, st.integers(1, 8)),
            st.builds(PerAxis, st.integers(-len(shape), len(shape) - 1)),
        )
    )
    return x, gran


@SETTINGS
@given(tensor_and_gran())
def test_groups_round_trip_and_stats_shape(case: tuple[torch.Tensor, Granularity]) -> None:
    """from_groups(to_groups(x)) == x and the stats broadcast against the grouped view."""
    x, gran = case
    g = to_groups(x, gran)
    assert torch.equal(from_groups(g, gran, x.shape), x)
    lo, hi = reduce_minmax(x, gran)
    assert lo.shape == hi.shape == granule_shape(x.shape, gran) == (*g.shape[:-1], 1)


@SETTINGS
@given(tensor_and_gran())
def test_minmax_matches_element_brute_force(case: tuple[torch.Tensor, Granularity]) -> None:
    """Each element lies within its granule's [min, max], and every min and max is attained in its granule."""
    x, gran = case
    lo, hi = reduce_minmax(x, gran)
    lo_el, hi_el = expand_to_elements(lo, gran, x.shape), expand_to_elements(hi, gran, x.shape)
    assert bool(((lo_el <= x) & (x <= hi_el)).all())
    assert bool((lo_el == x).any()) and bool((hi_el == x).any())


def test_partial_group_uses_real_elements_only() -> None:
    """With D=10 and size 4 the last group has 2 elements; its stats ignore the zero padding."""
    x = torch.arange(1.0, 11.0).reshape(1, 10)  # all positive: zero padding would show up as min 0
    lo, hi = reduce_minmax(x, PerGroup(4))
    assert lo.flatten().tolist() == [1.0, 5.0, 9.0]
    assert hi.flatten().tolist() == [4.0, 8.0, 10.0]
    lo, hi = reduce_minmax(-x, PerGroup(16))  # one group, partial, wider than the row
    assert (lo.item(), hi.item()) == (-10.0, -1.0)


def test_documented_shapes() -> None:
    """Stats shapes per granularity for a KV-like [B, H, S, D] tensor."""
    shape = (2, 4, 7, 10)
    assert granule_shape(shape, PerTensor()) == (1, 1)
    assert granule_shape(shape, PerRow()) == (2, 4, 7, 1)
    assert granule_shape(shape, PerGroup(4)) == (2, 4, 7, 3, 1)
    assert granule_shape(shape, PerAxis(1)) == (4, 1)
    assert granule_shape(shape, PerAxis(-1)) == (10, 1)


@pytest.mark.parametrize("gran", [PerTensor(), PerAxis(1), PerAxis(-1)])
def test_static_stats_merge_across_lengths(gran: Granularity) -> None:
    """PerTensor/PerAxis stats do not depend on batch or sequence length, and merging equals one big pass."""
    gen = torch.Generator().manual_seed(1)
    short, long = torch.randn(2, 4, 5, 8, generator=gen), torch.randn(3, 4, 9, 8, generator=gen)
    (lo1, hi1), (lo2, hi2) = reduce_minmax(short, gran), reduce_minmax(long, gran)
    assert lo1.shape == lo2.shape
    merged_lo, merged_hi = torch.minimum(lo1, lo2), torch.maximum(hi1, hi2)
    # every element of both batches, laid out as [N, H, D] so heads (axis 1) and channels (axis -1) are kept
    every = torch.cat([short.movedim(1, 0).reshape(4, -1, 8), long.movedim(1, 0).reshape(4, -1, 8)], dim=1)
    ref_lo, ref_hi = reduce_minmax(every.movedim(0, 1), gran)
    assert torch.equal(merged_lo, ref_lo) and torch.equal(merged_hi, ref_hi)


def test_inputs_not_mutated_and_views_independent() -> None:
    """to_groups/from_groups never write into the input."""
    x = torch.randn(3, 10)
    before = x.clone()
    g = to_groups(x, PerGroup(4))
    from_groups(g * 2, PerGroup(4), x.shape)
    reduce_minmax(x, PerAxis(0))
    assert torch.equal(x, before)


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_invalid_group_size(size: object) -> None:
    """PerGroup rejects sizes below 1 (and non-integers), naming the value."""
    with pytest.raises(ValueError, match=rf">= 1, got {size!r}"):
        PerGroup(size)  # type: ignore[arg-type]


def test_invalid_axis_and_rank() -> None:
    """Axis out of range and 0-d tensors for row-based granularities raise ValueErrors that say why."""
    with pytest.raises(ValueError, match=r"axis 3 is out of range for a 3-d tensor \(valid: -3\.\.2\)"):
        reduce_minmax(torch.randn(2, 3, 4), PerAxis(3))
    for gran in (PerRow(), PerGroup(2)):
        with pytest.raises(ValueError, match="at least one dimension"):
            reduce_minmax(torch.tensor(1.0), gran)
    lo, hi = reduce_minmax(torch.tensor(-2.0), PerTensor())
    assert (lo.item(), hi.item()) == (-2.0, -2.0)
