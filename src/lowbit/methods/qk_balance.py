"""Query/key balancing before a KV key codec: per KV head and RoPE pair, keys scaled by ``a`` and queries by ``1/a``
so both carry the same energy on calibration text (exact; folded into the q/k weights; see
:mod:`lowbit.surgery.qk_balance` for why it is QJL's variance-optimal rescale)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import Field
from torch import nn

from ..surgery.qk_balance import fold_balance, layer_scales, measure_energies, predicted_gain
from .registry import MethodResult, StepConfig, register
from .session import Session


class QKBalanceStep(StepConfig):
    """Balance query and key energies per RoPE pair (``alpha`` 0.5; 0 changes nothing), measured on ``samples``
    calibration sequences of ``seq_len`` tokens after any rotation step, before the prefix and weight steps."""

    method: Literal["qk_balance"] = "qk_balance"
    phase: ClassVar = "balance"
    alpha: float = Field(default=0.5, ge=0, le=1)
    samples: int = Field(default=16, ge=1)
    seq_len: int = Field(default=512, ge=2)

    def needs_calibration(self) -> bool:
        return True


@dataclass
class QKBalanceResult(MethodResult):
    """Per layer, the factor by which balancing multiplies ``E|q|^2 E|k|^2`` (QJL's score variance grows with it)."""

    key: ClassVar[str] = "qk_balance"
    alpha: float
    variance_factor: list[float]

    def report(self) -> dict:
        factors = self.variance_factor
        return {"alpha": self.alpha, "variance_factor_mean": sum(factors) / len(factors),
                "variance_factor_worst": max(factors), "variance_factor": factors}


@register(QKBalanceStep)
def apply(model: nn.Module, step: QKBalanceStep, session: Session) -> QKBalanceResult:
    """Measure query and key energies (keys centred when the recipe keys its KV quantizer around a centre), fold
    each layer's scales into its weights."""
    batches = session.calibration_text("qk_balance").sample(step.samples, step.seq_len)
    energies = measure_energies(model, session.spec, batches, centred=session.recipe.key_centre is not None)
    tick = session.tick("balancing queries and keys", len(energies))
    factors = []
    for i, layer_energies in enumerate(energies):
        scales = layer_scales(model, session.spec, layer_energies, step.alpha)
        factors.append(predicted_gain(*layer_energies, scales))
        fold_balance(model, session.spec, i, scales)
        tick()
    return QKBalanceResult(step.alpha, factors)
