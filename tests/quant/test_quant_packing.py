"""Bit packing round-trips exactly, takes exactly the advertised bytes, and int32 words follow compressed-tensors."""

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant.packing import pack_bits, pack_int32, packed_size, unpack_bits, unpack_int32


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


def _pack_to_int32_reference(signed: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' pack_to_int32 order, written out bit by bit: offset to unsigned, bit ``b`` of element ``i``
    at position ``p = bits*i + b`` of the row's stream, i.e. bit ``p % 32`` of word ``p // 32`` (dense: 3, 5, 6 and
    7-bit elements straddle words; for widths dividing 32, word ``j`` holds elements ``j*f .. j*f+f-1``)."""
    unsigned = signed.to(torch.int64) + (1 << (bits - 1))
    words = torch.zeros(*signed.shape[:-1], -(-signed.shape[-1] * bits // 32), dtype=torch.int64)
    for i in range(signed.shape[-1]):
        for b in range(bits):
            p = bits * i + b
            words[..., p // 32] |= ((unsigned[..., i] >> b) & 1) << (p % 32)
    return words.to(torch.uint32).view(torch.int32)  # the word's bit pattern, as compressed-tensors returns it


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 8), st.integers(1, 70), st.integers(1, 3), st.integers(0, 2**16))
def test_int32_words_round_trip_in_compressed_tensors_order(bits, n, rows, seed):
    codes = torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(seed))
    words = pack_int32(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (rows, -(-n * bits // 32))
    assert torch.equal(unpack_int32(words, bits, n), codes.to(torch.uint8))
    assert torch.equal(words, _pack_to_int32_reference(codes - (1 << (bits - 1)), bits))


def test_int3_codes_straddle_words():
    """Dense packing: 32 int3 codes fill exactly 3 words; code 10 takes bits 30-31 of word 0 and bit 0 of word 1."""
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, 10] = 0b111
    assert pack_int32(codes, 3).tolist() == [[-(2**31) + 2**30, 1, 0]]


def test_int4_layouts_lowest_bits_first():
    """8 int4 codes per word, code 0 lowest; the bytes of pack_bits are the same words (little-endian)."""
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert pack_int32(codes, 4).tolist() == [[0x87654321 - 2**32]]
    assert pack_bits(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]  # two per byte, even index in the low nibble
    many = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(1))
    if sys.byteorder == "little":
        assert torch.equal(pack_bits(many, 4).view(torch.int32), pack_int32(many, 4))


def test_int32_bad_input_is_named():
    with pytest.raises(ValueError, match=r"1 to 8, got 9"):
        pack_int32(torch.zeros(8, dtype=torch.int64), 9)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        pack_int32(torch.tensor([16]), 4)
    with pytest.raises(TypeError, match="int32 words"):
        unpack_int32(torch.zeros(2, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError, match="need 1 int32 words, got 2"):
        unpack_int32(torch.zeros(2, dtype=torch.int32), 4, 8)
