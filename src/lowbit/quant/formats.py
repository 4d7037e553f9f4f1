"""Number formats a tensor can be quantized to: integer grids and small floating-point grids.

An :class:`IntFormat` is a uniform grid of integer codes ``[qmin, qmax]`` used with a scale (and, when
asymmetric, a zero point). A :class:`FloatFormat` is a sign/exponent/mantissa grid used with a scale only.
Both are frozen value objects: they describe a grid and hold no tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, TypeAlias

_MIN_INT_BITS: Final = 2
_MIN_ASYM_INT_BITS: Final = 1  # a 1-bit asymmetric grid {0, 1} is well defined (1-bit KV codes); no format name
_MAX_INT_BITS: Final = 8
_MAX_EXP_BITS: Final = 6  # keeps the smallest subnormal spacing (2^(2 - 2^(e-1) - m)) a normal float32
_MAX_MAN_BITS: Final = 10
_MAX_FLOAT32_BINADE: Final = 2.0**127


@dataclass(frozen=True)
class IntFormat:
    """A ``bits``-bit integer grid.

    Symmetric formats use the *restricted* range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (e.g. [-7, 7] for int4) so
    that the grid is mirror-symmetric and ``q(-x) == -q(x)`` holds exactly; the unused code -2^(b-1) is given
    up for that. Asymmetric formats use the full unsigned range ``[0, 2^b - 1]`` with a zero point; they also exist
    with 1 bit (codes {0, 1}, for 1-bit KV caches), where a symmetric grid would be the single code 0.

    ``full_range`` (symmetric only): the *full* signed range ``[-2^(b-1), 2^(b-1) - 1]`` (e.g. [-8, 7] for int4),
    used with a *signed* scale that maps each granule's value of largest magnitude onto ``-2^(b-1)``: llama.cpp's
    Q4_0 (``d = v_max / -8``), so the extra level always lies on the side of the granule's extreme value.
    """

    bits: int
    symmetric: bool
    full_range: bool = False

    def __post_init__(self) -> None:
        """Reject bit widths outside 2..8 (1..8 asymmetric), naming the bad value: the grid would be degenerate."""
        valid = isinstance(self.bits, int) and not isinstance(self.bits, bool)
        lowest = _MIN_INT_BITS if self.symmetric else _MIN_ASYM_INT_BITS
        if not valid or not lowest <= self.bits <= _MAX_INT_BITS:
            raise ValueError(
                f"IntFormat bits must be an integer in {_MIN_INT_BITS}..{_MAX_INT_BITS} "
                f"(or {_MIN_ASYM_INT_BITS} when asymmetric), got {self.bits!r}"
            )
        if self.full_range and not self.symmetric:
            raise ValueError("IntFormat full_range applies to symmetric formats (asymmetric ones use every code)")

    @property
    def qmin(self) -> float:
        """Smallest code: ``-(2^(b-1) - 1)`` when symmetric (``-2^(b-1)`` with ``full_range``), else 0."""
        if self.full_range:
            return float(-(2 ** (self.bits - 1)))
        return float(-(2 ** (self.bits - 1) - 1)) if self.symmetric else 0.0

    @property
    def qmax(self) -> float:
        """Largest code: ``2^(b-1) - 1`` when symmetric, else ``2^b - 1``."""
        return float(2 ** (self.bits - 1) - 1) if self.symmetric else float(2**self.bits - 1)


@dataclass(frozen=True)
class FloatFormat:
    """A ``1 + exp_bits + man_bits``-bit floating-point grid (IEEE-like, with subnormals), always symmetric.

    ``max_value`` is the largest finite magnitude; values beyond it saturate (the formats here are used without
    inf). The exponent bias is ``2^(exp_bits-1) - 1`` as in IEEE 754 and the OCP MX/FP8 specifications.
    """

    name: str
    exp_bits: int
    man_bits: int
    max_value: float

    def __post_init__(self) -> None:
        """Reject layouts the float32 emulation in :mod:`lowbit.quant.fp` cannot represent exactly."""
        if not (1 <= self.exp_bits <= _MAX_EXP_BITS and 0 <= self.man_bits <= _MAX_MAN_BITS):
            raise ValueError(
                f"FloatFormat {self.name!r} needs exp_bits in 1..{_MAX_EXP_BITS} and man_bits in 0..{_MAX_MAN_BITS}, "
                f"got exp_bits={self.exp_bits}, man_bits={self.man_bits}"
            )
        if not (0 < self.max_value < _MAX_FLOAT32_BINADE and self._max_on_grid()):
            raise ValueError(f"FloatFormat {self.name!r} needs a max_value > 0 on its own grid, got {self.max_value}")

    def _max_on_grid(self) -> bool:
        """Whether ``max_value`` is a multiple of its binade's spacing ``2^(top_exp - man_bits)``."""
        return (self.max_value / 2.0 ** (self.top_exp - self.man_bits)).is_integer()

    @property
    def bits(self) -> int:
        """Total storage width: sign + exponent + mantissa."""
        return 1 + self.exp_bits + self.man_bits

    @property
    def symmetric(self) -> bool:
        """Always True: float formats use a scale only, never a zero point."""
        return True

    @property
    def bias(self) -> int:
        """Exponent bias ``2^(exp_bits-1) - 1``."""
        return (1 << (self.exp_bits - 1)) - 1

    @property
    def top_exp(self) -> int:
        """Unbiased exponent of ``max_value``'s binade, ``floor(log2 max_value)``."""
        return math.frexp(self.max_value)[1] - 1

    @property
    def rounding_limit(self) -> float:
        """``max_value`` plus half the top binade's spacing: magnitudes beyond it are saturated, not rounded.

        The float analogue of ``qmax + 0.5`` for integer codes; straight-through gradients stop beyond it.
        """
        return self.max_value + 2.0 ** (self.top_exp - self.man_bits) / 2

    @property
    def min_normal_exp(self) -> int:
        """Unbiased exponent of the smallest normal number, ``1 - bias``; subnormals share its spacing."""
        return 1 - self.bias


FP8_E4M3: Final = FloatFormat("fp8_e4m3", exp_bits=4, man_bits=3, max_value=448.0)
"""OCP FP8 E4M3 as ``torch.float8_e4m3fn``: no inf, largest finite 448."""

FP8_E5M2: Final = FloatFormat("fp8_e5m2", exp_bits=5, man_bits=2, max_value=57344.0)
"""OCP FP8 E5M2 as ``torch.float8_e5m2``: largest finite 57344 (saturated, inf unused)."""

FP4_E2M1: Final = FloatFormat("fp4_e2m1", exp_bits=2, man_bits=1, max_value=6.0)
"""OCP MX FP4 E2M1: magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}."""

Format: TypeAlias = IntFormat | FloatFormat

_FLOAT_FORMATS: Final = {f.name: f for f in (FP8_E4M3, FP8_E5M2, FP4_E2M1)}
_INT_NAMES: Final = tuple(f"int{b}" for b in range(_MIN_INT_BITS, _MAX_INT_BITS + 1))
FORMAT_NAMES: Final = (*_INT_NAMES, *_FLOAT_FORMATS)


def parse_format(name: str, symmetric: bool = True, full_range: bool = False) -> Format:
    """Turn a format name ("int2".."int8", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1") into a format object.

    ``symmetric`` and ``full_range`` (see :class:`IntFormat`) apply to integer formats only; float formats are
    always symmetric.
    """
    key = name.strip().lower()
    if key in _FLOAT_FORMATS:
        return _FLOAT_FORMATS[key]
    if key in _INT_NAMES:
        return IntFormat(bits=int(key[3:]), symmetric=symmetric, full_range=full_range)
    raise ValueError(f"unknown quantization format {name!r}; valid names: {', '.join(FORMAT_NAMES)}")
