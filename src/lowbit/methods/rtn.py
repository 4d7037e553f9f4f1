"""Round-to-nearest weight quantization: each weight onto the recipe's grid, scales from its observer."""

from __future__ import annotations

from typing import ClassVar, Literal

from torch import nn

from ..surgery.attach import quant_linears
from ..surgery.offload import onloaded
from .registry import StepConfig, register
from .session import Session


class RTNStep(StepConfig):
    """Round-to-nearest weight quantization with the recipe's weight scheme (its observer picks the clipping)."""

    method: Literal["rtn"] = "rtn"
    phase: ClassVar = "weights"


@register(RTNStep)
def apply(model: nn.Module, step: RTNStep, session: Session) -> None:
    """Round every quantized linear's weight to nearest."""
    linears = list(quant_linears(model))
    tick = session.tick("RTN weights", len(linears))
    for _, linear in linears:
        with onloaded(linear):
            linear.quantize_weight_rtn(session.recipe.weights)
        tick()
