"""Model surgery: the only code in lowbit that mutates modules.

- :mod:`.quantizer` — :class:`ActQuantizer`, a module that fake-quantizes a tensor with a scheme (dynamic or static).
- :mod:`.linear` — :class:`QuantLinear`, the replacement for ``nn.Linear`` with quantized weights and inputs.
- :mod:`.embedding` — :class:`QuantEmbedding`, the replacement for ``nn.Embedding`` with a quantized table.
- :mod:`.attention` — the ``"lowbit"`` attention function registered with transformers, which runs per-layer hooks on
  post-RoPE queries, keys and values (KV quantization here; online rotations later) before the stock kernel.
- :mod:`.apply` — applying a recipe's schemes to a model described by an :class:`~lowbit.models.arch.ArchSpec`.
"""
