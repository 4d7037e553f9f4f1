"""The ``"lowbit"`` attention function registered with transformers: hooks, packed caches, decode-equivalent mode.

An attention module opts in by holding ``lowbit_hooks`` (``HOOKS_ATTR``), an ``nn.ModuleList`` of modules with
``forward(query, key, value) -> (query, key, value)`` on post-RoPE tensors ``[batch, heads, tokens, head_dim]``;
they run in order before the scores are computed (:mod:`lowbit.surgery.attention` attaches them). Then:

* the cache handed over a :class:`PendingKV` (a :class:`~lowbit.kv.cache.PackedCache` layer): the hooks run on
  the step's new keys and values and the layer attends over its packed form;
* the module holds a cache spec (``SIMULATION_ATTR``): one-pass decode-equivalent attention
  (:func:`~lowbit.kv.attend.decode_equivalent_attention`);

in both, a key centre (``KEY_CENTRE_ATTR``) has the cache store keys minus their centre offsets and add
``q . offsets`` back to the scores;
* otherwise transformers' own sdpa kernel.

In the first two cases the KV fake-quantizers among the hooks are skipped: the packed cache quantizes. This module
sits below both the cache (which switches a model to this function when it is created) and the surgery that adds
hooks, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .attend import decode_equivalent_attention

ATTENTION_NAME = "lowbit"
HOOKS_ATTR = "lowbit_hooks"
SIMULATION_ATTR = "lowbit_decode_equivalent"  # a CacheSpec while a decode-equivalent evaluation runs
PREFIX_ATTR = "lowbit_prefix_len"  # cached prefix positions a decode-equivalent forward may find before its tokens
KEY_CENTRE_ATTR = "lowbit_key_centre"  # a packed cache's key centre (lowbit.surgery.key_centre.KeyCentre), optional


@dataclass(frozen=True, eq=False)
class PendingKV:
    """A step's new keys/values on their way from a packed cache layer's ``update`` to the attention function.

    ``layer`` is the cache layer (:class:`~lowbit.kv.cache.PackedLayer`): ``layer.attend(query, key, value, mask,
    scaling)`` appends the hooked keys/values and attends over the packed form.
    """

    layer: Any
    key: Tensor
    value: Tensor


def run_hooks(module: nn.Module, query, key, value, packed: bool, start: int = 0):
    """The module's hooks in order; KV fake-quantizers are skipped when a packed cache quantizes instead, and are
    told the cache position ``start`` of the first token handed over (they keep a prefix exact)."""
    for hook in getattr(module, HOOKS_ATTR, ()):
        if not getattr(hook, "quantizes_kv", False):
            query, key, value = hook(query, key, value)
        elif not packed:
            query, key, value = hook(query, key, value, start=start)
    return query, key, value


def _lowbit_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The registered attention function (transformers' signature): hooks, then packed, simulated or sdpa attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    scaling = kwargs.get("scaling") or module.scaling
    if isinstance(key, PendingKV) and getattr(key.layer, "stores_hooked", False):  # kv.hooked: hook, store, attend
        start = key.layer.get_seq_length()
        query, new_key, new_value = run_hooks(module, query, key.key, key.value, packed=False, start=start)
        key, value = key.layer.store(new_key, new_value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if isinstance(key, PendingKV):  # a packed cache: hook the new tokens, then attend over the packed form
        query, new_key, new_value = run_hooks(module, query, key.key, key.value, packed=True)
        return key.layer.attend(query, new_key, new_value, attention_mask, scaling), None
    simulated = getattr(module, SIMULATION_ATTR, None)
    query, key, value = run_hooks(module, query, key, value, packed=simulated is not None)
    if simulated is not None:
        if query.shape[2] != key.shape[2] and not getattr(module, PREFIX_ATTR, 0) == key.shape[2] - query.shape[2]:
            raise RuntimeError(
                "this model quantizes its KV cache with a packed cache: decode with "
                "past_key_values=lowbit.kv.PackedCache.for_model(model) (or use_cache=False)"
            )
        centre = getattr(module, KEY_CENTRE_ATTR, None)
        offsets = None if centre is None else centre.offsets(torch.arange(key.shape[2], device=key.device))
        return decode_equivalent_attention(query, key, value, simulated, attention_mask, scaling, offsets), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> str:
    """Register the ``"lowbit"`` attention function and its (sdpa) mask with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _lowbit_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


def use_lowbit_attention(model: nn.Module) -> str:
    """Register the lowbit attention function and switch ``model`` to it (nothing to do if it already uses it).

    The one place that does this: attaching a hook, entering decode-equivalent mode and creating a packed cache all
    call it. Returns the attention implementation's name.
    """
    name = register_attention()
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)
    return name
