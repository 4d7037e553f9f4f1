"""Packed KV caches on transformers' cache API: works with ``generate``, batches with padding, any GQA and head_dim.

``PackedCache(model, spec)`` holds per layer an exact sink, a packed run (bit-packed codes and float16 metadata,
see :mod:`lowbit.kv.codecs`) and an exact recent window. Its ``update`` does not return dense keys: it returns a
:class:`PendingKV` that carries the step's new keys and values to lowbit's attention function, which applies the
model's online hooks (e.g. QuaRot's R3) to them, appends them, attends over the packed form
(:func:`~lowbit.kv.attend.packed_attention`) and flushes whole groups out of the window. So the cache never holds a
dequantized copy, and prefill attention over the new tokens is exact.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin

from ..models.arch import decoder_layers, get_module, spec_for
from ..state import quant_state
from .attend import packed_attention
from .attention import KEY_CENTRE_ATTR, PendingKV, use_lowbit_attention
from .codecs import Packed
from .spec import CacheSpec, packed_count


class PackedRun:
    """A growing run of packed tokens: each field lives in a buffer with spare room along the token axis, so that
    appending copies only the new tokens. A full buffer grows by a quarter (and at least ``GROW_SLOTS``), so a long
    generation costs amortised O(1) copying per token instead of the O(n) of concatenating the whole run at every
    flush, and the spare room stays under a quarter of the run (it is counted in :attr:`nbytes`)."""

    GROW_SLOTS = 64

    def __init__(self, first: Packed) -> None:
        self._buffers = {k: v.contiguous() for k, v in first.fields.items()}
        self._used = {k: v.shape[2] for k, v in first.fields.items()}
        self.tokens = first.tokens

    def append(self, more: Packed) -> None:
        for name, new in more.fields.items():
            buffer, used = self._buffers[name], self._used[name]
            need = used + new.shape[2]
            if need > buffer.shape[2]:
                size = max(need, buffer.shape[2] + buffer.shape[2] // 4 + self.GROW_SLOTS)
                grown = buffer.new_empty(*buffer.shape[:2], size, *buffer.shape[3:])
                grown[:, :, :used] = buffer[:, :, :used]
                self._buffers[name] = buffer = grown
            buffer[:, :, used:need] = new
            self._used[name] = need
        self.tokens += more.tokens

    @property
    def packed(self) -> Packed:
        """The tokens appended so far (views of the buffers)."""
        return Packed({k: b[:, :, :self._used[k]] for k, b in self._buffers.items()}, self.tokens)

    @property
    def nbytes(self) -> int:
        """Bytes allocated, spare room included: the memory the run really holds."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


class PackedLayer(CacheLayerMixin):
    """One layer's packed cache: exact sink, packed run, exact recent window."""

    is_compileable = False
    is_sliding = False

    def __init__(self, spec: CacheSpec, centre=None) -> None:
        super().__init__()
        self.spec, self.centre = spec, centre  # centre: a KeyCentre (keys stored minus its offsets) or None
        self.sink_keys = self.sink_values = self.recent_keys = self.recent_values = None
        self._runs: tuple[PackedRun, PackedRun] | None = None

    @property
    def packed_keys(self) -> Packed | None:
        return None if self._runs is None else self._runs[0].packed

    @property
    def packed_values(self) -> Packed | None:
        return None if self._runs is None else self._runs[1].packed

    def _set_packed(self, keys: Packed | None, values: Packed | None) -> None:
        self._runs = None if keys is None else (PackedRun(keys), PackedRun(values))

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states[:, :, :0]
        self.sink_keys, self.recent_keys = empty.clone(), empty.clone()
        self.sink_values, self.recent_values = value_states[:, :, :0].clone(), value_states[:, :, :0].clone()
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[PendingKV, None]:
        """Hand the new keys/values to the attention function (which appends them after its hooks)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return PendingKV(self, key_states, value_states), None

    def attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float) -> Tensor:
        """Append the step's (hooked) keys/values, attend with them exact, then flush whole groups to packed form."""
        offsets = self._offsets(self.get_seq_length() + key.shape[2])
        self._append(key, value, offsets)
        packed = None if self.packed_keys is None else (self.packed_keys, self.packed_values)
        out = packed_attention(query, self.spec, (self.sink_keys, self.sink_values), packed,
                               (self.recent_keys, self.recent_values), mask, scaling, offsets)
        self._flush()
        return out

    def store(self, key: Tensor, value: Tensor) -> None:
        """Append keys/values and flush them into packed form without attending (filling a cache to measure it)."""
        if not self.is_initialized:
            self.lazy_initialization(key, value)
        self._append(key, value)
        self._flush()

    def _offsets(self, tokens: int) -> Tensor | None:
        """The key centre's offsets at positions ``[0, tokens)`` (None without a centre)."""
        if self.centre is None:
            return None
        return self.centre.offsets(torch.arange(tokens, device=self.device))

    def _append(self, key: Tensor, value: Tensor, offsets: Tensor | None = None) -> None:
        """Append the step's keys/values (keys minus their offsets, ``offsets`` covering every position so far)."""
        if self.centre is not None:
            held = self.get_seq_length()
            offsets = self._offsets(held + key.shape[2]) if offsets is None else offsets
            key = key - offsets[:, :, held:].to(key.dtype)
        room = self.spec.sink - self.sink_keys.shape[2]
        if room > 0:
            self.sink_keys = torch.cat([self.sink_keys, key[:, :, :room]], dim=2)
            self.sink_values = torch.cat([self.sink_values, value[:, :, :room]], dim=2)
            key, value = key[:, :, room:], value[:, :, room:]
        self.recent_keys = torch.cat([self.recent_keys, key], dim=2)
        self.recent_values = torch.cat([self.recent_values, value], dim=2)

    def _flush(self) -> None:
        n = packed_count(self.recent_keys.shape[2], self.spec.window, self.spec.group)  # whole groups past the window
        if n == 0:
            return
        keys = self.spec.keys.encode(self.recent_keys[:, :, :n])
        values = self.spec.values.encode(self.recent_values[:, :, :n])
        self.recent_keys, self.recent_values = self.recent_keys[:, :, n:], self.recent_values[:, :, n:]
        if self._runs is None:
            self._set_packed(keys, values)
        else:
            self._runs[0].append(keys)
            self._runs[1].append(values)

    @property
    def packed_tokens(self) -> int:
        return 0 if self._runs is None else self._runs[0].tokens

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[2] + self.packed_tokens + self.recent_keys.shape[2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def nbytes(self) -> int:
        """Bytes held: exact sink and window tensors plus every packed field."""
        if not self.is_initialized:
            return 0
        exact = (self.sink_keys, self.sink_values, self.recent_keys, self.recent_values)
        held = sum(t.numel() * t.element_size() for t in exact)
        if self._runs is not None:
            held += self._runs[0].nbytes + self._runs[1].nbytes
        return held + sum(getattr(c, "nbytes", 0) for c in (self.spec.keys, self.spec.values))  # static params

    def reset(self) -> None:
        self.is_initialized = False
        self.sink_keys = self.sink_values = self.recent_keys = self.recent_values = None
        self._runs = None

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self.recent_keys, self.recent_values = fn(self.recent_keys), fn(self.recent_values)
        if self._runs is not None:
            keys, values = self.packed_keys, self.packed_values
            self._set_packed(Packed({k: fn(v) for k, v in keys.fields.items()}, keys.tokens),
                             Packed({k: fn(v) for k, v in values.fields.items()}, values.tokens))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a packed KV cache cannot be cropped (assisted decoding is not supported)")


class PackedCache(Cache):
    """A packed KV cache for ``model`` (one :class:`PackedLayer` per decoder layer, codecs seeded per layer).

    Creating it switches the model to lowbit's attention function, which knows how to attend over packed layers.
    """

    def __init__(self, model: nn.Module, spec: CacheSpec) -> None:
        use_lowbit_attention(model)
        layers = model.config.get_text_config().num_hidden_layers
        centres = key_centres(model)
        super().__init__(layers=[PackedLayer(spec.for_layer(i), centres[i]) for i in range(layers)])

    @classmethod
    def for_model(cls, model: nn.Module) -> PackedCache:
        """The packed cache a model quantized with a ``kv_cache`` recipe uses (its spec is in the model's state)."""
        state = quant_state(model)
        if state is None or state.cache_spec is None:
            raise ValueError("this model has no packed KV cache: quantize it with a recipe that has a kv_cache section")
        return cls(model, state.cache_spec)

    @torch.no_grad()
    def start_from_prefix(self, keys: Tensor, values: Tensor) -> None:
        """Make the exact keys/values ``[layers, B, kv_heads, P, d]`` of a prefix the start of every layer.

        The prefix becomes part of each layer's exact sink (before the spec's own sink tokens), as the
        decode-equivalent evaluation assumes. The cache must be empty.
        """
        for layer, k, v in zip(self.layers, keys, values, strict=True):
            layer.spec = dataclasses.replace(layer.spec, sink=layer.spec.sink + k.shape[2])
            layer.lazy_initialization(k, v)
            offsets = layer._offsets(k.shape[2])
            layer.sink_keys = k.clone() if offsets is None else k - offsets.to(k.dtype)
            layer.sink_values = v.clone()

    @property
    def nbytes(self) -> int:
        """Bytes held by every layer."""
        return sum(layer.nbytes for layer in self.layers)


def key_centres(model: nn.Module) -> list:
    """Each decoder layer's key centre (None for a layer whose attention module holds none)."""
    spec = spec_for(model)
    return [getattr(get_module(layer, spec.attn), KEY_CENTRE_ATTR, None) for layer in decoder_layers(model, spec)]


def cache_bits(spec: CacheSpec, head_dim: int, context: int, exact_dtype: torch.dtype = torch.float16) -> float:
    """Bits per cached key/value element after ``context`` tokens, counted from the tensors a cache holds.

    Runs one KV head (every head for a static cache) of random keys/values through a :class:`PackedLayer` (exact sink and window stored in
    ``exact_dtype``, 16 bits by default as in a half-precision deployment) and divides the bytes held by the
    elements cached: codes, scales, norms, sketches, outlier values and indices, sink and window all count.
    """
    layer = PackedLayer(spec)
    heads = next((c.scale.shape[0] for c in (spec.keys, spec.values)
                  if isinstance(getattr(c, "scale", None), Tensor)), 1)  # static (per-head scales): every head
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 1, heads, context, head_dim, generator=gen).to(exact_dtype)
    layer.store(kv[0], kv[1])
    return layer.nbytes * 8 / (2 * heads * context * head_dim)
