"""Bit packing: store b-bit integer codes (1 <= b <= 8) densely in uint8 bytes, and read them back.

Widths that divide 8 (1, 2, 4, 8) pack whole codes into each byte: code ``i`` of a byte occupies bits
``[b*i, b*(i+1))`` (little-endian), so unpacking is one lookup per byte in a 256-entry table. Other widths are split into
bit planes of those widths (3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1), low bits first, each plane packed as
above and the planes concatenated along the last dimension: still exactly ``b`` bits per code (for a multiple of 8
codes), and unpacking stays a table lookup per byte instead of multi-byte word arithmetic. A plane's last byte is
padded with zero codes; unpacking needs ``n`` to drop the padding.
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


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dimension into uint8 ``[..., packed_size(n, bits)]``."""
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack_bits needs integer codes, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits}-bit packing")
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
