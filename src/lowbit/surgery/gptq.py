"""GPTQ on a model's layers: layer-streamed Hessians, then the GPTQ solver on every quantized linear of a layer.

Per decoder layer, one pass of the calibration samples (through the already-quantized earlier layers, stopped at the
last input it needs) records the input Hessian of each targeted linear (after any online input rotation), the solver
quantizes the linears, and the layer's quantized outputs feed the next layer (sequential: one pass per input group,
each after the groups before it are quantized). Linears that read the same input (q/k/v, gate/up) share one
Hessian and are solved together, on their stacked rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
def gptq_layer(layer: nn.Module, spec, run, scheme, config: GPTQConfig, sequential: bool = False) -> float:
    """GPTQ on one decoder layer's quantized linears: one ``run()`` of the calibration samples, stopped at the last
    group's input, records each input group's Hessian, then the solver quantizes each group. ``sequential``: one run
    per group instead, each after the groups before it are quantized (GPTQ's "true sequential": o_proj's Hessian
    sees the quantized q/k/v, and so on). Returns the summed GPTQ loss."""
    fmt, gran = scheme.number_format(), granularity_for(scheme, "weight")
    loss = 0.0
    for batch in _batches(_input_groups(layer, spec), sequential):
        hessians: dict[str, HessianAccumulator] = {}

        def sink(name: str, x: torch.Tensor) -> None:
            hessians.setdefault(name, HessianAccumulator(x.shape[-1])).add(x)

        with capture_inputs({str(i): group[0] for i, group in enumerate(batch)}, sink):
            run(until=batch[-1][0])  # the last group's input is the last one needed: the rest of the layer is skipped
        for i, group in enumerate(batch):
            loss += _solve_group(group, hessians[str(i)].hessian, scheme, fmt, gran, config)
    return loss


def _batches(groups: list[list[QuantLinear]], sequential: bool) -> list[list[list[QuantLinear]]]:
    """The input groups captured together: all at once, or one at a time in the layer's order."""
    return [[group] for group in groups] if sequential else [groups]


@torch.no_grad()
def gptq_layer_asymmetric(current: StreamedLayer, spec, scheme, config: GPTQConfig,
                          target_damp: float = 1.0) -> float:
    """GPTQ on one decoder layer against the full-precision outputs (asymmetric calibration,
    :mod:`lowbit.input_mismatch`).

    ``current.inputs``: the layer's inputs ``[n, T, hidden]`` in the full-precision model and in the model as
    quantized so far. Batch by batch, each input group's input is captured on both (the full-precision pass with
    every quantizer of the layer off, the quantized one with its activation quantizers on, as its weights will see
    them), giving the Hessian ``H`` of the quantized-path inputs and their cross-product ``C`` with the
    full-precision ones; each group is then solved by GPTQ on the target ``W*`` (ridge ``target_damp``).
    Always sequential (:func:`gptq_layer`): a group's quantized-path inputs are captured after the groups before it
    are quantized, so its target fits the inputs it will really see (captured before, with q/k/v still in full
    precision, o_proj's target corrects for an error it never meets, and the errors grew layer by layer: see
    benchmarks/README.md, QuaRot section). Returns the summed GPTQ loss (measured against ``W*``)."""
    fmt, gran = scheme.number_format(), granularity_for(scheme, "weight")
    groups = _input_groups(current.layer, spec)
    originals = {linear: linear.weight.data.clone() for group in groups for linear in group}
    loss = 0.0
    for batch in _batches(groups, sequential=True):
        hessians, crosses = _paired_statistics(current, batch, originals)
        for i, group in enumerate(batch):
            h = hessians[str(i)].hessian
            weight = torch.cat([linear.weight.data for linear in group])
            target = least_squares_target(weight, h, crosses[str(i)].cross, target_damp)
            loss += _solve_group(group, h, scheme, fmt, gran, config, target)
    return loss


def _paired_statistics(current: StreamedLayer, groups: list[list[QuantLinear]], originals: dict):
    """Each group's quantized-path Hessian and its cross-product with the full-precision inputs (through the layer's
    ``originals`` weights, whatever is quantized already), batch by batch."""
    layer, (full, quantized) = current.layer, current.inputs
    firsts = {str(i): group[0] for i, group in enumerate(groups)}
    hessians = {name: HessianAccumulator(m.in_features) for name, m in firsts.items()}
    crosses = {name: CrossAccumulator(m.in_features) for name, m in firsts.items()}
    for x_full, x_quant in zip(full.split(current.batch_size), quantized.split(current.batch_size), strict=True):
        seen: dict[str, torch.Tensor] = {}
        with (quantizers_off(layer), _weights(originals),
              capture_inputs(firsts, lambda name, x: seen.__setitem__(name, x))):
            current.chunks(x_full, until=groups[-1][0])
        with capture_inputs(firsts, lambda name, x: _add_pair(hessians, crosses, firsts, seen, name, x)):
            current.chunks(x_quant, until=groups[-1][0])
    return hessians, crosses


@contextmanager
def _weights(weights: dict[nn.Module, torch.Tensor]) -> Iterator[None]:
    """Each linear computes with the given weight for the duration of a block (its own after)."""
    own = {linear: linear.weight.data for linear in weights}
    try:
        for linear, weight in weights.items():
            linear.weight.data = weight
        yield
    finally:
        for linear, weight in own.items():
            linear.weight.data = weight


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
