"""Integer arithmetic of quantized products, shared by the fake-quant layers and the runtime kernels.

A linear layer with integer weights and per-token or per-tensor integer activations computes
``(v_x @ v_w^T) * s_w * s_x``: integer values (codes minus zero points) multiplied exactly, then scaled. Deployed
kernels sum the products exactly in int32; :func:`float_linear` sums them exactly in float32 column blocks
(:func:`exact_block`). Both the simulation (:class:`~lowbit.surgery.linear.QuantLinear` at inference) and the real
low-bit linears (:mod:`lowbit.runtime.linear`) compute through these functions, so a simulated model and its saved,
real-kernel twin give the same numbers bit for bit instead of two float roundings of one product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .formats import FloatFormat, IntFormat
from .granularity import PerRow, PerTensor
from .observers import observe_range
from .qparams import DEFAULT_EPS, compute_qparams


def act_qparams(x32: Tensor, fmt: IntFormat | FloatFormat, per_token: bool, observer: str, clip_ratio: float,
                observer_kwargs: dict) -> tuple[Tensor, Tensor | None]:
    """Dynamic scale (and unsigned zero point) of ``x32`` ``[M, K]``, per token ``[M, 1]`` or per tensor ``[1, 1]``.

    The same numbers as :class:`~lowbit.surgery.quantizer.ActQuantizer`'s dynamic forward (observe_range then
    compute_qparams); minmax takes a shortcut with the same float ops (symmetric: ``max|x| == max(|min|, |max|)``;
    asymmetric: compute_qparams' formula on ``aminmax``). ``per_token``: one scale per row of the last dimension,
    whatever the leading dimensions.
    """
    full_range = isinstance(fmt, IntFormat) and fmt.full_range  # a signed scale: compute_qparams' formula
    if observer == "minmax" and fmt.symmetric and not full_range:
        absmax = x32.abs().amax(dim=-1, keepdim=True) if per_token else x32.abs().amax().reshape(1, 1)
        top = fmt.qmax if isinstance(fmt, IntFormat) else fmt.max_value
        clipped = absmax if clip_ratio == 1.0 else absmax * clip_ratio  # * 1.0 is exact: one op fewer per call
        return (clipped / top).clamp_(min=DEFAULT_EPS), None
    if observer == "minmax" and isinstance(fmt, IntFormat) and not full_range:
        lo, hi = torch.aminmax(x32, dim=-1, keepdim=True) if per_token else (t.reshape(1, 1) for t in x32.aminmax())
        lo, hi = lo.clamp(max=0.0).mul_(clip_ratio), hi.clamp(min=0.0).mul_(clip_ratio)
        scale = ((hi - lo) / (fmt.qmax - fmt.qmin)).clamp_(min=DEFAULT_EPS)
        return scale, torch.round(fmt.qmin - lo / scale).clamp_(fmt.qmin, fmt.qmax)
    lo, hi = observe_range(x32, PerRow() if per_token else PerTensor(), fmt, observer, **observer_kwargs)
    qp = compute_qparams(lo, hi, fmt, clip_ratio=clip_ratio)
    return qp.scale, qp.zero_point


def magnitude(fmt: IntFormat) -> int:
    """The largest ``|code - zero point|`` of ``fmt``: ``max(qmax, -qmin)`` symmetric (``-qmin`` on the full grid),
    ``2^b - 1`` asymmetric."""
    return max(int(fmt.qmax), -int(fmt.qmin)) if fmt.symmetric else 2**fmt.bits - 1


def int_values(x32: Tensor, scale: Tensor, zero: Tensor | None, fmt: IntFormat, clamp: bool = True) -> Tensor:
    """``clamp(round(x / s) + z, qmin, qmax) - z`` as integer-valued float32 (the codes minus their zero point: what
    the matmul multiplies), the same numbers as :func:`int_codes`. ``clamp=False`` skips the clamp of symmetric codes
    where it provably does nothing (:func:`clamp_needed`)."""
    v = torch.div(x32, scale).round_()
    if zero is None:
        return v.clamp_(fmt.qmin, fmt.qmax) if clamp else v
    return v.add_(zero).clamp_(fmt.qmin, fmt.qmax).sub_(zero)


def clamp_needed(fmt: IntFormat, dynamic: bool, observer: str, clip_ratio: float) -> bool:
    """False when ``round(x / s)`` cannot leave the symmetric grid: a dynamic minmax scale without clipping
    (``s >= max|x| / qmax`` up to one rounding, so ``|x / s| <= qmax * (1 + 2^-23)``, which rounds to at most qmax)."""
    return not (fmt.symmetric and dynamic and observer == "minmax" and clip_ratio >= 1.0)


def exact_block(v_max: float, w_max: float) -> int:
    """Columns a float32 dot product of integers ``|v| <= v_max``, ``|w| <= w_max`` may sum and stay exact in any
    order: every partial sum is an integer of magnitude at most ``K * v_max * w_max <= 2^24``."""
    return max(1, int(2**24 // (v_max * w_max)))


def column_blocks(k: int, group: int, block: int) -> list[tuple[int, int, int]]:
    """``(start, end, g)``: the columns of each weight group ``g`` of ``group`` columns, cut into at most ``block``."""
    return [(s, min(s + block, start + group, k), g) for g, start in enumerate(range(0, k, group))
            for s in range(start, min(start + group, k), block)]


def float_linear(v: Tensor, wc: Tensor, w_scale: Tensor | None, blocks: list[tuple[int, int, int]]) -> Tensor:
    """``sum_g (v_g @ wc_g^T) * s_w[g]`` float32 ``[M, N]`` for integer-valued float32 ``v`` ``[M, K]`` and weight
    codes ``wc`` ``[N, K]`` (zero points subtracted); each block's float32 GEMM is exact (:func:`exact_block`), so
    the result is :func:`int_linear`'s up to the rounding of the block sums. ``w_scale`` None: ``wc`` is scaled."""
    if w_scale is None:
        return F.linear(v, wc)
    out, grouped = None, w_scale.shape[0] > 1
    for start, end, g in blocks:
        part = F.linear(v, wc) if len(blocks) == 1 else F.linear(v[:, start:end], wc[:, start:end])
        if grouped:
            part.mul_(w_scale[g])
        out = part if out is None else out.add_(part)
    return out if grouped else out.mul_(w_scale[0])
