"""Honest bit accounting: average stored bits per weight, activation and KV element, overheads included.

Conventions (stated so the numbers can be checked by hand):
- Unquantized tensors count 16 bits per element (a bf16/fp16 deployment), whatever dtype they are evaluated in.
- Every scale costs 16 bits (8 for the MX ``e8m0`` and NVFP4 ``float8_e4m3`` scale types, whose per-tensor float32
  scale adds 32 bits per weight); an asymmetric integer zero-point costs as many bits as the format.
- ``weight``: over every linear weight inside the decoder layers (quantized or not).
  ``weight_all``: over every parameter of the model (embeddings, norms and lm_head included; tied weights once); a
  quantized embedding table counts its codes and scales as a quantized linear weight does.
- ``activation``: over the inputs of every linear inside the decoder layers, weighted by their width. A dynamic
  per-token scale is paid once per token and group; static scales are fixed per model and count as zero per element.
- ``kv``: per key/value element of the cache; per-token-per-head scales are paid once per token, head and group.
"""

from __future__ import annotations

import math

from torch import nn

from .models.arch import ArchSpec, decoder_layers, get_module
from .quant import IntFormat
from .schemes import SCALE_BITS as SCHEME_SCALE_BITS
from .schemes import QuantScheme

FP_BITS = 16.0
SCALE_BITS = 16.0


def param_overhead_bits(scheme: QuantScheme) -> float:
    """Bits stored per scale: the scale itself (16, or 8 for the MX / NVFP4 scale types) plus an integer zero-point
    when asymmetric."""
    fmt = scheme.number_format()
    zero = fmt.bits if isinstance(fmt, IntFormat) and not fmt.symmetric else 0
    return SCHEME_SCALE_BITS.get(scheme.scale_dtype, SCALE_BITS) + zero


def runtime_bits_per_element(scheme: QuantScheme | None, row_width: int) -> float:
    """Average bits per element of an activation or KV row of ``row_width`` elements quantized with ``scheme``."""
    if scheme is None:
        return FP_BITS
    if not scheme.dynamic or scheme.granularity == "tensor":
        return float(scheme.bits)
    groups = math.ceil(row_width / scheme.group_size) if scheme.granularity == "group" else 1
    return scheme.bits + groups * param_overhead_bits(scheme) / row_width


def _linear_weight_bits(module: nn.Module) -> tuple[float, int]:
    """(total bits, element count) stored for one linear's weight (or a quantized embedding table's)."""
    if hasattr(module, "num_embeddings"):
        numel = module.num_embeddings * module.embedding_dim
    else:
        numel = module.in_features * module.out_features  # a real low-bit module holds packed codes, not ``weight``
    scheme = getattr(module, "weight_scheme", None)
    if scheme is None:
        return FP_BITS * numel, numel
    tensor_scale = 32.0 if scheme.scale_dtype == "float8_e4m3" else 0.0
    return scheme.bits * numel + module.weight_scale.numel() * param_overhead_bits(scheme) + tensor_scale, numel


def _decoder_linears(model: nn.Module, spec: ArchSpec) -> list[nn.Module]:
    return [get_module(layer, path) for layer in decoder_layers(model, spec) for path in spec.linear_roles.values()]


def weight_bits(model: nn.Module, spec: ArchSpec) -> dict[str, float]:
    """Average stored bits per weight over the decoder linears, and over every parameter of the model."""
    linears = _decoder_linears(model, spec)
    total, count = map(sum, zip(*(_linear_weight_bits(m) for m in linears)))
    quantized = [m for m in model.modules() if getattr(m, "weight_scheme", None) is not None]
    all_bits, all_count = map(sum, zip((0.0, 0), *(_linear_weight_bits(m) for m in quantized)))
    inside = {id(t) for m in quantized for t in (getattr(m, "weight", None),) if t is not None}
    for p in {id(p): p for p in model.parameters()}.values():
        if id(p) not in inside:
            all_bits, all_count = all_bits + FP_BITS * p.numel(), all_count + p.numel()
    return {"weight": total / count, "weight_all": all_bits / all_count}


def activation_bits(model: nn.Module, spec: ArchSpec) -> float:
    """Average bits per linear-input element over the decoder linears, weighted by input width."""
    total = count = 0.0
    for m in _decoder_linears(model, spec):
        quant = getattr(m, "input_quant", None)
        scheme = quant.scheme if quant is not None else getattr(m, "input_scheme", None)
        total += runtime_bits_per_element(scheme, m.in_features) * m.in_features
        count += m.in_features
    return total / count


def kv_bits(scheme: QuantScheme | None, head_dim: int) -> float:
    """Average bits per cached key/value element."""
    return runtime_bits_per_element(scheme, head_dim)
