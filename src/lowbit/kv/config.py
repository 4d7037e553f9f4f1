"""The ``kv_cache`` section of a recipe: which packed cache to use, as typed, validated data.

Example (YAML)::

    kv_cache:
      keys: {codec: int, bits: 2, axis: channel, group: 32}     # KIVI keys: per channel over 32 tokens
      values: {codec: int, bits: 2, group: 32}                  # per token, groups of 32 channels
      window: 128                                               # recent tokens kept exact
      sink: 1                                                   # first tokens kept exact

Key codecs: ``int``, ``qjl`` (1-bit sketch, ``m`` bits per key, exact outlier channels), ``turbo`` (rotated sphere
codebook, optional 1-bit residual sketch). Value codecs: ``int`` and ``turbo``. Any non-static codec takes
``centre: G`` (and ``scale: true``): the per-channel mean (and root-mean-square) of every ``G`` tokens is stored in
float16 and removed before quantizing (:class:`~lowbit.kv.centre.CentredCodec`), for keys with a large shared
offset (Qwen2's k_proj bias). ``key_centre: bias | mean`` removes a shared offset exactly and for free instead: one
pre-RoPE vector per KV head, turned by RoPE to each position, subtracted from every stored key and its scores added
back (:mod:`lowbit.surgery.key_centre`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .centre import CentredCodec
from .codecs import IntCodec, QJLKeyCodec, TurboCodec
from .spec import CacheSpec, reseed
from .static import static_codec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Centrable(_Strict):
    """``centre: G`` stores each channel's mean over every ``G`` tokens and removes it before quantizing;
    ``scale: true`` also divides each centred channel by its root-mean-square over the group (see
    :mod:`lowbit.kv.centre`). Each costs 16 bits per channel and group (``16 / G`` bits per element)."""

    centre: int | None = Field(default=None, ge=1)
    scale: bool = False

    @model_validator(mode="after")
    def _scale_needs_centre(self):
        if self.scale and self.centre is None:
            raise ValueError("scale: true needs a centre group (centre: G tokens)")
        if self.centre is not None and getattr(self, "static", False):
            raise ValueError("a static int KV codec cannot take a centre (its fixed scales already place the range)")
        return self

    def _centred(self, codec):
        """``codec`` behind the centring this config asks for, or as it is."""
        return codec if self.centre is None else CentredCodec(codec, self.centre, self.scale)


class IntCodecConfig(_Centrable):
    """Affine integer codes: per token (``axis: token``, channels in groups of ``group``, default the whole head) or
    per channel over ``group`` tokens (``axis: channel``, KIVI keys). ``static: true`` fixes the scales per KV head
    from calibration text instead (per channel group, or per channel with ``axis: channel``): codes only."""

    codec: Literal["int"] = "int"
    bits: int = Field(default=4, ge=1, le=8)
    symmetric: bool = False
    axis: Literal["token", "channel"] = "token"
    group: int | None = Field(default=None, ge=1)
    clip_ratio: float = Field(default=1.0, gt=0, le=1)
    static: bool = False

    def channels_per_scale(self, head_dim: int) -> int:
        """Channels sharing one static scale: 1 per channel (``axis: channel``), else the channel group."""
        return 1 if self.axis == "channel" else (self.group or head_dim)

    def build(self, seed: int) -> IntCodec:
        if self.static:
            raise ValueError("a static KV codec is built from calibration ranges (see KVCacheConfig.spec)")
        return self._centred(IntCodec(self.bits, self.symmetric, self.axis, self.group, self.clip_ratio))

    def build_static(self, lo, hi):
        return static_codec(lo, hi, self.bits, self.symmetric, self.clip_ratio)


class QJLCodecConfig(_Centrable):
    """QJL key sketch: ``m`` sign bits per key plus its norm; ``outliers`` exact channels per ``group`` tokens."""

    codec: Literal["qjl"] = "qjl"
    m: int = Field(default=128, ge=8, multiple_of=8)
    outliers: int = Field(default=8, ge=0)
    group: int = Field(default=32, ge=1)

    def build(self, seed: int):
        return self._centred(QJLKeyCodec(self.m, self.outliers, self.group, seed))


class TurboCodecConfig(_Centrable):
    """Rotated sphere codebook with ``bits`` per channel plus the norm; ``residual_qjl`` adds a 1-bit residual
    sketch for unbiased scores (keys)."""

    codec: Literal["turbo"] = "turbo"
    bits: int = Field(default=3, ge=1, le=8)
    residual_qjl: bool = False

    def build(self, seed: int):
        return self._centred(TurboCodec(self.bits, self.residual_qjl, seed))


KeyCodecConfig = Annotated[IntCodecConfig | QJLCodecConfig | TurboCodecConfig, Field(discriminator="codec")]
ValueCodecConfig = Annotated[IntCodecConfig | TurboCodecConfig, Field(discriminator="codec")]


class KVCacheConfig(_Strict):
    """A packed KV cache: key and value codecs, the exact recent ``window`` and ``sink`` tokens, a codec seed."""

    keys: KeyCodecConfig
    values: ValueCodecConfig
    window: int = Field(default=128, ge=0)
    sink: int = Field(default=0, ge=0)
    seed: int = 0
    key_centre: Literal["bias", "mean"] | None = None

    @model_validator(mode="after")
    def _groups_compatible(self) -> KVCacheConfig:
        if not self.static:
            _ = self.spec().group  # raises when the key and value token groups do not divide one another
        if self.static and self.key_centre:
            raise ValueError("key_centre needs non-static codecs (static ranges are calibrated without it): drop "
                             "static: true or key_centre")
        return self

    @property
    def static(self) -> bool:
        """True when a codec takes its scales from calibration (the model must be calibrated first)."""
        return any(getattr(c, "static", False) for c in (self.keys, self.values))

    def spec(self, ranges: list[dict] | None = None) -> CacheSpec:
        """The cache layout (codecs seeded from ``seed``; layers offset it further).

        Static codecs need ``ranges``: per decoder layer ``{"keys": (lo, hi), "values": (lo, hi)}`` as recorded by
        :class:`~lowbit.kv.static.KVRangeHook`; the result then holds one spec per layer.
        """
        if not self.static:
            return CacheSpec(self.keys.build(self.seed), self.values.build(self.seed + 1), self.window, self.sink)
        if ranges is None:
            raise ValueError("this kv_cache has static scales: calibrate it first (lowbit.quantize does, with data)")
        layers = tuple(
            CacheSpec(self._codec(self.keys, r["keys"], self.seed, i), self._codec(self.values, r["values"], self.seed + 1, i),
                      self.window, self.sink)
            for i, r in enumerate(ranges)
        )
        return CacheSpec(layers[0].keys, layers[0].values, self.window, self.sink, layers=layers)

    @staticmethod
    def _codec(config, lo_hi, seed: int, layer_idx: int):
        """Layer ``layer_idx``'s codec: calibrated when static, else seeded per layer as CacheSpec.for_layer does."""
        if getattr(config, "static", False):
            return config.build_static(*lo_hi)
        return reseed(config.build(seed), layer_idx)
