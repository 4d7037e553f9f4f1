"""The ``"lowbit"`` attention function: per-layer hooks on post-RoPE Q/K/V, then transformers' own kernel.

Registered once with transformers' ``AttentionInterface`` (and the matching mask function), so no modelling code is
forked or patched. An attention module opts in by holding ``lowbit_hooks``, an ``nn.ModuleList`` of modules with
``forward(query, key, value) -> (query, key, value)`` on tensors shaped ``[batch, heads, tokens, head_dim]``; they
run in order after RoPE and after the cache update (so ``key``/``value`` cover every cached position), before the
scores are computed. KV fake-quantization is such a hook; QuaRot's online rotation of Q and K (R3) is another.

With a packed KV cache (:mod:`lowbit.kv.cache`) the cache's ``update`` returns the step's new keys and values
unpacked; the hooks run on those (KV fake-quantizers are skipped: the cache quantizes), and the cache layer attends
over its packed form. :func:`decode_equivalent` makes full-sequence forwards attend as such a cache would.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .quantizer import ActQuantizer

ATTENTION_NAME = "lowbit"
HOOKS_ATTR = "lowbit_hooks"
SIMULATION_ATTR = "lowbit_decode_equivalent"  # a CacheSpec while a decode-equivalent evaluation runs
PREFIX_ATTR = "lowbit_prefix_len"  # cached prefix positions a decode-equivalent forward may find before its tokens


class KVQuantHook(nn.Module):
    """Fake-quantizes keys and values (post-RoPE) with their own quantizers; queries pass unchanged.

    The first ``exact_prefix`` cached positions (a PrefixQuant prefix) stay exact. Skipped when a packed cache (or
    its decode-equivalent evaluation) stores the keys and values instead.
    """

    quantizes_kv = True

    def __init__(self, k_quant: ActQuantizer, v_quant: ActQuantizer) -> None:
        super().__init__()
        self.k_quant, self.v_quant = k_quant, v_quant
        self.exact_prefix = 0

    def quantize_part(self, quant: ActQuantizer, x):
        """``quant(x)`` on the cached positions after the exact prefix."""
        p = min(self.exact_prefix, x.shape[2])
        if p == 0:
            return quant(x)
        return torch.cat([x[:, :, :p], quant(x[:, :, p:])], dim=2) if x.shape[2] > p else x

    def forward(self, query, key, value):
        return query, self.quantize_part(self.k_quant, key), self.quantize_part(self.v_quant, value)


def _run_hooks(module: nn.Module, query, key, value, packed: bool):
    """The module's hooks in order; KV fake-quantizers are skipped when a packed cache quantizes instead."""
    for hook in getattr(module, HOOKS_ATTR, ()):
        if not (packed and getattr(hook, "quantizes_kv", False)):
            query, key, value = hook(query, key, value)
    return query, key, value


def _lowbit_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..kv.attend import decode_equivalent_attention
    from ..kv.cache import PendingKV

    scaling = kwargs.get("scaling") or module.scaling
    if isinstance(key, PendingKV):  # a packed cache: hook the new tokens, then attend over the packed form
        query, new_key, new_value = _run_hooks(module, query, key.key, key.value, packed=True)
        return key.layer.attend(query, new_key, new_value, attention_mask, scaling), None
    simulated = getattr(module, SIMULATION_ATTR, None)
    query, key, value = _run_hooks(module, query, key, value, packed=simulated is not None)
    if simulated is not None:
        if query.shape[2] != key.shape[2] and not getattr(module, PREFIX_ATTR, 0) == key.shape[2] - query.shape[2]:
            raise RuntimeError(
                "this model quantizes its KV cache with a packed cache: decode with "
                "past_key_values=lowbit.kv.PackedCache.for_model(model) (or use_cache=False)"
            )
        return decode_equivalent_attention(query, key, value, simulated, attention_mask, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> str:
    """Register the ``"lowbit"`` attention function and its (sdpa) mask with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _lowbit_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


def add_attention_hook(model: nn.Module, attn: nn.Module, hook: nn.Module) -> None:
    """Append ``hook`` to one attention module's hooks and switch the model to the lowbit attention function."""
    if not hasattr(attn, HOOKS_ATTR):
        attn.register_module(HOOKS_ATTR, nn.ModuleList())
    getattr(attn, HOOKS_ATTR).append(hook)
    name = register_attention()
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)


def remove_attention_hooks(attn: nn.Module, drop) -> None:
    """Take off one attention module's hooks for which ``drop(hook)`` is true (the others keep their order)."""
    if hasattr(attn, HOOKS_ATTR):
        attn.register_module(HOOKS_ATTR, nn.ModuleList([h for h in getattr(attn, HOOKS_ATTR) if not drop(h)]))


def attention_hooks(attn: nn.Module) -> list[nn.Module]:
    """The hooks attached to one attention module (empty when none)."""
    return list(getattr(attn, HOOKS_ATTR, ()))


def set_decode_equivalent(model: nn.Module, spec) -> None:
    """Make full-sequence forwards attend as step-by-step decoding with a packed ``spec`` cache would (None: off).

    One-pass evaluation of a packed cache; see :func:`lowbit.kv.attend.decode_equivalent_attention`. A model in
    this mode must be given a :class:`~lowbit.kv.cache.PackedCache` when it decodes with a cache.
    """
    from ..models.arch import decoder_layers, get_module, spec_for

    arch = spec_for(model)
    for i, layer in enumerate(decoder_layers(model, arch)):
        attn = get_module(layer, arch.attn)
        if spec is None:
            if hasattr(attn, SIMULATION_ATTR):
                delattr(attn, SIMULATION_ATTR)
        else:
            setattr(attn, SIMULATION_ATTR, spec.for_layer(i))
    if spec is not None:
        name = register_attention()
        if model.config._attn_implementation != name:
            model.set_attn_implementation(name)


@contextmanager
def decode_equivalent(model: nn.Module, spec) -> Iterator[None]:
    """:func:`set_decode_equivalent` for the duration of a block."""
    previous = model.config._attn_implementation
    set_decode_equivalent(model, spec)
    try:
        yield
    finally:
        set_decode_equivalent(model, None)
        if previous != model.config._attn_implementation:
            model.set_attn_implementation(previous)
