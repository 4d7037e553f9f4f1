"""The GPTQ weight step: layer-streamed Hessians, then the GPTQ solver on every quantized linear of each layer.

Per decoder layer, one pass of the calibration samples (through the already-quantized earlier layers) records the
input Hessian of each targeted linear (after any online input rotation), the solver quantizes the linears, and the
layer's quantized outputs feed the next layer. Linears that read the same input (q/k/v, gate/up) share one Hessian.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..data import prepend_tokens
from ..errors import CalibrationError
from ..gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from ..models.arch import get_module
from ..quant import QParams
from .linear import QuantLinear
from .offload import onloaded
from .quantizer import granularity_for, observer_kwargs
from .sequential import capture_inputs, stream_layers


def _input_groups(layer: nn.Module, spec) -> list[list[QuantLinear]]:
    """The layer's quantized linears, grouped by shared input (one Hessian per group)."""
    groups = []
    for roles in spec.input_groups:
        members = [get_module(layer, spec.linear_roles[r]) for r in roles]
        members = [m for m in members if isinstance(m, QuantLinear)]
        if members:
            groups.append(members)
    return groups


@torch.no_grad()
def gptq_step(model: nn.Module, step, ctx) -> None:
    """Quantize every targeted decoder linear with GPTQ (``lm_head``, when targeted, falls back to RTN)."""
    if ctx.calibration is None:
        raise CalibrationError("GPTQ needs calibration text: pass calibration data (--calib-data)")
    scheme, spec = ctx.recipe.weights, ctx.spec
    fmt, gran = scheme.number_format(), granularity_for(scheme, "weight")
    config = GPTQConfig(block_size=step.block_size, damp=step.damp, act_order=step.act_order,
                        static_groups=step.static_groups)
    batches = ctx.calibration()
    stats = {"layers": 0, "tokens": int(batches.numel()), "loss": 0.0}
    start = time.perf_counter()

    def on_layer(index: int, layer: nn.Module, run) -> None:
        groups = _input_groups(layer, spec)
        hessians: dict[str, HessianAccumulator] = {}

        def sink(name: str, x: torch.Tensor) -> None:
            x = x[:, skip:]  # the prefix's activations are never quantized: they do not shape the Hessian
            hessians.setdefault(name, HessianAccumulator(x.shape[-1])).add(x)

        with capture_inputs({str(i): group[0] for i, group in enumerate(groups)}, sink):
            run()
        for i, group in enumerate(groups):
            for linear in group:
                result = gptq_quantize(linear.weight.data, hessians[str(i)].hessian, fmt, gran,
                                       observer=scheme.observer, clip_ratio=scheme.clip_ratio, config=config,
                                       **observer_kwargs(scheme))
                linear.set_quantized_weight(result.weight, QParams(result.scale, result.zero_point), scheme)
                stats["loss"] += float(result.loss)
        stats["layers"] += 1

    prefix = ctx.prefix[0] if ctx.prefix is not None else []
    skip = len(prefix)
    if prefix:  # calibration samples run after the prefix, as every request will
        batches = prepend_tokens(prefix, batches)
    stream_layers(model, spec, batches, on_layer, progress=ctx.progress)
    head = get_module(model, spec.lm_head)
    if isinstance(head, QuantLinear) and head.weight_scheme is None:
        with onloaded(head):
            head.quantize_weight_rtn(scheme)
    stats["seconds"] = time.perf_counter() - start
    ctx.info["gptq"] = stats
