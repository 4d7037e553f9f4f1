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

from ..errors import CalibrationError
from ..quant import (
    IntFormat,
    Offset,
    compute_qparams,
    dequantize_groups,
    quantize_groups,
)
from ..quant.packing import pack_bits, unpack_bits
from .codecs import META_DTYPE, Packed


@dataclass(frozen=True, eq=False)
class StaticIntCodec:
    """``bits``-bit codes with fixed ``scale`` and, when asymmetric, ``minimum`` (float offset, the default of
    :func:`static_codec`) or ``zero_point`` (integer offset), each ``[kv_heads, C]`` float16.

    The ``head_dim`` channels of a head split into ``C`` equal groups that share a scale (``C = head_dim``: one per
    channel). Codes and values are the quantizer core's (:func:`~lowbit.quant.quantize_groups`,
    :func:`~lowbit.quant.dequantize_groups`) with :class:`~lowbit.quant.IntFormat` ``(bits, symmetric)``, the same
    rounding as :class:`~lowbit.kv.codecs.IntCodec`; codes are stored as ``code - qmin``.
    """

    bits: int
    symmetric: bool
    scale: Tensor
    zero_point: Tensor | None = None
    minimum: Tensor | None = None

    @property
    def format(self) -> IntFormat:
        """The core integer grid these codes live on."""
        return IntFormat(self.bits, self.symmetric)

    @property
    def token_group(self) -> int:
        return 1

    @property
    def nbytes(self) -> int:
        """Bytes of the fixed parameters (held once per layer)."""
        held = (t for t in (self.scale, self.zero_point, self.minimum) if t is not None)
        return sum(t.numel() * t.element_size() for t in held)

    def _params(self, device) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Scale, zero point and minimum as float32 ``[kv_heads, 1, C, 1]``, broadcasting against :meth:`_grouped`."""
        def place(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device).float()[:, None, :, None]

        return place(self.scale), place(self.zero_point), place(self.minimum)

    def _grouped(self, x: Tensor) -> Tensor:
        """``[B, H, T, d]`` as ``[B, H, T, C, d/C]``: the channels sharing a scale on the last dim."""
        b, h, t, d = x.shape
        return x.reshape(b, h, t, self.scale.shape[1], d // self.scale.shape[1])

    def encode(self, x: Tensor) -> Packed:
        """Codes of ``x`` ``[B, H, T, d]`` with the fixed scales (values outside the range saturate)."""
        fmt, (scale, zero, minimum) = self.format, self._params(x.device)
        codes = quantize_groups(self._grouped(x.float()), scale, zero, fmt, minimum) - fmt.qmin
        codes = codes.reshape(x.shape).to(torch.uint8)
        return Packed({"codes": pack_bits(codes, self.bits)}, tokens=x.shape[2])

    def decode(self, packed: Packed, head_dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
        codes = unpack_bits(packed.fields["codes"], self.bits, head_dim).float()
        codes = codes + self.format.qmin if self.format.qmin else codes
        values = dequantize_groups(self._grouped(codes), *self._params(codes.device))
        return values.reshape(codes.shape).to(dtype)

    def scores(self, queries: Tensor, packed: Packed, head_dim: int) -> Tensor:
        return queries.float() @ self.decode(packed, head_dim).transpose(-1, -2)

    def weighted_sum(self, weights: Tensor, packed: Packed, head_dim: int) -> Tensor:
        return weights @ self.decode(packed, head_dim)


def static_codec(
    lo: Tensor, hi: Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0, offset: Offset = "float"
) -> StaticIntCodec:
    """A static codec from per-head, per-granule ranges ``lo``/``hi`` ``[kv_heads, C]``.

    :func:`~lowbit.quant.compute_qparams` with metadata rounded to float16, the dtype it is held in; asymmetric
    codes use ``offset`` (default ``"float"``: the exact range about its centre with a float minimum, like
    :class:`~lowbit.kv.codecs.IntCodec`).
    """
    qp = compute_qparams(lo, hi, IntFormat(bits, symmetric), clip_ratio, scale_dtype=META_DTYPE, offset=offset)
    zero, minimum = (None if t is None else t.to(META_DTYPE) for t in (qp.zero_point, qp.minimum))
    return StaticIntCodec(bits, symmetric, qp.scale.to(META_DTYPE), zero, minimum)


class KVRangeHook(nn.Module):
    """Attention hook that records per-head min/max of keys and values over granules of ``channels_per_scale``.

    Passes its inputs through unchanged; ``ranges()`` gives ``{"keys": (lo, hi), "values": (lo, hi)}``, each
    ``[kv_heads, head_dim / channels_per_scale]``. NaN or inf in calibration, or no calibration at all, raises a
    :class:`~lowbit.errors.CalibrationError` naming ``name`` (the attention layer), as activation quantizers do.
    The first ``skip`` cached positions (a PrefixQuant prefix, stored exactly) are not recorded.
    """

    def __init__(self, key_channels: int, value_channels: int, name: str = "", skip: int = 0) -> None:
        super().__init__()
        self.channels = {"keys": key_channels, "values": value_channels}
        self.name = name or "an attention layer"
        self.skip = skip
        self.seen: dict[str, tuple[Tensor, Tensor]] = {}

    def _record(self, kind: str, x: Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise CalibrationError(
                f"NaN or inf met in KV cache calibration at the {kind} of {self.name}: the model overflows in this "
                "dtype or the input is broken; load the model in float32 or check the calibration text"
            )
        b, h, t, d = x.shape
        g = x.detach().float().reshape(b, h, t, d // self.channels[kind], self.channels[kind])
        lo, hi = g.amin(dim=(0, 2, 4)), g.amax(dim=(0, 2, 4))
        if kind in self.seen:
            lo, hi = torch.minimum(lo, self.seen[kind][0]), torch.maximum(hi, self.seen[kind][1])
        self.seen[kind] = (lo, hi)

    def forward(self, query, key, value):
        self._record("keys", key[:, :, self.skip:])
        self._record("values", value[:, :, self.skip:])
        return query, key, value

    def ranges(self) -> dict[str, tuple[Tensor, Tensor]]:
        if len(self.seen) != 2:
            raise CalibrationError(
                f"the KV cache calibration of {self.name} saw no calibration data: the calibration text never "
                "reached it"
            )
        return dict(self.seen)
