"""Packed KV caches: codecs (int, KIVI, QJL, rotated codebook) and attention over the packed form.

``PackedCache.for_model(model)`` is the cache a model quantized with a ``kv_cache`` recipe decodes with;
:class:`CacheSpec` and the codecs build one by hand. The cache classes import transformers, so they load on
first use.
"""

from .codecs import IntCodec, Packed, QJLKeyCodec, TurboCodec
from .spec import CacheSpec

__all__ = ["CacheSpec", "IntCodec", "Packed", "PackedCache", "QJLKeyCodec", "TurboCodec", "cache_bits"]


def __getattr__(name: str):
    if name in ("PackedCache", "cache_bits"):
        from . import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'lowbit.kv' has no attribute {name!r}")
