"""Hooks on lowbit's attention function: per-layer modules on post-RoPE Q/K/V, attached and removed here.

The ``"lowbit"`` attention function itself (:mod:`lowbit.kv.attention`) is registered once with transformers'
``AttentionInterface`` (and the matching mask function), so no modelling code is forked or patched. An attention
module opts in by holding ``lowbit_hooks``, an ``nn.ModuleList`` of modules with
``forward(query, key, value) -> (query, key, value)`` on tensors shaped ``[batch, heads, tokens, head_dim]``; they
run in order after RoPE and after the cache update (so ``key``/``value`` cover every cached position), before the
scores are computed. KV fake-quantization is such a hook; QuaRot's online rotation of Q and K (R3) is another.

With a packed KV cache (:mod:`lowbit.kv.cache`) the cache's ``update`` returns the step's new keys and values
unpacked; the hooks run on those (KV fake-quantizers are skipped: the cache quantizes), and the cache layer attends
over its packed form. :func:`decode_equivalent` makes full-sequence forwards attend as such a cache would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..kv.attention import (
    ATTENTION_NAME,
    HOOKS_ATTR,
    PREFIX_ATTR,
    SIMULATION_ATTR,
    register_attention,
    use_lowbit_attention,
)
from .quantizer import ActQuantizer

__all__ = [
    "ATTENTION_NAME",
    "HOOKS_ATTR",
    "PREFIX_ATTR",
    "SIMULATION_ATTR",
    "KVQuantHook",
    "add_attention_hook",
    "attention_hooks",
    "decode_equivalent",
    "register_attention",
    "remove_attention_hooks",
    "set_decode_equivalent",
    "use_lowbit_attention",
]


class KVQuantHook(nn.Module):
    """Fake-quantizes keys and values (post-RoPE) with their own quantizers; queries pass unchanged.

    The first ``exact_prefix`` cached positions (a PrefixQuant prefix) stay exact. Skipped when a packed cache (or
    its decode-equivalent evaluation) stores the keys and values instead. With a ``centre``
    (:class:`~lowbit.surgery.key_centre.KeyCentre`) keys are rounded as ``k - o`` and ``o`` added back, where ``o`` is
    the RoPE-turned key centre at each cache position.
    """

    quantizes_kv = True

    def __init__(self, k_quant: ActQuantizer, v_quant: ActQuantizer, centre: nn.Module | None = None) -> None:
        super().__init__()
        self.k_quant, self.v_quant = k_quant, v_quant
        self.centre = centre
        self.exact_prefix = 0

    def quantize_part(self, quant: Callable, x, start: int = 0):
        """``quant(x)`` on the cached positions after the exact prefix; ``x`` holds positions ``start`` onwards."""
        p = min(max(self.exact_prefix - start, 0), x.shape[2])
        if p == 0:
            return quant(x)
        return torch.cat([x[:, :, :p], quant(x[:, :, p:])], dim=2) if x.shape[2] > p else x

    def forward(self, query, key, value, start: int = 0):
        """``start``: the cache position of the first token handed over (a cache that hooks each token once hands
        over only the new ones)."""
        return query, self.quantize_key(key, start), self.quantize_part(self.v_quant, value, start)

    def quantize_key(self, key, start: int = 0):
        """Keys through ``k_quant``, around the centre's offsets when there is a centre (the prefix stays exact)."""
        if self.centre is None:
            return self.quantize_part(self.k_quant, key, start)
        offsets = self.centre.offsets(torch.arange(start, start + key.shape[2], device=key.device)).to(key.dtype)

        def centred(x):
            o = offsets[:, :, offsets.shape[2] - x.shape[2]:]  # quantize_part hands over the positions after a prefix
            return self.k_quant(x - o) + o

        return self.quantize_part(centred, key, start)


def add_attention_hook(model: nn.Module, attn: nn.Module, hook: nn.Module) -> None:
    """Append ``hook`` to one attention module's hooks and switch the model to the lowbit attention function."""
    if not hasattr(attn, HOOKS_ATTR):
        attn.register_module(HOOKS_ATTR, nn.ModuleList())
    getattr(attn, HOOKS_ATTR).append(hook)
    use_lowbit_attention(model)


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
        use_lowbit_attention(model)


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
