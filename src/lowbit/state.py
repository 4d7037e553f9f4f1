"""One place for everything lowbit attaches to a model besides its quantized modules: :class:`QuantState`.

A quantized model stays the transformers model it was (``generate``, pipelines and lm-eval work on it). What lowbit
changes is of two kinds, both reachable from the model:

- modules in the model's own tree: :class:`~lowbit.surgery.linear.QuantLinear` in place of ``nn.Linear`` (quantized
  weight, scales, online input rotation, input quantizer) and each attention module's ``lowbit_hooks`` (KV
  quantizers, the online Q/K rotation); their tensors are in ``model.state_dict()``
  (:func:`lowbit.surgery.attach.quantization_parts` lists them);
- the model-level state held by one :class:`QuantState` submodule, ``model.lowbit``: the recipe, the PrefixQuant
  prefix (token ids and their full-precision keys/values, as buffers, so ``state_dict`` holds them too) and the
  packed KV cache's spec.

Saving a quantized model is then ``state_dict`` plus :meth:`QuantState.describe` and the modules' own configs.
"""

from __future__ import annotations

import torch
from torch import nn

STATE_NAME = "lowbit"  # the submodule of a quantized model that holds its QuantState


class QuantState(nn.Module):
    """The model-level part of a quantized model's state (see the module docstring).

    ``prefix_keys`` / ``prefix_values``: ``[layers, 1, kv_heads, prefix, head_dim]`` (None without a prefix);
    ``cache_spec``: the :class:`~lowbit.kv.spec.CacheSpec` of a packed KV cache, or None; ``recipe``: the recipe as
    JSON data.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("prefix_tokens", torch.zeros(0, dtype=torch.long))
        self.register_buffer("prefix_keys", None)
        self.register_buffer("prefix_values", None)
        self.cache_spec = None
        self.recipe: dict | None = None

    @property
    def prefix_length(self) -> int:
        return int(self.prefix_tokens.numel())

    def set_prefix(self, tokens: list[int], cache) -> None:
        """Keep ``tokens`` and their keys/values from a transformers cache (batch 1) as buffers."""
        self.prefix_tokens = torch.tensor(list(tokens), dtype=torch.long)
        if tokens:
            self.prefix_keys = torch.stack([layer.keys for layer in cache.layers])
            self.prefix_values = torch.stack([layer.values for layer in cache.layers])

    def describe(self) -> dict:
        """The JSON-serialisable part: recipe, prefix token ids, whether a packed cache is attached."""
        return {"recipe": self.recipe, "prefix_tokens": self.prefix_tokens.tolist(),
                "packed_kv_cache": self.cache_spec is not None}

    def extra_repr(self) -> str:
        name = (self.recipe or {}).get("name", "?")
        return f"recipe={name}, prefix={self.prefix_tokens.tolist()}, packed_cache={self.cache_spec is not None}"


def quant_state(model: nn.Module) -> QuantState | None:
    """The model's :class:`QuantState`, or None for a model lowbit has not quantized."""
    state = getattr(model, STATE_NAME, None)
    return state if isinstance(state, QuantState) else None


def ensure_state(model: nn.Module) -> QuantState:
    """The model's :class:`QuantState`, created (empty) on first use."""
    state = quant_state(model)
    if state is None:
        state = QuantState()
        model.add_module(STATE_NAME, state)
    return state
