"""GPTQ weight quantization (Frantar et al., 2022), layer-streamed over calibration text.

Per decoder layer, one pass of the calibration samples (through the already-quantized earlier layers, after the
prefix's full-precision cache when the recipe has one) records each input group's Hessian, then the solver
(:mod:`lowbit.gptq`) quantizes the layer's linears. ``lm_head``, when targeted, falls back to RTN.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ..models.arch import decoder_layers
from ..surgery.attach import act_quantizers, attach_activation_quantizers, calibrate_quantizers, quantizers_off
from ..surgery.gptq import gptq_config, gptq_layer, gptq_layer_asymmetric, quantize_head_rtn
from ..surgery.sequential import LayerStream, StreamedLayer, stream_layers
from .registry import MethodResult, StepConfig, register
from .session import Session


class GPTQStep(StepConfig):
    """GPTQ weight quantization with the recipe's weight scheme, layer-streamed over calibration text.

    ``damp``: fraction of the mean Hessian diagonal added before inversion; ``act_order``: process columns by
    decreasing Hessian diagonal; ``static_groups``: with groups, fit every group's scale up front on the original
    weights (false: on the error-updated weights when the loop first reaches one of the group's columns; measured
    in benchmarks/gptq_grid.py);
    ``sequential``: within a layer, record each input group's Hessian after the groups before it are quantized
    (GPTQ's "true sequential"; one partial pass of the samples per group instead of one in all).
    ``asymmetric``: fit each layer's quantized outputs, on the inputs it will see (through the layers and the
    groups of this layer quantized so far and its own activation quantizers), to the full-precision layer's outputs
    on full-precision inputs (Qronos / GPTAQ's asymmetric calibration, :mod:`lowbit.input_mismatch`), instead of to
    its own outputs on the quantized-path inputs; two streams of calibration samples instead of one, and always
    sequential. KV quantizers are not in the quantized path while it calibrates. ``target_damp``: the ridge that
    keeps the asymmetric target near the weight (``lambda = target_damp * mean(diag H)``): the least-squares fit of
    the full-precision outputs from noisy inputs shrinks the weight along input directions the calibration text
    barely excites, which other text needs. At 0.1 the target moved weights by 20-30% of their norm and the gain on
    the calibration text was a loss on other text; 1 gains on both (benchmarks/README.md, QuaRot section).
    """

    method: Literal["gptq"] = "gptq"
    phase: ClassVar = "weights"
    block_size: int = Field(default=128, ge=1)
    damp: float = Field(default=0.01, gt=0)
    act_order: bool = True
    static_groups: bool = True
    sequential: bool = False
    asymmetric: bool = False
    target_damp: float = Field(default=1.0, gt=0)

    def needs_calibration(self) -> bool:
        return True


@dataclass
class GPTQResult(MethodResult):
    """Layers quantized, calibration tokens seen (prefix excluded), the summed GPTQ loss and the wall time."""

    key: ClassVar[str] = "gptq"
    layers: int = 0
    tokens: int = 0
    loss: float = 0.0
    seconds: float = 0.0

    def report(self) -> dict:
        return {"layers": self.layers, "tokens": self.tokens, "loss": round(self.loss, 3),
                "seconds": round(self.seconds, 3)}


@register(GPTQStep)
@torch.no_grad()
def apply(model: nn.Module, step: GPTQStep, session: Session) -> GPTQResult:
    """Quantize every targeted decoder linear with GPTQ, one layer at a time."""
    scheme, spec, config = session.recipe.weights, session.spec, gptq_config(step)
    batches = session.calibration_text("GPTQ").default()
    result = GPTQResult(tokens=int(batches.numel()))
    start = time.perf_counter()

    def on_layer(index: int, layer: nn.Module, run) -> None:
        result.loss += gptq_layer(layer, spec, run, scheme, config, step.sequential)
        result.layers += 1

    # Samples run after the full-precision prefix cache, as every request will; its tokens never reach a Hessian.
    prefix = session.prefix.cache if session.prefix is not None else None
    if step.asymmetric:
        result.loss = _asymmetric(model, session, batches, prefix, config, step)
        result.layers = len(decoder_layers(model, spec))
    else:
        stream_layers(model, spec, batches, on_layer, progress=session.progress, prefix=prefix)
    quantize_head_rtn(model, spec, scheme)
    result.seconds = time.perf_counter() - start
    return result


def _asymmetric(model: nn.Module, session: Session, batches: torch.Tensor, prefix, config, step: GPTQStep) -> float:
    """Asymmetric GPTQ over two streams (full precision, quantized); returns the summed loss. The activation
    quantizers are attached first, so that the quantized stream runs through them (static ones are calibrated per
    layer on that stream)."""
    recipe, spec = session.recipe, session.spec
    if recipe.activations is not None:
        attach_activation_quantizers(model, recipe.activations)
    stream = LayerStream(model, spec, batches, streams=2, prefix=prefix)
    tick = session.tick("asymmetric GPTQ", len(decoder_layers(model, spec)))
    loss = 0.0

    def on_layer(current: StreamedLayer) -> list[torch.Tensor]:
        nonlocal loss
        full, quantized = current.inputs
        with quantizers_off(current.layer):
            target = current.run(full)
        calibrate_quantizers(list(act_quantizers(current.layer)), lambda: current.run(quantized))
        loss += gptq_layer_asymmetric(current, spec, recipe.weights, config, step.target_damp)
        tick()
        return [target, current.run(quantized)]

    stream.walk(on_layer)
    return loss
