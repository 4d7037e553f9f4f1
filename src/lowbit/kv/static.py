"""Static KV quantization: integer codes whose scales are fixed per KV head from calibration text.

A static cache stores codes only: the scale (and minimum) of each KV head — per group of channels, or per channel
(keys have outlier channels) — is measured once on calibration text and held by the codec, so a token costs exactly
``bits`` per element (PrefixQuant's static per-head KV). :class:`KVRangeHook` records the post-RoPE (and, with
QuaRot, post-R3) key/value ranges during calibration forwards; :func:`static_codec` turns ranges into a codec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..quant.packing import pack_bits, unpack_bits
from .codecs import META_DTYPE, Packed


@dataclass(frozen=True, eq=False)
class StaticIntCodec:
    """``bits``-bit codes with fixed ``scale`` (and ``minimum`` when asymmetric), each ``[kv_heads, C]``.

    The ``head_dim`` channels of a head split into ``C`` equal groups that share a scale (``C = head_dim``: one per
    channel). Asymmetric: ``x = code * scale + minimum``; symmetric: ``x = (code - 2^(bits-1) + 1) * scale``.
    """

    bits: int
    symmetric: bool
    scale: Tensor
    minimum: Tensor | None = None

    @property
    def token_group(self) -> int:
        return 1

    @property
    def nbytes(self) -> int:
        """Bytes of the fixed parameters (held once per layer)."""
        held = self.scale.numel() * self.scale.element_size()
        return held + (0 if self.minimum is None else self.minimum.numel() * self.minimum.element_size())

    def _params(self, device) -> tuple[Tensor, Tensor | None]:
        scale = self.scale.to(device).float()[None, :, None, :, None]
        lo = None if self.minimum is None else self.minimum.to(device).float()[None, :, None, :, None]
        return scale, lo

    def _grouped(self, x: Tensor) -> Tensor:
        b, h, t, d = x.shape
        return x.reshape(b, h, t, self.scale.shape[1], d // self.scale.shape[1])

    def encode(self, x: Tensor) -> Packed:
        """Codes of ``x`` ``[B, H, T, d]`` with the fixed scales (values outside the range saturate)."""
        scale, lo = self._params(x.device)
        g = self._grouped(x.float())
        if self.symmetric:
            half = 2 ** (self.bits - 1) - 1
            codes = (g / scale).round().clamp(-half, half) + half
        else:
            codes = ((g - lo) / scale).round().clamp(0, 2**self.bits - 1)
        return Packed({"codes": pack_bits(codes.reshape(x.shape).to(torch.uint8), self.bits)}, tokens=x.shape[2])

    def decode(self, packed: Packed, head_dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
        codes = unpack_bits(packed.fields["codes"], self.bits, head_dim).float()
        scale, lo = self._params(codes.device)
        g = self._grouped(codes)
        values = (g - (2 ** (self.bits - 1) - 1)) * scale if self.symmetric else g * scale + lo
        return values.reshape(codes.shape).to(dtype)

    def scores(self, queries: Tensor, packed: Packed, head_dim: int) -> Tensor:
        return queries.float() @ self.decode(packed, head_dim).transpose(-1, -2)

    def weighted_sum(self, weights: Tensor, packed: Packed, head_dim: int) -> Tensor:
        return weights @ self.decode(packed, head_dim)


def static_codec(lo: Tensor, hi: Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0) -> StaticIntCodec:
    """A static codec from per-head, per-granule ranges ``lo``/``hi`` ``[kv_heads, C]`` (clipped about the centre)."""
    lo, hi = lo.float(), hi.float()
    if symmetric:
        half = 2 ** (bits - 1) - 1
        scale = (torch.maximum(lo.abs(), hi.abs()) * clip_ratio / half).clamp_min(1e-8)
        return StaticIntCodec(bits, True, scale.to(META_DTYPE))
    centre, half_range = (hi + lo) / 2, (hi - lo) / 2 * clip_ratio
    scale = (2 * half_range / (2**bits - 1)).clamp_min(1e-8)
    return StaticIntCodec(bits, False, scale.to(META_DTYPE), (centre - half_range).to(META_DTYPE))


class KVRangeHook(nn.Module):
    """Attention hook that records per-head min/max of keys and values over granules of ``channels_per_scale``.

    Passes its inputs through unchanged; ``ranges()`` gives ``{"keys": (lo, hi), "values": (lo, hi)}``, each
    ``[kv_heads, head_dim / channels_per_scale]``. NaN or inf in calibration raises a clear error.
    """

    def __init__(self, key_channels: int, value_channels: int) -> None:
        super().__init__()
        self.channels = {"keys": key_channels, "values": value_channels}
        self.seen: dict[str, tuple[Tensor, Tensor]] = {}

    def _record(self, name: str, x: Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"calibration {name} contain NaN or inf: check the model in full precision")
        b, h, t, d = x.shape
        g = x.detach().float().reshape(b, h, t, d // self.channels[name], self.channels[name])
        lo, hi = g.amin(dim=(0, 2, 4)), g.amax(dim=(0, 2, 4))
        if name in self.seen:
            lo, hi = torch.minimum(lo, self.seen[name][0]), torch.maximum(hi, self.seen[name][1])
        self.seen[name] = (lo, hi)

    def forward(self, query, key, value):
        self._record("keys", key)
        self._record("values", value)
        return query, key, value

    def ranges(self) -> dict[str, tuple[Tensor, Tensor]]:
        if len(self.seen) != 2:
            raise ValueError("no calibration text reached this attention layer")
        return dict(self.seen)
