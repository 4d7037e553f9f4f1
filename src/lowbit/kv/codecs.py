"""KV codecs: pure functions from key/value tensors ``[batch, kv_heads, tokens, head_dim]`` to packed storage.

A codec turns a run of tokens into a :class:`Packed` (bit-packed uint8 codes plus float16 metadata, every field
shaped ``[batch, kv_heads, n, ...]`` with ``n`` the tokens or token groups, so runs concatenate along dim 2) and
back. Key codecs also score queries against the packed form (:meth:`KeyCodec.scores`), so attention never needs a
dequantized copy of the whole cache. Bits are counted from the tensors actually held (:attr:`Packed.nbytes`).

* :class:`IntCodec`: affine integer codes, 1–8 bits, per token (groups of channels, the usual per-head cache) or
  per channel over groups of tokens (KIVI's keys), computed by the quantizer core (:mod:`lowbit.quant`); float16
  scale and minimum (asymmetric) or scale (symmetric).
* :class:`QJLKeyCodec`: QJL's 1-bit sketch of keys with exact outlier channels per token group (keys only).
* :class:`TurboCodec`: random Hadamard rotation, then the optimal scalar codebook for a sphere coordinate on every
  channel, plus the norm; optionally a 1-bit QJL sketch of the residual for unbiased scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor

from ..quant import (
    OFFSETS,
    IntFormat,
    Offset,
    PerRow,
    compute_qparams,
    dequantize_groups,
    minmax_range,
    quantize_groups,
)
from ..quant.packing import pack_bits, unpack_bits
from ..rotations import random_hadamard
from .codebook import sphere_codebook
from .qjl import KeySketch, estimate_scores, qjl_projection, sign_matrix, sketch_keys

META_DTYPE = torch.float16  # scales, minima and norms are stored in half precision


@dataclass(frozen=True, eq=False)
class Packed:
    """Packed tokens: named tensors ``[batch, kv_heads, n, ...]`` (``n`` = tokens or token groups) and the count."""

    fields: dict[str, Tensor]
    tokens: int

    @property
    def nbytes(self) -> int:
        """Bytes held by every field."""
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    def split(self, tokens: int) -> tuple[Packed, Packed]:
        """The first ``tokens`` tokens and the rest (``tokens`` a whole number of the codec's token groups).

        Per-token fields are cut at ``tokens``; per-group fields at the matching number of groups.
        """
        head, tail = {}, {}
        for name, field in self.fields.items():
            cut = tokens if field.shape[2] == self.tokens else tokens * field.shape[2] // self.tokens
            head[name], tail[name] = field[:, :, :cut], field[:, :, cut:]
        return Packed(head, tokens), Packed(tail, self.tokens - tokens)

    def chunks(self, size: int) -> list[Packed]:
        """Consecutive runs of ``size`` tokens (the last may be shorter); ``size`` a multiple of the token group."""
        out, rest = [], self
        while rest.tokens > size:
            head, rest = rest.split(size)
            out.append(head)
        return [*out, rest]

    def select(self, index: Tensor) -> Packed:
        """Keep batch rows ``index`` (beam search reorders the cache this way)."""
        return Packed({k: v[index] for k, v in self.fields.items()}, self.tokens)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"KV bit width must be an integer from 1 to 8, got {bits!r}")


@dataclass(frozen=True)
class IntCodec:
    """Affine ``bits``-bit integer codes from the quantizer core, with float16 metadata.

    ``axis="token"``: each token's ``head_dim`` channels in groups of ``group`` (default: the whole head) share a
    scale (and zero point). ``axis="channel"``: each channel shares a scale (and zero point) over ``group``
    consecutive tokens (KIVI's key quantization; runs must then be whole groups). Scales, offsets and codes are
    :func:`~lowbit.quant.compute_qparams` and :func:`~lowbit.quant.quantize_groups` of the min/max range with
    :class:`~lowbit.quant.IntFormat` ``(bits, symmetric)`` and the core's ``offset`` convention (asymmetric codes
    only): ``"float"`` (default) keeps each exact range, ``clip_ratio`` shrinking it about its centre, with a float
    minimum (``x = code * scale + min``), so a range that does not contain 0 (KIVI's per-channel keys) keeps all its
    levels; ``"int"`` is the recipe quantizers' grid (range widened to include 0, integer zero point, clip about 0).
    Symmetric codes lie in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``. Metadata is rounded to float16, the dtype it is
    stored in (scale up, minimum to nearest), before the codes are computed, so decoding reproduces
    ``fake_quantize(x, fmt, gran, scale_dtype=torch.float16, offset=offset)`` bit for bit. Codes are stored as
    ``code - qmin`` in ``[0, 2^bits)``.
    """

    bits: int
    symmetric: bool = False
    axis: Literal["token", "channel"] = "token"
    group: int | None = None
    clip_ratio: float = 1.0
    offset: Offset = "float"

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.offset not in OFFSETS:
            raise ValueError(f"offset must be one of {OFFSETS}, got {self.offset!r}")
        if self.symmetric and self.bits == 1:
            raise ValueError("a symmetric integer KV codec needs at least 2 bits")
        if self.axis not in ("token", "channel"):
            raise ValueError(f"axis must be 'token' or 'channel', got {self.axis!r}")
        if self.group is not None and self.group < 1:
            raise ValueError(f"group must be >= 1, got {self.group}")
        if not 0 < self.clip_ratio <= 1:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")

    @property
    def format(self) -> IntFormat:
        """The core integer grid these codes live on."""
        return IntFormat(self.bits, self.symmetric)

    @property
    def token_group(self) -> int:
        """Tokens encoded together (a run's length must be a multiple of this)."""
        return (self.group or 1) if self.axis == "channel" else 1

    def _grouped(self, x: Tensor) -> Tensor:
        """View ``[B, H, T, d]`` as ``[B, H, n, granules, members]``: the elements sharing a scale on the last dim.

        ``axis="token"``: ``[B, H, T, d/g, g]``; ``axis="channel"``: ``[B, H, T/g, d, g]`` (a transposed view).
        """
        b, h, t, d = x.shape
        if self.axis == "token":
            g = self.group or d
            if d % g:
                raise ValueError(f"head_dim {d} is not a multiple of the channel group {g}")
            return x.reshape(b, h, t, d // g, g)
        g = self.group or 1
        if t % g:
            raise ValueError(f"{t} tokens are not a whole number of {g}-token groups")
        return x.reshape(b, h, t // g, g, d).transpose(3, 4)

    def _ungroup(self, grouped: Tensor, shape: torch.Size) -> Tensor:
        if self.axis == "token":
            return grouped.reshape(shape)
        return grouped.transpose(3, 4).reshape(shape)

    def encode(self, x: Tensor) -> Packed:
        """Pack ``x`` ``[B, H, T, d]`` (``T`` a multiple of :attr:`token_group`)."""
        fmt, grouped = self.format, self._grouped(x.float())
        lo, hi = minmax_range(grouped, PerRow())
        qp = compute_qparams(lo, hi, fmt, self.clip_ratio, scale_dtype=META_DTYPE, offset=self.offset)
        codes = quantize_groups(grouped, qp.scale, qp.zero_point, fmt, qp.minimum) - fmt.qmin
        meta = {"scale": qp.scale.squeeze(-1).to(META_DTYPE)}
        if qp.minimum is not None:
            meta["min"] = qp.minimum.squeeze(-1).to(META_DTYPE)  # already a float16 value: exact
        if qp.zero_point is not None:
            meta["zero_point"] = qp.zero_point.squeeze(-1).to(META_DTYPE)  # integers below 256: exact in float16
        codes = self._ungroup(codes, x.shape).to(torch.uint8)
        return Packed({"codes": pack_bits(codes, self.bits), **meta}, tokens=x.shape[2])

    def decode(self, packed: Packed, head_dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dequantized tensor ``[B, H, T, head_dim]``."""
        f, fmt = packed.fields, self.format
        codes = unpack_bits(f["codes"], self.bits, head_dim).float()
        codes = codes + fmt.qmin if fmt.qmin else codes
        zero, minimum = (f[k].float().unsqueeze(-1) if k in f else None for k in ("zero_point", "min"))
        values = dequantize_groups(self._grouped(codes), f["scale"].float().unsqueeze(-1), zero, minimum)
        return self._ungroup(values, codes.shape).to(dtype)

    def scores(self, queries: Tensor, packed: Packed, head_dim: int) -> Tensor:
        """``queries [B, H, Tq, d] @ keys.T`` against the packed keys: ``[B, H, Tq, T]``."""
        return queries.float() @ self.decode(packed, head_dim).transpose(-1, -2)

    def weighted_sum(self, weights: Tensor, packed: Packed, head_dim: int) -> Tensor:
        """``weights [B, H, Tq, T] @ values`` for the packed values."""
        return weights @ self.decode(packed, head_dim)


@lru_cache(maxsize=256)
def _projection(d: int, m: int, seed: int) -> Tensor:
    return qjl_projection(d, m, seed)


@lru_cache(maxsize=256)
def _hadamard(d: int, seed: int):
    return random_hadamard(d, seed)


@lru_cache(maxsize=256)
def _hadamard_dense_t(d: int, seed: int) -> Tensor:
    return _hadamard(d, seed).dense().to(torch.float32).T.contiguous()


@dataclass(frozen=True)
class QJLKeyCodec:
    """QJL keys: ``sign(S k)`` packed (``m`` bits) and ``||k||``, with outlier channels kept exact.

    Per group of ``group`` tokens and per KV head, the ``outliers`` channels with the largest L2 norm over the
    group are stored exactly (float16, plus their uint8 indices once per group) and zeroed in the key before it is
    sketched. Scoring zeroes the same channels of the query for the sketched part (still unbiased, no extra bits)
    and adds the exact outlier part: ``<q, k> ~= est(<q_in, k_in>) + <q_out, k_out>``. ``S`` is
    :func:`~lowbit.kv.qjl.qjl_projection` of ``seed`` (one seed per layer keeps layers independent).
    """

    m: int
    outliers: int = 8
    group: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.m < 8 or self.m % 8:
            raise ValueError(f"QJL sketch size m must be a positive multiple of 8, got {self.m}")
        if self.outliers < 0 or self.group < 1:
            raise ValueError(f"outliers must be >= 0 and group >= 1, got {self.outliers}, {self.group}")

    @property
    def token_group(self) -> int:
        return self.group

    def encode(self, keys: Tensor) -> Packed:
        """Pack keys ``[B, H, T, d]`` (``T`` a multiple of ``group``)."""
        b, h, t, d = keys.shape
        if t % self.group:
            raise ValueError(f"{t} tokens are not a whole number of {self.group}-token groups")
        if self.outliers >= d:
            raise ValueError(f"{self.outliers} outlier channels leave nothing to sketch in head_dim {d}")
        grouped = keys.float().reshape(b, h, t // self.group, self.group, d)
        index = grouped.norm(dim=3).topk(self.outliers, dim=-1).indices  # [B, H, G, o]
        take = index.unsqueeze(3).expand(-1, -1, -1, self.group, -1)
        exact = grouped.gather(-1, take)  # [B, H, G, group, o]
        inliers = grouped.scatter(-1, take, 0.0).reshape(b, h, t, d)
        sketch = sketch_keys(inliers, _projection(d, self.m, self.seed), META_DTYPE)
        return Packed({"signs": sketch.signs, "norm": sketch.norm.unsqueeze(-1),
                       "outliers": exact.reshape(b, h, t, self.outliers).to(META_DTYPE),
                       "index": index.to(torch.uint8)}, tokens=t)

    def scores(self, queries: Tensor, packed: Packed, head_dim: int) -> Tensor:
        """Estimated ``<q, k>`` for queries ``[B, H, Tq, d]`` against the packed keys: ``[B, H, Tq, T]``."""
        f, q = packed.fields, queries.float()
        proj = _projection(head_dim, self.m, self.seed).to(q.device)
        sketch = KeySketch(f["signs"], f["norm"].squeeze(-1), self.m)
        signs = sign_matrix(sketch)  # [B, H, T, m] for this run of tokens only
        norm = sketch.norm.float()
        coeff = math.sqrt(math.pi / 2) / self.m * norm  # [B, H, T]
        base = (q @ proj.T) @ signs.transpose(-1, -2) * coeff.unsqueeze(-2)
        if self.outliers == 0:
            return base
        b, h, t, _ = signs.shape
        groups = t // self.group
        index = f["index"].long()  # [B, H, G, o]
        columns = proj.T[index]  # [B, H, G, o, m]: the sketch's columns at each group's zeroed channels
        grouped_signs = signs.reshape(b, h, groups, self.group, self.m)
        leak = torch.einsum("bhgtm,bhgom->bhgto", grouped_signs, columns).reshape(b, h, t, -1)  # S[:, c] . sign
        values = f["outliers"].float() - coeff.unsqueeze(-1) * leak  # [B, H, T, o]
        q_sel = q.unsqueeze(2).expand(-1, -1, groups, -1, -1).gather(
            -1, index.unsqueeze(3).expand(-1, -1, -1, q.shape[2], -1))  # [B, H, G, Tq, o]
        corr = torch.einsum("bhgqo,bhgto->bhqgt", q_sel, values.reshape(b, h, groups, self.group, -1))
        return base + corr.reshape(b, h, q.shape[2], t)


@dataclass(frozen=True)
class TurboCodec:
    """Rotated-codebook codes: ``x -> (R x / ||x||)`` quantized coordinate-wise with the sphere codebook, plus ``||x||``.

    ``R`` is a seeded random Hadamard of ``head_dim`` (any size with a construction), after which every coordinate
    of the unit vector follows the same known distribution, so :func:`~lowbit.kv.codebook.sphere_codebook` is the
    optimal scalar quantizer for all of them. With ``residual_qjl`` one more bit per channel holds a QJL sketch
    (``m = head_dim``) of the rotated residual and its norm, which makes scores unbiased (TurboQuant-prod);
    ``bits`` counts the codebook bits only.
    """

    bits: int
    residual_qjl: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _check_bits(self.bits)

    @property
    def token_group(self) -> int:
        return 1

    def _rotation(self, d: int):
        return _hadamard(d, self.seed)

    def encode(self, x: Tensor) -> Packed:
        """Pack ``x`` ``[B, H, T, d]``."""
        d = x.shape[-1]
        y = self._rotation(d).apply(x.float())
        norm = y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        book = sphere_codebook(d, self.bits)
        codes = book.encode(y / norm)
        fields = {"codes": pack_bits(codes, self.bits), "norm": norm.to(META_DTYPE)}
        if self.residual_qjl:
            residual = y - book.decode(codes) * norm.to(META_DTYPE).float()
            sketch = sketch_keys(residual, _projection(d, d, self.seed + 1), META_DTYPE)
            fields.update(rsigns=sketch.signs, rnorm=sketch.norm.unsqueeze(-1))
        return Packed(fields, tokens=x.shape[2])

    def _rotated(self, packed: Packed, d: int) -> Tensor:
        """The dequantized vectors in the rotated basis (codebook part only)."""
        f = packed.fields
        return sphere_codebook(d, self.bits).decode(unpack_bits(f["codes"], self.bits, d)) * f["norm"].float()

    def decode(self, packed: Packed, head_dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dequantized ``[B, H, T, head_dim]`` (codebook part, rotated back; the residual sketch is for scores)."""
        back = self._rotated(packed, head_dim) @ _hadamard_dense_t(head_dim, self.seed).to(packed.fields["norm"].device)
        return back.to(dtype)

    def weighted_sum(self, weights: Tensor, packed: Packed, head_dim: int) -> Tensor:
        """``weights [B, H, Tq, T] @ values``: summed in the rotated basis, rotated back once per query."""
        return (weights @ self._rotated(packed, head_dim)) @ _hadamard_dense_t(head_dim, self.seed).to(weights.device)

    def scores(self, queries: Tensor, packed: Packed, head_dim: int) -> Tensor:
        """``<q, k>`` for queries ``[B, H, Tq, d]``, computed in the rotated basis: ``[B, H, Tq, T]``."""
        q = self._rotation(head_dim).apply(queries.float())
        out = q @ self._rotated(packed, head_dim).transpose(-1, -2)
        if self.residual_qjl:
            f = packed.fields
            sketch = KeySketch(f["rsigns"], f["rnorm"].squeeze(-1), head_dim)
            out = out + estimate_scores(q, sketch, _projection(head_dim, head_dim, self.seed + 1))
        return out
