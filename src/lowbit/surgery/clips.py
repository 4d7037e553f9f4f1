"""Learnable clip ratios of dynamic activation/KV quantizers, shared by the steps that train them.

Each dynamic quantizer shrinks its observed range by a clip ratio. Learning one ratio per quantizer (OmniQuant's LAC,
OSTQuant's learnable clipping) trains a logit per quantizer (:mod:`~lowbit.quant.clip`): SpinQuant learns them with
the rotations, quantization-aware training with the weights. While they train, each quantizer reads its ratio from
the shared logit vector; :func:`fix_clips` writes the learned ratios into the quantizers' schemes and unbinds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..quant.clip import clip_from_logit, logit_from_clip
from .attach import act_quantizers


@dataclass
class LearnedClips:
    """One learnable clip ratio per dynamic activation/KV quantizer, as logits (:mod:`~lowbit.quant.clip`).

    ``names``: the quantizers' names, in the order of ``logits``. ``adam``: the Adam state of ``logits`` after the
    last step (``exp_avg``, ``exp_avg_sq``, ``step``), kept so that a resumed run continues exactly.
    """

    names: list[str]
    logits: nn.Parameter
    adam: dict[str, Tensor] = field(default_factory=dict)

    def ratios(self) -> dict[str, float]:
        """The learned clip ratio of each quantizer, by name."""
        return dict(zip(self.names, clip_from_logit(self.logits.detach()).tolist()))

    def summary(self) -> dict:
        """The report's account: how many ratios were learned, their min, median and max."""
        return clip_summary(self.ratios())

    def bind(self, model: nn.Module) -> None:
        """Make each named quantizer of ``model`` read its clip ratio from ``logits``."""
        quantizers = {q.name: q for q in act_quantizers(model)}
        missing = [n for n in self.names if n not in quantizers]
        if missing:
            raise ValueError(f"learned clips name quantizers the model lacks: {missing[:3]}")
        for i, name in enumerate(self.names):
            quantizers[name].learned_clip = (self.logits, i)


def initial_clips(model: nn.Module, dynamic_only: bool = False) -> LearnedClips:
    """One logit per activation/KV quantizer of ``model`` (only the enabled dynamic ones with ``dynamic_only``),
    started at its scheme's clip ratio (a ratio of 1 starts just below it, see :func:`logit_from_clip`)."""
    quantizers = [q for q in act_quantizers(model) if not dynamic_only or (q.enabled and not q.static)]
    logits = torch.tensor([logit_from_clip(q.scheme.clip_ratio) for q in quantizers])
    return LearnedClips([q.name for q in quantizers], nn.Parameter(logits))


def fix_clips(model: nn.Module, clips: LearnedClips) -> None:
    """End learning: every bound quantizer of ``model`` keeps its learned ratio in its scheme and stops reading the
    logits."""
    ratios = clips.ratios()
    for q in act_quantizers(model):
        if q.name in ratios:
            q.scheme = q.scheme.model_copy(update={"clip_ratio": ratios[q.name]})
            q.learned_clip = None


def clip_summary(ratios: dict[str, float]) -> dict:
    """``{"learned": n, "min", "median", "max"}`` of learned clip ratios (empty when there are none)."""
    if not ratios:
        return {}
    values = torch.tensor(list(ratios.values()))
    return {"learned": len(values), "min": round(float(values.min()), 4),
            "median": round(float(values.median()), 4), "max": round(float(values.max()), 4)}
