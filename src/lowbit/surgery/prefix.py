"""PrefixQuant's prefixed KV cache: every sequence starts from the full-precision keys/values of a few prefix tokens.

The prefix (PrefixQuant's outlier tokens then BOS, see :func:`lowbit.analysis.select_prefix`) runs once through the
rotated, *unquantized* model; its keys and values are kept in full precision and every request continues from them,
so the tokens that would carry massive activations never reach a quantizer. :func:`attach_prefix` keeps them in the
model's state: the model's forward then returns logits for the caller's tokens only (perplexity on real tokens), and
``generate`` continues after the prefix and returns the prompts and new tokens only. KV fake-quantizers leave the
prefix positions exact.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from torch import nn

from ..kv.cache import PackedCache
from ..kv.hooked import HookedCache
from ..models.arch import ArchSpec, decoder_layers, get_module
from ..state import ensure_state, quant_state
from .attention import PREFIX_ATTR, attention_hooks


@torch.no_grad()
def prefix_cache(model: nn.Module, prefix: list[int]):
    """The transformers cache holding ``prefix``'s keys/values from ``model`` (batch 1)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if prefix:
        model(torch.tensor([prefix]), use_cache=True, **{cache_argument(type(model).forward): cache})
    return cache


def keep_prefix_exact(model: nn.Module, spec: ArchSpec, length: int) -> None:
    """Make every KV fake-quantizer leave the first ``length`` cached positions (the prefix) unquantized, and let
    decode-equivalent forwards of a packed cache find them before their tokens."""
    for layer in decoder_layers(model, spec):
        attn = get_module(layer, spec.attn)
        setattr(attn, PREFIX_ATTR, length)
        for hook in attention_hooks(attn):
            if getattr(hook, "quantizes_kv", False):
                hook.exact_prefix = length


def attach_prefix(model: nn.Module, spec: ArchSpec, tokens: list[int], cache) -> None:
    """Make every forward of ``model`` start from ``tokens``' full-precision keys/values (a transformers cache).

    The prefix is kept in the model's :class:`~lowbit.state.QuantState`; a forward pre-hook (PyTorch's own
    extension point, so the model stays a plain transformers model) puts it in front of every request: see
    :func:`_start_from_prefix`. KV fake-quantizers leave the prefix positions exact.
    """
    ensure_state(model).set_prefix(tokens, cache)
    restore_prefix(model, spec)


def restore_prefix(model: nn.Module, spec: ArchSpec) -> None:
    """Start every request from the prefix already held in the model's state (after :func:`attach_prefix`, or a
    load that filled the state's buffers): KV quantizers leave it exact, and the forward pre-hook prepends it."""
    keep_prefix_exact(model, spec, quant_state(model).prefix_length)
    if not any(hook is _start_from_prefix for hook in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_start_from_prefix, with_kwargs=True)


def prefix_tokens(model: nn.Module) -> list[int]:
    """The token ids every sequence of ``model`` starts from (empty without a prefix)."""
    state = quant_state(model)
    return state.prefix_tokens.tolist() if state is not None else []


@torch.no_grad()
def fill_prefix(model: nn.Module, cache, batch: int):
    """Put the prefix's keys/values (repeated for ``batch`` rows) into an empty ``cache`` and return it."""
    state = quant_state(model)
    keys = state.prefix_keys.expand(-1, batch, -1, -1, -1)
    values = state.prefix_values.expand(-1, batch, -1, -1, -1)
    if isinstance(cache, (PackedCache, HookedCache)):
        cache.start_from_prefix(keys, values)
    else:
        for i in range(keys.shape[0]):
            cache.update(keys[i].clone(), values[i].clone(), i)
    setattr(cache, PREFIX_MARK, keys.shape[3])
    return cache


PREFIX_MARK = "lowbit_prefix_length"  # set on a cache that starts with the model's prefix


@lru_cache(maxsize=None)
def cache_argument(forward) -> str:
    """The name the model's forward takes its cache under (``cache`` in newer transformers)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _start_from_prefix(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: run the request after the prefix, in the caller's coordinates.

    Without a cache (a one-pass forward, as evaluation runs) the request starts from a fresh copy of the prefix
    cache. An empty cache (what ``generate`` passes first) is filled with the prefix, becoming a packed cache when
    the model has one. For a cache holding the prefix, the caller's positions and 2D attention mask, which count
    only the caller's tokens, are shifted past the prefix. Logits are returned for the caller's tokens only.
    """
    state = quant_state(model)
    if state is None or state.prefix_length == 0:
        return None
    ids = args[0] if args else kwargs.get("input_ids")
    if ids is None:
        ids = kwargs["inputs_embeds"]
    batch, length = ids.shape[:2]
    name = cache_argument(type(model).forward)
    other = "past_key_values" if name == "cache" else "cache"
    cache = kwargs.pop(name, None)
    cache = cache if cache is not None else kwargs.pop(other, None)
    if cache is None:
        from transformers import DynamicCache

        cache = fill_prefix(model, DynamicCache(config=model.config), batch)
        kwargs["use_cache"] = True
    elif not getattr(cache, PREFIX_MARK, 0):
        if cache.get_seq_length() != 0:
            raise ValueError("a cache that does not start with the model's prefix: pass an empty cache or none")
        if state.cache_spec is not None and not isinstance(cache, PackedCache):
            cache = PackedCache.for_model(model)
        cache = fill_prefix(model, cache, batch)
    kwargs[name] = cache
    shift = state.prefix_length
    seen = cache.get_seq_length() - shift  # the caller's tokens already cached
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + shift
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape[1] == seen + length:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], shift), mask], dim=1)
    return args, kwargs
