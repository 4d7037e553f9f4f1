"""Typed number-format schemes: what a weight, activation or KV tensor is quantized to, and how its scales are chosen.

The recipe (:mod:`lowbit.recipe`) holds one :class:`QuantScheme` per kind of tensor; the quantized modules in
:mod:`lowbit.surgery` read them. Both import this module, so neither imports the other.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .quant import parse_format

LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
TARGETABLE = (*LINEAR_ROLES, "lm_head")


class StrictConfig(BaseModel):
    """Base of every typed config: unknown fields are errors and instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantScheme(StrictConfig):
    """One number format and how its scales are chosen.

    ``granularity`` names which elements share a scale: ``tensor``; ``channel`` (weights: per output channel;
    activations: per input channel, static only); ``group`` (``group_size`` consecutive elements of the last
    dimension); ``token`` (activations and KV: per token, and per head for KV); ``head`` (KV only: per head, static
    over tokens when ``dynamic`` is false, else per token and head).
    """

    format: str = "int8"
    symmetric: bool = True
    granularity: Literal["tensor", "channel", "group", "token", "head"] = "channel"
    group_size: int | None = None
    dynamic: bool = True
    observer: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = Field(default=99.9, gt=0, le=100)
    clip_ratio: float = Field(default=1.0, gt=0, le=1)

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
        return self

    @property
    def bits(self) -> int:
        return parse_format(self.format, self.symmetric).bits

    def number_format(self):
        """The quantizer-core format object of this scheme."""
        return parse_format(self.format, self.symmetric)

    def describe(self) -> str:
        """Short human form, e.g. ``int4 sym g64`` or ``int8 sym token dyn``."""
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        sym = "" if self.format.startswith("fp") else (" sym" if self.symmetric else " asym")
        clip = f" clip{self.clip_ratio:g}" if self.clip_ratio < 1 else ""
        mode = " dyn" if self.dynamic else " static"
        return f"{self.format}{sym} {gran}{mode}{clip}"


class CalibrationConfig(StrictConfig):
    """How much calibration text static scales (and later methods) see."""

    samples: int = Field(default=16, ge=1)
    seq_len: int = Field(default=512, ge=2)
