"""A quantized weight on disk and back: packed codes, scales and zero points under compressed-tensors' names.

One linear's tensors (``[N, K]`` weight, ``G`` scale granules per row):

* int weights below 8 bits: ``weight_packed`` int32 ``[N, ceil(K * b / 32)]`` (:func:`~lowbit.quant.pack_int32`:
  ``32 // b`` codes per word, lowest index in the lowest bits) of the unsigned codes ``q + 2^(b-1)`` (symmetric
  signed codes) or the codes as they are (asymmetric), and ``weight_shape`` int64 ``[2]``;
* int8 weights: ``weight`` int8 ``[N, K]`` (asymmetric codes shifted by -128);
* float formats: ``weight`` in the narrowest torch float8 dtype that holds the codes exactly (``x / s``);
* ``weight_scale`` float32 ``[N, G]`` (``[1]`` per tensor); ``weight_zero_point`` int32 ``[N, G]`` for asymmetric
  grids, in the signed convention ``z - 2^(b-1)`` (compressed-tensors packs it along rows; lowbit keeps it plain).

The codes are recovered exactly from a fake-quantized weight (it lies on its grid), so the file round-trips bit for
bit; :func:`decode_weight` gives back the weight the fake-quant model computes with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..quant import QParams, dequantize, granule_shape, quantize
from ..quant.formats import FloatFormat
from ..quant.packing import pack_int32, unpack_int32
from ..schemes import QuantScheme
from ..surgery.quantizer import granularity_for

FLOAT_STORAGE = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "fp4_e2m1": torch.float8_e4m3fn}


def _packs(scheme: QuantScheme) -> bool:
    return not isinstance(scheme.number_format(), FloatFormat) and scheme.bits < 8


def _offset(scheme: QuantScheme) -> int:
    """What turns lowbit's codes into the stored unsigned (packed) or signed (int8, zero point) convention."""
    return 2 ** (scheme.bits - 1)


def encode_weight(w_hat: Tensor, qparams: QParams, scheme: QuantScheme) -> dict[str, Tensor]:
    """The on-disk tensors of a weight ``w_hat`` that lies on ``scheme``'s grid with ``qparams``."""
    fmt, gran = scheme.number_format(), granularity_for(scheme, "weight")
    codes = quantize(w_hat.float(), qparams, fmt, gran)
    n = w_hat.shape[0]
    out = {"weight_scale": qparams.scale.float().reshape(n, -1) if qparams.scale.numel() > 1
           else qparams.scale.float().reshape(1)}
    if isinstance(fmt, FloatFormat):
        out["weight"] = codes.to(FLOAT_STORAGE[scheme.format])
        return out
    signed = codes if scheme.symmetric else codes - _offset(scheme)
    if _packs(scheme):
        out["weight_packed"] = pack_int32((signed + _offset(scheme)).to(torch.uint8), scheme.bits)
        out["weight_shape"] = torch.tensor(list(w_hat.shape), dtype=torch.int64)
    else:
        out["weight"] = signed.to(torch.int8)
    if qparams.zero_point is not None:
        out["weight_zero_point"] = (qparams.zero_point.reshape(out["weight_scale"].shape) - _offset(scheme)).to(torch.int32)
    return out


def weight_codes(tensors: dict[str, Tensor], scheme: QuantScheme, shape: tuple[int, int]) -> Tensor:
    """lowbit's codes (float32, ``[N, K]``: signed when symmetric, unsigned when not) from the on-disk tensors."""
    if isinstance(scheme.number_format(), FloatFormat):
        return tensors["weight"].float()
    if _packs(scheme):
        signed = unpack_int32(tensors["weight_packed"], scheme.bits, shape[1]).float() - _offset(scheme)
    else:
        signed = tensors["weight"].float()
    return signed if scheme.symmetric else signed + _offset(scheme)


def weight_qparams(tensors: dict[str, Tensor], scheme: QuantScheme, shape: tuple[int, int]) -> QParams:
    """The weight's qparams in lowbit's granule shape, from the on-disk scale and zero point."""
    granules = granule_shape(shape, granularity_for(scheme, "weight"))
    zero = tensors.get("weight_zero_point")
    zero = None if zero is None else (zero.float() + _offset(scheme)).reshape(granules)
    return QParams(tensors["weight_scale"].float().reshape(granules), zero)


def decode_weight(tensors: dict[str, Tensor], scheme: QuantScheme, shape: tuple[int, int],
                  dtype: torch.dtype = torch.float32) -> tuple[Tensor, QParams]:
    """The dequantized weight (what the fake-quant model computes with) and its qparams."""
    qparams = weight_qparams(tensors, scheme, shape)
    gran = granularity_for(scheme, "weight")
    return dequantize(weight_codes(tensors, scheme, shape), qparams, scheme.number_format(), gran, shape, dtype), qparams
