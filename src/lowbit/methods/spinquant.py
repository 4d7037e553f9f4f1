"""SpinQuant (Liu et al., 2024, arXiv 2405.16406): learn R1 and the per-layer R2 with Cayley SGD, then fold them in.

The training itself (a differentiable rotated forward, the Cayley and Adam steps) is :mod:`lowbit.surgery.spinquant`;
this module is the recipe step: prepare the model, learn (or load) the rotations, fold them, checkpoint and resume.

Rotations are saved as checkpoints (:mod:`lowbit.surgery.checkpoint`): safetensors (``r1``, ``r2.<layer>``, and
when clips learn ``clip_logits`` with their Adam state) plus metadata (the settings' fingerprint: recipe name, seed,
training settings; then step, the loss curve, the clipped quantizers' names) so that training resumes from its last
checkpoint after an interruption and a recipe can load learned rotations instead of training again
(``rotations: path``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..models.arch import decoder_layers, get_module
from ..surgery.attach import (
    act_quantizers,
    attach_activation_quantizers,
    attach_kv_quantizers,
    quant_linears,
    swap_linears,
)
from ..surgery.attention import KVQuantHook, remove_attention_hooks
from ..surgery.checkpoint import (
    check_checkpoint_path,
    load_checkpoint,
    model_digest,
    read_checkpoint,
    save_checkpoint,
    tensor_digest,
)
from ..surgery.clips import LearnedClips, initial_clips
from ..surgery.rotate import (
    add_online_rotations,
    check_residual_rotation,
    fold_input_rotation,
    fold_norms,
    o_rotation_matrix,
    random_r1_r2,
    rotate_heads,
    rotate_residual,
    rotation_seeds,
)
from ..surgery.spinquant import Rotations, TrainConfig, train_rotations
from .quarot import RotationResult
from .registry import StepConfig, register
from .session import Session


class SpinQuantStep(StepConfig):
    """SpinQuant: learn R1 and the per-layer R2 with Cayley SGD for the recipe's activation/KV quantizers.

    Training starts from QuaRot's seeded random Hadamards (R3/R4 stay fixed Hadamards) and minimises next-token
    cross-entropy with fake-quantized activations and KV on ``samples`` calibration sequences of ``seq_len`` tokens,
    ``batch`` per step, for ``steps`` steps at peak ``lr`` with cosine decay; each step is capped at ``1 / ||W||`` in
    ``step_norm`` (``"one"``: the matrix 1-norm, as the reference; ``"fro"``: Frobenius). The default ``lr`` 0.05 keeps
    steps proportional to the gradient; the reference's 1.5 makes nearly every step the capped one, which on the
    default model undoes in 60 steps most of what 20 steps learn (``benchmarks/spinquant_sweep.py``). ``checkpoint``: a file
    written every ``checkpoint_every`` steps; a run with the same settings resumes from it. ``rotations``: load learned rotations
    from such a file instead of training. ``quantize_weights``: also RTN fake-quantize the linear weights with the
    recipe's weight scheme while learning (for weight-only recipes, where nothing else is quantized).
    ``scale_grad``: gradients also flow through the quantizers' dynamic scales, crediting a rotation for the smaller
    rounding error of flatter tensors (without it, as in the reference, training on the default model raises the
    held-out loss instead of lowering it). ``autocast``: ``bf16`` runs training under bfloat16 autocast (about 1.7×
    faster on a CPU with bf16 instructions), ``off`` in float32; the rotations are always kept and folded in float32/64.
    ``o_rotation``: a fixed seeded rotation of o_proj's input across heads (as the QuaRot step's), online, applied
    after the learned R2 while learning and when folded. ``loss``: ``ce`` trains on next-token cross-entropy (the
    reference), ``kl`` on the KL divergence from the full-precision model's next-token distribution.
    ``learn``: what trains. ``rotations`` is SpinQuant's R1/R2; ``clips`` adds one clip ratio per activation/KV
    quantizer (in (0.5, 1), started at the scheme's ``clip_ratio``, Adam at peak ``clip_lr`` with the same cosine
    decay), as OmniQuant's and OSTQuant's learnable clipping; the recipe's final quantizers then use the learned
    ratios. ``[clips]`` alone keeps QuaRot's Hadamards: QuaRot with learned clipping. Clips need dynamic activation
    and KV schemes (static scales get theirs from calibration and the blockwise step's search).
    """

    method: Literal["spinquant"] = "spinquant"
    phase: ClassVar = "rotation"
    steps: int = Field(default=100, ge=1)
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    step_norm: Literal["one", "fro"] = "one"
    samples: int = Field(default=100, ge=1)
    seq_len: int = Field(default=512, ge=2)
    batch: int = Field(default=1, ge=1)
    r3: bool = True
    r4: bool = True
    seed: int | None = None
    checkpoint: str | None = None
    checkpoint_every: int = Field(default=10, ge=1)
    rotations: str | None = None
    quantize_weights: bool = False
    scale_grad: bool = True
    autocast: Literal["bf16", "off"] = "off"
    o_rotation: bool = False
    loss: Literal["ce", "kl"] = "ce"
    learn: list[Literal["rotations", "clips"]] = Field(default=["rotations"], min_length=1)
    clip_lr: float = Field(default=0.1, gt=0)

    @field_validator("learn")
    @classmethod
    def _learn_once_each(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"learn names each of rotations, clips at most once, got {value}")
        return value

    def needs_calibration(self) -> bool:
        return self.rotations is None  # a rotations file replaces learning


_ADAM = "clip_adam."


def save_rotations(path: str | Path, rot: Rotations, meta: dict) -> None:
    """Write rotations (and learned clips) with metadata atomically: a partial file never replaces a good checkpoint.

    The fixed rotation across heads is not stored (it is rebuilt from the seed); the metadata records whether the
    rotations were learned with one.
    """
    tensors = {"r1": rot.r1, **{f"r2.{i}": r for i, r in enumerate(rot.r2)}}
    meta = {**meta, "o_rotation": rot.o is not None}
    if rot.clips is not None:
        tensors["clip_logits"] = rot.clips.logits
        tensors.update({_ADAM + k: v.reshape(-1) for k, v in rot.clips.adam.items()})
        meta["clip_names"] = rot.clips.names
    save_checkpoint(path, tensors, meta)


def load_rotations(path: str | Path) -> tuple[Rotations, dict]:
    """Rotations and metadata from :func:`save_rotations`; a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        from ..errors import RecipeError

        raise RecipeError(f"rotations file {path} not found: train rotations first or fix the path")
    return _rotations(*read_checkpoint(path))


def _rotations(tensors: dict[str, torch.Tensor], meta: dict) -> tuple[Rotations, dict]:
    """The :class:`Rotations` (with their learned clips and Adam state, when saved) of a rotations file's tensors."""
    keys = sorted((k for k in tensors if k.startswith("r2.")), key=lambda k: int(k.split(".")[1]))
    rot = Rotations(nn.Parameter(tensors["r1"]), [nn.Parameter(tensors[k]) for k in keys])
    if "clip_logits" in tensors:
        adam = {k.removeprefix(_ADAM): v for k, v in tensors.items() if k.startswith(_ADAM)}
        adam = {k: v.reshape(()) if k == "step" else v for k, v in adam.items()}
        rot.clips = LearnedClips(list(meta["clip_names"]), nn.Parameter(tensors["clip_logits"]), adam)
    return rot, meta


def initial_rotations(model: nn.Module, spec, seed: int) -> Rotations:
    """QuaRot's seeded random Hadamards for R1 and every R2: where SpinQuant starts."""
    r1, r2 = random_r1_r2(model, rotation_seeds(model, spec, seed))
    return Rotations(nn.Parameter(r1.dense().float()), [nn.Parameter(r.dense().float()) for r in r2])


def prepare_training(model: nn.Module, spec, recipe, seed: int, r3: bool, r4: bool, o_rotation: bool = False,
                     calibration=None) -> dict:
    """Fold norms, fix R3/R4, attach the recipe's fake-quantizers for training; returns rotation info.
    ``calibration()``: batches that measure the KV quantizers' key centres (``key_centre: mean``; keys do not change
    under R1/R2, so the centres hold while the rotations learn).

    With ``o_rotation`` the rotation across heads is hooked at o_proj's input but not folded into its weight: it
    must come after the learned R2 (see :class:`Rotations`).
    """
    info: dict = {"untied_lm_head_bytes": fold_norms(model, spec)}
    seeds = rotation_seeds(model, spec, seed)
    info.update(add_online_rotations(model, spec, seeds, r3, r4, o_rotation=o_rotation, fold_o=False))
    training = training_recipe(recipe)
    if training.activations is not None:
        swap_linears(model, spec, recipe.targets)
        attach_activation_quantizers(model, training.activations)
    if training.kv is not None:
        attach_kv_quantizers(model, spec, training.kv, calibration)
    return info


def training_recipe(recipe):
    """The recipe whose quantizers rotations learn through: static schemes become their dynamic per-token form.

    Static scales are fitted after the rotations exist (and after a PrefixQuant prefix removes the outlier tokens),
    so while learning, the same format is applied with dynamic per-token (activations) or per-token-and-head (KV)
    scales, SpinQuant's own setting.
    """
    changes = {}
    if recipe.activations is not None and not recipe.activations.dynamic:
        changes["activations"] = recipe.activations.model_copy(update={"dynamic": True, "granularity": "token"})
    if recipe.kv is not None and not recipe.kv.dynamic:
        changes["kv"] = recipe.kv.model_copy(update={"dynamic": True, "granularity": "head"})
    return recipe.model_copy(update=changes) if changes else recipe


def _remove_training_quantizers(model: nn.Module, spec) -> None:
    """Take the fake-quantizers off again: the recipe attaches its own after the weight step, as for QuaRot."""
    for _, linear in quant_linears(model):
        linear.input_quant = None
    for layer in decoder_layers(model, spec):
        remove_attention_hooks(get_module(layer, spec.attn), lambda h: isinstance(h, KVQuantHook))
    left = [q.name for q in act_quantizers(model)]
    if left:
        raise RuntimeError(f"training quantizers left attached after SpinQuant: {left[:3]}")


def _resume(step, rot: Rotations, fingerprint: dict) -> tuple[Rotations, int, list[float]]:
    """The checkpoint's rotations, next step and losses when it matches this run; else a fresh start."""
    found = load_checkpoint(step.checkpoint, fingerprint)
    if found is None:
        return rot, 0, []
    saved, meta = _rotations(*found)
    if len(saved.r2) != len(rot.r2):
        return rot, 0, []
    return saved, int(meta["step"]) + 1, list(meta.get("losses", []))


@register(SpinQuantStep)
def apply(model: nn.Module, step: SpinQuantStep, session: Session) -> RotationResult:
    """Learn (or load) R1/R2 (and clip ratios) for the recipe's quantizers and fold the rotations in; learned clip
    ratios go to the recipe's final quantizers through ``session.clip_ratios``."""
    seed = session.seed if step.seed is None else step.seed
    spec, recipe = session.spec, session.recipe
    check_residual_rotation(spec, "SpinQuant's learned R1")
    start = time.perf_counter()
    model.requires_grad_(False)
    # loaded rotations learn nothing: no training quantizers, so no key centres to measure for them
    learning = recipe if step.rotations is None else recipe.model_copy(update={"activations": None, "kv": None})
    info = prepare_training(model, spec, learning, seed, step.r3, step.r4, step.o_rotation,
                            session.default_calibration)
    o = o_rotation_matrix(model, rotation_seeds(model, spec, seed)).dense().float() if step.o_rotation else None
    if step.rotations is not None:
        rot, meta = load_rotations(step.rotations)
        _check_o_rotation(step, meta)
        _check_clips(step, rot)
        rot.o = o
        losses = list(meta.get("losses", []))
    else:
        rot, losses = _learn(model, spec, step, session, seed, o)
    if "clips" not in step.learn:
        rot.clips = None
    _remove_training_quantizers(model, spec)
    with torch.no_grad():
        rotate_residual(model, spec, rot.r1.detach().double())
        rotate_heads(model, spec, [r.detach().double() for r in rot.r2])
        if o is not None:
            fold_input_rotation(model, spec, spec.o, o.double())
    info.update(_describe(rot, "rotations" in step.learn))
    info.update({"max_orthogonality_error": rot.max_orthogonality_error(), "losses": [round(x, 4) for x in losses],
                 "seconds": round(time.perf_counter() - start, 3)})
    if rot.clips is not None:
        session.clip_ratios = rot.clips.ratios()
    return RotationResult(info, learned=rot)


def _describe(rot: Rotations, learned: bool) -> dict:
    """The report's account of R1/R2 and of the clip ratios."""
    if learned:
        out = {"R1": "learned (SpinQuant, Cayley SGD) from a seeded random Hadamard",
               "R2": f"learned, one per layer ({len(rot.r2)})"}
    else:
        out = {"R1": "seeded random Hadamard (QuaRot's, not learned)", "R2": f"seeded random Hadamards ({len(rot.r2)})"}
    if rot.clips is not None:
        out["clip_ratios"] = rot.clips.summary()
    return out


def _check_clips(step, rot: Rotations) -> None:
    """A step that learns clips can only load a rotations file that holds them."""
    if "clips" in step.learn and rot.clips is None:
        from ..errors import RecipeError

        raise RecipeError(f"rotations file {step.rotations} holds no learned clip ratios but this step has "
                          "learn: [.., clips]: drop clips from learn or train again with them")


def _check_o_rotation(step, meta: dict) -> None:
    """Rotations learned with (or without) the rotation across heads only fit a recipe that says the same."""
    if bool(meta.get("o_rotation", False)) != step.o_rotation:
        from ..errors import RecipeError

        raise RecipeError(f"rotations file {step.rotations} was learned with o_rotation={meta.get('o_rotation', False)}"
                          f" but this step has o_rotation={step.o_rotation}: make them match or train again")


def _learn(model: nn.Module, spec, step, session: Session, seed: int,
           o: torch.Tensor | None) -> tuple[Rotations, list[float]]:
    """Train from the initial Hadamards (or the matching checkpoint), checkpointing as configured."""
    batches = session.calibration_text("SpinQuant (learning rotations)").sample(step.samples, step.seq_len)
    fingerprint = {"recipe": session.recipe.name, "seed": seed, "steps": step.steps, "lr": step.lr,
                   "samples": step.samples, "seq_len": step.seq_len, "quantize_weights": step.quantize_weights,
                   "batch": step.batch, "step_norm": step.step_norm, "scale_grad": step.scale_grad,
                   "autocast": step.autocast, "o_rotation": step.o_rotation, "loss": step.loss, "learn": step.learn,
                   "clip_lr": step.clip_lr,
                   "schemes": session.recipe.model_dump(mode="json", exclude={"name", "description", "steps"})}
    if step.checkpoint is not None:  # bound to this model and these samples: another's rotations are never resumed
        check_checkpoint_path(step.checkpoint)
        fingerprint.update(model=model_digest(model), calibration=tensor_digest(batches))
    start = initial_rotations(model, spec, seed)
    if "clips" in step.learn:
        start.clips = initial_clips(model)
    rot, first, earlier = _resume(step, start, fingerprint)
    rot.o = o
    weights = session.recipe.weights if step.quantize_weights else None
    config = TrainConfig(steps=step.steps, lr=step.lr, momentum=step.momentum, batch=step.batch, weights=weights,
                         norm=step.step_norm, scale_grad=step.scale_grad, autocast=step.autocast, loss=step.loss,
                         learn=tuple(step.learn), clip_lr=step.clip_lr)

    def checkpoint(i: int, current: Rotations, losses: list[float]) -> None:
        if step.checkpoint is not None and (i + 1 == step.steps or (i + 1) % step.checkpoint_every == 0):
            save_rotations(step.checkpoint, current, {**fingerprint, "step": i, "losses": earlier + losses})

    new = train_rotations(model, spec, rot, batches, config, session.progress, start_step=first, on_step=checkpoint)
    return rot, earlier + new
