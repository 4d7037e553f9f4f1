"""GPTQ on a model's layers: layer-streamed Hessians, then the GPTQ solver on every quantized linear of a layer.

Per decoder layer, one pass of the calibration samples (through the already-quantized earlier layers, stopped at the
last input it needs) records the input Hessian of each targeted linear (after any online input rotation), the solver
quantizes the linears, and the layer's quantized outputs feed the next layer. Linears that read the same input
(q/k/v, gate/up) share one Hessian and are solved together, on their stacked rows.
"""

from __future__ import annotations

import torch
from torch import nn

from ..gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from ..input_mismatch import CrossAccumulator, least_squares_target
from ..models.arch import get_module
from ..quant import QParams
from .attach import quantizers_off
from .linear import QuantLinear
from .offload import onloaded
from .quantizer import granularity_for, observer_kwargs
from .sequential import StreamedLayer, capture_inputs


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
def gptq_layer(layer: nn.Module, spec, run, scheme, config: GPTQConfig) -> float:
    """GPTQ on one decoder layer's quantized linears: one ``run()`` of the calibration samples, stopped at the last
    group's input, records each input group's Hessian, then the solver quantizes each group. Returns the summed GPTQ
    loss."""
    fmt, gran = scheme.number_format(), granularity_for(scheme, "weight")
    groups = _input_groups(layer, spec)
    hessians: dict[str, HessianAccumulator] = {}

    def sink(name: str, x: torch.Tensor) -> None:
        hessians.setdefault(name, HessianAccumulator(x.shape[-1])).add(x)

    with capture_inputs({str(i): group[0] for i, group in enumerate(groups)}, sink):
        run(until=groups[-1][0])  # the last group's input is the last one needed: the rest of the layer is skipped
    loss = 0.0
    for i, group in enumerate(groups):
        loss += _solve_group(group, hessians[str(i)].hessian, scheme, fmt, gran, config)
    return loss


@torch.no_grad()
def gptq_layer_asymmetric(current: StreamedLayer, spec, scheme, config: GPTQConfig,
                          target_damp: float = 0.1) -> float:
    """GPTQ on one decoder layer against the full-precision outputs (asymmetric calibration,
    :mod:`lowbit.input_mismatch`).

    ``current.inputs``: the layer's inputs ``[n, T, hidden]`` in the full-precision model and in the model as
    quantized so far. Batch by batch, each input group's input is captured on both (the full-precision pass with
    every quantizer of the layer off, the quantized one with its activation quantizers on, as its weights will see
    them), giving the Hessian ``H`` of the quantized-path inputs and their cross-product ``C`` with the
    full-precision ones; each group is then solved by GPTQ on the target ``W*`` (ridge ``target_damp``). Returns the
    summed GPTQ loss (measured against ``W*``)."""
    layer, (full, quantized) = current.layer, current.inputs
    fmt, gran = scheme.number_format(), granularity_for(scheme, "weight")
    groups = _input_groups(layer, spec)
    firsts = {str(i): group[0] for i, group in enumerate(groups)}
    hessians = {name: HessianAccumulator(m.in_features) for name, m in firsts.items()}
    crosses = {name: CrossAccumulator(m.in_features) for name, m in firsts.items()}
    size = current.batch_size
    for x_full, x_quant in zip(full.split(size), quantized.split(size), strict=True):
        seen: dict[str, torch.Tensor] = {}
        with quantizers_off(layer), capture_inputs(firsts, lambda name, x: seen.__setitem__(name, x)):
            current.chunks(x_full, until=groups[-1][0])
        with capture_inputs(firsts, lambda name, x: _add_pair(hessians, crosses, firsts, seen, name, x)):
            current.chunks(x_quant, until=groups[-1][0])
    loss = 0.0
    for i, group in enumerate(groups):
        h = hessians[str(i)].hessian
        weight = torch.cat([linear.weight.data for linear in group])
        target = least_squares_target(weight, h, crosses[str(i)].cross, target_damp)
        loss += _solve_group(group, h, scheme, fmt, gran, config, target)
    return loss


def _add_pair(hessians, crosses, firsts, seen, name: str, x: torch.Tensor) -> None:
    """Accumulate one group's quantized-path input (through its own activation quantizer) against ``seen[name]``."""
    quant = firsts[name].input_quant
    x_quant = quant(x) if quant is not None else x
    hessians[name].add(x_quant)
    crosses[name].add(x_quant, seen[name])


def _solve_group(group: list[QuantLinear], hessian: torch.Tensor, scheme, fmt, gran, config: GPTQConfig,
                 target: torch.Tensor | None = None) -> float:
    """GPTQ on linears that share one input Hessian, solved once on their stacked rows; returns the GPTQ loss.

    GPTQ treats every output row on its own given ``H`` (its scales are per row or per row-group), so q/k/v or
    gate/up stacked into one matrix give each linear exactly what a separate solve gives, with one column order,
    one Cholesky factorisation and one column loop for the group instead of one per linear. ``target``: the
    stacked weight to quantize instead of the linears' own (asymmetric calibration).
    """
    weight = torch.cat([linear.weight.data for linear in group]) if target is None else target
    result = gptq_quantize(weight, hessian, fmt, gran,
                           observer=scheme.observer, clip_ratio=scheme.clip_ratio, config=config,
                           scale_dtype=scheme.scale_torch_dtype, **observer_kwargs(scheme))
    sizes = [linear.out_features for linear in group]
    zeros = result.zero_point.split(sizes) if result.zero_point is not None else [None] * len(group)
    for linear, weight, scale, zero in zip(group, result.weight.split(sizes), result.scale.split(sizes), zeros):
        # clones: each linear owns its parameters (a saved file must not see views of one shared tensor)
        linear.set_quantized_weight(weight, QParams(scale.clone(), None if zero is None else zero.clone()), scheme)
    return float(result.loss)


def gptq_config(step) -> GPTQConfig:
    """The solver settings of a recipe step with GPTQ fields."""
    return GPTQConfig(block_size=step.block_size, damp=step.damp, act_order=step.act_order,
                      static_groups=step.static_groups)


def quantize_head_rtn(model: nn.Module, spec, scheme) -> None:
    """RTN on ``lm_head`` when it is targeted and not yet quantized (layer-wise methods cover decoder layers)."""
    head = get_module(model, spec.lm_head)
    if isinstance(head, QuantLinear) and head.weight_scheme is None:
        with onloaded(head):
            head.quantize_weight_rtn(scheme)
