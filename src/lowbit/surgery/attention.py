"""The ``"lowbit"`` attention function: per-layer hooks on post-RoPE Q/K/V, then transformers' own kernel.

Registered once with transformers' ``AttentionInterface`` (and the matching mask function), so no modelling code is
forked or patched. An attention module opts in by holding ``lowbit_hooks``, an ``nn.ModuleList`` of modules with
``forward(query, key, value) -> (query, key, value)`` on tensors shaped ``[batch, heads, tokens, head_dim]``; they
run in order after RoPE and after the cache update (so ``key``/``value`` cover every cached position), before the
scores are computed. KV quantization is such a hook; online rotations of Q and K will be another.
"""

from __future__ import annotations

from torch import nn

from .quantizer import ActQuantizer

ATTENTION_NAME = "lowbit"
HOOKS_ATTR = "lowbit_hooks"


class KVQuantHook(nn.Module):
    """Fake-quantizes keys and values (post-RoPE) with their own quantizers; queries pass unchanged."""

    def __init__(self, k_quant: ActQuantizer, v_quant: ActQuantizer) -> None:
        super().__init__()
        self.k_quant, self.v_quant = k_quant, v_quant

    def forward(self, query, key, value):
        return query, self.k_quant(key), self.v_quant(value)


def _lowbit_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for hook in getattr(module, HOOKS_ATTR, ()):
        query, key, value = hook(query, key, value)
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


def attention_hooks(attn: nn.Module) -> list[nn.Module]:
    """The hooks attached to one attention module (empty when none)."""
    return list(getattr(attn, HOOKS_ATTR, ()))
