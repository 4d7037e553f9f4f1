"""The ``kv_cache`` section of a recipe: which packed cache to use, as typed, validated data.

Example (YAML)::

    kv_cache:
      keys: {codec: int, bits: 2, axis: channel, group: 32}     # KIVI keys: per channel over 32 tokens
      values: {codec: int, bits: 2, group: 32}                  # per token, groups of 32 channels
      window: 128                                               # recent tokens kept exact
      sink: 1                                                   # first tokens kept exact

Key codecs: ``int``, ``qjl`` (1-bit sketch, ``m`` bits per key, exact outlier channels), ``turbo`` (rotated sphere
codebook, optional 1-bit residual sketch). Value codecs: ``int`` and ``turbo``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .codecs import IntCodec, QJLKeyCodec, TurboCodec
from .spec import CacheSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IntCodecConfig(_Strict):
    """Affine integer codes: per token (``axis: token``, channels in groups of ``group``, default the whole head) or
    per channel over ``group`` tokens (``axis: channel``, KIVI keys)."""

    codec: Literal["int"] = "int"
    bits: int = Field(default=4, ge=1, le=8)
    symmetric: bool = False
    axis: Literal["token", "channel"] = "token"
    group: int | None = Field(default=None, ge=1)
    clip_ratio: float = Field(default=1.0, gt=0, le=1)

    def build(self, seed: int) -> IntCodec:
        return IntCodec(self.bits, self.symmetric, self.axis, self.group, self.clip_ratio)


class QJLCodecConfig(_Strict):
    """QJL key sketch: ``m`` sign bits per key plus its norm; ``outliers`` exact channels per ``group`` tokens."""

    codec: Literal["qjl"] = "qjl"
    m: int = Field(default=128, ge=8, multiple_of=8)
    outliers: int = Field(default=8, ge=0)
    group: int = Field(default=32, ge=1)

    def build(self, seed: int) -> QJLKeyCodec:
        return QJLKeyCodec(self.m, self.outliers, self.group, seed)


class TurboCodecConfig(_Strict):
    """Rotated sphere codebook with ``bits`` per channel plus the norm; ``residual_qjl`` adds a 1-bit residual
    sketch for unbiased scores (keys)."""

    codec: Literal["turbo"] = "turbo"
    bits: int = Field(default=3, ge=1, le=8)
    residual_qjl: bool = False

    def build(self, seed: int) -> TurboCodec:
        return TurboCodec(self.bits, self.residual_qjl, seed)


KeyCodecConfig = Annotated[Union[IntCodecConfig, QJLCodecConfig, TurboCodecConfig], Field(discriminator="codec")]
ValueCodecConfig = Annotated[Union[IntCodecConfig, TurboCodecConfig], Field(discriminator="codec")]


class KVCacheConfig(_Strict):
    """A packed KV cache: key and value codecs, the exact recent ``window`` and ``sink`` tokens, a codec seed."""

    keys: KeyCodecConfig
    values: ValueCodecConfig
    window: int = Field(default=128, ge=0)
    sink: int = Field(default=0, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _groups_compatible(self) -> KVCacheConfig:
        _ = self.spec().group  # raises when the key and value token groups do not divide one another
        return self

    def spec(self) -> CacheSpec:
        """The cache layout (codecs seeded from ``seed``; layers offset it further)."""
        return CacheSpec(self.keys.build(self.seed), self.values.build(self.seed + 1), self.window, self.sink)
