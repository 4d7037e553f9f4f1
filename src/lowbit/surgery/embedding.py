"""``QuantEmbedding``: a token embedding table whose rows are quantized (the fake-quant counterpart of
:class:`lowbit.runtime.embedding.RuntimeEmbedding`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from ..quant import QParams
from ..schemes import QuantScheme
from .linear import round_to_nearest


class QuantEmbedding(nn.Module):
    """Drop-in replacement for ``nn.Embedding`` whose table ``[num_embeddings, embedding_dim]`` is quantized.

    As in :class:`~lowbit.surgery.linear.QuantLinear`, ``weight`` holds the dequantized values of the quantized table
    (a lookup returns exactly what a low-bit table returns) and ``weight_scale`` / ``weight_zero`` the quantization
    parameters a packed table stores: one row per token, so ``channel`` means a scale per token and ``group`` scales
    per ``group_size`` consecutive elements of a row.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        if type(embedding) is not nn.Embedding or embedding.max_norm is not None:
            raise ModelError(f"{type(embedding).__name__} is not a plain nn.Embedding lookup: lowbit quantizes plain "
                             "embedding tables only; leave `embeddings` unset for this model")
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight = embedding.weight
        self.weight_scheme: QuantScheme | None = None
        self.register_buffer("weight_scale", None)
        self.register_buffer("weight_zero", None)

    def extra_repr(self) -> str:
        w = self.weight_scheme.describe() if self.weight_scheme else "fp"
        return f"{self.num_embeddings}, {self.embedding_dim}, weight={w}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)

    @torch.no_grad()
    def quantize_weight_rtn(self, scheme: QuantScheme) -> None:
        """Round every row of the table to nearest on the scheme's grid (as a linear weight's rows), in float32."""
        self.set_quantized_weight(*round_to_nearest(self.weight, scheme), scheme)

    @torch.no_grad()
    def set_quantized_weight(self, w_hat: torch.Tensor, qparams: QParams, scheme: QuantScheme) -> None:
        """Install an already-quantized table and its quantization parameters."""
        self.weight.data.copy_(w_hat.to(self.weight.dtype))
        self.weight_scale, self.weight_zero = qparams.scale, qparams.zero_point
        self.weight_scheme = scheme
