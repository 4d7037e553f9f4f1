"""Emulated rounding onto small floating-point grids (FP8 E4M3/E5M2, FP4 E2M1, any IEEE-like layout).

The grid of a format with ``m`` mantissa bits has, in the binade ``[2^e, 2^(e+1))``, spacing ``2^(e - m)``;
below the smallest normal ``2^e_min`` (subnormals) the spacing stays ``2^(e_min - m)``. Rounding to the grid is
therefore ``round(|x| / 2^(E - m)) * 2^(E - m)`` with ``E = max(floor(log2 |x|), e_min)``, done with round to
nearest, ties to even (``torch.round``), after saturating to ``±max_value``. Every step is exact in float32:
the scaling is by powers of two and the rounded integers have at most ``m + 1`` bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.quant.formats import FloatFormat

_F32_EXP_BIAS = 127
_F32_MAN_BITS = 23


# Formats torch stores natively, keyed by (exp_bits, man_bits, max_value): the cast rounds to nearest-even too.
_NATIVE_DTYPES: dict[tuple[int, int, float], torch.dtype] = {
    (4, 3, 448.0): torch.float8_e4m3fn,
    (5, 2, 57344.0): torch.float8_e5m2,
}


def _pow2(exponent: Tensor) -> Tensor:
    """Exact ``2.0 ** exponent`` in float32 for integer exponents in [-126, 127], built from the IEEE bit pattern.

    Done by bit construction rather than ``torch.exp2`` because vectorised exp2 is not guaranteed to be exact.
    """
    biased = (exponent.to(torch.int32) + _F32_EXP_BIAS) << _F32_MAN_BITS
    return biased.view(torch.float32)


def round_to_float_format(x: Tensor, fmt: FloatFormat) -> Tensor:
    """Round ``x`` to the nearest value of ``fmt`` (ties to even, subnormals kept, saturating at ``±max_value``).

    Computed in float32 and returned in ``x.dtype``. For FP8 this equals, bit for bit,
    ``x.clamp(-max, max).to(torch.float8_e4m3fn or torch.float8_e5m2).to(torch.float32)``. NaN stays NaN; the
    sign of zero is kept. Not differentiable in a useful way: use it under a straight-through estimator.
    """
    native = _NATIVE_DTYPES.get((fmt.exp_bits, fmt.man_bits, fmt.max_value))
    if native is not None:  # same values (tested against the emulation), one cast instead of six tensor ops
        return x.to(torch.float32).clamp(-fmt.max_value, fmt.max_value).to(native).to(x.dtype)
    return emulate_float_format(x, fmt)


def emulate_float_format(x: Tensor, fmt: FloatFormat) -> Tensor:
    """The arithmetic behind :func:`round_to_float_format`, for any layout (used directly for FP4 and custom ones)."""
    x32 = x.to(torch.float32)
    mag = x32.abs().clamp(max=fmt.max_value)
    _, frexp_exp = torch.frexp(mag)  # mag = mantissa * 2^frexp_exp with mantissa in [0.5, 1)
    binade = (frexp_exp - 1).clamp(min=fmt.min_normal_exp)  # floor(log2 |x|), floored at the subnormal binade
    step_exp = binade - fmt.man_bits
    rounded = torch.round(mag * _pow2(-step_exp)) * _pow2(step_exp)
    return torch.copysign(rounded, x32).to(x.dtype)
