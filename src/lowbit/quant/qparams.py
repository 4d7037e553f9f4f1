"""Quantization parameters (scale, zero point) and the quantize / dequantize / fake-quantize maps on them.

Reference formulas (per granule, broadcast over the grouped view of :mod:`lowbit.quant.granularity`):

* integer formats: ``q = clamp(round(x / s) + z, qmin, qmax)`` and ``x_hat = (q - z) * s``
  (``z = 0`` when symmetric);
* float formats: ``q = round_to_float_format(x / s)`` and ``x_hat = q * s``.

``round`` is round-half-to-even (``torch.round``). :func:`fake_quantize_groups` computes ``x_hat`` as one
differentiable expression with a straight-through rounding, ``s * (clamp(round_ste(x / s) + z, qmin, qmax) - z)``,
which gives gradient 1 w.r.t. ``x`` inside the clamp range, 0 where clamped, and the LSQ gradient w.r.t. ``s``
(Esser et al., "Learned Step Size Quantization", 2020): ``round(x/s) - x/s`` inside, ``qmin - z`` or ``qmax - z``
where clamped.
:func:`lowbit.quant.fake.fake_quantize` wraps it with an observer (the observers build on this module, so the
composite lives one layer up).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.quant.formats import FloatFormat, Format, IntFormat
from lowbit.quant.fp import round_to_float_format
from lowbit.quant.granularity import Granularity, from_groups, granule_shape, to_groups

DEFAULT_EPS = 1e-8
"""Smallest scale :func:`compute_qparams` returns, so that an all-zero or constant granule never divides by zero."""


@dataclass(frozen=True, eq=False)
class QParams:
    """Per-granule scale and zero point, each of shape ``granule_shape(x.shape, gran)`` (or broadcastable to it).

    ``zero_point`` is None for symmetric integer and float formats, and holds integer values in
    ``[qmin, qmax]`` for asymmetric integer formats. ``eq=False``: tensors have no single truth value.
    """

    scale: Tensor
    zero_point: Tensor | None = None


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` (half to even) in the forward pass, identity gradient in the backward pass (straight-through).

    Written as ``x + (round(x) - x).detach()``; the forward value equals ``round(x)`` exactly.
    """
    return x + (torch.round(x) - x).detach()


def _round_float_ste(y: Tensor, fmt: FloatFormat) -> Tensor:
    """Round ``y`` to ``fmt`` (saturating) with a straight-through gradient: 1 up to ``±rounding_limit``, 0 beyond.

    The limit sits half a spacing above ``max_value``, like ``qmax + 0.5`` for integers, so the element that sets
    a min/max scale keeps its gradient even when ``x / s`` overshoots ``max_value`` by a rounding error.
    """
    clamped = y.clamp(-fmt.rounding_limit, fmt.rounding_limit)
    return clamped + (round_to_float_format(clamped, fmt) - clamped).detach()


def _check_clip_ratio(clip_ratio: float) -> None:
    """Reject non-positive or non-finite clip ratios, which would give a zero or undefined scale."""
    if not 0.0 < clip_ratio < float("inf"):
        raise ValueError(f"clip_ratio must be a finite number > 0 (1.0 = no clipping), got {clip_ratio}")


def compute_qparams(
    xmin: Tensor, xmax: Tensor, fmt: Format, clip_ratio: float = 1.0, eps: float = DEFAULT_EPS
) -> QParams:
    """Map a per-granule range ``[xmin, xmax]`` to a scale (and zero point), computed in float32.

    * symmetric int: ``s = clip * max(|xmin|, |xmax|) / qmax``;
    * asymmetric int: the range is first widened to include 0 (so 0 is exactly representable), scaled by
      ``clip``, then ``s = (hi - lo) / (qmax - qmin)`` and ``z = clamp(round(qmin - lo / s), qmin, qmax)``;
    * float: ``s = clip * max(|xmin|, |xmax|) / max_value``.

    ``s`` is floored at ``eps`` so a zero range gives a finite scale; gradients flow to ``xmin``/``xmax``.
    """
    _check_clip_ratio(clip_ratio)
    lo, hi = xmin.to(torch.float32), xmax.to(torch.float32)
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        lo, hi = lo.clamp(max=0.0) * clip_ratio, hi.clamp(min=0.0) * clip_ratio
        scale = ((hi - lo) / (fmt.qmax - fmt.qmin)).clamp(min=eps)
        zero_point = (round_ste(fmt.qmin - lo / scale)).clamp(fmt.qmin, fmt.qmax)
        return QParams(scale=scale, zero_point=zero_point)
    absmax = torch.maximum(lo.abs(), hi.abs()) * clip_ratio
    top = fmt.qmax if isinstance(fmt, IntFormat) else fmt.max_value
    return QParams(scale=(absmax / top).clamp(min=eps), zero_point=None)


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target`` (right-aligned, each dim 1 or equal), never widening it.

    Checked explicitly because a scale of shape ``(out,)`` against stats ``(out, 1)`` would silently broadcast to
    ``(out, out)``.
    """
    if len(shape) > len(target):
        return False
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(target), strict=False))


def check_qparams(qp: QParams, fmt: Format, stats_shape: torch.Size) -> None:
    """Reject qparams whose shapes would broadcast wrongly, or whose zero point does not fit the format."""
    needs_zero = isinstance(fmt, IntFormat) and not fmt.symmetric
    if needs_zero != (qp.zero_point is not None):
        kind = "an asymmetric integer" if needs_zero else "a symmetric or float"
        raise ValueError(f"{kind} format {fmt} needs zero_point {'set' if needs_zero else 'None'}")
    for name, t in (("scale", qp.scale), ("zero_point", qp.zero_point)):
        if t is None:
            continue
        if not _broadcasts_to(t.shape, stats_shape):
            raise ValueError(
                f"qparams {name} of shape {tuple(t.shape)} does not broadcast to the per-granule shape "
                f"{tuple(stats_shape)}"
            )


def float32_qparams(qp: QParams) -> tuple[Tensor, Tensor | None]:
    """Scale and zero point as float32 (differentiably cast, so a learnable scale keeps its gradient)."""
    zero = None if qp.zero_point is None else qp.zero_point.to(torch.float32)
    return qp.scale.to(torch.float32), zero


def quantize(x: Tensor, qp: QParams, fmt: Format, gran: Granularity) -> Tensor:
    """Return the codes of ``x``, in ``x``'s shape, as float32 (not differentiable).

    Int formats: ``clamp(round(x / s) + z, qmin, qmax)`` (integer values); float formats:
    ``round_to_float_format(x / s)`` (grid values). Codes keep the original layout so they can be packed directly.
    """
    check_qparams(qp, fmt, granule_shape(x.shape, gran))
    scale, zero = float32_qparams(qp)
    scaled = to_groups(x.to(torch.float32), gran) / scale
    if isinstance(fmt, FloatFormat):
        codes = round_to_float_format(scaled, fmt)
    else:
        shifted = torch.round(scaled) if zero is None else torch.round(scaled) + zero
        codes = shifted.clamp(fmt.qmin, fmt.qmax)
    return from_groups(codes, gran, x.shape)


def dequantize(
    q: Tensor,
    qp: QParams,
    fmt: Format,
    gran: Granularity,
    shape: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Values ``(q - z) * s`` (int) or ``q * s`` (float) from codes ``q`` as returned by :func:`quantize`.

    ``shape`` is the original tensor shape; codes stored flattened (e.g. after unpacking) are reshaped to it.
    Defaults to ``q.shape``. Computed in float32, returned as ``dtype``.
    """
    shape = q.shape if shape is None else torch.Size(shape)
    check_qparams(qp, fmt, granule_shape(shape, gran))
    scale, zero = float32_qparams(qp)
    codes = to_groups(q.reshape(shape).to(torch.float32), gran)
    values = codes * scale if zero is None else (codes - zero) * scale
    return from_groups(values, gran, shape).to(dtype)


def fake_quantize_groups(g: Tensor, scale: Tensor, zero_point: Tensor | None, fmt: Format) -> Tensor:
    """Differentiable ``dequantize(quantize(g))`` on a grouped view ``g`` with per-granule ``scale``/``zero_point``.

    Int: ``s * (clamp(round_ste(g / s) + z, qmin, qmax) - z)``; float: ``s * round_fp(g / s)`` with a
    straight-through, saturating rounding.
    No shape checks: callers pass stats that broadcast against ``g``.
    """
    scaled = g / scale
    if isinstance(fmt, FloatFormat):
        return scale * _round_float_ste(scaled, fmt)
    if zero_point is None:
        return scale * round_ste(scaled).clamp(fmt.qmin, fmt.qmax)
    return scale * ((round_ste(scaled) + zero_point).clamp(fmt.qmin, fmt.qmax) - zero_point)
