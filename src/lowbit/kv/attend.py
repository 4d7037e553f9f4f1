"""Attention over a packed KV cache, and its one-pass decode-equivalent form for evaluation.

Shapes follow transformers: queries ``[B, Hq, Tq, d]``, keys/values ``[B, Hkv, T, d]`` with ``Hq = g * Hkv`` (query
head ``h`` reads KV head ``h // g``), masks ``[B, 1, Tq, T]`` (bool, True = attend, or additive float) or None for
plain causal attention; outputs ``[B, Tq, Hq, d]`` like transformers' attention functions. Queries are grouped per
KV head as ``[B, Hkv, g * Tq, d]`` so packed keys are scored once per KV head whatever the GQA group size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .codecs import Packed
from .spec import CacheSpec, packed_count


def group_queries(query: Tensor, kv_heads: int) -> Tensor:
    """``[B, Hq, Tq, d]`` -> ``[B, Hkv, g * Tq, d]`` (the query heads that share a KV head, stacked)."""
    b, hq, tq, d = query.shape
    if hq % kv_heads:
        raise ValueError(f"{hq} query heads do not split into groups over {kv_heads} KV heads")
    return query.reshape(b, kv_heads, (hq // kv_heads) * tq, d)


def masked_softmax(scores: Tensor, mask: Tensor | None, tq: int) -> Tensor:
    """Softmax over keys of grouped scores ``[B, Hkv, g*Tq, T]`` with a ``[B, 1, Tq, T]`` mask (None: causal)."""
    b, hkv, gtq, t = scores.shape
    s = scores.float().reshape(b, hkv, gtq // tq, tq, t)
    if mask is None:
        positions = torch.arange(t - tq, t, device=s.device)[:, None]
        mask = (torch.arange(t, device=s.device)[None, :] <= positions)[None, None]
    mask = mask[..., -t:].unsqueeze(2)  # [B, 1, 1, Tq, T]
    s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    weights = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # a query with every key masked (padding) attends to none
    return weights.reshape(b, hkv, gtq, t)


def _ungroup(out: Tensor, tq: int) -> Tensor:
    """Grouped outputs ``[B, Hkv, g*Tq, d]`` -> transformers' ``[B, Tq, Hq, d]``."""
    b, hkv, gtq, d = out.shape
    return out.reshape(b, hkv * (gtq // tq), tq, d).transpose(1, 2)


def with_offsets(scores: Tensor, q: Tensor, offsets: Tensor | None) -> Tensor:
    """Grouped ``scores`` ``[B, Hkv, g*Tq, T]`` of keys stored as ``k - offsets``, with ``q . offsets`` added back."""
    return scores if offsets is None else scores + q @ offsets[:, :, :scores.shape[-1]].float().transpose(-1, -2)


CHUNK_TOKENS = 2048  # packed tokens scored / dequantized at a time, so no dense copy of a long cache exists


def _chunk(spec: CacheSpec) -> int:
    return max(spec.group, CHUNK_TOKENS // spec.group * spec.group)


def packed_attention(
    query: Tensor,
    spec: CacheSpec,
    exact_before: tuple[Tensor, Tensor],
    packed: tuple[Packed, Packed] | None,
    exact_after: tuple[Tensor, Tensor],
    mask: Tensor | None,
    scaling: float,
    offsets: Tensor | None = None,
) -> Tensor:
    """Attention over ``[exact_before | packed | exact_after]`` keys/values (sink, packed run, recent window).

    The packed run is scored and its values dequantized ``CHUNK_TOKENS`` tokens at a time. ``offsets``
    ``[1, Hkv, T, d]``: the stored keys are ``k - offsets`` (a key centre, :mod:`lowbit.surgery.key_centre`), so
    ``q . offsets`` is added back to every score.
    """
    kv_heads, d, tq = exact_after[0].shape[1], query.shape[-1], query.shape[2]
    q = group_queries(query.float(), kv_heads)
    key_chunks = [] if packed is None else packed[0].chunks(_chunk(spec))
    value_chunks = [] if packed is None else packed[1].chunks(_chunk(spec))
    parts = [q @ exact_before[0].float().transpose(-1, -2)]
    parts += [spec.keys.scores(q, chunk, d) for chunk in key_chunks]
    parts.append(q @ exact_after[0].float().transpose(-1, -2))
    scores = with_offsets(torch.cat(parts, dim=-1), q, offsets)
    weights = masked_softmax(scores * scaling, mask, tq).split([p.shape[-1] for p in parts], -1)
    out = weights[0] @ exact_before[1].float() + weights[-1] @ exact_after[1].float()
    for w, chunk in zip(weights[1:-1], value_chunks, strict=True):
        out = out + spec.values.weighted_sum(w, chunk, d)  # one chunk of values at a time
    return _ungroup(out, tq).to(query.dtype)


QUERY_CHUNK = 1024  # queries per block in decode-equivalent attention: causal keys only, bounded score memory


def decode_equivalent_attention(
    query: Tensor, key: Tensor, value: Tensor, spec: CacheSpec, mask: Tensor | None, scaling: float,
    offsets: Tensor | None = None,
) -> Tensor:
    """Causal attention over a whole sequence as step-by-step decoding with the packed cache would compute it.

    The query at position ``i`` sees the sink and its recent window exactly and the tokens the cache would have
    packed by then (:func:`~lowbit.kv.spec.packed_count`) through the codecs: one forward pass, the same numbers as
    decoding token by token (up to float rounding). Keys before the queries (``T - Tq`` of them: a PrefixQuant
    prefix already in the cache) are an exact sink in addition to the spec's own. The packed run is encoded once;
    queries go ``QUERY_CHUNK`` at a time, each block scoring only the keys it may see. With ``offsets`` (a key
    centre) the keys are stored and encoded as ``k - offsets`` and ``q . offsets`` added back to the scores.
    """
    if offsets is not None:
        key = key - offsets.to(key.dtype)
    t, tq = key.shape[2], query.shape[2]
    offset = t - tq
    sink = min(spec.sink + offset, t)
    n = ((t - sink) // spec.group) * spec.group
    run = slice(sink, sink + n)
    packed = (spec.keys.encode(key[:, :, run]), spec.values.encode(value[:, :, run])) if n else None
    outs = []
    for a in range(0, tq, QUERY_CHUNK):
        b = min(a + QUERY_CHUNK, tq)
        rows = None if mask is None else mask[:, :, a:b, : offset + b]
        outs.append(_decode_rows(query[:, :, a:b], key[:, :, : offset + b], value[:, :, : offset + b], spec,
                                 packed, sink, offset + a, rows, scaling, offsets))
    return torch.cat(outs, dim=1)


def _decode_rows(query, key, value, spec: CacheSpec, packed, sink: int, start: int, mask, scaling: float,
                 offsets: Tensor | None = None) -> Tensor:
    """Decode-equivalent attention of queries at key positions ``start, start+1, ...`` over keys ``[0, T)``.

    Query ``i`` of the block sees ``counts[i]`` packed tokens after the sink (non-decreasing in ``i``). Keys every
    query sees packed are scored only from the packed form, keys no query sees packed only exactly; just the band in
    between (about a window and a group wide) is scored both ways and chosen per query.
    """
    kv_heads, d, tq = key.shape[1], query.shape[-1], query.shape[2]
    q = group_queries(query.float(), kv_heads)
    before = (start + torch.arange(tq, device=key.device) - sink).clamp_min(0)  # non-sink tokens before each query
    counts = packed_count(before, spec.window, spec.group)
    n = int(counts.max()) if packed is not None else 0  # packed tokens the latest query of the block sees
    if n == 0:
        scores = with_offsets(q @ key.float().transpose(-1, -2), q, offsets)
        return _ungroup(masked_softmax(scores * scaling, mask, tq) @ value.float(), tq).to(query.dtype)
    lo = int(counts.min())  # packed tokens the earliest query sees: packed for every query of the block
    packed_k, packed_v = (p.split(n)[0] for p in packed)
    exact = lambda x: torch.cat([x[:, :, :sink], x[:, :, sink + lo:]], dim=2).float()  # sink, then the band on
    exact_scores = q @ exact(key).transpose(-1, -2)
    packed_scores = spec.keys.scores(q, packed_k, d)
    mixed = torch.arange(lo, n, device=key.device)[None, :] < counts[:, None]  # [Tq, n - lo], True: packed
    mixed = mixed.repeat(q.shape[2] // tq, 1)  # grouped query rows: g copies of the Tq rows
    band = torch.where(mixed, packed_scores[..., lo:], exact_scores[..., sink:sink + n - lo])
    scores = torch.cat([exact_scores[..., :sink], packed_scores[..., :lo], band, exact_scores[..., sink + n - lo:]], -1)
    scores = with_offsets(scores, q, offsets)
    weights = masked_softmax(scores * scaling, mask, tq)
    packed_weights = torch.cat([weights[..., sink:sink + lo], weights[..., sink + lo:sink + n] * mixed], dim=-1)
    exact_weights = torch.cat([weights[..., :sink], weights[..., sink + lo:]], dim=-1)
    exact_weights[..., sink:sink + n - lo].masked_fill_(mixed, 0.0)
    out = exact_weights @ exact(value) + spec.values.weighted_sum(packed_weights, packed_v, d)
    return _ungroup(out, tq).to(query.dtype)
