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

from ..surgery.gptq import gptq_config, gptq_layer, quantize_head_rtn
from ..surgery.sequential import stream_layers
from .registry import MethodResult, StepConfig, register
from .session import Session


class GPTQStep(StepConfig):
    """GPTQ weight quantization with the recipe's weight scheme, layer-streamed over calibration text.

    ``damp``: fraction of the mean Hessian diagonal added before inversion; ``act_order``: process columns by
    decreasing Hessian diagonal; ``static_groups``: with groups and act-order, fix group scales up front.
    """

    method: Literal["gptq"] = "gptq"
    phase: ClassVar = "weights"
    block_size: int = Field(default=128, ge=1)
    damp: float = Field(default=0.01, gt=0)
    act_order: bool = True
    static_groups: bool = True

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
        result.loss += gptq_layer(layer, spec, run, scheme, config)
        result.layers += 1

    # Samples run after the full-precision prefix cache, as every request will; its tokens never reach a Hessian.
    prefix = session.prefix.cache if session.prefix is not None else None
    stream_layers(model, spec, batches, on_layer, progress=session.progress, prefix=prefix)
    quantize_head_rtn(model, spec, scheme)
    result.seconds = time.perf_counter() - start
    return result
