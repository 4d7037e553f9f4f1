"""PrefixQuant's prefixed KV cache: every sequence starts from the full-precision keys/values of a few prefix tokens.

The prefix (PrefixQuant's outlier tokens then BOS, see :func:`lowbit.analysis.select_prefix`) runs once through the
rotated, *unquantized* model; its keys and values are kept in full precision and every request continues from them,
so the tokens that would carry massive activations never reach a quantizer. :class:`PrefixedModel` wraps a quantized
model with that cache: its forward returns logits for the caller's tokens only (perplexity on real tokens), and
``generate`` continues after the prefix. KV fake-quantizers leave the prefix positions exact.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..data import prepend_tokens
from ..kv.cache import SPEC_ATTR, PackedCache
from ..models.arch import ArchSpec, decoder_layers, get_module
from .attention import PREFIX_ATTR, attention_hooks


@torch.no_grad()
def prefix_cache(model: nn.Module, prefix: list[int]):
    """The transformers cache holding ``prefix``'s keys/values from ``model`` (batch 1)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if prefix:
        model(torch.tensor([prefix]), past_key_values=cache, use_cache=True)
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


class PrefixedModel(nn.Module):
    """A model that starts every sequence from a full-precision prefix cache.

    ``forward(input_ids)`` returns the outputs for ``input_ids`` only, the prefix coming first in every row;
    ``generate`` continues prompts after the prefix and returns the prompts and new tokens (no prefix).
    """

    def __init__(self, model: nn.Module, prefix: list[int], cache) -> None:
        super().__init__()
        self.model = model
        self.prefix = list(prefix)
        self._cache = cache

    @property
    def config(self):
        return self.model.config

    @property
    def device(self):
        return self.model.device

    def __getattr__(self, name: str):
        if name == SPEC_ATTR:  # a packed KV cache's spec lives on the wrapped model (bit accounting, generate)
            return getattr(self.model, SPEC_ATTR)
        return super().__getattr__(name)

    def get_submodule(self, target: str) -> nn.Module:
        """Paths resolve inside the wrapped model, so architecture specs (``model.layers``...) apply unchanged."""
        return self.model.get_submodule(target) if target else self

    def _cache_for(self, batch: int):
        cache = copy.deepcopy(self._cache)
        if batch > 1 and self.prefix:
            cache.batch_repeat_interleave(batch)
        return cache

    def _mask(self, attention_mask: Tensor | None, input_ids: Tensor) -> Tensor | None:
        if attention_mask is None or not self.prefix:
            return attention_mask
        ones = attention_mask.new_ones(input_ids.shape[0], len(self.prefix))
        return torch.cat([ones, attention_mask], dim=1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs):
        kwargs.pop("use_cache", None)
        kwargs.pop("past_key_values", None)
        return self.model(input_ids, attention_mask=self._mask(attention_mask, input_ids),
                          past_key_values=self._cache_for(input_ids.shape[0]), use_cache=True, **kwargs)

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        """Greedy/sampled continuation of ``input_ids`` after the prefix (the prefix is not in the result)."""
        if not self.prefix:
            return self.model.generate(input_ids, attention_mask=attention_mask, **kwargs)
        full = prepend_tokens(self.prefix, input_ids)
        cache = self._cache_for(input_ids.shape[0])
        if hasattr(self.model, SPEC_ATTR):  # a packed KV cache: the prefix is its exact sink
            cache = PackedCache.with_prefix(self.model, cache)
        out = self.model.generate(full, attention_mask=self._mask(attention_mask, input_ids),
                                  past_key_values=cache, **kwargs)
        return out[:, len(self.prefix):]
