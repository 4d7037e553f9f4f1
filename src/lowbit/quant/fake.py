"""Fake quantization: ``dequantize(quantize(x))`` as one differentiable op, with the range observed or given.

A composite of the two layers below it: :mod:`lowbit.quant.observers` picks a range from the data and
:mod:`lowbit.quant.qparams` turns it into a scale (and zero point) and applies it
(:func:`~lowbit.quant.qparams.fake_quantize_groups`). It lives in its own module because the observers themselves
build on :mod:`~lowbit.quant.qparams` (the MSE clip search fake-quantizes candidates), so placing it in either would
make the two import each other.

The observer and qparams functions are looked up on their modules at call time, so a test (or a caller) that
patches ``lowbit.quant.observers.observe_range`` or ``lowbit.quant.qparams.compute_qparams`` sees every use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lowbit.quant import observers as _observers
from lowbit.quant import qparams as _qparams
from lowbit.quant.formats import Format, IntFormat
from lowbit.quant.granularity import Granularity, from_groups, granule_shape, to_groups
from lowbit.quant.integer import act_qparams, int_values
from lowbit.quant.qparams import (
    Offset,
    QParams,
    check_qparams,
    fake_quantize_groups,
    float32_qparams,
)


def _resolve_qparams(
    x: Tensor,
    fmt: Format,
    gran: Granularity,
    qparams: QParams | None,
    observer: str,
    clip_ratio: float,
    observer_kwargs: dict[str, Any],
    scale_grad: bool = False,
    scale_dtype: torch.dtype | None = None,
    offset: Offset = "int",
) -> QParams:
    """Static mode: check and return the given qparams. Dynamic mode: observe ``x`` and compute them.

    Dynamic statistics are detached unless ``scale_grad``, so the gradient w.r.t. ``x`` is the plain
    straight-through one; see :func:`fake_quantize` for what ``scale_grad`` adds.
    """
    if qparams is not None:
        dynamic_only = observer != "minmax" or clip_ratio != 1.0 or observer_kwargs or scale_grad
        if dynamic_only or scale_dtype is not None or offset != "int":
            raise ValueError(
                "observer, clip_ratio, scale_grad, scale_dtype, offset and observer options apply to dynamic mode "
                "only (qparams=None; given qparams carry their own zero point or minimum)"
            )
        check_qparams(qparams, fmt, granule_shape(x.shape, gran))
        return qparams
    if offset != "int" and observer == "mse" and isinstance(fmt, IntFormat) and not fmt.symmetric:
        raise ValueError("the mse observer searches clip ratios for offset='int' grids; use minmax or percentile")
    xmin, xmax = _observers.observe_range(x if scale_grad else x.detach(), gran, fmt, observer,
                                          scale_dtype=scale_dtype, **observer_kwargs)
    return _qparams.compute_qparams(xmin, xmax, fmt, clip_ratio=clip_ratio, scale_dtype=scale_dtype, offset=offset)


def fake_quantize(
    x: Tensor,
    fmt: Format,
    gran: Granularity,
    *,
    qparams: QParams | None = None,
    observer: str = "minmax",
    clip_ratio: float = 1.0,
    scale_grad: bool = False,
    scale_dtype: torch.dtype | None = None,
    offset: Offset = "int",
    **observer_kwargs: Any,
) -> Tensor:
    """Quantize then dequantize ``x`` in one differentiable op (straight-through rounding, LSQ scale gradient).

    Dynamic mode (``qparams=None``): the range comes from ``observer`` ("minmax", "percentile", "mse", with
    ``observer_kwargs``), shrunk by ``clip_ratio``. Static mode: ``qparams`` are used as given (their scale may
    require grad). Computed in float32; the output has ``x``'s dtype and shape.

    ``scale_grad`` (dynamic mode): let the gradient also flow through the observed range into ``x``. The output is
    ``x + s * e`` with rounding error ``e`` in [-1/2, 1/2]; with the range detached, straight-through rounding
    treats the error ``s * e`` as a constant, so a change of ``x`` that shrinks its range (a rotation that flattens
    an outlier) earns no credit for the smaller error. With it, ``d out / d s = e`` carries that credit to the
    largest elements: the reparameterisation gradient of the loss under additive noise of width ``s``, which is
    what learning rotations needs (SpinQuant).

    ``scale_dtype`` (dynamic mode): round the scale up to this dtype first (see
    :func:`~lowbit.quant.qparams.compute_qparams`); with float16 the output equals, bit for bit, what a packed
    store that keeps float16 scales dequantizes (the packed KV cache's :class:`~lowbit.kv.codecs.IntCodec`).

    ``offset`` (dynamic mode, asymmetric integer formats): ``"int"`` widens the range to include 0 and uses an
    integer zero point; ``"float"`` keeps the exact range with a float minimum, the packed KV caches' convention
    (see :data:`~lowbit.quant.qparams.Offset`). The ``mse`` observer supports ``"int"`` only.
    """
    if not x.is_floating_point():
        raise ValueError(f"fake_quantize needs a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        return x.clone()
    x32 = x.to(torch.float32)
    qp = _resolve_qparams(
        x32, fmt, gran, qparams, observer, clip_ratio, observer_kwargs, scale_grad, scale_dtype, offset
    )
    scale, zero, minimum = float32_qparams(qp)
    out = fake_quantize_groups(to_groups(x32, gran), scale, zero, fmt, minimum)
    return from_groups(out, gran, x.shape).to(x.dtype)


def fake_quantize_rows(x: Tensor, fmt: IntFormat, clip_ratio: float = 1.0) -> Tensor:
    """``fake_quantize(x, fmt, PerRow(), clip_ratio=clip_ratio)`` (dynamic minmax scales per row of the last
    dimension, integer grid), the same values bit for bit, as a dozen tensor ops without the general path's views and
    checks: the inference-time quantizer of every dynamic KV cache and per-token activation runs it once per decode
    step and layer. No gradient: callers use :func:`fake_quantize` when one is recorded. The scales and values are
    the integer kernels' own (:func:`~lowbit.quant.integer.act_qparams`, :func:`~lowbit.quant.integer.int_values`)."""
    if fmt.full_range:
        raise ValueError("fake_quantize_rows takes restricted-range integer formats")
    if x.numel() == 0:
        return x.clone()
    x32 = x.to(torch.float32)
    scale, zero = act_qparams(x32, fmt, True, "minmax", clip_ratio, {})
    return (scale * int_values(x32, scale, zero, fmt)).to(x.dtype)
