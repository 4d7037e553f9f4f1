"""Bit packing round-trips exactly and takes exactly the advertised bytes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.kv.packing import pack_bits, packed_size, unpack_bits


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 8), st.integers(1, 70), st.integers(1, 3), st.integers(0, 2**16))
def test_round_trip_any_width_and_length(bits, n, rows, seed):
    codes = torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(seed))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_size(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n), codes.to(torch.uint8))


def test_sizes_are_dense():
    assert packed_size(64, 1) == 8 and packed_size(64, 2) == 16 and packed_size(64, 3) == 24
    assert packed_size(64, 4) == 32 and packed_size(64, 8) == 64 and packed_size(64, 7) == 56
    assert packed_size(10, 3) == 3 + 2  # a 2-bit plane of 3 bytes and a 1-bit plane of 2 bytes


def test_layout_is_little_endian_and_odd_widths_are_bit_planes():
    """Code i of a byte sits at bits [b*i, b*(i+1)); a 3-bit code is a 2-bit plane then a 1-bit plane."""
    codes = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1]])
    assert pack_bits(codes, 1).tolist() == [[0b10000001]]
    assert pack_bits(torch.tensor([[3, 1, 0, 0]]), 2).tolist() == [[0b0111]]
    assert pack_bits(torch.tensor([[5, 2, 7, 0]]), 3).tolist() == [[0b00111001, 0b0101]]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="from 1 to 8"):
        pack_bits(torch.zeros(8, dtype=torch.int64), 9)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(TypeError, match="integer codes"):
        pack_bits(torch.zeros(8), 2)
    with pytest.raises(ValueError, match="need 3 bytes"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, 8)
