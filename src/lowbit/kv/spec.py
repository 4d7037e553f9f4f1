"""What a packed KV cache stores: a key codec, a value codec, an exact recent window and exact sink tokens.

Token ``j`` of a sequence lives in one of three places when the query at position ``i`` attends:

* the **sink**: the first ``sink`` tokens, kept exact for good (attention sinks, a PrefixQuant prefix);
* the **packed** run: older tokens in whole groups of ``group`` tokens (the codecs' token grouping);
* the **recent** window: at least the last ``window`` tokens, exact.

A cache appends a token, attends, then flushes whole groups from the recent window into the packed run while at
least ``window`` tokens stay exact. So at query ``i`` the packed run holds the first :func:`packed_count` non-sink
tokens; the decode-equivalent one-pass evaluation uses the same rule, which is why the two agree exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .codecs import Packed


class KeyCodec(Protocol):
    """Encodes runs of keys and scores queries against the packed form."""

    @property
    def token_group(self) -> int: ...

    def encode(self, x: Tensor) -> Packed: ...

    def scores(self, queries: Tensor, packed: Packed, head_dim: int) -> Tensor: ...


class ValueCodec(Protocol):
    """Encodes runs of values, decodes them, and sums them under attention weights."""

    @property
    def token_group(self) -> int: ...

    def encode(self, x: Tensor) -> Packed: ...

    def decode(self, packed: Packed, head_dim: int, dtype: torch.dtype = torch.float32) -> Tensor: ...

    def weighted_sum(self, weights: Tensor, packed: Packed, head_dim: int) -> Tensor: ...


@dataclass(frozen=True, eq=False)
class CacheSpec:
    """A packed cache's layout: codecs, exact recent ``window`` and exact ``sink`` tokens."""

    keys: KeyCodec
    values: ValueCodec
    window: int = 128
    sink: int = 0
    layers: tuple[CacheSpec, ...] | None = None  # per-layer specs (static codecs calibrated layer by layer)

    def __post_init__(self) -> None:
        if self.window < 0 or self.sink < 0:
            raise ValueError(f"window and sink must be >= 0, got {self.window} and {self.sink}")

    @property
    def group(self) -> int:
        """Tokens flushed together: a whole group for both codecs (the larger of their groupings)."""
        kg, vg = self.keys.token_group, self.values.token_group
        if max(kg, vg) % min(kg, vg):
            raise ValueError(f"key and value token groups {kg} and {vg} must divide one another")
        return max(kg, vg)

    def for_layer(self, layer_idx: int) -> CacheSpec:
        """The spec of one layer: its own when calibrated per layer, else this one with seeded codecs (QJL,
        rotated codebook) offset per layer so that layers are independent."""
        if self.layers is not None:
            return self.layers[layer_idx]
        return dataclasses.replace(self, keys=reseed(self.keys, layer_idx), values=reseed(self.values, layer_idx))


def reseed(codec, layer_idx: int):
    """A seeded codec (QJL, rotated codebook) with its seed offset for one layer; other codecs as they are. A
    wrapping codec (a centred one) has its inner codec reseeded."""
    if dataclasses.is_dataclass(codec) and hasattr(codec, "inner"):
        return dataclasses.replace(codec, inner=reseed(codec.inner, layer_idx))
    if dataclasses.is_dataclass(codec) and hasattr(codec, "seed"):
        return dataclasses.replace(codec, seed=codec.seed + 7919 * layer_idx)
    return codec


def packed_count(non_sink_before, window: int, group: int):
    """Non-sink tokens in packed form when a query arrives after ``non_sink_before`` earlier non-sink tokens.

    Works on an int or elementwise on an integer tensor (one count per query).
    """
    if isinstance(non_sink_before, torch.Tensor):
        return torch.div(non_sink_before - window, group, rounding_mode="floor").clamp_min(0) * group
    return max(0, (non_sink_before - window) // group) * group
