"""The tensors of a GGUF file from a quantized lowbit model: names, block packing, llama.cpp's q/k row order.

A quantized linear or embedding table whose scheme lies on a GGML block grid (blocks of 32 along each row, float16
scales; see :mod:`lowbit.quant.ggml`) is written as those blocks, holding lowbit's own codes (GPTQ's, not a
re-rounding): the codes are recovered from the fake-quant weight and checked to give it back bit for bit. Norms and
biases are F32, other matrices F16 or F32. llama.cpp's ``llama`` architecture applies RoPE to interleaved pairs,
so (like its converter) the rows of q and k are permuted from Hugging Face's rotate-half order, per head.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import gguf
import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ArtifactError
from ..models.arch import ArchSpec, decoder_layers, get_module
from ..quant.ggml import BLOCK, LAYOUTS, pack_blocks
from ..schemes import QuantScheme

T = gguf.MODEL_TENSOR
ROLE_TENSORS = {"q": T.ATTN_Q, "k": T.ATTN_K, "v": T.ATTN_V, "o": T.ATTN_OUT,
                "gate": T.FFN_GATE, "up": T.FFN_UP, "down": T.FFN_DOWN}
FLOAT_TYPES = ("F16", "F32")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as the writer takes it: numpy data (bytes ``[N, row_bytes]`` for blocks) and its block type."""

    name: str
    data: np.ndarray
    block: str | None = None  # "Q4_0", "Q8_0", ...; None: float data written in its own dtype

    @property
    def raw_dtype(self) -> gguf.GGMLQuantizationType | None:
        return None if self.block is None else gguf.GGMLQuantizationType[self.block]


def fits(scheme: QuantScheme | None, block: str) -> bool:
    """Whether weights quantized with ``scheme`` lie on ``block``'s grid: symmetric integer codes of at most its
    bits (Q4_0, Q8_0), groups of 32 along the row and float16 scales."""
    if scheme is None or not scheme.format.startswith("int") or not scheme.symmetric:
        return False
    layout = LAYOUTS[block]
    on_blocks = scheme.granularity == "group" and scheme.group_size == BLOCK and scheme.scale_dtype == "float16"
    return on_blocks and not layout.has_min and scheme.bits <= layout.bits


def smallest_block(scheme: QuantScheme | None) -> str | None:
    """The smallest block type whose grid holds ``scheme``'s weights, or None (written as floats)."""
    return next((b for b in ("Q4_0", "Q8_0") if fits(scheme, b)), None)


def block_codes(module: nn.Module, block: str, what: str) -> tuple[Tensor, Tensor]:
    """Integer codes ``[N, K]`` and float16-valued scales ``[N, K / 32]`` of a fake-quant module's weight, checked
    to dequantize to exactly that weight (else an :class:`ArtifactError` naming ``what``)."""
    w = module.weight.detach().to(torch.float32)
    n, k = w.shape
    scale = module.weight_scale.detach().to(torch.float32).reshape(n, k // BLOCK, 1)
    codes = torch.round(w.reshape(n, k // BLOCK, BLOCK) / scale)
    layout = LAYOUTS[block]
    exact_scales = torch.equal(scale.to(torch.float16).to(torch.float32), scale)
    in_range = bool(codes.numel() == 0 or (codes.min() >= layout.qmin and codes.max() <= layout.qmax))
    if not (exact_scales and in_range and torch.equal(codes * scale, w.reshape(n, k // BLOCK, BLOCK))):
        raise ArtifactError(f"{what}'s weight is not exactly on the {block} grid (a scale that is not a float16, or a "
                            "weight trained or cast after rounding): quantize it with a gguf-* recipe in float32")
    return codes.reshape(n, k).to(torch.int32), scale.reshape(n, k // BLOCK)


def rope_rows(t: Tensor, heads: int) -> Tensor:
    """Rows of a q or k projection (``[heads * head_dim, ...]``) from Hugging Face's rotate-half order to llama.cpp's
    interleaved pairs: per head, row ``i`` of the first half and row ``i`` of the second become rows ``2i, 2i+1``
    (convert_hf_to_gguf's ``permute``)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _float(name: str, t: Tensor, float_type: str) -> GGUFTensor:
    """A float tensor: 1-D ones (norms, biases) always F32 as llama.cpp needs, matrices in ``float_type``."""
    dtype = np.float32 if t.ndim == 1 or float_type == "F32" else np.float16
    return GGUFTensor(name, t.detach().to(torch.float32).numpy().astype(dtype))


def matrix(name: str, module: nn.Module, block: str | None, float_type: str, heads: int | None = None) -> GGUFTensor:
    """A weight matrix as ``block`` blocks of its own codes (None: as floats), rows put in llama.cpp's RoPE order
    when ``heads`` is given."""
    order = (lambda t: rope_rows(t, heads)) if heads else (lambda t: t)
    if block is None:
        return _float(name, order(module.weight.detach()), float_type)
    codes, scale = block_codes(module, block, name)
    return GGUFTensor(name, pack_blocks(block, order(codes), order(scale)).numpy(), block)


def _is_tied(model: nn.Module, spec: ArchSpec) -> bool:
    """Whether lm_head computes with the embedding table's values: the same tensor, or (a tied model whose table
    and head were quantized apart with one scheme) an equal one. llama.cpp then reuses ``token_embd`` and the
    file holds the matrix once."""
    head, embed = get_module(model, spec.lm_head).weight, get_module(model, spec.embed).weight
    return head is embed or (head.shape == embed.shape and torch.equal(head.detach(), embed.detach()))


def model_tensors(model: nn.Module, spec: ArchSpec, block: str | None, float_type: str,
                  permute_qk: bool) -> Iterator[GGUFTensor]:
    """Every tensor of the GGUF in llama.cpp's names: the decoder linears as ``block`` (None: all matrices as
    ``float_type``), the embedding table and an untied lm_head in the smallest block type their own schemes fit
    (else floats), norms and biases F32."""
    fit = smallest_block if block is not None else (lambda scheme: None)
    config = model.config
    heads = {"q": config.num_attention_heads, "k": config.num_key_value_heads} if permute_qk else {}
    embed = get_module(model, spec.embed)
    yield matrix(gguf.TENSOR_NAMES[T.TOKEN_EMBD] + ".weight", embed,
                 fit(getattr(embed, "weight_scheme", None)), float_type)
    for i, layer in enumerate(decoder_layers(model, spec)):
        blk = {t: gguf.TENSOR_NAMES[t].format(bid=i) for t in (*ROLE_TENSORS.values(), T.ATTN_NORM, T.FFN_NORM)}
        yield _float(blk[T.ATTN_NORM] + ".weight", get_module(layer, spec.input_norm).weight, float_type)
        for role, path in spec.linear_roles.items():
            linear = get_module(layer, path)
            yield matrix(blk[ROLE_TENSORS[role]] + ".weight", linear, block, float_type, heads.get(role))
            if linear.bias is not None:
                bias = linear.bias.detach()
                yield _float(blk[ROLE_TENSORS[role]] + ".bias", rope_rows(bias, heads[role]) if role in heads
                             else bias, float_type)
        yield _float(blk[T.FFN_NORM] + ".weight", get_module(layer, spec.post_attn_norm).weight, float_type)
    yield _float(gguf.TENSOR_NAMES[T.OUTPUT_NORM] + ".weight", get_module(model, spec.final_norm).weight, float_type)
    if not _is_tied(model, spec):
        head = get_module(model, spec.lm_head)
        yield matrix(gguf.TENSOR_NAMES[T.OUTPUT] + ".weight", head,
                     fit(getattr(head, "weight_scheme", None)), float_type)
