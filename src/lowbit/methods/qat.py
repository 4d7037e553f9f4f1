"""Quantization-aware training (LLM-QAT's logit distillation, EfficientQAT's end-to-end phase) on any quantized model.

The step runs last (phase ``train``), on the model every earlier step and quantizer left: QuaRot, SpinQuant or
PrefixQuant results alike. The math is in :mod:`lowbit.surgery.qat`; this module is the recipe step: which text it
trains on, what trains, and what it reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ..surgery.qat import QATConfig, Trained, distill, self_generated
from .registry import MethodResult, StepConfig, register
from .session import Session


class QATStep(StepConfig):
    """End-to-end quantization-aware training of the quantized model, distilled from the full-precision one.

    ``steps`` of AdamW on ``batch`` sequences each, drawn from ``samples`` sequences of ``seq_len`` tokens of
    ``data``: ``calibration`` (the calibration text) or ``self`` (sampled from the full-precision model itself, so
    a user without text can still train). ``train``: ``scales`` (weight and static activation/KV scales),
    ``scales_norms`` (and the norm weights) or ``weights`` (and the latent weights). Learning rates are scale-free:
    ``lr_weight`` in units of each linear's quantization step, ``lr_scale`` relative to each scale; ``lr_norm`` is
    absolute (norm weights are about 1). Loss: KL of the quantized model's next-token distribution from the
    full-precision one's.
    """

    method: Literal["qat"] = "qat"
    phase: ClassVar = "train"
    steps: int = Field(default=200, ge=1)
    samples: int = Field(default=64, ge=1)
    seq_len: int = Field(default=512, ge=2)
    batch: int = Field(default=1, ge=1)
    data: Literal["calibration", "self"] = "calibration"
    train: Trained = "weights"
    lr_weight: float = Field(default=0.02, ge=0)
    lr_scale: float = Field(default=0.005, ge=0)
    lr_norm: float = Field(default=1e-4, ge=0)
    seed: int | None = None

    def needs_calibration(self) -> bool:
        return self.data == "calibration"


@dataclass
class QATResult(MethodResult):
    """The loss of every step (KL from the full-precision model on the training batches), what trained, on which
    text, and the wall time."""

    key: ClassVar[str] = "qat"
    losses: list[float] = field(default_factory=list)
    train: str = ""
    data: str = ""
    tokens: int = 0
    seconds: float = 0.0

    def report(self) -> dict:
        head, tail = self.losses[:10], self.losses[-10:]
        return {"steps": len(self.losses), "train": self.train, "data": self.data, "tokens": self.tokens,
                "kl_first_10": sum(head) / max(1, len(head)), "kl_last_10": sum(tail) / max(1, len(tail)),
                "losses": self.losses, "seconds": round(self.seconds, 3)}


@register(QATStep)
@torch.no_grad()
def apply(model: nn.Module, step: QATStep, session: Session) -> QATResult:
    """Distil the quantized ``model`` from the session's full-precision teacher (see the module docstring)."""
    start = time.perf_counter()
    seed = session.seed if step.seed is None else step.seed
    teacher = session.teacher
    if step.data == "self":
        batches = self_generated(teacher, step.samples, step.seq_len, seed)
    else:
        batches = session.calibration_text("quantization-aware training").sample(step.samples, step.seq_len)
    config = QATConfig(step.steps, step.batch, step.train, step.lr_weight, step.lr_scale, step.lr_norm, seed)
    losses = distill(model, teacher, batches, config, session.progress)
    return QATResult(losses, step.train, step.data, int(batches.numel()), time.perf_counter() - start)
