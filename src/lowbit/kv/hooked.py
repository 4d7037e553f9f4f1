"""A float KV cache that stores each token's keys and values once, after the attention hooks.

transformers' ``DynamicCache`` hands the attention function the whole cache at every step, so lowbit's attention
hooks (the R3 rotation of queries and keys, the KV fake quantizers) would redo their work on every cached token at
every decode step: O(context) per step, more than the weight GEMMs at batch 8 or a 512-token prompt. Where every
hook works token by token (per-token or static KV scales, per-token rotations), hooking the new tokens once and
storing the result gives the same keys and values: :class:`HookedCache` does that. Its layers hand the new states to
the attention function as :class:`~lowbit.kv.attention.PendingKV` (like the packed caches), which runs the hooks
on them, stores them with :meth:`HookedLayer.store` and attends over everything stored.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from .attention import PendingKV, use_lowbit_attention


class HookedLayer(DynamicLayer):
    """A dynamic cache layer whose stored keys/values are the hooked ones (see the module docstring)."""

    stores_hooked = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[PendingKV, None]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return PendingKV(self, key_states, value_states), None

    def store(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Append the step's hooked keys/values; returns every stored key and value."""
        self.keys = torch.cat([self.keys, key], dim=-2)
        self.values = torch.cat([self.values, value], dim=-2)
        return self.keys, self.values


class HookedCache(Cache):
    """One :class:`HookedLayer` per decoder layer of ``model``; switches the model to lowbit's attention function."""

    def __init__(self, model: nn.Module) -> None:
        use_lowbit_attention(model)
        layers = model.config.get_text_config().num_hidden_layers
        super().__init__(layers=[HookedLayer() for _ in range(layers)])
