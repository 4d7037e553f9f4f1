"""Pure tensor ops behind :mod:`lowbit.runtime.linear`: integer codes in and out of their stored form, activations to
integer or fp8 codes exactly as the fake quantizers round them, and the low-bit matmuls of PyTorch's CPU build.

Code conventions. Weight and activation codes are *signed* int8 everywhere here: a symmetric b-bit code ``q`` in
``[-(2^(b-1)-1), 2^(b-1)-1]`` as it is, an asymmetric one (unsigned ``u`` in ``[0, 2^b-1]`` with integer zero point
``z``) as ``u - 2^(b-1)`` with zero point ``z - 2^(b-1)``, so ``u - z`` is unchanged and every code fits int8.

The kernels and their constraints (PyTorch 2.13, x86 AVX-512; see /work/shared/reference/runtime.md section 4):
``torch._int_mm`` (int8 x int8 -> int32, exact, no shape constraints on CPU);
``aten._weight_int4pack_mm_for_cpu`` (x of any float dtype, fast with bf16 only; group in 32..256, K % group == 0,
N % 16 == 0; its packed layout is ISA-specific, so it is built at load time, never stored);
``aten._weight_int8pack_mm`` (per-channel scales in x's dtype; K % 16 == 0, else garbage or a crash).
``torch._int_mm`` is fast only where the CPU has int8 dot-product instructions (AVX512-VNNI, AMX: :func:`has_int8_dot`);
elsewhere it runs a scalar loop (measured 0.01-0.2x fp32 ``F.linear``). There the u8 x s8 GEMMs of fbgemm
(``quantized.linear_with_input_q_dq_qweight_dq_output_fp32``) and oneDNN (``onednn.qlinear_pointwise``, the x86
inductor op) run, exactly for weight codes up to :data:`U8S8_MAX_W` (int16 pair sums, see there), and float32
``F.linear`` on the codes is exact in blocks (:func:`lowbit.quant.integer.exact_block`).
Measurements: benchmarks/kernel_bench.py.
No model code here: :mod:`lowbit.runtime.linear` holds the modules.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..quant import FloatFormat, IntFormat, pack_int32, unpack_int32

INT4PACK_GROUPS = (256, 128, 64, 32)
"""Group sizes ``_weight_int4pack_mm_for_cpu`` takes, largest first."""


# --- codes in and out of their stored form ------------------------------------------------------------------------


def offset(bits: int) -> int:
    """``2^(b-1)``: what turns a signed code into compressed-tensors' unsigned one."""
    return 1 << (bits - 1)


def pack_codes(signed: Tensor, bits: int) -> Tensor:
    """Signed codes ``[N, K]`` -> ``weight_packed`` int32 ``[N, ceil(K*b/32)]`` (``pack_int32(q + 2^(b-1), b)``)."""
    return pack_int32(signed.to(torch.int16) + offset(bits), bits)


def unpack_codes(words: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of :func:`pack_codes`: signed int8 codes ``[N, K]``. int4 takes a two-op fast path (per-call use)."""
    if bits == 4:
        shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
        nibbles = ((words.unsqueeze(-1) >> shifts) & 15).to(torch.int8).reshape(*words.shape[:-1], -1)[..., :k]
        return nibbles.sub_(8)
    return (unpack_int32(words, bits, k).to(torch.int16) - offset(bits)).to(torch.int8)


FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""The E2M1 magnitudes in code order: code ``c`` (4 bits) is ``(-1)^(c >> 3) * FP4_MAGNITUDES[c & 7]``."""


def pack_fp4(values: Tensor) -> Tensor:
    """FP4 E2M1 grid values ``[N, K]`` -> uint8 ``[N, ceil(K/2)]``, two codes a byte, column ``2j`` in the low nibble
    (compressed-tensors' ``nvfp4-pack-quantized`` layout). A value off the E2M1 grid is an error."""
    magnitudes = torch.tensor(FP4_MAGNITUDES, device=values.device)
    index = torch.searchsorted(magnitudes, values.abs().to(torch.float32).contiguous())
    index = index.clamp(max=len(FP4_MAGNITUDES) - 1)
    if not torch.equal(magnitudes[index], values.abs().to(torch.float32)):
        raise ValueError("pack_fp4 needs values on the FP4 E2M1 grid {0, 0.5, 1, 1.5, 2, 3, 4, 6} (with signs)")
    codes = (index | (torch.signbit(values).to(torch.int64) << 3)).to(torch.uint8)
    codes = torch.nn.functional.pad(codes, (0, codes.shape[-1] % 2))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pack_fp4`: the float32 E2M1 values ``[N, K]``."""
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)[..., :k].to(torch.int64)
    magnitudes = torch.tensor(FP4_MAGNITUDES, device=packed.device)[codes & 7]
    return torch.where(codes >= 8, -magnitudes, magnitudes)


def nibble_pack(signed: Tensor) -> Tensor:
    """Signed codes in ``[-8, 7]`` ``[N, K]`` -> uint8 ``[N, ceil(K/2)]`` made for unpacking on every call: column
    ``j`` in the low nibble and column ``j + ceil(K/2)`` in the high one, each plus 8 (:func:`nibble_unpack` is two
    ops into the halves of its output and one subtraction; the stored int32 words take ~15x longer to unpack)."""
    n, k = signed.shape
    h = (k + 1) // 2
    u = torch.nn.functional.pad(signed.to(torch.int16) + 8, (0, 2 * h - k))
    return (u[:, :h] | (u[:, h:] << 4)).to(torch.uint8)


def nibble_unpack(packed: Tensor, k: int) -> Tensor:
    """Inverse of :func:`nibble_pack`: signed int8 codes ``[N, k]`` (a view of an ``[N, 2*ceil(k/2)]`` tensor)."""
    n, h = packed.shape
    out = torch.empty(n, 2 * h, dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(packed, 15, out=out[:, :h])
    torch.bitwise_right_shift(packed, 4, out=out[:, h:])
    return out.sub_(8).view(torch.int8)[:, :k]  # uint8 wraps: 0..7 -> 248..255 = -8..-1 as int8


# --- activations to codes ------------------------------------------------------------------------------------------


def int_codes(x32: Tensor, scale: Tensor, zero: Tensor | None, fmt: IntFormat) -> Tensor:
    """Signed int8 codes ``clamp(round(x / s) + z, qmin, qmax)`` (minus ``2^(b-1)`` when asymmetric)."""
    q = torch.round(x32 / scale)
    if zero is None:
        return q.clamp_(fmt.qmin, fmt.qmax).to(torch.int8)
    return q.add_(zero).clamp_(fmt.qmin, fmt.qmax).sub_(offset(fmt.bits)).to(torch.int8)


def fp8_codes(x32: Tensor, scale: Tensor, fmt: FloatFormat, dtype: torch.dtype) -> Tensor:
    """``x / s`` rounded to the fp8 ``dtype`` (saturating at ``fmt.max_value``): the fake quantizer's
    ``round_to_float_format`` (the same values, tested), by torch's cast, which is twice as fast here."""
    return (x32 / scale).clamp_(-fmt.max_value, fmt.max_value).to(dtype)


# --- integer matmul --------------------------------------------------------------------------------------------------


def int_linear(xq: Tensor, w8: Tensor, w_scale: Tensor, group: int, x_zero: Tensor | None = None,
               w_zero: Tensor | None = None, w_colsum: Tensor | None = None) -> Tensor:
    """``sum_g (xq_g - z_x)(w_g - z_w)^T * s_w[g]`` in float32 ``[M, N]``, each group's product exact in int32.

    ``xq`` int8 ``[M, K]``; ``w8`` int8 ``[N, K]``; ``w_scale`` float32
    ``[G, N]`` (``G = 1`` per channel or tensor); ``group`` the columns per group (the last may be shorter).
    Zero points, signed int32: ``x_zero`` ``[M or 1, 1]``, ``w_zero`` ``[G, N]``; ``w_colsum`` ``[G, N]`` is
    ``sum_k w - K_g * z_w`` per group (needed with ``x_zero``). The product expands to
    ``xq @ w^T - z_w * rowsum(xq) - z_x * w_colsum``: one ``torch._int_mm`` per group plus rank-1 corrections.
    """
    out = None
    for g in range(w_scale.shape[0]):
        cols = slice(g * group, (g + 1) * group)
        xg, wg = (xq, w8) if w_scale.shape[0] == 1 else (xq[:, cols], w8[:, cols])  # strided views: _int_mm takes any
        acc = torch._int_mm(xg, wg.t())
        if w_zero is not None:
            acc -= xg.sum(dim=-1, keepdim=True, dtype=torch.int32) * w_zero[g]
        if x_zero is not None:
            acc -= x_zero * w_colsum[g]
        part = acc.to(torch.float32).mul_(w_scale[g])
        out = part if out is None else out.add_(part)
    return out


# --- int8 dot products without VNNI: u8 x s8 GEMMs, float32 on codes --------------------------------------------------

U8S8_MAX_W = 64
"""Largest |weight code| (zero point subtracted) the u8 x s8 kernels multiply exactly on any x86 CPU. Without VNNI
they use ``vpmaddubsw``, which adds two u8 x s8 products into int16 with saturation: ``255 * (64 + 64) = 32640``
fits, int8 codes do not (measured: codes of +-127 on both sides give wrong sums in fbgemm and oneDNN)."""

U8S8_ZERO = 128
"""Activation zero point handed to the u8 x s8 kernels: ``u = v + 128`` holds every ``v`` in ``[-128, 127]``."""


def has_int8_dot() -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX512-VNNI or AMX), where ``torch._int_mm`` is fast."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_vnni_supported", lambda: False)() or
                getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def u8s8_kernels() -> tuple[str, ...]:
    """The u8 x s8 GEMMs this PyTorch build has: ``"fbgemm"`` (quantized engine), ``"onednn"`` (x86 inductor ops)."""
    found = []
    if "fbgemm" in torch.backends.quantized.supported_engines:
        found.append("fbgemm")
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise"):
        found.append("onednn")
    return tuple(found)


def fbgemm_pack(w8: Tensor, scale: Tensor) -> torch.ScriptObject:
    """int8 codes ``[N, K]`` (|w| <= :data:`U8S8_MAX_W`) and float32 scales ``[N]`` -> fbgemm's packed weight (an
    opaque object; measured ~1.3x ``N*K`` bytes at 576x1536)."""
    zeros = torch.zeros(w8.shape[0], dtype=torch.long)
    engine = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated; the packed weight is not one
        try:
            torch.backends.quantized.engine = "fbgemm"
            q = torch._make_per_channel_quantized_tensor(w8.contiguous(), scale.to(torch.float64), zeros, 0)
            return torch.ops.quantized.linear_prepack(q, None)
        finally:
            torch.backends.quantized.engine = engine


def fbgemm_mm(v: Tensor, packed: torch.ScriptObject, zero: int) -> Tensor:
    """``(v @ w^T) * scale`` float32 ``[M, N]``: ``v`` integer-valued float32 with ``v + zero`` in ``[0, 255]`` (the
    kernel quantizes it with scale 1: exact), int32 accumulation, then ``float(acc) * scale[n]``."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(v, 1.0, zero, packed)


def onednn_pack(w8: Tensor) -> Tensor:
    """int8 codes ``[N, K]`` (|w| <= :data:`U8S8_MAX_W`) -> oneDNN's packed weight (an mkldnn tensor, ~1.1x ``N*K``)."""
    return torch.ops.onednn.qlinear_prepack(w8.contiguous(), None)


def onednn_mm(v: Tensor, packed: Tensor, scale: Tensor, w_zero: Tensor, zero: int) -> Tensor:
    """As :func:`fbgemm_mm` through ``onednn.qlinear_pointwise`` (``v + zero`` cast to uint8; ``w_zero`` int32 zeros)."""
    u = (v + zero).to(torch.uint8)
    return torch.ops.onednn.qlinear_pointwise(u, 1.0, zero, packed, scale, w_zero, None, 1.0, 0, torch.float32,
                                              "none", [], "")


# --- weight-only kernels ---------------------------------------------------------------------------------------------


def int4pack_group(k: int, group: int) -> int | None:
    """The ``_weight_int4pack_mm_for_cpu`` group size that expresses scales shared by ``group`` columns of a ``K``-wide
    weight (the largest allowed size dividing both, each scale repeated), or None when there is none."""
    return next((t for t in INT4PACK_GROUPS if group % t == 0 and k % t == 0), None)


def int4pack_weight(signed: Tensor) -> Tensor:
    """Signed int4 codes ``[N, K]`` -> the CPU kernel's packed uint8 layout (ISA-specific: build it, never store it)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu((signed.to(torch.int32) + 8), 1)


def int4pack_scales_zeros(scale: Tensor, zero: Tensor | None, group: int, kernel_group: int,
                          dtype: torch.dtype) -> Tensor:
    """``[K/kernel_group, N, 2]`` (scale, float zero) in ``dtype`` for scales ``[N, G]`` shared by ``group`` columns.

    The kernel computes ``w = (u - 8) * scale + zero`` with ``u = q + 8``; ours is ``(q - z) * s``, so ``zero = -z*s``.
    """
    reps = group // kernel_group
    s = scale.repeat_interleave(reps, dim=1)
    z = torch.zeros_like(s) if zero is None else -zero.to(torch.float32).repeat_interleave(reps, dim=1) * s
    return torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(dtype)


def int4pack_mm(x: Tensor, packed: Tensor, kernel_group: int, scales_zeros: Tensor) -> Tensor:
    """``x @ W^T`` with the packed int4 weight; ``x`` ``[M, K]`` contiguous, in the dtype of ``scales_zeros``."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, kernel_group, scales_zeros)


def int8pack_mm(x: Tensor, w8: Tensor, scales: Tensor) -> Tensor:
    """``x @ (w8 * scales[:, None])^T``; ``scales`` ``[N]`` in ``x``'s dtype; only when ``K % 16 == 0``."""
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), w8, scales)


def int8group_mm(x: Tensor, w8: Tensor, scales: Tensor) -> Tensor:
    """``x @ W^T`` (float32) for int8 codes with one scale per row and group of ``g`` columns: ``w8`` ``[G, N, g]``
    holds group ``i``'s columns ``i*g .. i*g+g-1``, ``scales`` ``[G, N]`` in ``x``'s dtype (bf16). One
    ``_weight_int8pack_mm`` per group (its per-row scale is the group's), partial products summed in float32; only
    when ``g % 16 == 0``. PyTorch has no group-wise int8 kernel on CPU; at one row this reads the codes once instead
    of dequantizing the whole weight."""
    g = w8.shape[2]
    out = None
    for i in range(w8.shape[0]):
        y = torch.ops.aten._weight_int8pack_mm(x[:, i * g:(i + 1) * g].contiguous(), w8[i], scales[i])
        out = y.float() if out is None else out.add_(y)
    return out


def dequantize_weight(signed: Tensor, scale: Tensor, zero: Tensor | None, group: int, dtype: torch.dtype) -> Tensor:
    """``(q - z) * s`` ``[N, K]`` in ``dtype`` from signed codes and ``[N, G]`` scales/zeros shared by ``group`` columns
    (computed in float32, as :func:`lowbit.quant.dequantize` does)."""
    n, k = signed.shape
    g = scale.shape[1]
    q = torch.nn.functional.pad(signed.to(torch.float32), (0, g * group - k)).reshape(n, g, group) if g > 1 else \
        signed.to(torch.float32).reshape(n, 1, k)
    if zero is not None:
        q = q - zero.to(torch.float32).unsqueeze(-1)
    return (q * scale.unsqueeze(-1)).reshape(n, -1)[:, :k].to(dtype)
