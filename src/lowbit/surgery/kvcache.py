"""Give a model its packed KV cache (a recipe's ``kv_cache``), calibrating static per-head scales when asked."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch
from torch import nn

from ..kv.config import KVCacheConfig
from ..kv.static import KVRangeHook
from ..models.arch import ArchSpec, decoder_layers, get_module, head_dim
from ..state import ensure_state, quant_state
from .attention import (
    KVQuantHook,
    add_attention_hook,
    attention_hooks,
    remove_attention_hooks,
    set_decode_equivalent,
)
from .key_centre import attach_key_centres, key_centres_for
from .prefix import cache_argument
from .rotate import QKRotationHook


@torch.no_grad()
def calibrate_kv_ranges(model: nn.Module, arch: ArchSpec, config: KVCacheConfig, batches: torch.Tensor) -> list[dict]:
    """Per-layer key/value ranges over the calibration batches ``[n, L]``, seen where the cache would store them.

    The recorders run last among each attention module's hooks, so keys are measured after any online rotation;
    with a PrefixQuant prefix, requests run after it and its exactly stored positions are not recorded.
    """
    d = head_dim(model.config)
    channels = [c.channels_per_scale(d) if getattr(c, "static", False) else d for c in (config.keys, config.values)]
    attns = [get_module(layer, arch.attn) for layer in decoder_layers(model, arch)]
    state = quant_state(model)
    skip = state.prefix_length if state is not None else 0
    hooks = [KVRangeHook(*channels, name=f"layer {i}", skip=skip) for i in range(len(attns))]
    for attn, hook in zip(attns, hooks, strict=True):
        add_attention_hook(model, attn, hook)
    try:
        for row in batches:
            model(row.unsqueeze(0), use_cache=False)
    finally:
        for attn, hook in zip(attns, hooks, strict=True):
            remove_attention_hooks(attn, lambda h, ours=hook: h is ours)
    return [hook.ranges() for hook in hooks]


def attach_packed_cache(model: nn.Module, spec) -> None:
    """Give the model a packed KV cache: one-pass forwards evaluate it decode-equivalently, and
    ``PackedCache.for_model(model)`` builds the cache to decode with (the spec is kept in the model's state)."""
    ensure_state(model).cache_spec = spec
    set_decode_equivalent(model, spec)


@contextmanager
def packed_cache_suspended(model: nn.Module) -> Iterator[None]:
    """Full-sequence forwards attend over exact keys and values for the duration of a block, when ``model`` has a
    packed cache (its codes have no gradient to train through); the cache applies again after."""
    state = quant_state(model)
    spec = state.cache_spec if state is not None else None
    if spec is None:
        yield
        return
    set_decode_equivalent(model, None)
    try:
        yield
    finally:
        set_decode_equivalent(model, spec)


def apply_kv_cache(model: nn.Module, arch: ArchSpec, config: KVCacheConfig, calibration) -> None:
    """Attach the recipe's packed cache, calibrating its static scales first when it has any; with a
    ``key_centre``, give the attention modules their key centres first (``mean``: measured on ``calibration()``)."""
    if config.key_centre:
        attach_key_centres(model, arch, key_centres_for(model, arch, config.key_centre, calibration), cache=True)
    if not config.static:
        attach_packed_cache(model, config.spec())
        return
    if calibration is None:
        from ..errors import CalibrationError

        raise CalibrationError("this kv_cache has static scales and needs calibration data: pass some")
    attach_packed_cache(model, config.spec(calibrate_kv_ranges(model, arch, config, calibration())))


def hooks_work_per_token(model: nn.Module) -> bool:
    """Whether every attention hook of ``model`` treats each token on its own (KV fake quantizers with per-token or
    static scales, an exact prefix included; R3 rotations) and there is at least one: then hooking each token once,
    as it enters the cache, gives what hooking the whole cache at every step gives
    (:class:`~lowbit.kv.hooked.HookedCache`)."""

    def per_token(hook: nn.Module) -> bool:
        if isinstance(hook, QKRotationHook):
            return True
        if type(hook) is not KVQuantHook:
            return False
        return all(q.static or q.scheme.granularity != "tensor" for q in (hook.k_quant, hook.v_quant))

    hooks = [h for m in model.modules() for h in attention_hooks(m)]
    return bool(hooks) and all(per_token(h) for h in hooks)


def decode_cache(model: nn.Module):
    """The cache a model decodes with: its packed KV cache when it has one; a :class:`~lowbit.kv.hooked.HookedCache`
    when its attention hooks work token by token (the same keys and values, hooked once instead of at every step;
    a prefix is put in front when the model's forward first meets the empty cache); else None (transformers'
    default)."""
    state = quant_state(model)
    if state is None or state.cache_spec is None:
        if hooks_work_per_token(model):
            from ..kv.hooked import HookedCache

            return HookedCache(model)
        return None
    from ..kv.cache import PackedCache

    return PackedCache.for_model(model)


class DecodesWithLowbitCache:
    """Mixin of a quantized model's class: ``generate`` given no cache decodes with :func:`decode_cache`'s (what
    ``lowbit generate`` uses): a packed KV cache where the recipe has one (else the KV cache would stay full
    precision), a :class:`~lowbit.kv.hooked.HookedCache` where the hooks work token by token. A cache the caller
    passes, or ``use_cache=False``, is left as it is; ``forward`` is unchanged."""

    def generate(self, *args, **kwargs):
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None and kwargs.get("use_cache", True):
            cache = decode_cache(self)
            if cache is not None:
                kwargs[cache_argument(type(self).forward)] = cache
        return super().generate(*args, **kwargs)


@lru_cache(maxsize=None)
def _decoding_class(cls: type) -> type:
    return type(cls.__name__, (DecodesWithLowbitCache, cls), {"__module__": cls.__module__, "__doc__": cls.__doc__})


def use_decode_cache(model: nn.Module) -> None:
    """Make ``model.generate`` use :func:`decode_cache`'s cache (:class:`DecodesWithLowbitCache`); idempotent. The
    model's class becomes a subclass of the same name, so ``isinstance``, ``save_pretrained``'s architecture name
    and every method stay as they were."""
    if not isinstance(model, DecodesWithLowbitCache):
        model.__class__ = _decoding_class(type(model))
