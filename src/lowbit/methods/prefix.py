"""PrefixQuant (Chen et al., 2024): a prefix of outlier tokens whose full-precision keys/values start every sequence.

The tokens that carry massive activations (found on calibration text, or given) run once through the model as
rotated so far, before any weight is quantized; their cache is kept in full precision, so those activations never
reach a static quantizer (see :mod:`lowbit.surgery.prefix`). Later steps read the prefix from the session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import Field
from torch import nn

from ..analysis.outliers import analyze, select_prefix
from ..surgery.prefix import prefix_cache
from .registry import MethodResult, StepConfig, register
from .session import Prefix, Session


class PrefixStep(StepConfig):
    """PrefixQuant's prefix: tokens whose full-precision keys/values start every sequence.

    ``tokens``: the prefix's token ids, or None to detect them: outlier tokens (max |x| / median > ``eta`` at the
    down_proj inputs of the model as rotated so far) on ``samples`` calibration sequences of ``seq_len`` tokens.
    Place it after the rotation step and before the weight step.
    """

    method: Literal["prefix"] = "prefix"
    phase: ClassVar = "prefix"
    tokens: list[int] | None = None
    eta: float = Field(default=64.0, gt=1)
    samples: int = Field(default=64, ge=1)
    seq_len: int = Field(default=512, ge=2)

    def needs_calibration(self) -> bool:
        return self.tokens is None


@dataclass
class PrefixResult(MethodResult):
    """The prefix's tokens, the outlier threshold, and (when detected) the largest outlier ratio without and with
    the prefix on the calibration samples."""

    key: ClassVar[str] = "prefix"
    tokens: list[int]
    eta: float
    largest_ratio_without_prefix: float | None = None
    largest_ratio_with_prefix: float | None = None

    def report(self) -> dict:
        out: dict = {"eta": self.eta}
        if self.largest_ratio_without_prefix is not None:
            out["largest_ratio_without_prefix"] = self.largest_ratio_without_prefix
            out["largest_ratio_with_prefix"] = self.largest_ratio_with_prefix
        out["tokens"] = list(self.tokens)
        return out


@register(PrefixStep)
def apply(model: nn.Module, step: PrefixStep, session: Session) -> PrefixResult:
    """Choose the prefix (given, or detected on calibration text) and compute its full-precision cache."""
    if step.tokens is not None:
        result = PrefixResult(list(step.tokens), step.eta)
    else:
        batches = session.calibration_text("detecting the prefix").sample(step.samples, step.seq_len)
        before = analyze(model, session.spec, batches, step.eta)
        tokens = select_prefix(before, model.config.bos_token_id)
        after = analyze(model, session.spec, batches, step.eta, prefix=tokens)
        result = PrefixResult(list(tokens), step.eta, before.largest_ratio(), after.largest_ratio())
    session.prefix = Prefix(result.tokens, prefix_cache(model, result.tokens))
    return result
