"""What quantization-aware training distils from: the full-precision model's next-token distributions on its text.

Two kinds, one interface (:class:`Teacher`: the training and held-out sequences, and the student's KL from the
teacher on any of them):

* :class:`LiveTeacher` keeps a frozen full-precision copy of the model beside the student and runs it on each batch:
  the exact KL over the whole vocabulary (LLM-QAT's loss), at the cost of a second model in memory and a teacher
  forward every step.
* :class:`TopKTeacher` runs the full-precision model once over every sequence before any step changes it and keeps,
  per token, the log-probabilities of its ``k`` most likely next tokens (sparse knowledge distillation). The loss is
  the KL between the two distributions coarsened to those ``k`` tokens and one bucket for the rest
  (:func:`topk_kl`): a lower bound of the full KL that equals it when the rest holds no mass. Its gradient is the
  full KL's on the k tokens; on the rest it can only push the student's own shape of the rest up or down. It needs
  no second model, so a model that only fits offloaded can train; at ``k = 1024`` it stores 8 KB a token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def kl_from_teacher(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over tokens of ``KL(teacher || student)`` of the next-token distributions, computed in float32."""
    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def _log1mexp(a: Tensor) -> Tensor:
    """``log(1 - exp(a))`` for ``a <= 0``, accurate at both ends (``-inf`` at ``a = 0``)."""
    return torch.where(a > -0.6931, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def topk_kl(student_logits: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """Mean over tokens of the KL from the teacher of the student's next-token distribution, both coarsened to the
    teacher's top-k tokens plus one bucket for every other token.

    ``values`` / ``indices``: ``[..., k]`` the teacher's log-probabilities of its ``k`` most likely tokens and their
    ids; ``student_logits``: ``[..., vocab]``. Computed in float32; the student's rest-bucket is kept at least 1e-6
    so that a student sure of the top-k keeps a finite gradient.
    """
    s = F.log_softmax(student_logits.float(), dim=-1)
    s_k = s.gather(-1, indices.long())
    t = values.float()
    head = (t.exp() * (t - s_k)).sum(-1)
    t_rest = (-torch.expm1(t.logsumexp(-1))).clamp_min(0.0)  # the teacher's mass outside its top k
    s_rest = _log1mexp(s_k.logsumexp(-1).clamp_max(-1e-6))
    rest = t_rest * (torch.log(t_rest.clamp_min(torch.finfo(torch.float32).tiny)) - s_rest)
    return (head + rest).mean()


class Teacher:
    """The full-precision model's next-token distributions on the training sequences ``batches`` ``[n, L]`` and the
    ``held_out`` ones ``[m, L]`` (None: nothing held out)."""

    batches: Tensor
    held_out: Tensor | None

    @property
    def name(self) -> str:
        """What the distributions come from, for reports (``model``, ``top-1024``)."""
        raise NotImplementedError

    def tokens(self, held: bool = False) -> Tensor:
        """The training sequences, or the held-out ones."""
        if held and self.held_out is None:
            raise ValueError("this teacher holds no held-out sequences")
        return self.held_out if held else self.batches

    def kl(self, student_logits: Tensor, rows: Tensor, held: bool = False) -> Tensor:
        """Mean over tokens of the student's KL from the teacher, given the student's logits on sequences ``rows``
        of :meth:`tokens`."""
        raise NotImplementedError


@dataclass
class LiveTeacher(Teacher):
    """A frozen full-precision copy of the model, run on each batch (the exact KL)."""

    batches: Tensor
    held_out: Tensor | None
    model: nn.Module

    @property
    def name(self) -> str:
        return "model"

    def kl(self, student_logits: Tensor, rows: Tensor, held: bool = False) -> Tensor:
        with torch.no_grad():
            target = self.model(self.tokens(held)[rows], use_cache=False).logits
        return kl_from_teacher(student_logits, target)


@dataclass
class TopKTeacher(Teacher):
    """The model's top-``k`` next-token log-probabilities on every sequence, computed once (see the module
    docstring): ``values`` float32 and ``indices`` int32 ``[n, L, k]``, and the same for the held-out sequences."""

    batches: Tensor
    held_out: Tensor | None
    values: Tensor
    indices: Tensor
    held_values: Tensor | None = None
    held_indices: Tensor | None = None

    @classmethod
    @torch.no_grad()
    def cache(cls, model: nn.Module, batches: Tensor, held_out: Tensor | None, k: int,
              batch: int = 1) -> TopKTeacher:
        """Run ``model`` (full precision, unchanged) over every sequence, ``batch`` a pass, and keep its top ``k``."""
        def top(tokens: Tensor) -> tuple[Tensor, Tensor]:
            values, indices = [], []
            for part in tokens.split(batch):
                log_probs = F.log_softmax(model(part, use_cache=False).logits.float(), dim=-1)
                best = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
                values.append(best.values)
                indices.append(best.indices.to(torch.int32))
            return torch.cat(values), torch.cat(indices)

        values, indices = top(batches)
        held = top(held_out) if held_out is not None else (None, None)
        return cls(batches, held_out, values, indices, *held)

    @property
    def name(self) -> str:
        return f"top-{self.values.shape[-1]}"

    def kl(self, student_logits: Tensor, rows: Tensor, held: bool = False) -> Tensor:
        self.tokens(held)
        values, indices = (self.held_values, self.held_indices) if held else (self.values, self.indices)
        return topk_kl(student_logits, values[rows], indices[rows])
