"""``QuantLinear``: a linear layer whose weight is quantized and whose input can be fake-quantized."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import (
    IntFormat,
    QParams,
    ScaleDtype,
    bind_scale_unit,
    compute_qparams,
    dequantize,
    fake_quantize,
    observe_range,
    quantize,
    snap_scale,
    stored_unit,
)
from ..quant.integer import act_qparams, column_blocks, exact_block, float_linear, int_values, magnitude
from ..schemes import QuantScheme
from .quantizer import (
    ActQuantizer,
    granularity_for,
    make_buffer,
    make_trainable,
    observer_kwargs,
)


class QuantLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear``: ``y = q_a(t(x)) @ W_q.T + b``.

    ``weight`` holds the dequantized values of the quantized weight (so the layer computes exactly what a
    low-bit kernel would); ``weight_scale`` / ``weight_zero`` hold the quantization parameters that a packed format
    stores. ``input_transform`` is an optional online rotation ``t`` of the input (QuaRot's R4); ``input_quant`` is an
    :class:`ActQuantizer` or ``None`` (full-precision input).

    Between :meth:`learn_weight` and :meth:`freeze_weight` the layer trains its weight through the quantizer
    (EfficientQAT): ``weight`` is a latent float weight, fake-quantized on every forward with a learnable
    ``weight_scale`` (straight-through rounding, LSQ scale gradient); or, with the codes fixed, the weight is its
    integer codes times the learnable scale (EfficientQAT's end-to-end phase: the scale's gradient is the code).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_scheme: QuantScheme | None = None
        self.register_buffer("weight_scale", None)
        self.register_buffer("weight_zero", None)
        self.input_transform: nn.Module | None = None
        self.input_quant: ActQuantizer | None = None
        self.learning = False
        self.register_buffer("_codes", None, persistent=False)  # fixed codes while only the scales learn
        self._code_qparams: QParams | None = None  # ... or the scales they are re-derived from (offloaded weight)
        self._scale_dtype: ScaleDtype = None  # how the training weight scale is stored, its unit bound

    def extra_repr(self) -> str:
        w = self.weight_scheme.describe() if self.weight_scheme else "fp"
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, weight={w}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:  # an online rotation (R4) runs before the input is quantized
            x = self.input_transform(x)
        if self.integer_product() and not self._needs_grad(x):
            return self._integer_forward(x)
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.quantized_weight() if self.learning else self.weight, self.bias)

    def integer_product(self) -> bool:
        """Whether inference computes ``(v_x @ v_w^T) * s_w * s_x`` on integer values, as the deployed integer kernels
        do (:mod:`lowbit.quant.integer`): frozen int weights per channel or tensor, and int activations whose scales
        factor out of the matmul (dynamic per token, or per tensor) with the scheme's own clip and scale dtype."""
        q, w = self.input_quant, self.weight_scheme
        if q is None or w is None or self.learning or not q.enabled or q.calibrating or q.learned_clip is not None:
            return False
        a = q.scheme
        return (isinstance(q.fmt, IntFormat) and isinstance(w.number_format(), IntFormat)
                and w.granularity in ("channel", "tensor") and a.scale_torch_dtype is None
                and (a.granularity == "tensor" or (a.granularity == "token" and a.dynamic))
                and (a.dynamic or q.scale is not None))

    def _needs_grad(self, x: torch.Tensor) -> bool:
        scale = self.input_quant.scale if self.input_quant is not None else None
        return torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                            or (scale is not None and scale.requires_grad))

    def _integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The integer product (:meth:`integer_product`): the same values as the fake-quant matmul up to float32
        rounding, summed exactly instead, so that the real low-bit linear computes the same bits."""
        q, a = self.input_quant, self.input_quant.scheme
        x32 = x.reshape(-1, self.in_features).to(torch.float32)
        if a.dynamic:
            s_x, z_x = act_qparams(x32, q.fmt, a.granularity == "token", a.observer, a.clip_ratio, observer_kwargs(a))
        else:
            s_x = q.scale.reshape(1, 1).to(torch.float32)
            z_x = None if q.zero_point is None else q.zero_point.reshape(1, 1).to(torch.float32)
        v, (w, s_w, blocks) = int_values(x32, s_x, z_x, q.fmt), self._integer_weight(q.fmt)
        y = float_linear(v, w, s_w, blocks).mul_(s_x)
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _integer_weight(self, act: IntFormat) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
        """The weight's codes minus zero points (integer-valued float32 ``[N, K]``), its scales ``[1, N]`` or ``[1, 1]``
        and the exact column blocks for activations of format ``act``."""
        fmt = self.weight_scheme.number_format()
        codes = self._fixed_codes(QParams(self.weight_scale, self.weight_zero))
        if self.weight_zero is not None:
            codes = codes - self.weight_zero.reshape(-1, 1).to(torch.float32)
        scale = self.weight_scale.detach().to(torch.float32).reshape(1, -1)
        block = exact_block(magnitude(act), magnitude(fmt))
        return codes, scale, column_blocks(self.in_features, self.in_features, block)

    def quantized_weight(self) -> torch.Tensor:
        """``weight`` fake-quantized with the current ``weight_scale`` / ``weight_zero``, or the fixed codes times
        them while only the scales learn (differentiable in the scale, and in the latent weight)."""
        scheme = self.weight_scheme
        fmt, gran = scheme.number_format(), granularity_for(scheme, "weight")
        qp = QParams(snap_scale(self.weight_scale, self._scale_dtype) if self.learning else self.weight_scale,
                     self.weight_zero)
        if self._codes is not None or self._code_qparams is not None:
            codes = self._codes if self._codes is not None else self._fixed_codes(self._code_qparams)
            return dequantize(codes, qp, fmt, gran, dtype=self.weight.dtype)
        return fake_quantize(self.weight, fmt, gran, qparams=qp)

    def _fixed_codes(self, qparams: QParams) -> torch.Tensor:
        """The weight's codes on the grid of ``qparams`` (the scales the weight was rounded with)."""
        scheme = self.weight_scheme
        return quantize(self.weight.detach().to(torch.float32), qparams, scheme.number_format(),
                        granularity_for(scheme, "weight"))

    def learn_weight(self, latent: torch.Tensor | None = None,
                     codes_fixed: bool = False) -> tuple[nn.Parameter, nn.Parameter]:
        """Start training the weight and its scale through the quantizer; returns ``(weight, weight_scale)``.

        ``latent``: the float weight to train from (the weight before rounding, so that small updates can move
        values across rounding boundaries); by default the quantized weight itself. ``codes_fixed``: train the scale
        alone on the weight's current codes (the weight does not learn). On the rounded weight, LSQ's scale gradient
        ``round(w/s) - w/s`` is zero, so scales alone would only drift; with the codes fixed it is the code.
        """
        if self.weight_scheme is None:
            raise ValueError("learn_weight needs a quantized weight first (RTN or GPTQ)")
        if latent is not None:
            self.weight.data.copy_(latent)
        if codes_fixed and self.weight.device.type == "meta":  # offloaded: the codes of each forward's loaded weight
            self._code_qparams = QParams(self.weight_scale.detach().clone(), self.weight_zero)
        elif codes_fixed:
            self._codes = self._fixed_codes(QParams(self.weight_scale, self.weight_zero))
        self._scale_dtype = stored_unit(self.weight_scale, self.weight_scheme.scale_torch_dtype)
        scale = make_trainable(self, "weight_scale")
        self.weight.requires_grad_(not codes_fixed)
        self.learning = True
        return self.weight, scale

    @torch.no_grad()
    def freeze_weight(self) -> None:
        """End training: round the latent weight with the learned scale and store it as the quantized weight."""
        if not self.learning:
            return
        w_hat = self.quantized_weight()
        scale = make_buffer(self, "weight_scale", self._scale_dtype)
        self.weight.requires_grad_(False)
        self.learning, self._codes, self._code_qparams = False, None, None
        self.set_quantized_weight(w_hat, QParams(scale, self.weight_zero), self.weight_scheme)

    @torch.no_grad()
    def quantize_weight_rtn(self, scheme: QuantScheme) -> None:
        """Round the weight to nearest on the scheme's grid (scales from its observer and clip ratio), in float32."""
        self.set_quantized_weight(*round_to_nearest(self.weight, scheme), scheme)

    @torch.no_grad()
    def set_quantized_weight(self, w_hat: torch.Tensor, qparams, scheme: QuantScheme) -> None:
        """Install an already-quantized weight (from RTN, GPTQ, ...) and its quantization parameters."""
        self.weight.data.copy_(w_hat.to(self.weight.dtype))
        self.weight_scale, self.weight_zero = qparams.scale, qparams.zero_point
        self.weight_scheme = scheme


@torch.no_grad()
def round_to_nearest(weight: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, QParams]:
    """``weight`` ``[rows, columns]`` rounded to nearest on the scheme's grid, in float32 (scales per row, group or
    tensor from its observer and clip ratio, rounded to the scheme's ``scale_dtype``): the dequantized weight and its
    quantization parameters."""
    fmt, gran = scheme.number_format(), granularity_for(scheme, "weight")
    w = weight.detach().float()
    scale_dtype = bind_scale_unit(scheme.scale_torch_dtype, w, fmt)
    xmin, xmax = observe_range(w, gran, fmt, scheme.observer, scale_dtype=scale_dtype, **observer_kwargs(scheme))
    qp = compute_qparams(xmin, xmax, fmt, clip_ratio=scheme.clip_ratio, scale_dtype=scale_dtype)
    return dequantize(quantize(w, qp, fmt, gran), qp, fmt, gran, w.shape), qp
