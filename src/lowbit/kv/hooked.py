"""A float KV cache that stores each token's keys and values once, after the attention hooks.

transformers' ``DynamicCache`` hands the attention function the whole cache at every step, so lowbit's attention
hooks (the R3 rotation of queries and keys, the KV fake quantizers) would redo their work on every cached token at
every decode step: O(context) per step, more than the weight GEMMs at batch 8 or a 512-token prompt. Where every
hook works token by token (per-token or static KV scales, per-token rotations), hooking the new tokens once and
storing the result gives the same keys and values: :class:`HookedCache` does that. Its layers hand the new states to
the attention function as :class:`~lowbit.kv.attention.PendingKV` (like the packed caches), which runs the hooks
on them, stores them with :meth:`HookedLayer.store` and attends over everything stored. A PrefixQuant prefix is
hooked once when the cache starts from it (rotated, never quantized: :meth:`HookedCache.start_from_prefix`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from ..models.arch import decoder_layers, get_module, spec_for
from .attention import PendingKV, run_hooks, use_lowbit_attention


class HookedLayer(DynamicLayer):
    """A dynamic cache layer whose stored keys/values are the hooked ones (see the module docstring).

    They live in buffers allocated ahead (half again the tokens stored, at least ``AHEAD`` more), so a decode step
    writes its token in place instead of copying the whole cache (``torch.cat``); ``keys``/``values`` are views of
    the stored part. Where transformers replaces them (beam reordering, cropping), the next store starts from them.
    """

    stores_hooked = True
    AHEAD = 256
    _ahead: tuple[Tensor, Tensor, Tensor] | None = None  # key buffer, value buffer, the keys view last handed out

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[PendingKV, None]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return PendingKV(self, key_states, value_states), None

    def store(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Append the step's hooked keys/values; returns every stored key and value."""
        held = self.keys.shape[-2] if self.keys.numel() else 0
        buffers = self._ahead
        fits = buffers is not None and self.keys is buffers[2] and held + key.shape[-2] <= buffers[0].shape[-2] \
            and buffers[0].shape[:2] == key.shape[:2]
        if not fits:
            size = max(held + key.shape[-2] + self.AHEAD, (held + key.shape[-2]) * 3 // 2)
            buffers = [key.new_empty(*key.shape[:2], size, key.shape[-1]),
                       value.new_empty(*value.shape[:2], size, value.shape[-1])]
            if held:
                buffers[0][..., :held, :].copy_(self.keys)
                buffers[1][..., :held, :].copy_(self.values)
        end = held + key.shape[-2]
        buffers[0][..., held:end, :].copy_(key)
        buffers[1][..., held:end, :].copy_(value)
        self.keys, self.values = buffers[0][..., :end, :], buffers[1][..., :end, :]
        self._ahead = (buffers[0], buffers[1], self.keys)
        return self.keys, self.values


class HookedCache(Cache):
    """One :class:`HookedLayer` per decoder layer of ``model``; switches the model to lowbit's attention function."""

    def __init__(self, model: nn.Module) -> None:
        use_lowbit_attention(model)
        spec = spec_for(model)
        self.attention = [get_module(layer, spec.attn) for layer in decoder_layers(model, spec)]
        super().__init__(layers=[HookedLayer() for _ in self.attention])

    @torch.no_grad()
    def start_from_prefix(self, keys: Tensor, values: Tensor) -> None:
        """Start every layer from a prefix's exact keys/values ``[layers, B, kv_heads, P, d]``, as the attention hooks
        leave them (rotated, not quantized: the KV quantizers keep the prefix exact). The cache must be empty."""
        for layer, attn, k, v in zip(self.layers, self.attention, keys, values, strict=True):
            _, k, v = run_hooks(attn, k, k, v, packed=True)
            layer.lazy_initialization(k, v)
            layer.store(k.clone(), v.clone())
