"""lowbit's quantization schemes as compressed-tensors schemes, and one quantized linear's tensors in their layout.

A scheme maps when a compressed-tensors format stores it exactly and a vLLM scheme reads that format:

==========================================  ===================  ===========================================
lowbit weights x activations                format               vLLM scheme
==========================================  ===================  ===========================================
int2..int8 channel/group x float            ``pack-quantized``   WNA16 (kernels for 4 and 8 bits)
int8 channel sym x int8 token dyn           ``int-quantized``    W8A8Int8 (also static per-tensor input)
int4 channel/group sym x int8 token dyn     ``int-quantized``    W4A8Int
int channel/group x int4 sym token dyn      ``pack-quantized``   WNA4Int (W4A4, recent vLLM's Humming kernel)
fp8_e4m3 channel/tensor x none or fp8 (*)   ``float-quantized``  W8A8Fp8 / W8A16Fp8
==========================================  ===================  ===========================================

(*) fp8 activations dynamic per token or static symmetric per tensor. Anything else raises
:class:`~lowbit.errors.ArtifactError` naming the nearest scheme that maps. Conventions: compressed-tensors decodes
``(q - zero_point) * scale`` with signed ``q`` and ``zero_point``, which is lowbit's ``(c - z) * s`` with both shifted
by ``2^(b-1)``, so every weight decodes to exactly lowbit's quantized weight (scales are stored in the model's dtype,
as the package expects: exact for float32 models). Dynamic activation scales are computed by the runtime (vLLM:
int8 absmax/127 per token, as lowbit; transformers' CPU fake-quant: absmax/127.5).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ArtifactError
from ..quant import FloatFormat, pack_int32
from ..runtime import kernels as K
from ..schemes import QuantScheme

FALLBACK = "or save it for lowbit's own runtime with `lowbit quantize --save`"
PACKED, INT, FLOAT = "pack-quantized", "int-quantized", "float-quantized"


def _refuse(path: str, what: str, instead: str) -> ArtifactError:
    return ArtifactError(f"{path}: {what} has no compressed-tensors/vLLM equivalent; {instead}, {FALLBACK}")


def _args(scheme: QuantScheme, weight: bool) -> dict:
    """compressed-tensors ``QuantizationArgs`` fields for a lowbit scheme (a weight's scales are static)."""
    fp = isinstance(scheme.number_format(), FloatFormat)
    strategy = {"head": "attn_head"}.get(scheme.granularity, scheme.granularity)
    args = {"num_bits": scheme.bits, "type": "float" if fp else "int", "symmetric": scheme.symmetric,
            "strategy": strategy, "dynamic": scheme.dynamic and not weight}
    if scheme.granularity == "group":
        args["group_size"] = scheme.group_size
    if not scheme.symmetric:
        args["zp_dtype"] = "torch.int8"
    return args


def _check_weight(path: str, w: QuantScheme, in_features: int | None) -> None:
    if w.format.startswith("fp"):
        if w.format != "fp8_e4m3" or w.granularity not in ("channel", "tensor"):
            raise _refuse(path, f"weights {w.describe()}", "use fp8_e4m3 weights per channel or per tensor")
        return
    if w.granularity not in ("channel", "group"):
        raise _refuse(path, f"weights {w.describe()}", "use int weights per channel or in groups")
    if w.granularity == "group" and in_features is not None and in_features % w.group_size:
        raise _refuse(path, f"groups of {w.group_size} over {in_features} inputs (not a divisor)",
                      "use a group size that divides every layer's input size")


def _check_activation(path: str, w: QuantScheme, a: QuantScheme) -> str:
    """The format a weight x activation pair is written in, or an error naming what to use instead."""
    if a.clip_ratio < 1:
        raise _refuse(path, f"activation clip_ratio {a.clip_ratio:g}", "use clip_ratio 1.0 for activations")
    dyn_token = a.granularity == "token" and a.dynamic
    static_tensor = a.granularity == "tensor" and not a.dynamic
    if w.format == "fp8_e4m3" and a.format == "fp8_e4m3" and (dyn_token or (static_tensor and a.symmetric)):
        return FLOAT
    if w.format == "int8" and a.format == "int8" and w.symmetric and w.granularity == "channel" \
            and (dyn_token or static_tensor):
        return INT
    if w.format == "int4" and a.format == "int8" and w.symmetric and dyn_token and a.symmetric:
        return INT
    if w.format.startswith("int") and a.format == "int4" and dyn_token and a.symmetric:
        return PACKED
    raise _refuse(path, f"weights {w.describe()} x activations {a.describe()}",
                  "use W8A8 int8 (channel x dynamic token), W4A8, W4A4 with symmetric dynamic per-token activations, "
                  "or FP8")


def ct_scheme(path: str, w: QuantScheme | None, a: QuantScheme | None, in_features: int | None) -> dict | None:
    """The compressed-tensors scheme fields (``weights``, ``input_activations``, ``format``) of one linear, None for
    a full-precision linear; :class:`ArtifactError` when the pair has no equivalent (``in_features`` None: a recipe's
    schemes, checked before a model exists; group sizes are then checked per layer later)."""
    if w is None:
        if a is not None:
            raise _refuse(path, "activation quantization of a full-precision weight", "quantize the weights too")
        return None
    _check_weight(path, w, in_features)
    if a is None:
        fmt = FLOAT if w.format.startswith("fp") else PACKED
    else:
        fmt = _check_activation(path, w, a)
    return {"weights": _args(w, True), "input_activations": None if a is None else _args(a, False), "format": fmt}


def _signed_codes(tensors: dict[str, Tensor], w: QuantScheme, in_features: int) -> Tensor:
    """The weight's signed integer codes ``[N, K]`` (int16) from lowbit's on-disk tensors."""
    if "weight_packed" in tensors:
        return K.unpack_codes(tensors["weight_packed"], w.bits, in_features).to(torch.int16)
    return tensors["weight"].to(torch.int16)


def _pack_zero_point(zero: Tensor, bits: int) -> Tensor:
    """compressed-tensors packs an asymmetric zero point ``[N, G]`` along the output dimension (``packed_dim=0``)."""
    return pack_int32((zero.to(torch.int16) + K.offset(bits)).T.contiguous(), bits).T.contiguous()


def ct_tensors(tensors: dict[str, Tensor], scheme: dict, w: QuantScheme, in_features: int,
               dtype: torch.dtype) -> dict[str, Tensor]:
    """One quantized linear's tensors (lowbit's on-disk names, without the module path) in compressed-tensors'
    layout for ``scheme`` (from :func:`ct_scheme`); scales in ``dtype``, the model's."""
    out = {}
    if scheme["format"] == FLOAT:
        out["weight"] = tensors["weight"]
    else:
        codes = _signed_codes(tensors, w, in_features)
        if scheme["format"] == INT:
            out["weight"] = codes.to(torch.int8)
        else:
            out["weight_packed"] = pack_int32(codes + K.offset(w.bits), w.bits)
            out["weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
    out["weight_scale"] = tensors["weight_scale"].to(dtype)
    if "weight_zero_point" in tensors:
        zero = tensors["weight_zero_point"]
        out["weight_zero_point"] = _pack_zero_point(zero, w.bits) if scheme["format"] == PACKED else zero.to(torch.int8)
    if "bias" in tensors:
        out["bias"] = tensors["bias"]
    if "input_scale" in tensors:
        out["input_scale"] = tensors["input_scale"].reshape(1).to(dtype)
    if "input_zero_point" in tensors:
        out["input_zero_point"] = tensors["input_zero_point"].reshape(1).to(torch.int8)
    return out
