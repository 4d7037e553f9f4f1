"""Bit packing: store b-bit integer codes (1 <= b <= 8) densely in uint8 bytes or int32 words, and read them back.

Codes are unsigned (``[0, 2**b)``): the codes of :func:`lowbit.quant.quantize` minus the format's ``qmin``. Used by
the packed KV cache and meant for packed weights alike.

Widths that divide 8 (1, 2, 4, 8) pack whole codes into each byte: code ``i`` of a byte occupies bits
``[b*i, b*(i+1))`` (little-endian), so unpacking is one lookup per byte in a 256-entry table. Other widths are split
into bit planes of those widths (3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1), low bits first, each plane packed as
above and the planes concatenated along the last dimension: still exactly ``b`` bits per code (for a multiple of 8
codes), and unpacking stays a table lookup per byte instead of multi-byte word arithmetic. A plane's last byte is
padded with zero codes; unpacking needs ``n`` to drop the padding. With ``b = 4`` a byte holds two codes, the even
index in the low nibble: the usual int4 layout for weights.

:func:`pack_int32` packs codes densely into int32 words along the last dimension: code ``i`` of a row occupies bits
``[b*i, b*(i+1))`` of the row's bit stream, word ``j`` holding stream bits ``[32*j, 32*(j+1))`` (lowest bits first),
so ``n`` codes take ``ceil(n * b / 32)`` words. That is the order of compressed-tensors' ``pack_to_int32``
(``packed_dim=1``): for widths that divide 32 (e.g. 8 int4 codes per word) no code straddles two words; 3, 5, 6 and
7-bit codes do. On a little-endian machine, for ``n`` a multiple of ``32 // b`` and ``b`` in 1, 2, 4, 8, these words
are the bytes of :func:`pack_bits` viewed as int32.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bit width must be an integer from 1 to 8, got {bits!r}")


def _planes(bits: int) -> list[tuple[int, int]]:
    """``(offset, width)`` of each bit plane, low bits first, widths 4/2/1 (or the whole width when it divides 8)."""
    if 8 % bits == 0:
        return [(0, bits)]
    planes, offset = [], 0
    for width in (4, 2, 1):
        if bits - offset >= width and (bits - offset) & width:
            planes.append((offset, width))
            offset += width
    return planes


def _plane_size(n: int, width: int) -> int:
    per_byte = 8 // width
    return -(-n // per_byte)


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take once packed (each plane's last byte padded)."""
    _check_bits(bits)
    return sum(_plane_size(n, width) for _, width in _planes(bits))


def _pack_plane(codes: Tensor, width: int) -> Tensor:
    """Codes in ``[0, 2**width)`` (uint8), ``8 // width`` per byte."""
    if width == 8:
        return codes
    per_byte = 8 // width
    n = codes.shape[-1]
    padded = torch.nn.functional.pad(codes, (0, -n % per_byte)).reshape(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=codes.device)
    return (padded << shifts).sum(dim=-1, dtype=torch.uint8)


@lru_cache(maxsize=32)
def _unpack_table(width: int, offset: int, device: torch.device) -> Tensor:
    """``[256, 8 // width]`` uint8: the codes each byte value holds, already shifted to their plane's ``offset``."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8)
    table = ((torch.arange(256, dtype=torch.int32).to(torch.uint8)[:, None] >> shifts) & (2**width - 1)) << offset
    return table.to(device)


def _unpack_plane(packed: Tensor, width: int, n: int, offset: int = 0) -> Tensor:
    """The plane's codes shifted left by ``offset``: one table lookup per byte (faster than shifting on a CPU)."""
    if width == 8:
        return packed[..., :n].clone()  # only 8-bit codes are one 8-bit plane (offset 0)
    table = _unpack_table(width, offset, packed.device)
    codes = table.index_select(0, packed.reshape(-1).int())
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]


def _check_codes(codes: Tensor, bits: int, packer: str) -> None:
    """Reject non-integer codes and codes outside ``[0, 2**bits)``, which would corrupt their neighbours."""
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"{packer} needs integer codes, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits}-bit packing")


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dimension into uint8 ``[..., packed_size(n, bits)]``."""
    _check_bits(bits)
    _check_codes(codes, bits, "pack_bits")
    codes = codes.to(torch.uint8)
    planes = [_pack_plane((codes >> offset) & (2**width - 1), width) for offset, width in _planes(bits)]
    return planes[0] if len(planes) == 1 else torch.cat(planes, dim=-1)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes (uint8) along the last dimension."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits needs uint8 bytes, got {packed.dtype}")
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(f"{n} codes of {bits} bits need {packed_size(n, bits)} bytes, got {packed.shape[-1]}")
    codes, start = None, 0
    for offset, width in _planes(bits):
        size = _plane_size(n, width)
        plane = _unpack_plane(packed[..., start:start + size], width, n, offset)
        codes = plane if codes is None else codes | plane
        start += size
    return codes


def _check_int32_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"int32 packing takes bit widths 1 to 8, got {bits!r}")


def _stream_positions(bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For the 32 codes of one ``bits``-word block: each code's word index and bit offset in that word."""
    start = torch.arange(32, device=device) * bits
    return start // 32, start % 32


def pack_int32(codes: Tensor, bits: int) -> Tensor:
    """Pack codes in ``[0, 2**bits)`` along the last dimension densely into int32 words (see the module doc).

    Every 32 codes fill exactly ``bits`` words; the last word is padded with zero bits. compressed-tensors'
    ``pack_to_int32`` takes signed values ``v`` and packs ``v + 2**(bits-1)``, so signed codes go in shifted by that
    offset. Output ``[..., ceil(n * bits / 32)]`` int32 (the word's bit pattern).
    """
    _check_int32_bits(bits)
    _check_codes(codes, bits, "pack_int32")
    n = codes.shape[-1]
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, -n % 32)).reshape(*codes.shape[:-1], -1, 32)
    word, offset = _stream_positions(bits, codes.device)
    shifted = padded << offset  # up to 39 bits: the low 32 go to `word`, the rest to the next word
    words = torch.zeros(*padded.shape[:-1], bits + 1, dtype=torch.int64, device=codes.device)
    words.scatter_add_(-1, word.expand_as(padded), shifted & 0xFFFFFFFF)
    words.scatter_add_(-1, (word + 1).expand_as(padded), shifted >> 32)  # bits never overlap: add is or
    words = words[..., :bits].reshape(*codes.shape[:-1], -1)[..., : -(-n * bits // 32)]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the uint32 pattern as int32


def unpack_int32(words: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_int32`: the first ``n`` codes (uint8) along the last dimension."""
    _check_int32_bits(bits)
    if words.dtype != torch.int32:
        raise TypeError(f"unpack_int32 needs int32 words, got {words.dtype}")
    if words.shape[-1] != -(-n * bits // 32):
        raise ValueError(f"{n} codes of {bits} bits need {-(-n * bits // 32)} int32 words, got {words.shape[-1]}")
    if 32 % bits == 0:  # no code straddles two words: one shift per code
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
        codes = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)  # the mask drops the sign bits an arithmetic shift adds
        return codes.reshape(*words.shape[:-1], -1)[..., :n].to(torch.uint8)
    unsigned = torch.nn.functional.pad(words.to(torch.int64) & 0xFFFFFFFF, (0, -words.shape[-1] % bits + 1))
    blocks = unsigned[..., :-1].reshape(*words.shape[:-1], -1, bits)
    after = torch.cat([blocks[..., 1:], unsigned[..., bits::bits].unsqueeze(-1)], dim=-1)  # each word's successor
    word, offset = _stream_positions(bits, words.device)
    pairs = blocks[..., word] | (after[..., word] << 32)  # a code's word and the next, as one 64-bit stream
    codes = (pairs >> offset) & (2**bits - 1)
    return codes.reshape(*words.shape[:-1], -1)[..., :n].to(torch.uint8)
