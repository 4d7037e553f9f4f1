"""Real low-bit execution of quantized linears (layer 5: imports surgery, quant, schemes, errors).

- :mod:`.kernels` — pure tensor ops: codes in and out of their stored form, activation codes, PyTorch's CPU low-bit
  matmuls with their constraints.
- :mod:`.linear` — :class:`IntLinear`, :class:`WeightOnlyLinear`, :class:`Fp8Linear` (one per kind, chosen by the
  schemes with :func:`kernel_class`); their ``state_dict`` is the on-disk format, :meth:`RuntimeLinear.prepare` builds
  kernel layouts after loading; :func:`to_runtime` / :func:`convert` turn fake-quant layers into them.
- :mod:`.fused` — siblings that read one input (q/k/v, gate/up) run as one combined module: one activation
  quantization and one GEMM per group (:func:`fuse_groups`); the stored tensors stay per linear (row views).
- :mod:`.embedding` — :class:`RuntimeEmbedding`, a quantized token embedding table kept as codes and scales (the same
  on-disk names as a linear's weight); a lookup dequantizes the requested rows only.
"""

from .embedding import (
    RuntimeEmbedding,
    convert_embeddings,
    quant_embedding_state,
    to_quant_embedding,
    to_runtime_embedding,
)
from .fused import SharedRun, fuse_groups
from .linear import (
    Fp8Linear,
    IntLinear,
    RuntimeLinear,
    WeightOnlyLinear,
    convert,
    kernel_class,
    quant_linear_state,
    to_runtime,
)

__all__ = ["Fp8Linear", "IntLinear", "RuntimeEmbedding", "RuntimeLinear", "SharedRun", "WeightOnlyLinear", "convert",
           "convert_embeddings", "fuse_groups", "kernel_class", "quant_embedding_state", "quant_linear_state", "to_quant_embedding",
           "to_runtime", "to_runtime_embedding"]
