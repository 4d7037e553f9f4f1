"""Centring for KV codecs: remove what a run of tokens shares before quantizing what tells them apart.

Some models' keys carry a large offset common to every token: Qwen2's k_proj bias adds the same vector to every
pre-RoPE key, so in some layers the mean key is 30-110 times larger than the per-token variation. A codec that
spends its bits on the whole vector (the rotated codebook's norm and direction, QJL's sketch whose error scales with
``||k||``) then quantizes mostly the offset and loses the differences that attention reads.

:class:`CentredCodec` wraps any codec: per KV head and per run of ``group`` tokens it stores the per-channel mean
``c`` (float16, ``16 / group`` bits per element) and hands ``x - c`` to the inner codec. Scores stay exact in the
centre: ``<q, k> = <q, k - c> + <q, c>``, the second term computed once per query and group; values decode as
``(x - c) + c`` and sum as ``w @ (v - c) + (sum of w over the group) c``. The mean moves with the data, so it also
follows offsets that RoPE turns slowly with position, which one calibrated centre could not.

With ``scale`` the centred channels are also divided by their root-mean-square over the group (one more float16
per channel and group) before the inner codec sees them, and multiplied back on decoding: KIVI's per-channel
ranges, in front of any codec. Centring alone is not enough where queries are large in the channels that keys barely
vary in (Qwen2's first layer: q and k both carry biases): a rotated codebook or a sketch spreads its error evenly
over the channels, and the large query channels multiply it; scaled, each channel's error follows its own spread.
Scores are then ``q @ decode(k)``, or, for a codec that cannot decode (QJL's sketch), the inner scores of the query
rescaled group by group, ``<q * s, (k - c) / s>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .codecs import META_DTYPE, Packed

CENTRE = "centre_mean"  # the packed field holding the group means [B, H, T / group, d]
SCALE = "centre_rms"  # with ``scale``: the centred channels' root-mean-square per group [B, H, T / group, d]


@dataclass(frozen=True)
class CentredCodec:
    """``inner`` applied to ``x`` minus its per-channel mean over each run of ``group`` tokens (see module doc)."""

    inner: object
    group: int
    scale: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"a centre group must be a positive number of tokens, got {self.group!r}")
        g = self.inner.token_group
        if max(g, self.group) % min(g, self.group):
            raise ValueError(f"the centre group ({self.group}) and the codec's token group ({g}) must divide one "
                             "another")
        if self.scale and not hasattr(self.inner, "decode") and self.group % g:
            raise ValueError(f"a scaled centre group ({self.group}) must be a multiple of the codec's token group "
                             f"({g})")

    @property
    def token_group(self) -> int:
        return max(self.group, self.inner.token_group)

    def _grouped(self, x: Tensor) -> Tensor:
        b, h, t, d = x.shape
        if t % self.group:
            raise ValueError(f"{t} tokens are not a whole number of {self.group}-token centre groups")
        return x.float().reshape(b, h, t // self.group, self.group, d)

    def _spread(self, meta: Tensor) -> Tensor:
        """Per-group metadata ``[B, H, G, d]`` as float32 ``[B, H, G, 1, d]``, broadcasting over a group's tokens."""
        return meta.float().unsqueeze(3)

    def _split(self, packed: Packed) -> tuple[Packed, Tensor, Tensor | None]:
        fields = dict(packed.fields)
        centre, scale = fields.pop(CENTRE), fields.pop(SCALE) if self.scale else None
        return Packed(fields, packed.tokens), centre, scale

    def encode(self, x: Tensor) -> Packed:
        """Pack ``x`` ``[B, H, T, d]``: the inner codec's fields for ``(x - c) / s`` plus ``c`` (and ``s``).

        ``c`` and ``s`` are rounded to the float16 they are stored in before use, so decoding inverts exactly what
        the inner codec saw."""
        grouped = self._grouped(x)
        centre = grouped.mean(3).to(META_DTYPE)
        centred = grouped - self._spread(centre)
        meta = {CENTRE: centre}
        if self.scale:
            scale = centred.pow(2).mean(3).sqrt().to(META_DTYPE).clamp_min(torch.finfo(META_DTYPE).tiny)
            centred = centred / self._spread(scale)
            meta[SCALE] = scale
        inner = self.inner.encode(centred.reshape(x.shape))
        return Packed({**inner.fields, **meta}, inner.tokens)

    def decode(self, packed: Packed, head_dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dequantized ``[B, H, T, head_dim]``: the inner codec's output times ``s``, plus ``c``."""
        inner, centre, scale = self._split(packed)
        x = self._grouped(self.inner.decode(inner, head_dim))
        if scale is not None:
            x = x * self._spread(scale)
        return (x + self._spread(centre)).reshape(*x.shape[:2], -1, head_dim).to(dtype)

    def scores(self, queries: Tensor, packed: Packed, head_dim: int) -> Tensor:
        """``<q, k>`` for queries ``[B, H, Tq, d]``: ``[B, H, Tq, T]``. Centred only: the inner codec's
        ``<q, k - c>`` plus the exact ``<q, c>`` of each key's group; scaled: against the decoded keys."""
        if self.scale and hasattr(self.inner, "decode"):
            return queries.float() @ self.decode(packed, head_dim).transpose(-1, -2)
        inner, centre, scale = self._split(packed)
        q = queries.float()
        if scale is None:
            inner_scores = self.inner.scores(q, inner, head_dim)
        else:  # one group at a time, the query rescaled by the group's channel scales
            inner_scores = torch.cat([self.inner.scores(q * scale[:, :, g:g + 1].float(), chunk, head_dim)
                                      for g, chunk in enumerate(inner.chunks(self.group))], dim=-1)
        shared = q @ centre.float().transpose(-1, -2)  # [B, H, Tq, T / group]
        return inner_scores + shared.repeat_interleave(self.group, dim=-1)

    def weighted_sum(self, weights: Tensor, packed: Packed, head_dim: int) -> Tensor:
        """``weights [B, H, Tq, T] @ values``. Centred only: the inner sum of ``v - c`` plus each group's weight
        times ``c``; scaled: against the decoded values."""
        if self.scale:
            return weights @ self.decode(packed, head_dim)
        inner, centre, _ = self._split(packed)
        b, h, tq, t = weights.shape
        per_group = weights.reshape(b, h, tq, t // self.group, self.group).sum(-1)
        return self.inner.weighted_sum(weights, inner, head_dim) + per_group @ centre.float()
