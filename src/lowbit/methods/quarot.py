"""QuaRot (Ashkboos et al., 2024): computational-invariance rotations with seeded random Hadamards.

Norms are folded into their readers, then R1 (residual stream) and one R2 per layer (value/output heads) are folded
into the weights offline; R3 (post-RoPE Q/K) and R4 (down_proj input) run online. The full-precision model's
outputs are unchanged (see :mod:`lowbit.surgery.rotate` for the algebra).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..rotations.kinds import RotationKind
from ..surgery.rotate import (
    add_online_rotations,
    check_residual_rotation,
    fold_norms,
    random_r1_r2,
    rotate_heads,
    rotate_residual,
    rotation_seeds,
)
from .registry import MethodResult, StepConfig, register
from .session import Session


class QuaRotStep(StepConfig):
    """QuaRot's computational-invariance rotations with seeded random Hadamards (applied before weight steps).

    ``r1``: residual stream; ``r2``: per head on values; ``r3``: online on post-RoPE Q and K (only useful when the
    KV cache is quantized); ``r4``: online on the down_proj input; ``o_rotation``: online on the o_proj input
    across heads (QuaRot's; R2 rotates only within a head, so heads of different scale stay unequal without it;
    off by default until measured on every preset); ``readers``: online on the q/k/v input and on the gate/up input
    (hidden size, folded into those weights: R1's effect on their activations where R1 is not exact, as under
    Gemma 3's post-norms; two online transforms per layer). ``fold_norms``: fold the norm scales into the linears
    that read them, which R1 needs (a norm commutes with a rotation only at unit scale) and nothing else does; the
    default folds when R1 is applied or the family has no post-norms (Llama, Qwen2, Mistral: as QuaRot, always), so
    on Gemma 3 with ``r1: false`` the norms keep their scales, which damp its massive-activation channels before
    any activation is quantized (folded, those channels reach the activation quantizers at full size). ``seed`` defaults to the run's seed.
    ``fallback`` (``block_diagonal`` or ``random_orthogonal``) is used only for a size with no Hadamard construction;
    without it such a size is an error.

    ``kind``: what R1 and R2 are (:mod:`lowbit.rotations.kinds`): ``hadamard`` (QuaRot's, the default),
    ``hadamard_unsigned``, ``block_hadamard`` (blocks of ``block_size``, default 64), ``orthogonal`` (Haar-random),
    ``bernoulli`` (a ±1/sqrt(n) matrix used as is: not orthogonal, so the model changes) or
    ``bernoulli_orthogonalised``. The online R3 and R4 stay randomized Hadamards, which have a fast transform.
    """

    method: Literal["quarot"] = "quarot"
    phase: ClassVar = "rotation"
    r1: bool = True
    r2: bool = True
    r3: bool = True
    r4: bool = True
    o_rotation: bool = False
    readers: bool = False
    fold_norms: bool | None = None
    seed: int | None = None
    fallback: Literal["block_diagonal", "random_orthogonal"] | None = None
    kind: RotationKind = "hadamard"
    block_size: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _r1_needs_folded_norms(self) -> QuaRotStep:
        if self.r1 and self.fold_norms is False:
            raise ValueError("r1 needs the norm scales folded into their readers: drop fold_norms: false or set "
                             "r1: false")
        if self.block_size is not None and self.kind != "block_hadamard":
            raise ValueError(f"block_size is the block order of kind 'block_hadamard', not of '{self.kind}': drop it "
                             "or set kind: block_hadamard")
        return self


@dataclass
class RotationResult(MethodResult):
    """The rotations a rotation step applied: a description of each (and learning statistics), plus the learned
    rotations themselves when a step learned them (:class:`~lowbit.surgery.spinquant.Rotations`)."""

    key: ClassVar[str] = "rotation"
    details: dict[str, Any] = field(default_factory=dict)
    learned: Any = None

    def report(self) -> dict[str, Any]:
        return dict(self.details)


@register(QuaRotStep)
@torch.no_grad()
def apply(model: nn.Module, step: QuaRotStep, session: Session) -> RotationResult:
    """Fold norms and apply the rotations the step asks for."""
    spec = session.spec
    if step.r1:
        check_residual_rotation(spec)
    seeds = rotation_seeds(model, spec, session.seed if step.seed is None else step.seed)
    fold = step.fold_norms if step.fold_norms is not None else step.r1 or not spec.writer_norms
    details: dict[str, Any] = {"untied_lm_head_bytes": fold_norms(model, spec) if fold else 0}
    r1, r2 = random_r1_r2(model, seeds, step.fallback, step.kind, step.block_size)
    if step.r1:
        rotate_residual(model, spec, r1.dense())
        details["R1"] = r1.description
    if step.r2:
        rotate_heads(model, spec, [r.dense() for r in r2])
        details["R2"] = r2[0].description + f" (one per layer, {len(r2)} seeds)"
    details.update(add_online_rotations(model, spec, seeds, step.r3, step.r4, step.fallback, step.o_rotation,
                                        readers=step.readers))
    return RotationResult(details)
