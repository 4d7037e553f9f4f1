"""A module that fake-quantizes tensors with a recipe scheme, with dynamic or calibrated static scales."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CalibrationError
from ..quant import (
    Granularity,
    IntFormat,
    PerAxis,
    PerGroup,
    PerRow,
    PerTensor,
    QParams,
    ScaleDtype,
    compute_qparams,
    fake_quantize,
    observe_range,
    snap_scale,
    stored_unit,
)
from ..quant.clip import clip_from_logit
from ..quant.fake import fake_quantize_rows
from ..schemes import QuantScheme


def granularity_for(scheme: QuantScheme, kind: str) -> Granularity:
    """The quantizer-core granularity of a recipe scheme applied to a ``kind`` of tensor.

    ``weight`` tensors are ``[out, in]``; ``activation`` tensors ``[..., features]``; ``kv`` tensors
    ``[batch, heads, tokens, head_dim]``.
    """
    g = scheme.granularity
    if g == "tensor":
        return PerTensor()
    if g == "group":
        return PerGroup(scheme.group_size)
    if kind == "weight":  # channel: one scale per output row
        return PerRow()
    if kind == "activation":
        return PerAxis(-1) if g == "channel" else PerRow()
    # kv: per token and head (dynamic) or per head across tokens (static)
    return PerAxis(1) if (g == "head" and not scheme.dynamic) else PerRow()


def observer_kwargs(scheme: QuantScheme) -> dict[str, float]:
    """Extra arguments the scheme's observer takes."""
    return {"percentile": scheme.percentile} if scheme.observer == "percentile" else {}


def make_trainable(module: nn.Module, name: str) -> nn.Parameter:
    """Replace the buffer ``module.<name>`` with a trainable parameter holding a copy of its value."""
    value = getattr(module, name).detach().clone()
    delattr(module, name)
    setattr(module, name, nn.Parameter(value))
    return getattr(module, name)


@torch.no_grad()
def make_buffer(module: nn.Module, name: str, dtype: ScaleDtype = None) -> torch.Tensor:
    """Turn the learned scale ``module.<name>`` back into a buffer, kept away from zero on its own side (full-range
    int grids have negative scales) and on a value of the ``dtype`` it is stored in (:func:`snap_scale`); returns
    it."""
    value, tiny = getattr(module, name).detach(), torch.finfo(torch.float32).tiny
    value = snap_scale(torch.where(value < 0, value.clamp_max(-tiny), value.clamp_min(tiny)), dtype)
    delattr(module, name)
    module.register_buffer(name, value)
    return value


@dataclass
class _RangeStats:
    """Running calibration statistics of a static quantizer."""

    xmin: torch.Tensor | None = None
    xmax: torch.Tensor | None = None
    batches: int = 0


class ActQuantizer(nn.Module):
    """Fake-quantizes its input with a :class:`QuantScheme`.

    Dynamic schemes compute scales from every input. Static schemes first observe calibration inputs
    (:meth:`start_calibration` … :meth:`finish_calibration`), then hold fixed ``scale`` / ``zero_point`` buffers;
    their forward never computes a scale from the input. During calibration the input passes through unchanged.
    The ``minmax`` observer keeps the running min/max over batches; ``percentile`` and ``mse`` average each batch's
    clipped range. The calibrated range is kept (``range_min`` / ``range_max``), so a search can re-clip it
    (:meth:`set_clip`); :meth:`learn_scale` turns the scale into a trainable parameter (LSQ gradient) and
    :meth:`freeze_scale` back into a buffer. ``scale_grad``: dynamic scales pass gradient to the input (see
    :func:`~lowbit.quant.fake_quantize`); set while rotations learn. ``learned_clip``: ``(logits, index)`` while a
    dynamic quantizer's clip ratio trains, element ``index`` of a shared logit vector replacing the scheme's ratio
    (see :mod:`~lowbit.quant.clip`).
    """

    def __init__(self, scheme: QuantScheme, kind: str, name: str = "") -> None:
        super().__init__()
        self.scheme = scheme
        self.kind = kind
        self.name = name
        self.fmt = scheme.number_format()
        self.granularity = granularity_for(scheme, kind)
        # dynamic minmax scales per row on a restricted integer grid: the same values through fewer ops at inference
        self._rows_shortcut = (scheme.dynamic and isinstance(self.granularity, PerRow) and scheme.observer == "minmax"
                               and isinstance(self.fmt, IntFormat) and not self.fmt.full_range
                               and scheme.scale_torch_dtype is None)
        self.calibrating = False
        self.enabled = True
        self.scale_grad = False
        self.learned_clip: tuple[torch.Tensor, int] | None = None
        self._scale_dtype: ScaleDtype = None  # how a training static scale is stored, its unit bound
        self._stats = _RangeStats()
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.register_buffer("range_min", None)
        self.register_buffer("range_max", None)

    def extra_repr(self) -> str:
        return self.scheme.describe()

    @property
    def static(self) -> bool:
        return not self.scheme.dynamic

    @property
    def clip_ratio(self) -> float | torch.Tensor:
        """The dynamic range's shrink factor: the learned one while it trains, else the scheme's."""
        if self.learned_clip is None:
            return self.scheme.clip_ratio
        logits, index = self.learned_clip
        return clip_from_logit(logits[index])

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    def start_calibration(self) -> None:
        self.calibrating, self._stats = True, _RangeStats()

    def finish_calibration(self) -> None:
        """Freeze the observed range into ``scale`` / ``zero_point``."""
        self.calibrating = False
        stats = self._stats
        if stats.xmin is None:
            raise CalibrationError(
                f"quantizer {self.name or self.kind} saw no calibration data: the calibration text never reached it"
            )
        if stats.batches > 1 and self.scheme.observer != "minmax":
            stats.xmin, stats.xmax = stats.xmin / stats.batches, stats.xmax / stats.batches
        self.range_min, self.range_max = stats.xmin, stats.xmax
        self.set_clip(self.scheme.clip_ratio)
        self._stats = _RangeStats()

    @torch.no_grad()
    def set_clip(self, factor: float) -> None:
        """Scales from the calibrated range shrunk by ``factor`` (in (0, 1]): the knob of a clip-factor search."""
        if self.range_min is None:
            raise CalibrationError(f"quantizer {self.name or self.kind} has no calibrated range to clip")
        qp = compute_qparams(self.range_min, self.range_max, self.fmt, clip_ratio=factor,
                             scale_dtype=self.scheme.scale_torch_dtype)
        if isinstance(self.scale, nn.Parameter):
            self.scale.copy_(qp.scale)
        else:
            self.scale = qp.scale
        self.zero_point = qp.zero_point

    def learn_scale(self) -> nn.Parameter:
        """Make the static scale a trainable parameter (straight-through rounding, LSQ gradient) and return it."""
        if not self.calibrated:
            raise CalibrationError(f"static quantizer {self.name or self.kind} was never calibrated")
        self._scale_dtype = stored_unit(self.scale, self.scheme.scale_torch_dtype)
        return make_trainable(self, "scale")

    def freeze_scale(self) -> None:
        """Turn a learned scale back into a buffer (away from zero, on a value its dtype stores)."""
        if isinstance(self.scale, nn.Parameter):
            make_buffer(self, "scale", self._scale_dtype)

    def _observe(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise CalibrationError(
                f"NaN or inf met in calibration at {self.name or self.kind}: the model overflows in this dtype "
                "or the input is broken; load the model in float32 or check the calibration text"
            )
        xmin, xmax = observe_range(x.float(), self.granularity, self.fmt, self.scheme.observer,
                                   scale_dtype=self.scheme.scale_torch_dtype, **observer_kwargs(self.scheme))
        s = self._stats
        if s.xmin is None:
            s.xmin, s.xmax = xmin, xmax
        elif self.scheme.observer == "minmax":
            s.xmin, s.xmax = torch.minimum(s.xmin, xmin), torch.maximum(s.xmax, xmax)
        else:
            s.xmin, s.xmax = s.xmin + xmin, s.xmax + xmax
        s.batches += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.static:
            if self.calibrating:
                self._observe(x)
                return x
            if self.scale is None:
                raise CalibrationError(f"static quantizer {self.name or self.kind} was never calibrated")
            scale = self.scale  # a training scale runs on the values its dtype stores
            if isinstance(scale, nn.Parameter):
                scale = snap_scale(scale, self._scale_dtype)
            return fake_quantize(x, self.fmt, self.granularity, qparams=QParams(scale, self.zero_point))
        if self._rows_shortcut and self.learned_clip is None and not (torch.is_grad_enabled() and x.requires_grad):
            return fake_quantize_rows(x, self.fmt, self.scheme.clip_ratio)
        return fake_quantize(
            x,
            self.fmt,
            self.granularity,
            observer=self.scheme.observer,
            clip_ratio=self.clip_ratio,
            scale_grad=self.scale_grad,
            scale_dtype=self.scheme.scale_torch_dtype,
            **observer_kwargs(self.scheme),
        )
