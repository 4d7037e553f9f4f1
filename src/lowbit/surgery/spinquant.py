"""SpinQuant: learn R1 and the per-layer R2 with Cayley SGD so that the quantized model loses less, then fold them.

Reference: Liu et al., "SpinQuant: LLM Quantization with Learned Rotations", 2024, arXiv 2405.16406.

The model is prepared as for QuaRot (norms folded, lm_head untied, R4 folded into down_proj with its online
Hadamard, R3 online on Q/K) and given the recipe's activation and KV fake-quantizers (straight-through rounding).
All weights stay frozen. Each training step computes the rotated weights from the frozen originals as a
differentiable function of R1 and R2 (:func:`rotated_parameters`), runs the model on them with
``torch.func.functional_call``, and takes one :class:`~lowbit.rotations.cayley.CayleySGD` step on the next-token
cross-entropy of calibration text. The learned rotations are then folded into the weights exactly like QuaRot's
(float64) and the fake-quantizers removed, so GPTQ (or RTN) runs next as in the QuaRot flow.

With ``learn`` including ``clips``, one clip ratio per activation/KV quantizer trains alongside (Adam on a logit,
:mod:`~lowbit.quant.clip`), as OmniQuant's and OSTQuant's learnable clipping; with ``clips`` alone the rotations stay
QuaRot's Hadamards.

Unlike the reference, the gradient also flows through the quantizers' dynamic scales (``TrainConfig.scale_grad``):
a rotation changes the rounding error mainly through the range it gives each token, and a gradient with the
scales detached treats that error as a constant (on the default model it then raises the held-out loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.arch import ArchSpec, decoder_layers, get_module, head_dim
from ..rotations.cayley import CayleySGD
from .attach import quantizers_off, scale_gradients
from .clips import LearnedClips
from .rotate import rotate_bias_heads, rotate_input_heads, rotate_output_heads
from .train import Trainer, autocast, average_gradients, cosine, rank_and_world


@dataclass
class Rotations:
    """Trainable R1 (hidden × hidden) and one R2 (head_dim × head_dim) per layer, float32 parameters.

    ``o``: a fixed (not learned) rotation of o_proj's input across heads, applied after R2 (``W_o · R2 · o``), when
    the recipe asks for one; it is hooked online at o_proj's input while learning. ``clips``: the quantizers'
    learnable clip ratios, when they learn too.
    """

    r1: nn.Parameter
    r2: list[nn.Parameter]
    o: Tensor | None = None
    clips: LearnedClips | None = None

    def parameters(self) -> list[nn.Parameter]:
        return [self.r1, *self.r2]

    def max_orthogonality_error(self) -> float:
        """``max |R^T R - I|`` over every rotation."""
        errs = []
        for r in self.parameters():
            x = r.detach().double()
            errs.append(float((x.T @ x - torch.eye(x.shape[0], dtype=torch.float64)).abs().max()))
        return max(errs)


def _param_name(spec: ArchSpec, i: int, path: str, kind: str = "weight") -> str:
    return f"{spec.layers}.{i}.{path}.{kind}"


def frozen_originals(model: nn.Module, spec: ArchSpec) -> dict[str, Tensor]:
    """Detached copies of every parameter the rotations touch, keyed by parameter name."""
    names = [f"{spec.embed}.weight", f"{spec.lm_head}.weight"]
    for i, layer in enumerate(decoder_layers(model, spec)):
        for path in (*spec.residual_readers, *spec.residual_writers):
            names.append(_param_name(spec, i, path))
            if get_module(layer, path).bias is not None:
                names.append(_param_name(spec, i, path, "bias"))
    params = dict(model.named_parameters(remove_duplicate=False))
    return {n: params[n].detach().clone() for n in names}


def rotated_parameters(originals: dict[str, Tensor], spec: ArchSpec, rot: Rotations, d: int) -> dict[str, Tensor]:
    """The rotated weights, differentiable in R1 and R2 (the same maps as QuaRot's in-place rotation).

    Readers of the residual stream (embedding rows, q/k/v/gate/up, lm_head) become ``W @ R1``; writers (o, down)
    ``R1^T @ W`` with bias ``b @ R1``; v_proj's output heads ``R2^T`` per head and o_proj's input heads ``@ R2``,
    then ``@ rot.o`` across heads when there is one.
    """
    r1 = rot.r1
    out = {f"{spec.embed}.weight": originals[f"{spec.embed}.weight"] @ r1,
           f"{spec.lm_head}.weight": originals[f"{spec.lm_head}.weight"] @ r1}
    for i, r2 in enumerate(rot.r2):
        for path in spec.residual_readers:
            out[_param_name(spec, i, path)] = originals[_param_name(spec, i, path)] @ r1
            if (bias := _param_name(spec, i, path, "bias")) in originals:
                out[bias] = originals[bias]
        for path in spec.residual_writers:
            out[_param_name(spec, i, path)] = r1.T @ originals[_param_name(spec, i, path)]
            if (bias := _param_name(spec, i, path, "bias")) in originals:
                out[bias] = originals[bias] @ r1
        v, o = _param_name(spec, i, spec.v), _param_name(spec, i, spec.o)
        out[v] = rotate_output_heads(out[v], r2, d)
        if (bias := _param_name(spec, i, spec.v, "bias")) in originals:
            out[bias] = rotate_bias_heads(originals[bias], r2, d)
        out[o] = rotate_input_heads(out[o], r2, d)
        if rot.o is not None:
            out[o] = out[o] @ rot.o
    return out


@dataclass
class TrainConfig:
    """How rotations are learned: ``steps`` Cayley SGD steps at peak ``lr`` with cosine decay, ``batch`` samples."""

    steps: int = 100
    lr: float = 0.05
    momentum: float = 0.0
    batch: int = 1
    norm: str = "one"  # the norm of the Cayley direction that caps the step (see CayleySGD)
    weights: object | None = None  # a QuantScheme: RTN fake-quantize the rotated linear weights while learning
    scale_grad: bool = True  # gradients through the dynamic scales (see fake_quantize); False: the reference's STE
    autocast: str = "off"  # "bf16": forward and backward under bfloat16 autocast (faster on CPUs with bf16)
    loss: str = "ce"  # "ce": next-token cross-entropy (the reference); "kl": KL from the full-precision model
    learn: tuple[str, ...] = ("rotations",)  # what trains: "rotations" (Cayley SGD) and/or "clips" (Adam)
    clip_lr: float = 0.1  # Adam's peak learning rate for the clip logits (held-out sweep: 0.1 ≈ 0.2 < 0.05 < 0.02)


def train_rotations(model: nn.Module, spec: ArchSpec, rot: Rotations, batches: Tensor, config: TrainConfig,
                    progress=None, start_step: int = 0, on_step=None, stop_step: int | None = None) -> list[float]:
    """Learn ``rot`` on calibration token ``batches`` ``[n, L]``; returns the loss per step.

    ``on_step(step, rot, losses)`` is called after every step with this run's losses so far (checkpointing);
    ``start_step`` resumes the schedule and ``stop_step`` (default ``config.steps``) ends this call early, the
    cosine decay still running over ``config.steps``. Every weight of ``model`` must already be frozen; batches
    cycle in order. The loop is :class:`~lowbit.surgery.train.Trainer`'s.
    """
    originals = frozen_originals(model, spec)
    d = head_dim(model.config)
    if rot.clips is not None:
        rot.clips.bind(model)
    optimizers = _optimizers(rot, config)
    trainer = Trainer(optimizers, config.steps, cosine, after_backward=partial(average_gradients, optimizers),
                      after_step=partial(_keep_adam_state, rot, config, optimizers))
    report = None if on_step is None else lambda step, losses: on_step(step, rot, losses)
    return trainer.run(lambda step: _train_step(model, spec, rot, originals, batches, config, step, d),
                       start_step, stop_step, report, progress, "learning rotations")


def _optimizers(rot: Rotations, config: TrainConfig) -> list[torch.optim.Optimizer]:
    """The optimizers ``config.learn`` asks for, each at its peak learning rate: Cayley SGD for the rotations, Adam
    for the clip logits (its state restored from ``rot.clips.adam`` when resuming)."""
    unknown = set(config.learn) - {"rotations", "clips"}
    if unknown or not config.learn:
        raise ValueError(f"learn must name 'rotations' and/or 'clips', got {list(config.learn)}")
    optimizers: list[torch.optim.Optimizer] = []
    for p in rot.parameters():  # fixed rotations need no gradient
        p.requires_grad_("rotations" in config.learn)
    if "rotations" in config.learn:
        optimizers.append(CayleySGD(rot.parameters(), lr=config.lr, momentum=config.momentum, norm=config.norm))
    if "clips" in config.learn:
        if rot.clips is None:
            raise ValueError("learning clips needs rot.clips (one logit per quantizer)")
        adam = torch.optim.Adam([rot.clips.logits], lr=config.clip_lr)
        if rot.clips.adam:
            adam.state[rot.clips.logits] = {k: v.clone() for k, v in rot.clips.adam.items()}
        optimizers.append(adam)
    return optimizers


def _keep_adam_state(rot: Rotations, config: TrainConfig, optimizers: list[torch.optim.Optimizer]) -> None:
    """After a step, copy the clip logits' Adam state into ``rot.clips`` so that a checkpoint resumes exactly."""
    if rot.clips is not None and "clips" in config.learn:
        rot.clips.adam = {k: v.detach().clone() for k, v in optimizers[-1].state[rot.clips.logits].items()}


def _train_step(model, spec, rot, originals, batches, config, step: int, d: int) -> Tensor:
    """The loss of training step ``step`` on this process's share of the step's batch (batches cycle in order).

    Under torch.distributed each process takes its own ``batch`` samples of the step's global batch
    (``batch * world`` samples) and the rotations' gradients are averaged (:func:`.train.average_gradients`), so every
    process takes the same step: the same result as one process with a ``batch * world`` batch.
    """
    rank, world = rank_and_world()
    first = (step * world + rank) * config.batch
    tokens = batches[torch.arange(first, first + config.batch) % len(batches)]
    with autocast(config.autocast, rot.r1.device):
        return rotation_loss(model, spec, rot, originals, tokens, d, config.weights, config.scale_grad, config.loss)


def rotation_loss(model, spec, rot: Rotations, originals, tokens: Tensor, d: int, weights=None,
                  scale_grad: bool = False, loss: str = "ce") -> Tensor:
    """The training loss of ``model`` on ``tokens`` ``[B, L]`` with rotations ``rot`` applied to the frozen
    ``originals`` (and the linears RTN fake-quantized with ``weights``, a QuantScheme, when given).

    ``loss``: ``"ce"``, next-token cross-entropy on the text (the reference's); ``"kl"``, the KL divergence of the
    quantized model's next-token distribution from the full-precision model's (the same weights with every
    quantizer off, which the rotations leave unchanged). KL scores each position against the whole teacher
    distribution instead of one sampled token, so its gradient measures only what quantization changes.
    ``scale_grad``: every dynamic quantizer (activations, KV, weights) passes gradient through its scale, so the
    rotations are credited for the smaller rounding error of a flatter tensor; see
    :func:`~lowbit.quant.fake_quantize`.
    """
    if loss not in ("ce", "kl"):
        raise ValueError(f"loss must be 'ce' or 'kl', got {loss!r}")
    params = rotated_parameters(originals, spec, rot, d)
    teacher = _teacher_log_probs(model, params, tokens) if loss == "kl" else None
    if weights is not None:
        params = _fake_quantize_linears(params, spec, weights, scale_grad)
    with scale_gradients(model, scale_grad):
        logits = torch.func.functional_call(model, params, (tokens,), {"use_cache": False}).logits
    if teacher is not None:
        student = F.log_softmax(logits.flatten(0, 1).float(), dim=-1)
        return F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def _teacher_log_probs(model: nn.Module, params: dict[str, Tensor], tokens: Tensor) -> Tensor:
    """Full-precision next-token log-probabilities ``[B·L, vocab]``: ``model`` with every quantizer off, no grad."""
    detached = {name: p.detach() for name, p in params.items()}
    with quantizers_off(model), torch.no_grad():
        logits = torch.func.functional_call(model, detached, (tokens,), {"use_cache": False}).logits
    return F.log_softmax(logits.flatten(0, 1).float(), dim=-1)




def _fake_quantize_linears(params: dict[str, Tensor], spec: ArchSpec, scheme, scale_grad: bool) -> dict[str, Tensor]:
    """RTN fake-quantize the decoder linears' rotated weights (straight-through), for weight-only SpinQuant."""
    from ..quant import fake_quantize
    from .quantizer import granularity_for

    fmt, gran = scheme.number_format(), granularity_for(scheme, "weight")
    linear = f"{spec.layers}."
    return {name: fake_quantize(w, fmt, gran, clip_ratio=scheme.clip_ratio, scale_grad=scale_grad)
            if name.startswith(linear) and name.endswith(".weight") else w for name, w in params.items()}
