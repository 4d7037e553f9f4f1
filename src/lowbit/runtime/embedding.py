"""A real low-bit token embedding table: the lookup of a fake-quant
:class:`~lowbit.surgery.embedding.QuantEmbedding`, with the table kept in its stored form.

Persistent tensors (the on-disk format, the same names and conventions as a quantized linear's weight in
:mod:`lowbit.runtime.linear`, rows = tokens): ``weight_packed`` int32 ``[V, ceil(D*b/32)]`` + ``weight_shape`` int64
``[2]`` (int weights below 8 bits), or ``weight`` int8 / float8 ``[V, D]``; ``weight_scale`` float32 ``[V, 1]`` /
``[V, ceil(D/g)]`` / ``[1]`` (per token / group / tensor); ``weight_zero_point`` int32, same shape, asymmetric only.
A lookup gathers the requested rows' codes and scales and dequantizes those rows only, in float32 then the model
dtype, exactly as the fake-quant table was dequantized: nothing is built by :meth:`RuntimeEmbedding.prepare`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..quant import QParams, granule_shape
from ..schemes import QuantScheme
from ..surgery.embedding import QuantEmbedding
from ..surgery.offload import carry_hook
from ..surgery.quantizer import granularity_for
from . import kernels as K
from .linear import scale_values, stored_codes, weight_buffers, weight_state


class RuntimeEmbedding(nn.Module):
    """A quantized embedding table ``[num_embeddings, embedding_dim]`` held as codes and scales.

    Build one with :meth:`empty` (on ``meta``, for a loader: ``load_state_dict(sd, assign=True)`` then
    :meth:`prepare`) or :func:`to_runtime_embedding` from the fake-quant module.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, weight_scheme: QuantScheme,
                 dtype: torch.dtype = torch.float32, padding_idx: int | None = None,
                 device: torch.device | str = "meta") -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.weight_scheme, self.dtype, self.prepared = weight_scheme, dtype, False
        self.bits = weight_scheme.number_format().bits
        self.group = weight_scheme.group_size if weight_scheme.granularity == "group" else embedding_dim
        for name, tensor in weight_buffers(num_embeddings, embedding_dim, weight_scheme, device).items():
            self.register_buffer(name, tensor)

    @classmethod
    def empty(cls, num_embeddings: int, embedding_dim: int, weight_scheme: QuantScheme,
              dtype: torch.dtype = torch.float32, padding_idx: int | None = None) -> RuntimeEmbedding:
        """An unfilled table on ``meta``."""
        return cls(num_embeddings, embedding_dim, weight_scheme, dtype, padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight={self.weight_scheme.describe()}"

    def prepare(self) -> RuntimeEmbedding:
        """Nothing to build (a lookup reads the stored form); marks the loaded table ready. Returns self."""
        self.prepared = True
        return self

    def rows(self, ids: Tensor) -> Tensor:
        """The dequantized rows ``[n, embedding_dim]`` of the token ids ``[n]``, in the model dtype."""
        codes = stored_codes(self, self.embedding_dim, ids)
        s, z = scale_values(self), getattr(self, "weight_zero_point", None)
        if s.dim() == 1:  # per tensor
            s, z = s.reshape(1, 1), None if z is None else z.reshape(1, 1)
        else:
            s, z = s.index_select(0, ids), None if z is None else z.index_select(0, ids)
        return K.dequantize_weight(codes, s, z, self.group, self.dtype)

    def forward(self, ids: Tensor) -> Tensor:
        if not self.prepared:
            raise RuntimeError("RuntimeEmbedding.prepare() must run after its tensors are loaded")
        return self.rows(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)


def quant_embedding_state(embedding: QuantEmbedding) -> dict[str, Tensor]:
    """The persistent tensors (on-disk format) of the runtime table for the fake-quant ``embedding``."""
    if embedding.weight_scheme is None:
        raise ValueError(f"{embedding.extra_repr()}: the table is not quantized")
    return weight_state(embedding)


def to_runtime_embedding(embedding: QuantEmbedding) -> RuntimeEmbedding:
    """A prepared runtime table looking up what the fake-quant ``embedding`` looks up, built as a loader builds it."""
    module = RuntimeEmbedding.empty(embedding.num_embeddings, embedding.embedding_dim, embedding.weight_scheme,
                                    embedding.weight.dtype, embedding.padding_idx)
    module.load_state_dict(quant_embedding_state(embedding), assign=True)
    return module.prepare()


def to_quant_embedding(table: RuntimeEmbedding) -> QuantEmbedding:
    """The fake-quant :class:`QuantEmbedding` of a loaded runtime table (its table dequantized once, in the model
    dtype): exactly the module the table was saved from."""
    scheme, shape = table.weight_scheme, (table.num_embeddings, table.embedding_dim)
    with torch.device("meta"):
        embedding = QuantEmbedding(nn.Embedding(*shape, padding_idx=table.padding_idx))
    granules = granule_shape(shape, granularity_for(scheme, "weight"))
    zero = getattr(table, "weight_zero_point", None)
    zero = None if zero is None else (zero.float() + K.offset(table.bits)).reshape(granules)
    w_hat = table.rows(torch.arange(table.num_embeddings))
    embedding.weight = nn.Parameter(w_hat, requires_grad=False)
    embedding.set_quantized_weight(w_hat, QParams(scale_values(table).reshape(granules), zero), scheme)
    return embedding


def convert_embeddings(model: nn.Module) -> nn.Module:
    """Replace every quantized :class:`QuantEmbedding` of ``model`` by its runtime table, in place; returns ``model``."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantEmbedding) and m.weight_scheme]
    for name, embedding in found:
        table = to_runtime_embedding(embedding)
        parent, _, child = name.rpartition(".")
        carry_hook(embedding, table)
        setattr(model.get_submodule(parent) if parent else model, child, table)
    return model
