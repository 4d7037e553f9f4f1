"""End-to-end quantization-aware training: the whole quantized model distilled from the full-precision one.

The student is the finished fake-quantized model: rounding is straight-through and scales get the LSQ gradient, so
the weights, activations and KV cache it is trained through are the ones it will run with. The loss is the KL
divergence of the student's next-token distribution from the teacher's (LLM-QAT's logit distillation), averaged
over tokens. What trains (:data:`TRAINED`):

* ``scales``: every weight scale, on the weight's fixed integer codes, and every static activation/KV scale
  (EfficientQAT's end-to-end phase);
* ``scales_norms``: those and the norm weights (a learned per-channel input scale of each linear they feed);
* ``weights``: those, the norms and the latent weights themselves (full QAT).

With ``clips``, each dynamic activation/KV quantizer's clip ratio trains too (:mod:`.clips`), from the ratio it has
(SpinQuant's learned one, or the scheme's): a dynamic quantizer has no scale to learn, and its clip is what sets it.

AdamW without weight decay, warmup then cosine decay (the shared loop of :mod:`.train`); learning rates are
scale-free as in :mod:`.block_finetune`. Given held-out sequences, the KL on them is measured before training and
every ``eval_every`` steps, and the student ends with the trained values of the best measurement (the starting
point included): many parameters trained on a short text fit that text and drift from the teacher elsewhere, and
this stops that from leaving a model worse than where training began. At the end every weight is rounded with its
learned scale and every scale frozen: the result is the same kind of quantized model a weight step leaves, ready
to evaluate, save and run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from .block_finetune import freeze, gradient_flags, learn, shuffled_batches, sign_keeper, trainable, warmup_cosine
from .clips import fix_clips, initial_clips
from .offload import checkpointed, is_offloaded, streamed
from .teacher import Teacher
from .train import Trainer, autocast, average_gradients, rank_and_world

Trained = Literal["scales", "scales_norms", "weights"]
TRAINED: tuple[str, ...] = get_args(Trained)


@dataclass(frozen=True)
class QATConfig:
    """Steps, batch (sequences per step), what trains and its learning rates (see the module docstring)."""

    steps: int
    batch: int = 1
    train: Trained = "weights"
    lr_weight: float = 0.002
    lr_scale: float = 0.001
    lr_norm: float = 2e-5
    seed: int = 0
    eval_every: int = 25
    clips: bool = False
    lr_clip: float = 0.01
    autocast: str = "off"  # "bf16": the training steps' forward and backward under bfloat16 autocast


@dataclass
class Distilled:
    """What training did: every step's loss, the held-out KL after each measured step (step 0: before training),
    the step whose trained values the student kept (the last one when nothing was held out), and the learned clip
    ratio of each dynamic quantizer (when clips trained), by name."""

    losses: list[float]
    held_out: dict[int, float]
    kept_step: int
    clips: dict[str, float] = field(default_factory=dict)


def norm_weights(model: nn.Module) -> list[nn.Parameter]:
    """The scale vectors of the model's normalisation layers (RMSNorm / LayerNorm weights)."""
    return [m.weight for m in model.modules() if "Norm" in type(m).__name__ and isinstance(m.weight, nn.Parameter)]


def distill(student: nn.Module, teacher: Teacher, config: QATConfig,
            progress: Callable[[str, int], Callable[..., None]] | None = None,
            resume: tuple[dict[str, Tensor], dict] | None = None,
            save: Callable[[dict[str, Tensor], dict], None] | None = None, save_every: int = 25) -> Distilled:
    """Train ``student`` towards ``teacher`` on its training sequences for ``config.steps`` steps (the samples
    cycled in a seeded order, ``config.batch`` per step), keeping the values that do best on its held-out sequences
    when it has some. The student ends frozen.

    A student whose weights accelerate offloads trains streamed (:func:`~lowbit.surgery.offload.streamed`): its
    weight matrices come in for each module's forward and again for the backward pass, which recomputes each
    decoder layer (:func:`~lowbit.surgery.offload.checkpointed`), so memory holds one weight matrix at a time, each layer's
    input, and one layer's activations; what trains (scales, norms, clips) stays in memory and is written back at the end.

    ``save(tensors, progress)`` is called every ``save_every`` steps and after the last with everything a resumed
    run needs (:func:`training_state`); ``resume`` is such a saved state, from which training continues exactly."""
    linears, quants = trainable(student)
    if not linears and not quants:
        raise ValueError("quantization-aware training needs quantized weights or static scales to train")
    flags, clips = gradient_flags(student), None
    student.requires_grad_(False)
    offloaded = is_offloaded(student)
    try:
        with streamed(student), (checkpointed(student) if offloaded else nullcontext()):
            groups, scales = learn(linears, quants, config.lr_weight, config.lr_scale,
                                   weights=config.train == "weights")
            norms = norm_weights(student) if config.train != "scales" else []
            for w in norms:
                w.requires_grad_(True)
            if norms:
                groups.append({"params": norms, "lr": config.lr_norm})
            clips = initial_clips(student, dynamic_only=True) if config.clips else None
            if clips is not None and clips.names:
                clips.bind(student)
                groups.append({"params": [clips.logits], "lr": config.lr_clip})
            done = _train(student, teacher, config, groups, scales, progress, resume, save, save_every)
        return replace(done, clips=clips.ratios() if clips is not None else {})
    finally:
        freeze(linears, quants, student, flags)
        if clips is not None:
            fix_clips(student, clips)


def _train(student: nn.Module, teacher: Teacher, config: QATConfig, groups: list[dict], scales: list[Tensor],
           progress, resume, save, save_every: int) -> Distilled:
    """The training loop of :func:`distill` over AdamW's parameter ``groups`` (``scales`` kept on their side of
    zero); the student ends with the best held-out values."""
    held_out = teacher.held_out
    rank, world = rank_and_world()
    order = _order(len(teacher.batches), config, world)

    def loss_at(step: int) -> Tensor:
        rows = order[step][rank * config.batch:(rank + 1) * config.batch]
        with autocast(config.autocast, teacher.batches.device):
            return teacher.kl(student(teacher.batches[rows], use_cache=False).logits, rows)

    optimizers = [torch.optim.AdamW(groups, weight_decay=0.0)]
    trainer = Trainer(optimizers, config.steps, warmup_cosine, after_backward=partial(average_gradients, optimizers),
                      after_step=sign_keeper(scales))
    params = [p for g in groups for p in g["params"]]
    best, first, earlier = _Best(params), 0, []
    if resume is not None:
        first, earlier = restore_state(params, optimizers[0], best, *resume)
    elif held_out is not None:
        best.offer(0, held_out_kl(student, teacher, config.batch))

    def on_step(step: int, losses: list[float]) -> None:
        done = step + 1
        if held_out is not None and (done % config.eval_every == 0 or done == config.steps):
            best.offer(done, held_out_kl(student, teacher, config.batch))
        if save is not None and rank == 0 and (done % save_every == 0 or done == config.steps):  # one writer
            save(*training_state(params, optimizers[0], best, done, earlier + losses))

    losses = earlier + trainer.run(loss_at, start=first, on_step=on_step, progress=progress,
                                   label="quantization-aware training")
    best.restore()
    return Distilled(losses, best.history, best.step if held_out is not None else len(losses))


def training_state(params: list[Tensor], optimizer: torch.optim.Optimizer, best: _Best, done: int,
                   losses: list[float]) -> tuple[dict[str, Tensor], dict]:
    """(tensors, progress) of a training run after ``done`` steps: the trained values, AdamW's moments and step
    counts, the best values held so far; the losses and held-out record."""
    tensors: dict[str, Tensor] = {}
    for i, p in enumerate(params):
        tensors[f"param.{i}"] = p.detach().clone()
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"adam.{i}.{key}"] = torch.as_tensor(value).detach().clone()
        if best.saved is not None:
            tensors[f"best.{i}"] = best.saved[i]
    progress = {"step": done, "losses": losses, "held_out": {str(k): v for k, v in best.history.items()},
                "best_step": best.step, "best_kl": best.kl if math.isfinite(best.kl) else None}
    return tensors, progress


@torch.no_grad()
def restore_state(params: list[Tensor], optimizer: torch.optim.Optimizer, best: _Best, tensors: dict[str, Tensor],
                  progress: dict) -> tuple[int, list[float]]:
    """Put a :func:`training_state` back; returns (the next step, the losses so far)."""
    for i, p in enumerate(params):
        p.copy_(tensors[f"param.{i}"])
        state = {key.split(".", 2)[2]: value.clone() for key, value in tensors.items() if key.startswith(f"adam.{i}.")}
        if state:
            optimizer.state[p] = state
    if "best.0" in tensors:
        best.saved = [tensors[f"best.{i}"].clone() for i in range(len(params))]
    best.history = {int(k): v for k, v in progress["held_out"].items()}
    best.step = progress["best_step"]
    best.kl = math.inf if progress["best_kl"] is None else progress["best_kl"]
    return int(progress["step"]), list(progress["losses"])


@torch.no_grad()
def held_out_kl(student: nn.Module, teacher: Teacher, batch: int) -> float:
    """Mean over tokens of the student's KL from the teacher on its held-out sequences, ``batch`` sequences a pass."""
    tokens = teacher.tokens(held=True)
    total = 0.0
    for rows in torch.arange(len(tokens)).split(batch):
        logits = student(tokens[rows], use_cache=False).logits
        total += teacher.kl(logits, rows, held=True).item() * tokens[rows].numel()
    return total / tokens.numel()


class _Best:
    """The trained tensors' values at the best held-out KL offered so far (copies, taken when it improves)."""

    def __init__(self, params: list[Tensor]):
        self.params, self.saved, self.step, self.kl = params, None, 0, math.inf
        self.history: dict[int, float] = {}

    def offer(self, step: int, kl: float) -> None:
        self.history[step] = kl
        if kl < self.kl:
            self.step, self.kl = step, kl
            self.saved = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def restore(self) -> None:
        for p, value in zip(self.params, self.saved or [], strict=False):
            p.copy_(value)


def _order(n: int, config: QATConfig, world: int = 1) -> list[Tensor]:
    """Each step's sample indices: seeded shuffles of the ``n`` samples, one after another, ``config.batch * world``
    a step (under torch.distributed each process takes its own ``config.batch`` of them and the gradients are
    averaged: the steps of one process with the joint batch)."""
    batch = config.batch * world
    if n < batch:
        raise ValueError(f"{n} training sequences cannot fill a step of {config.batch} per process on {world} "
                         "processes: raise samples or lower batch")
    epochs = math.ceil(config.steps / (n // batch))
    steps = shuffled_batches(n, batch, config.seed, epochs)
    if world > 1:  # every process needs its full share: an epoch's short last step is dropped
        steps = [b for b in steps if len(b) == batch]
    return steps[: config.steps]


@torch.no_grad()
def self_generated(teacher: nn.Module, samples: int, seq_len: int, seed: int, batch: int = 16) -> Tensor:
    """``[samples, seq_len]`` token sequences sampled from ``teacher`` itself (LLM-QAT's data-free distillation):
    each starts from the BOS token (a random token when the model has none) and continues by sampling the teacher's
    full next-token distribution (temperature 1, no top-k), never stopping early."""
    config = teacher.config
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, samples, batch):
            n = min(batch, samples - start)
            first = (torch.full((n, 1), config.bos_token_id) if config.bos_token_id is not None
                     else torch.randint(0, config.vocab_size, (n, 1)))
            new = seq_len - 1
            out.append(teacher.generate(first, attention_mask=torch.ones_like(first), do_sample=True, top_k=0,
                                        top_p=1.0, temperature=1.0, max_new_tokens=new, min_new_tokens=new,
                                        pad_token_id=config.eos_token_id or 0))
    return torch.cat(out)
