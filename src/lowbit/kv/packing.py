"""Bit packing: store b-bit integer codes (1 <= b <= 8) densely in uint8 bytes, and read them back.

Codes along the last dimension are taken eight at a time: eight b-bit codes make exactly b bytes (code ``i`` of a
group occupies bits ``[b*i, b*(i+1))`` of a little-endian 8b-bit word). A last dimension that is not a multiple of
eight is padded with zero codes, so ``n`` codes take ``ceil(n / 8) * b`` bytes; unpacking needs ``n`` to drop the
padding. This covers the 3-bit codes that power-of-two layouts cannot hold without waste.
"""

from __future__ import annotations

import torch
from torch import Tensor

_GROUP = 8  # codes per packed group: 8 codes of b bits are b whole bytes


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bit width must be an integer from 1 to 8, got {bits!r}")


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take once packed (the last group padded to eight codes)."""
    _check_bits(bits)
    return -(-n // _GROUP) * bits


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dimension into uint8 ``[..., packed_size(n, bits)]``."""
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack_bits needs integer codes, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits}-bit packing")
    if bits == 8:
        return codes.to(torch.uint8)
    n = codes.shape[-1]
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte
        per_byte = 8 // bits
        padded = torch.nn.functional.pad(codes.to(torch.uint8), (0, -n % 8)).reshape(*codes.shape[:-1], -1, per_byte)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return (padded << shifts).sum(dim=-1, dtype=torch.uint8)
    pad = -n % _GROUP
    groups = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).reshape(*codes.shape[:-1], -1, _GROUP)
    shifts = torch.arange(_GROUP, device=codes.device) * bits
    words = (groups << shifts).sum(dim=-1, keepdim=True)  # [..., groups, 1], at most 56 bits: fits int64
    byte_shifts = torch.arange(bits, device=codes.device) * 8
    return ((words >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*codes.shape[:-1], -1)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes (uint8) along the last dimension."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits needs uint8 bytes, got {packed.dtype}")
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(f"{n} codes of {bits} bits need {packed_size(n, bits)} bytes, got {packed.shape[-1]}")
    if bits == 8:
        return packed.clone()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, unpacked with uint8 shifts only
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(*packed.shape[:-1], -1)[..., :n]
    groups = packed.reshape(*packed.shape[:-1], -1, bits).to(torch.int32)  # 8 codes in <= 7 bytes: 56 bits
    dtype = torch.int32 if bits <= 3 else torch.int64  # a word of 8 codes fits 24 bits for 3-bit codes
    words = groups[..., 0].to(dtype)
    for i in range(1, bits):
        words = words | (groups[..., i].to(dtype) << (8 * i))
    shifts = torch.arange(_GROUP, device=packed.device, dtype=dtype) * bits
    codes = ((words.unsqueeze(-1) >> shifts) & (2**bits - 1)).to(torch.uint8).reshape(*packed.shape[:-1], -1)
    return codes[..., :n]
