"""Quantization parameters (scale, zero point) and the quantize / dequantize / fake-quantize maps on them.

Reference formulas (per granule, broadcast over the grouped view of :mod:`lowbit.quant.granularity`):

* integer formats: ``q = clamp(round(x / s) + z, qmin, qmax)`` and ``x_hat = (q - z) * s``
  (``z = 0`` when symmetric);
* asymmetric integer formats with ``offset="float"`` (a float minimum ``m`` instead of an integer zero point):
  ``q = clamp(round((x - m) / s), qmin, qmax)`` and ``x_hat = q * s + m``;
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
from typing import Literal, TypeAlias

import torch
from torch import Tensor

from lowbit.quant.formats import FloatFormat, Format, IntFormat
from lowbit.quant.fp import round_to_float_format
from lowbit.quant.granularity import Granularity, from_groups, granule_shape, to_groups

DEFAULT_EPS = 1e-8
"""Smallest scale :func:`compute_qparams` returns, so that an all-zero or constant granule never divides by zero."""

Offset = Literal["int", "float"]
"""How an asymmetric integer grid is placed on a range (:func:`compute_qparams`).

``"int"`` (the default, every recipe quantizer): the range is widened to include 0, clipped about 0, and shifted by
an integer zero point, so 0 is exactly representable. ``"float"`` (the packed KV caches): the exact range, clipped
about its centre, starting at a float minimum, so a range that does not contain 0 (KIVI's per-channel keys) keeps
all its levels.
"""

OFFSETS: tuple[str, ...] = ("int", "float")


@dataclass(frozen=True, eq=False)
class QParams:
    """Per-granule scale and offset, each of shape ``granule_shape(x.shape, gran)`` (or broadcastable to it).

    Symmetric integer and float formats have neither offset. An asymmetric integer format has exactly one:
    ``zero_point``, integer values in ``[qmin, qmax]`` (``offset="int"``), or ``minimum``, the float value of code 0
    (``offset="float"``). ``eq=False``: tensors have no single truth value.
    """

    scale: Tensor
    zero_point: Tensor | None = None
    minimum: Tensor | None = None


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` (half to even) in the forward pass, identity gradient in the backward pass (straight-through).

    Written as ``x + (round(x) - x).detach()``; the forward value equals ``round(x)`` exactly (``round(x) - x`` is
    exact: Sterbenz's lemma, or ``-x`` where ``round(x) == 0``), so where no gradient is recorded it is ``round(x)``
    alone (two ops fewer per call: inference, the runtime's KV quantizers).
    """
    if not (x.requires_grad and torch.is_grad_enabled()):
        return torch.round(x)
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


@dataclass(frozen=True, eq=False)
class RelativeScale:
    """Scales stored in a small float ``dtype`` as multiples of one float32 ``unit`` per tensor: NVFP4's FP8 E4M3
    block scales under a per-tensor scale. A scale ``s`` is stored as ``round_up(s / unit)`` in ``dtype``."""

    dtype: torch.dtype
    unit: Tensor


ScaleDtype: TypeAlias = torch.dtype | RelativeScale | None
"""How scales are stored: None (float32, unrounded), a float dtype (float16, bfloat16, ``float8_e8m0fnu`` for MX's
power-of-two scales), a dtype of :data:`RELATIVE_DTYPES` (its unit taken from the scales rounded together), or a
:class:`RelativeScale` with its unit fixed beforehand (:func:`bind_scale_unit`)."""

RELATIVE_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn,)


def _unit_unbound(dtype: ScaleDtype) -> bool:
    """Whether ``dtype`` is relative with no unit bound yet (a bare dtype of :data:`RELATIVE_DTYPES`)."""
    return not isinstance(dtype, RelativeScale) and dtype in RELATIVE_DTYPES


def _next_up(stored: Tensor, info: torch.finfo) -> Tensor:
    """The next value of ``info``'s float grid above each (positive, on-grid) value of ``stored``; saturates at max.
    Used where ``torch.nextafter`` has no kernel (8-bit floats)."""
    binade = torch.exp2(torch.floor(torch.log2(stored.clamp(min=info.smallest_normal))))
    return (stored + binade * info.eps).clamp(max=info.max)


def _round_up_to(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``scale`` rounded up onto ``dtype``'s positive finite values, as float32, gradient straight through."""
    info = torch.finfo(dtype)
    wanted = scale.clamp(min=info.tiny * info.eps, max=info.max)
    stored = wanted.detach().to(dtype)
    below = stored.to(torch.float32) < wanted
    if dtype.itemsize == 1:
        up = _next_up(stored.to(torch.float32), info)
    else:
        up = torch.nextafter(stored, stored.new_tensor(info.max))
    stored = torch.where(below, up.to(stored.dtype), stored).to(torch.float32)
    return wanted + (stored - wanted).detach()  # exact: stored is within a factor 2 of wanted (Sterbenz)


def round_scale(scale: Tensor, dtype: ScaleDtype) -> Tensor:
    """``scale`` rounded *up* to the float ``dtype`` it will be stored in, as float32 (None: unchanged).

    Up, not to nearest, so that the stored scale's grid still spans the whole range: with 255 levels a scale
    rounded down by float16's relative 2^-11 would cut 12% of a step off the top of the range. Clamped first to
    ``dtype``'s positive finite values, so a tiny range never stores a zero scale. The gradient passes straight
    through (the rounding is a constant offset). A relative dtype (:class:`RelativeScale`, or a dtype of
    :data:`RELATIVE_DTYPES` whose unit is then ``max(scale) / dtype max``) rounds ``scale / unit`` instead.
    """
    if dtype is None:
        return scale
    if _unit_unbound(dtype):
        dtype = RelativeScale(dtype, _unit(scale, dtype))
    if isinstance(dtype, RelativeScale):
        stored = _round_up_to(scale.detach() / dtype.unit, dtype.dtype) * dtype.unit
        return scale + (stored - scale).detach()
    return _round_up_to(scale, dtype)


def stored_unit(scale: Tensor, dtype: ScaleDtype) -> ScaleDtype:
    """``dtype`` with the unit ``scale`` was rounded with bound to it when it is relative (else unchanged): for
    scales about to train, so that training and freezing round them on the grid they start on. Scales never rounded
    that way (no unit divides them all back into ``dtype``) get the unit of their largest value."""
    if not _unit_unbound(dtype):
        return dtype
    try:
        unit = split_relative_scale(scale, dtype)[1]
    except ValueError:
        unit = _unit(scale, dtype).reshape(1)
    return RelativeScale(dtype, unit)


def snap_scale(scale: Tensor, dtype: ScaleDtype) -> Tensor:
    """``scale`` (either sign: full-range int grids have negative ones) moved to the nearest value ``dtype`` stores,
    the gradient straight through; a value it already stores stays. For scales that train: every value the model runs
    with, during training and after, is one the file stores. Nearest, not up as :func:`round_scale` rounds scales
    computed from a range, so that a scale on its grid stays there. A relative ``dtype`` needs its unit bound
    (:func:`stored_unit`)."""
    if dtype is None:
        return scale
    if _unit_unbound(dtype):
        raise ValueError(f"a relative scale dtype {dtype} needs its unit bound first (stored_unit)")
    relative = isinstance(dtype, RelativeScale)
    unit, target = (dtype.unit.to(scale.device), dtype.dtype) if relative else (1.0, dtype)  # x / 1.0 is exact
    info, magnitude = torch.finfo(target), scale.detach().abs().to(torch.float32) / unit
    stored = magnitude.clamp(min=info.tiny * info.eps, max=info.max).to(target).to(torch.float32) * unit
    stored = torch.where(scale.detach() < 0, -stored, stored)
    return scale + (stored - scale).detach()


def _unit(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The per-tensor unit that puts the largest of ``scale`` at ``dtype``'s largest value."""
    return (scale.detach().abs().amax().to(torch.float32) / torch.finfo(dtype).max).clamp(min=DEFAULT_EPS)


def bind_scale_unit(dtype: ScaleDtype, x: Tensor, fmt: Format) -> ScaleDtype:
    """``dtype`` with its per-tensor unit fixed from the whole of ``x`` when it is relative (else unchanged): for
    code that rounds the scales of one tensor in pieces (GPTQ's column groups, the MSE search's rows), so that all
    pieces share the unit a single rounding of the whole tensor would use."""
    if not _unit_unbound(dtype):
        return dtype
    whole = compute_qparams(x.detach().amin(), x.detach().amax(), fmt).scale
    return RelativeScale(dtype, _unit(whole, dtype))


def split_relative_scale(scale: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Scales rounded with a relative ``dtype`` (every one ``unit * v`` with ``v`` a value of ``dtype``, one float32
    ``unit`` per tensor, see :func:`round_scale`) as ``(v in dtype, unit [1])``, for a file that stores them that way.

    The unit is not kept beside the scales, so it is recovered: the largest scale is ``unit`` times some value of
    ``dtype``; each candidate (largest first) is tried until every scale divides back into ``dtype`` (up to float32
    rounding), then the unit is moved by a float32 step where that makes ``v * unit`` give back every scale bit for
    bit. Raises ValueError when no candidate fits (scales that were never rounded that way).
    """
    info = torch.finfo(dtype)
    every = torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32)
    candidates = every[torch.isfinite(every) & (every > 0)].unique().flip(0)
    s = scale.detach().to(torch.float32)
    top = s.abs().amax()
    for value in candidates:
        unit = (top / value).reshape(1)
        stored = (s / unit).clamp(-info.max, info.max).to(dtype)
        if torch.allclose(stored.to(torch.float32) * unit, s, rtol=1e-6, atol=0.0):
            return stored, _exact_unit(stored.to(torch.float32), unit, s)
    raise ValueError(f"these scales are not one per-tensor unit times values of {dtype}: they were not rounded to it")


def _exact_unit(values: Tensor, unit: Tensor, scale: Tensor) -> Tensor:
    """``unit`` or a float32 neighbour of it for which ``values * unit == scale`` exactly (``unit`` when none)."""
    for candidate in (unit, torch.nextafter(unit, unit * 2), torch.nextafter(unit, unit / 2)):
        if torch.equal(values * candidate, scale):
            return candidate
    return unit


def round_minimum(minimum: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``minimum`` rounded to the *nearest* value of the float ``dtype`` it will be stored in, as float32.

    Clamped first to ``dtype``'s finite range. The gradient passes straight through. None: unchanged.
    """
    if dtype is None:
        return minimum
    info = torch.finfo(dtype)
    wanted = minimum.clamp(min=info.min, max=info.max)
    return wanted + (wanted.detach().to(dtype).to(torch.float32) - wanted).detach()


def _check_offset(offset: str) -> None:
    """Reject an offset convention other than those of :data:`Offset`."""
    if offset not in OFFSETS:
        raise ValueError(f"offset must be one of {OFFSETS}, got {offset!r}")


def _float_offset_qparams(
    lo: Tensor, hi: Tensor, fmt: IntFormat, clip_ratio: float, eps: float, scale_dtype: ScaleDtype
) -> QParams:
    """Asymmetric qparams with a float minimum: the exact range ``[lo, hi]``, shrunk by ``clip_ratio`` about its
    centre, ``m = lo`` and ``s = (hi - m) / (qmax - qmin)``.

    With ``scale_dtype``, ``m`` is rounded to nearest first and ``s`` computed from the rounded ``m``, then rounded
    up, so ``m + (qmax - qmin) * s`` still reaches ``hi``.
    """
    centre, half = (hi + lo) / 2, (hi - lo) / 2 * clip_ratio
    minimum = round_minimum(centre - half, scale_dtype)
    scale = round_scale(((centre + half - minimum) / (fmt.qmax - fmt.qmin)).clamp(min=eps), scale_dtype)
    return QParams(scale=scale, minimum=minimum)


def _full_range_qparams(
    lo: Tensor, hi: Tensor, fmt: IntFormat, clip_ratio: float, eps: float, scale_dtype: ScaleDtype
) -> QParams:
    """Signed scale of a full-range symmetric grid: ``s = clip * v / qmin``, ``v`` the signed value of largest
    magnitude (the positive one on a tie), so ``v`` maps onto code ``qmin`` exactly (llama.cpp's Q4_0,
    ``d = v / -8``).

    The magnitude is floored at ``eps`` and rounded up to ``scale_dtype`` (:func:`round_scale`) before the sign is
    applied, so the stored scale still reaches ``v``; a zero granule gets ``+eps``.
    """
    extreme = torch.where(hi >= -lo, hi, lo) * clip_ratio
    magnitude = round_scale((extreme.abs() / -fmt.qmin).clamp(min=eps), scale_dtype)
    return QParams(scale=torch.where(extreme > 0, -magnitude, magnitude), zero_point=None)


def compute_qparams(
    xmin: Tensor,
    xmax: Tensor,
    fmt: Format,
    clip_ratio: float = 1.0,
    eps: float = DEFAULT_EPS,
    scale_dtype: ScaleDtype = None,
    offset: Offset = "int",
) -> QParams:
    """Map a per-granule range ``[xmin, xmax]`` to a scale (and offset), computed in float32.

    * symmetric int: ``s = clip * max(|xmin|, |xmax|) / qmax``;
    * full-range symmetric int (:class:`IntFormat` ``full_range``): a signed ``s = clip * v / qmin`` with ``v`` the
      one of ``xmin``/``xmax`` of larger magnitude (llama.cpp's Q4_0 scale);
    * asymmetric int, ``offset="int"``: the range is first widened to include 0 (so 0 is exactly representable),
      scaled by ``clip``, then ``s = (hi - lo) / (qmax - qmin)`` and ``z = clamp(round(qmin - lo / s), qmin, qmax)``;
    * asymmetric int, ``offset="float"``: the exact range shrunk by ``clip`` about its centre, ``minimum = lo``
      and ``s = (hi - lo) / (qmax - qmin)`` (see :data:`Offset`);
    * float: ``s = clip * max(|xmin|, |xmax|) / max_value``.

    ``offset`` only matters for asymmetric integer formats (the others have no offset). ``s`` is floored at
    ``eps`` so a zero range gives a finite scale; gradients flow to ``xmin``/``xmax``.
    ``scale_dtype`` (e.g. float16, for a packed store that keeps scales in half precision): ``s`` is rounded up to
    it (:func:`round_scale`) before the zero point is computed (a float minimum is rounded to nearest, before the
    scale), so codes computed with these qparams dequantize exactly from the stored values.
    """
    _check_clip_ratio(clip_ratio)
    _check_offset(offset)
    lo, hi = xmin.to(torch.float32), xmax.to(torch.float32)
    if isinstance(fmt, IntFormat) and fmt.full_range:
        return _full_range_qparams(lo, hi, fmt, clip_ratio, eps, scale_dtype)
    if isinstance(fmt, IntFormat) and not fmt.symmetric and offset == "float":
        return _float_offset_qparams(lo, hi, fmt, clip_ratio, eps, scale_dtype)
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        lo, hi = lo.clamp(max=0.0) * clip_ratio, hi.clamp(min=0.0) * clip_ratio
        scale = round_scale(((hi - lo) / (fmt.qmax - fmt.qmin)).clamp(min=eps), scale_dtype)
        zero_point = (round_ste(fmt.qmin - lo / scale)).clamp(fmt.qmin, fmt.qmax)
        return QParams(scale=scale, zero_point=zero_point)
    absmax = torch.maximum(lo.abs(), hi.abs()) * clip_ratio
    top = fmt.qmax if isinstance(fmt, IntFormat) else fmt.max_value
    return QParams(scale=round_scale((absmax / top).clamp(min=eps), scale_dtype), zero_point=None)


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target`` (right-aligned, each dim 1 or equal), never widening it.

    Checked explicitly because a scale of shape ``(out,)`` against stats ``(out, 1)`` would silently broadcast to
    ``(out, out)``.
    """
    if len(shape) > len(target):
        return False
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(target), strict=False))


def check_qparams(qp: QParams, fmt: Format, stats_shape: torch.Size) -> None:
    """Reject qparams whose shapes would broadcast wrongly, or whose offset does not fit the format."""
    needs_offset = isinstance(fmt, IntFormat) and not fmt.symmetric
    offsets = (qp.zero_point is not None) + (qp.minimum is not None)
    if offsets != int(needs_offset):
        if not needs_offset:
            raise ValueError(f"a symmetric or float format {fmt} needs zero_point None and minimum None")
        need = "zero_point set (or minimum, for offset='float')" if offsets == 0 else "zero_point or minimum, not both"
        raise ValueError(f"an asymmetric integer format {fmt} needs {need}")
    for name, t in (("scale", qp.scale), ("zero_point", qp.zero_point), ("minimum", qp.minimum)):
        if t is None:
            continue
        if not _broadcasts_to(t.shape, stats_shape):
            raise ValueError(
                f"qparams {name} of shape {tuple(t.shape)} does not broadcast to the per-granule shape "
                f"{tuple(stats_shape)}"
            )


def float32_qparams(qp: QParams) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Scale, zero point and minimum as float32 (differentiably cast, so a learnable scale keeps its gradient)."""
    zero = None if qp.zero_point is None else qp.zero_point.to(torch.float32)
    minimum = None if qp.minimum is None else qp.minimum.to(torch.float32)
    return qp.scale.to(torch.float32), zero, minimum


def quantize_groups(
    g: Tensor, scale: Tensor, zero_point: Tensor | None, fmt: Format, minimum: Tensor | None = None
) -> Tensor:
    """Codes of a grouped view ``g`` with per-granule ``scale``/``zero_point`` that broadcast against it (float32).

    Int: ``clamp(round(g / s) + z, qmin, qmax)``, or ``clamp(round((g - m) / s), qmin, qmax)`` with a float
    ``minimum`` ``m``; float: ``round_to_float_format(g / s)``. No shape checks: the one rounding rule for every
    caller with its own grouped view (the packed KV codecs); see :func:`quantize`.
    """
    scaled = g / scale if minimum is None else (g - minimum) / scale
    if isinstance(fmt, FloatFormat):
        return round_to_float_format(scaled, fmt)
    rounded = torch.round(scaled)
    return (rounded if zero_point is None else rounded + zero_point).clamp(fmt.qmin, fmt.qmax)


def dequantize_groups(q: Tensor, scale: Tensor, zero_point: Tensor | None, minimum: Tensor | None = None) -> Tensor:
    """Values ``(q - z) * s``, ``q * s + m`` (float ``minimum``) or ``q * s`` of codes on a grouped view.

    No shape checks.
    """
    if minimum is not None:
        return q * scale + minimum
    return q * scale if zero_point is None else (q - zero_point) * scale


def quantize(x: Tensor, qp: QParams, fmt: Format, gran: Granularity) -> Tensor:
    """Return the codes of ``x``, in ``x``'s shape, as float32 (not differentiable).

    Int formats: ``clamp(round(x / s) + z, qmin, qmax)`` (integer values); float formats:
    ``round_to_float_format(x / s)`` (grid values). Codes keep the original layout so they can be packed directly.
    """
    check_qparams(qp, fmt, granule_shape(x.shape, gran))
    scale, zero, minimum = float32_qparams(qp)
    codes = quantize_groups(to_groups(x.to(torch.float32), gran), scale, zero, fmt, minimum)
    return from_groups(codes, gran, x.shape)


def dequantize(
    q: Tensor,
    qp: QParams,
    fmt: Format,
    gran: Granularity,
    shape: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Values ``(q - z) * s`` or ``q * s + m`` (int) or ``q * s`` (float) from codes ``q`` from :func:`quantize`.

    ``shape`` is the original tensor shape; codes stored flattened (e.g. after unpacking) are reshaped to it.
    Defaults to ``q.shape``. Computed in float32, returned as ``dtype``.
    """
    shape = q.shape if shape is None else torch.Size(shape)
    check_qparams(qp, fmt, granule_shape(shape, gran))
    scale, zero, minimum = float32_qparams(qp)
    values = dequantize_groups(to_groups(q.reshape(shape).to(torch.float32), gran), scale, zero, minimum)
    return from_groups(values, gran, shape).to(dtype)


def fake_quantize_groups(
    g: Tensor, scale: Tensor, zero_point: Tensor | None, fmt: Format, minimum: Tensor | None = None
) -> Tensor:
    """Differentiable ``dequantize(quantize(g))`` on a grouped view ``g`` with per-granule ``scale``/``zero_point``.

    Int: ``s * (clamp(round_ste(g / s) + z, qmin, qmax) - z)``, or ``clamp(round_ste((g - m) / s), qmin, qmax) * s
    + m`` with a float ``minimum``; float: ``s * round_fp(g / s)`` with a
    straight-through, saturating rounding. The forward value equals ``dequantize_groups(quantize_groups(g))``
    exactly (the straight-through rounding adds and subtracts an exactly representable difference).
    No shape checks: callers pass stats that broadcast against ``g``.
    """
    if minimum is not None:
        return round_ste((g - minimum) / scale).clamp(fmt.qmin, fmt.qmax) * scale + minimum
    scaled = g / scale
    if isinstance(fmt, FloatFormat):
        return scale * _round_float_ste(scaled, fmt)
    if zero_point is None:
        return scale * round_ste(scaled).clamp(fmt.qmin, fmt.qmax)
    return scale * ((round_ste(scaled) + zero_point).clamp(fmt.qmin, fmt.qmax) - zero_point)
