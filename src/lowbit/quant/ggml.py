"""GGML's 32-weight blocks (Q4_0, Q4_1, Q8_0) as pure tensor math: integer codes and float16 scales to the bytes
llama.cpp reads, and back.

Blocks run along each row (the ``in_features`` / K dimension of a weight ``[N, K]``), 32 weights each; a row of K
weights is K / 32 blocks laid end to end. Layouts (llama.cpp ``ggml-common.h``, little-endian, IEEE half scales):

* ``Q4_0`` (18 bytes): ``d`` fp16, ``qs[16]``; byte ``j`` holds ``u_j`` in its low nibble and ``u_{j+16}`` in its high
  nibble, ``u = q + 8`` for signed codes ``q`` in [-8, 7]; value ``d * q``.
* ``Q4_1`` (20 bytes): ``d`` fp16, ``m`` fp16, ``qs[16]`` as Q4_0 with unsigned codes ``u`` in [0, 15]; value
  ``d * u + m``.
* ``Q8_0`` (34 bytes): ``d`` fp16, ``qs[32]`` int8 codes ``q`` in [-128, 127]; value ``d * q``.

The reference dequantizers are ``gguf.quants.dequantize`` (gguf-py) and ``dequantize_row_q4_0`` etc. in ggml; the
values are ``float32(d) * float32(q)`` (``+ float32(m)``), the same float32 products lowbit's ``dequantize`` forms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import torch
from torch import Tensor

BLOCK: Final = 32


@dataclass(frozen=True)
class BlockLayout:
    """One GGML block type: its name, bytes per block, the code range and whether it stores a minimum."""

    name: str
    nbytes: int
    qmin: int
    qmax: int
    has_min: bool = False

    @property
    def bits(self) -> int:
        """Bits per code."""
        return (self.qmax - self.qmin).bit_length()


LAYOUTS: Final = {
    "Q4_0": BlockLayout("Q4_0", 18, -8, 7),
    "Q4_1": BlockLayout("Q4_1", 20, 0, 15, has_min=True),
    "Q8_0": BlockLayout("Q8_0", 34, -128, 127),
}


def _half_bytes(t: Tensor) -> Tensor:
    """``t`` ``[N, G]`` as float16, viewed as its little-endian bytes ``[N, G, 2]``."""
    half = t.to(torch.float16).contiguous()
    return half.view(torch.uint8).reshape(*half.shape, 2)


def _check(layout: BlockLayout, codes: Tensor, scale: Tensor, minimum: Tensor | None) -> None:
    """Reject shapes and codes the layout cannot hold (a bug upstream, not user input)."""
    n, k = codes.shape
    if k % BLOCK:
        raise ValueError(f"{layout.name} rows hold blocks of {BLOCK}: a row of {k} weights does not divide")
    if scale.shape != (n, k // BLOCK):
        raise ValueError(f"{layout.name} needs one scale per block, shape {(n, k // BLOCK)}, got {tuple(scale.shape)}")
    if layout.has_min != (minimum is not None):
        raise ValueError(f"{layout.name} {'needs' if layout.has_min else 'takes no'} per-block minimum")
    if codes.numel() and (int(codes.min()) < layout.qmin or int(codes.max()) > layout.qmax):
        raise ValueError(f"{layout.name} codes must lie in [{layout.qmin}, {layout.qmax}]")


def pack_blocks(kind: str, codes: Tensor, scale: Tensor, minimum: Tensor | None = None) -> Tensor:
    """The GGML bytes ``[N, K / 32 * nbytes]`` (uint8) of integer ``codes`` ``[N, K]`` with per-block ``scale``
    (and ``minimum``, Q4_1) ``[N, K / 32]``, stored as float16 (the caller makes sure they are float16 values)."""
    layout = LAYOUTS[kind]
    _check(layout, codes, scale, minimum)
    n, k = codes.shape
    blocks = codes.to(torch.int32).reshape(n, k // BLOCK, BLOCK)
    head = [_half_bytes(scale)] + ([_half_bytes(minimum)] if minimum is not None else [])
    if layout.bits == 8:
        body = blocks.to(torch.int8).view(torch.uint8)
    else:
        u = (blocks - layout.qmin).to(torch.uint8)  # Q4_0: q + 8; Q4_1: already unsigned
        body = u[..., : BLOCK // 2] | (u[..., BLOCK // 2 :] << 4)
    return torch.cat([*head, body], dim=-1).reshape(n, -1)


def unpack_blocks(kind: str, data: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Codes ``[N, k]`` (int32), scales and minimums (Q4_1; else None) ``[N, k / 32]`` (float32) of GGML bytes
    ``[N, k / 32 * nbytes]``: the inverse of :func:`pack_blocks`."""
    layout = LAYOUTS[kind]
    n = data.shape[0]
    blocks = data.reshape(n, k // BLOCK, layout.nbytes)
    offset = 4 if layout.has_min else 2

    def half(at: int) -> Tensor:
        return blocks[..., at : at + 2].contiguous().view(torch.float16).squeeze(-1).to(torch.float32)

    body = blocks[..., offset:]
    if layout.bits == 8:
        codes = body.contiguous().view(torch.int8).to(torch.int32)
    else:
        codes = torch.cat([body & 0x0F, body >> 4], dim=-1).to(torch.int32) + layout.qmin
    return codes.reshape(n, k), half(0), half(2) if layout.has_min else None
