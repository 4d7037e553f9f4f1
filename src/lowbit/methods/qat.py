"""Quantization-aware training (LLM-QAT's logit distillation, EfficientQAT's end-to-end phase) on any quantized model.

The step runs last (phase ``train``), on the model every earlier step and quantizer left: QuaRot, SpinQuant or
PrefixQuant results alike. The math is in :mod:`lowbit.surgery.qat`; this module is the recipe step: which text it
trains on, what trains, and what it reports.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import CalibrationError, ModelError
from ..surgery.checkpoint import (
    check_checkpoint_path,
    load_checkpoint,
    model_digest,
    save_checkpoint,
    tensor_digest,
)
from ..surgery.clips import clip_summary
from ..surgery.kvcache import packed_cache_suspended
from ..surgery.offload import checkpointable, is_offloaded
from ..surgery.qat import QATConfig, Trained, distill, self_generated
from ..surgery.teacher import LiveTeacher, TopKTeacher
from ..surgery.train import rank_and_world
from .registry import MethodResult, StepConfig, register
from .session import Session

LR_SCALE_FIXED_CODES = 0.004  # lr_scale's default for train: scales / scales_norms
LR_SCALE_WEIGHTS = 0.001  # ... and for train: weights


class QATStep(StepConfig):
    """End-to-end quantization-aware training of the quantized model, distilled from the full-precision one.

    ``steps`` of AdamW on ``batch`` sequences each, drawn from ``samples`` sequences of ``seq_len`` tokens of
    ``data``: ``calibration`` (the calibration text) or ``self`` (sampled from the full-precision model itself, so
    a user without text can still train). ``holdout`` more sequences are kept out of training (the last tokens of
    the calibration text, or more samples of the model's own text) and the KL on them measured before training and
    every ``eval_every`` steps: the model keeps the trained values of the best measurement, the start included
    (``holdout: 0``: the last step's, no validation). ``checkpoint``: a safetensors file written every
    ``checkpoint_every`` steps (trained values, optimizer state, the best values so far); a run with the same
    settings, model and text resumes from it exactly. ``train``: ``scales`` (the default: weight scales on the fixed
    codes the earlier steps chose, static activation/KV scales), ``scales_norms`` (and the norm weights) or
    ``weights`` (and the latent weights; the scales then get LSQ's gradient through the rounding). The scales alone
    measured best and cheapest (benchmarks/README.md, QAT ablation). Scales stored in float16, FP8 or E8M0 train on
    (and end at) values of that dtype, straight-through. ``clips``: and every dynamic activation/KV quantizer's clip
    ratio (Adam on its logit, ``lr_clip``). Learning rates are scale-free:
    ``lr_weight`` in units of each linear's quantization step, ``lr_scale`` relative to each scale; ``lr_norm`` is
    absolute (norm weights are about 1). The defaults are about LLM-QAT's learning rate (2e-5 on weights whose
    4-bit step is about 1e-2) in these units: ten times more shakes a PTQ result off its codes at the end of the
    warmup faster than training recovers them (benchmarks/README.md, QAT). ``lr_scale``'s default follows what
    trains: 0.001 with ``weights``, 0.004 with the scales on fixed codes (``scales``, ``scales_norms``; measured
    better there, QAT ablation). With ``train: weights`` and weights in groups (g64), the group scales diverged at
    the default ``lr_scale`` where per-channel scales did not (same place): fix them with ``lr_scale: 0``. Loss: KL
    of the quantized model's next-token distribution from the full-precision one's. ``teacher``: where that comes
    from (:mod:`lowbit.surgery.teacher`): ``model``, a full-precision copy kept beside the student (the exact KL over
    the vocabulary; twice the model in memory); ``topk``, the full-precision model's ``top_k`` most likely next
    tokens per position, computed once before any step changes it (the KL over those and one bucket for the rest;
    no second model; 8 KB a token at the default 1024, which measured as good as ``model``, where 64 did not:
    benchmarks/README.md, QAT); ``auto`` (the default), ``model`` for a model in memory and ``topk`` for a model
    accelerate offloads, which trains streamed, one weight matrix in memory at a time (scales and norms only:
    ``train: weights`` would hold AdamW's moments for every weight). With ``topk`` the held-out KL that picks the
    kept step is the same coarse KL.
    ``autocast: bf16``: the training steps run under bfloat16 autocast (faster on CPUs with bf16 instructions;
    held-out checks and everything kept stay float32). A packed KV cache (``kv_cache``) is not trained through (its
    codes have no gradient): training and the held-out checks see exact keys and values, and the cache applies
    again after.
    """

    method: Literal["qat"] = "qat"
    phase: ClassVar = "train"
    steps: int = Field(default=200, ge=1)
    samples: int = Field(default=64, ge=1)
    seq_len: int = Field(default=512, ge=2)
    batch: int = Field(default=1, ge=1)
    data: Literal["calibration", "self"] = "calibration"
    train: Trained = "scales"
    lr_weight: float = Field(default=0.002, ge=0)
    lr_scale: float = Field(default=LR_SCALE_FIXED_CODES, ge=0)  # LR_SCALE_WEIGHTS with train: weights
    lr_norm: float = Field(default=2e-5, ge=0)
    clips: bool = False
    teacher: Literal["auto", "model", "topk"] = "auto"
    top_k: int = Field(default=1024, ge=1)
    lr_clip: float = Field(default=0.01, ge=0)
    autocast: Literal["bf16", "off"] = "off"
    seed: int | None = None
    holdout: int = Field(default=8, ge=0)
    eval_every: int = Field(default=25, ge=1)
    checkpoint: str | None = None
    checkpoint_every: int = Field(default=25, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _scale_rate_for_what_trains(cls, data: object) -> object:
        """The default ``lr_scale`` of what trains: a scale on fixed codes takes a larger step than one moving
        with its latent weights."""
        if isinstance(data, dict) and data.get("train") == "weights" and "lr_scale" not in data:
            data = {**data, "lr_scale": LR_SCALE_WEIGHTS}
        return data

    def needs_calibration(self) -> bool:
        return self.data == "calibration"


@dataclass
class QATResult(MethodResult):
    """The loss of every step (KL from the full-precision model on the training batches), the held-out KL at each
    measured step and the step kept, what trained, on which text, from which teacher, and the wall time (of
    training: a top-k teacher's cache is made before the first step, in the quantize time)."""

    key: ClassVar[str] = "qat"
    losses: list[float] = field(default_factory=list)
    held_out: dict[int, float] = field(default_factory=dict)
    kept_step: int = 0
    train: str = ""
    data: str = ""
    tokens: int = 0
    seconds: float = 0.0
    clips: dict[str, float] = field(default_factory=dict)
    teacher: str = "model"

    def report(self) -> dict:
        head, tail = self.losses[:10], self.losses[-10:]
        return {"steps": len(self.losses), "train": self.train, "data": self.data, "tokens": self.tokens,
                "teacher": self.teacher,
                "kl_first_10": sum(head) / max(1, len(head)), "kl_last_10": sum(tail) / max(1, len(tail)),
                "held_out_kl": {str(k): v for k, v in self.held_out.items()}, "kept_step": self.kept_step,
                "losses": self.losses, "seconds": round(self.seconds, 3),
                **({"clip_ratios": clip_summary(self.clips)} if self.clips else {})}


@torch.no_grad()
def prepare(model: nn.Module, step: QATStep, session: Session) -> None:
    """Before any step changes ``model``: the training and held-out text, and the teacher on it (see
    :class:`QATStep`'s ``teacher``)."""
    offloaded = is_offloaded(model)
    kind = step.teacher if step.teacher != "auto" else ("topk" if offloaded else "model")
    if offloaded:
        _check_streamable(model, step, kind)
    if step.checkpoint is not None:  # a path no file can be written to fails now, not at the first save
        check_checkpoint_path(step.checkpoint)
    seed = _seed(step, session)
    batches, held = _texts(step, session, seed, model)
    if kind == "model":
        teacher = copy.deepcopy(model).eval()
        teacher.requires_grad_(False)
        session.teacher = LiveTeacher(batches, held, teacher)
    else:
        session.teacher = TopKTeacher.cache(model, batches, held, step.top_k, step.batch)


def _check_streamable(model: nn.Module, step: QATStep, kind: str) -> None:
    """Refuse, before anything changes, what cannot train on an offloaded model."""
    if kind == "model":
        raise ModelError("teacher: model keeps a full-precision copy beside the student, and this model is offloaded "
                         "(a copy would share its offload store): use teacher: topk (or auto), or load it in memory")
    if step.train == "weights":
        raise ModelError("train: weights on an offloaded model would hold AdamW's two moments for every weight in "
                         "memory: train scales or scales_norms, or load the model in memory")
    if not checkpointable(model):
        raise ModelError(f"qat on an offloaded model checkpoints transformers decoder layers, and "
                         f"{type(model).__name__} has none: load it in memory")


@register(QATStep, prepare=prepare)
@torch.no_grad()
def apply(model: nn.Module, step: QATStep, session: Session) -> QATResult:
    """Distil the quantized ``model`` from the session's full-precision teacher (see the module docstring)."""
    start = time.perf_counter()
    seed = _seed(step, session)
    teacher = session.teacher
    batches, held = teacher.batches, teacher.held_out
    config = QATConfig(step.steps, step.batch, step.train, step.lr_weight, step.lr_scale, step.lr_norm, seed,
                       step.eval_every, step.clips, step.lr_clip, step.autocast)
    resume, save = None, None
    if step.checkpoint is not None:  # bound to these settings, this model and this text: never someone else's run
        fingerprint = {**step.model_dump(mode="json", exclude={"checkpoint", "checkpoint_every"}), "seed": seed,
                       "model": model_digest(model), "text": tensor_digest(batches),
                       "held_out": None if held is None else tensor_digest(held), "world": rank_and_world()[1]}
        found = load_checkpoint(step.checkpoint, fingerprint)
        resume = None if found is None else (found[0], found[1]["progress"])

        def save(tensors: dict, progress: dict) -> None:
            save_checkpoint(step.checkpoint, tensors, {**fingerprint, "progress": progress})
    with packed_cache_suspended(model):  # trains (and validates) on exact KV: a packed cache's codes have no gradient
        done = distill(model, teacher, config, session.progress, resume, save, step.checkpoint_every)
    return QATResult(done.losses, done.held_out, done.kept_step, step.train, step.data, int(batches.numel()),
                     time.perf_counter() - start, done.clips, teacher.name)


def _seed(step: QATStep, session: Session) -> int:
    """The step's own seed, else the session's."""
    return session.seed if step.seed is None else step.seed


def _texts(step: QATStep, session: Session, seed: int, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training sequences and the held-out ones (None when ``holdout`` is 0), never overlapping; ``model``: the
    full-precision model, whose own text ``data: self`` samples."""
    if step.data == "self":
        text = self_generated(model, step.samples + step.holdout, step.seq_len, seed)
        return text[: step.samples], (text[step.samples :] if step.holdout else None)
    calibration = session.calibration_text("quantization-aware training")
    if not step.holdout:
        return calibration.sample(step.samples, step.seq_len), None
    if calibration.held_out is None:
        raise CalibrationError("quantization-aware training with holdout needs calibration text that can hold out "
                               "its end: pass data from lowbit.prepare_data, or set holdout: 0")
    reserve = step.holdout * step.seq_len
    held = calibration.held_out(step.holdout, step.seq_len)
    return calibration.sample(step.samples, step.seq_len, reserve=reserve), held
