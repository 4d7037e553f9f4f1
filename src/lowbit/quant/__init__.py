"""Pure-tensor quantizer core: number formats, granularities, quantization parameters and fake quantization.

Three layers, each depending only on the ones before it (and on torch):

1. **What to quantize to, and in which blocks.**
   :mod:`~lowbit.quant.formats` holds the integer (``IntFormat``, int2..int8, symmetric or asymmetric, plus a 1-bit
   asymmetric grid) and floating-point (``FloatFormat``: ``FP8_E4M3``, ``FP8_E5M2``, ``FP4_E2M1``) grids and
   ``parse_format``;
   :mod:`~lowbit.quant.fp` rounds to a float grid exactly like torch's float8 casts;
   :mod:`~lowbit.quant.granularity` says which elements share a scale (``PerTensor``, ``PerRow``,
   ``PerGroup``, ``PerAxis``) and maps a tensor to/from its grouped view, with per-granule min/max.
2. **Quantization parameters.** :mod:`~lowbit.quant.qparams` turns a range into a ``QParams``
   (scale, and an integer zero point or, with ``offset="float"``, a float minimum) with ``compute_qparams``
   (optionally rounding them to their storage dtype) and applies
   ``quantize`` / ``dequantize`` (``quantize_groups`` / ``dequantize_groups`` on a caller's own grouped view);
   :mod:`~lowbit.quant.observers` picks the range from data (``minmax``, ``percentile``, ``mse`` clip search).
3. **Fake quantization.** ``fake_quantize`` (in :mod:`~lowbit.quant.fake`) is ``dequantize(quantize(x))`` as one
   differentiable op with straight-through rounding and the LSQ scale gradient, in dynamic (observe ``x``) or
   static (given ``QParams``) mode, for every format and granularity.

Beside them, :mod:`~lowbit.quant.packing` stores integer codes densely (``pack_bits``: b bits per code in uint8;
``pack_int32``: compressed-tensors' int32 words), for packed KV caches and packed weights alike.
"""

from lowbit.quant.fake import fake_quantize
from lowbit.quant.formats import (
    FORMAT_NAMES,
    FP4_E2M1,
    FP8_E4M3,
    FP8_E5M2,
    FloatFormat,
    Format,
    IntFormat,
    parse_format,
)
from lowbit.quant.fp import round_to_float_format
from lowbit.quant.granularity import (
    Granularity,
    PerAxis,
    PerGroup,
    PerRow,
    PerTensor,
    expand_to_elements,
    from_groups,
    granule_shape,
    reduce_granules,
    reduce_minmax,
    to_groups,
)
from lowbit.quant.observers import (
    OBSERVERS,
    minmax_range,
    mse_range,
    observe_range,
    percentile_range,
)
from lowbit.quant.packing import (
    pack_bits,
    pack_int32,
    packed_size,
    unpack_bits,
    unpack_int32,
)
from lowbit.quant.qparams import (
    OFFSETS,
    Offset,
    QParams,
    RelativeScale,
    ScaleDtype,
    bind_scale_unit,
    compute_qparams,
    dequantize,
    dequantize_groups,
    fake_quantize_groups,
    quantize,
    quantize_groups,
    round_minimum,
    round_scale,
    round_ste,
    snap_scale,
    split_relative_scale,
    stored_unit,
)

__all__ = [
    "FORMAT_NAMES",
    "FP4_E2M1",
    "FP8_E4M3",
    "FP8_E5M2",
    "OBSERVERS",
    "OFFSETS",
    "FloatFormat",
    "Format",
    "Granularity",
    "IntFormat",
    "Offset",
    "PerAxis",
    "PerGroup",
    "PerRow",
    "PerTensor",
    "QParams",
    "RelativeScale",
    "ScaleDtype",
    "bind_scale_unit",
    "split_relative_scale",
    "stored_unit",
    "compute_qparams",
    "dequantize",
    "dequantize_groups",
    "expand_to_elements",
    "fake_quantize",
    "fake_quantize_groups",
    "from_groups",
    "granule_shape",
    "minmax_range",
    "mse_range",
    "observe_range",
    "pack_bits",
    "pack_int32",
    "packed_size",
    "parse_format",
    "percentile_range",
    "quantize",
    "quantize_groups",
    "reduce_granules",
    "reduce_minmax",
    "round_minimum",
    "round_scale",
    "snap_scale",
    "round_ste",
    "round_to_float_format",
    "to_groups",
    "unpack_bits",
    "unpack_int32",
]
