"""Typed number-format schemes: what a weight, activation or KV tensor is quantized to, and how its scales are chosen.

The recipe (:mod:`lowbit.recipe`) holds one :class:`QuantScheme` per kind of tensor; the quantized modules in
:mod:`lowbit.surgery` read them. Both import this module, so neither imports the other.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .quant import parse_format

LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "e8m0": torch.float8_e8m0fnu,
                "float8_e4m3": torch.float8_e4m3fn}
SCALE_BITS = {"float16": 16, "bfloat16": 16, "e8m0": 8, "float8_e4m3": 8}
TARGETABLE = (*LINEAR_ROLES, "lm_head")


class StrictConfig(BaseModel):
    """Base of every typed config: unknown fields are errors, numbers are finite (NaN passes no bound check, so it
    would otherwise be misreported), and instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class QuantScheme(StrictConfig):
    """One number format and how its scales are chosen.

    ``granularity`` names which elements share a scale: ``tensor``; ``channel`` (weights: per output channel;
    activations: per input channel, static only); ``group`` (``group_size`` consecutive elements of the last
    dimension); ``token`` (activations and KV: per token, and per head for KV); ``head`` (KV only: per head, static
    over tokens when ``dynamic`` is false, else per token and head).

    ``int_range`` (symmetric integer formats): ``restricted`` (the default) is the mirror-symmetric grid
    ``[-(2^(b-1) - 1), 2^(b-1) - 1]``; ``full`` is ``[-2^(b-1), 2^(b-1) - 1]`` with a signed scale mapping each
    granule's largest-magnitude value onto ``-2^(b-1)``, llama.cpp's Q4_0 grid (see
    :class:`~lowbit.quant.IntFormat`). ``scale_dtype``: the float type the scales are stored in (``float16`` for
    GGUF blocks); scales are rounded up to it before the codes are chosen, so the fake-quantized weight is exactly
    what a file holding float16 scales dequantizes to. ``None`` keeps float32 scales. ``e8m0``: powers of two (the
    OCP MX formats' shared block scale: MXFP4 is ``fp4_e2m1`` in groups of 32 with ``e8m0``); ``float8_e4m3``: FP8
    E4M3 scales under one float32 scale per tensor (NVFP4: ``fp4_e2m1`` in groups of 16). Both for symmetric
    formats only.

    ``key_centre`` (KV only, dynamic): round keys around a per-head pre-RoPE centre turned by RoPE to each position
    (:mod:`lowbit.surgery.key_centre`): ``bias`` the k_proj bias, ``mean`` the mean key over calibration text.
    """

    format: str = "int8"
    symmetric: bool = True
    granularity: Literal["tensor", "channel", "group", "token", "head"] = "channel"
    group_size: int | None = None
    dynamic: bool = True
    observer: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = Field(default=99.9, gt=0, le=100)
    clip_ratio: float = Field(default=1.0, gt=0, le=1)
    int_range: Literal["restricted", "full"] = "restricted"
    scale_dtype: Literal["float16", "bfloat16", "e8m0", "float8_e4m3"] | None = None
    key_centre: Literal["bias", "mean"] | None = None

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        try:
            parse_format(value)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _group_size_matches(self) -> QuantScheme:
        if self.granularity == "group" and (self.group_size is None or self.group_size < 1):
            raise ValueError("granularity 'group' needs a positive group_size (e.g. group_size: 64)")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError(f"group_size is only used with granularity 'group', not '{self.granularity}'")
        if self.scale_dtype in ("e8m0", "float8_e4m3") and not self.symmetric:
            raise ValueError(f"scale_dtype '{self.scale_dtype}' is for symmetric formats (MX / NVFP4 blocks have no "
                             "zero point): set symmetric: true or another scale_dtype")
        if self.int_range == "full" and (not self.symmetric or not self.format.startswith("int")):
            raise ValueError("int_range 'full' is for symmetric integer formats: set symmetric: true and an int format")
        return self

    @property
    def bits(self) -> int:
        return self.number_format().bits

    @property
    def scale_torch_dtype(self) -> torch.dtype | None:
        """``scale_dtype`` as a torch dtype (None: float32 scales, not rounded)."""
        return None if self.scale_dtype is None else SCALE_DTYPES[self.scale_dtype]

    def number_format(self):
        """The quantizer-core format object of this scheme."""
        return parse_format(self.format, self.symmetric, full_range=self.int_range == "full")

    def describe(self) -> str:
        """Short human form, e.g. ``int4 sym g64`` or ``int8 sym token dyn``."""
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        sym = "" if self.format.startswith("fp") else (" sym" if self.symmetric else " asym")
        sym += "-full" if self.int_range == "full" else ""
        clip = f" clip{self.clip_ratio:g}" if self.clip_ratio < 1 else ""
        mode = " dyn" if self.dynamic else " static"
        scale = f" scale-{self.scale_dtype}" if self.scale_dtype else ""
        centre = f" centre-{self.key_centre}" if self.key_centre else ""
        return f"{self.format}{sym} {gran}{mode}{clip}{scale}{centre}"


class CalibrationConfig(StrictConfig):
    """How much calibration text static scales (and later methods) see."""

    samples: int = Field(default=16, ge=1)
    seq_len: int = Field(default=512, ge=2)
