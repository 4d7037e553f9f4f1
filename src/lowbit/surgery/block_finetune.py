"""EfficientQAT-style fine-tuning of one decoder layer: weights and quantizer scales, MSE to the full-precision output.

Every quantized linear of the layer trains its latent weight and its per-channel weight scale through the quantizer
(:meth:`QuantLinear.learn_weight`); every static activation/KV quantizer trains its scale
(:meth:`ActQuantizer.learn_scale`). Rounding is straight-through and scales get the LSQ gradient. AdamW (no weight
decay), a short linear warmup and a cosine learning-rate decay to zero; the layer's other parameters (norms) stay frozen. At the end the
weights are rounded with their learned scales and everything is frozen again.

Learning rates are scale-free: Adam moves every parameter by about its learning rate per step, so each tensor gets
its own rate, ``lr_weight`` in units of that linear's mean quantization step for weights and ``lr_scale`` relative
to the mean of each scale tensor. Weight scales around 0.01 and activation scales around 1 then move alike, and the
same settings suit any model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from .linear import QuantLinear
from .quantizer import ActQuantizer


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int
    batch: int
    lr_weight: float
    lr_scale: float
    seed: int = 0


WARMUP = 0.1  # share of the steps over which the learning rate rises linearly before the cosine decay


def warmup_cosine(step: int, steps: int) -> float:
    """Learning-rate factor: a linear warmup over the first ``WARMUP`` share of ``steps``, then cosine to zero.

    Adam's first updates move every parameter by about the full learning rate whatever its gradient; starting
    from a good quantized state, the warmup keeps those first steps from undoing it.
    """
    warm = max(1, round(WARMUP * steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _trainable(layer: nn.Module) -> tuple[list[QuantLinear], list[ActQuantizer]]:
    linears = [m for m in layer.modules() if isinstance(m, QuantLinear) and m.weight_scheme is not None]
    quants = [m for m in layer.modules() if isinstance(m, ActQuantizer) and m.static and m.calibrated and m.enabled]
    return linears, quants


def finetune_layer(
    layer: nn.Module,
    forward: Callable[[Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    config: FinetuneConfig,
    on_step: Callable[[float], None] | None = None,
    latent: dict[QuantLinear, Tensor] | None = None,
) -> list[float]:
    """Train ``layer`` so that ``forward(inputs[i])`` matches ``targets[i]``; returns the mean loss of each epoch.

    ``inputs``/``targets``: ``[n, T, hidden]`` samples; ``forward`` runs the layer on a batch of them. ``latent``:
    the float weights before rounding, where known (RTN), to train from instead of the rounded ones.
    """
    linears, quants = _trainable(layer)
    if not linears and not quants or config.epochs == 0:
        return []
    frozen = {p: p.requires_grad for p in layer.parameters()}
    layer.requires_grad_(False)
    groups, scales = [], []
    for linear in linears:
        w, s = linear.learn_weight(None if latent is None else latent.get(linear))
        step = float(s.detach().abs().mean())
        groups += [{"params": [w], "lr": config.lr_weight * step}, {"params": [s], "lr": config.lr_scale * step}]
        scales.append(s)
    for q in quants:
        s = q.learn_scale()
        groups.append({"params": [s], "lr": config.lr_scale * float(s.detach().abs().mean())})
        scales.append(s)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    steps = config.epochs * math.ceil(len(inputs) / config.batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_cosine, steps=steps))
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    try:
        with torch.enable_grad():
            for _ in range(config.epochs):
                total = 0.0
                for batch in torch.randperm(len(inputs), generator=generator).split(config.batch):
                    loss = (forward(inputs[batch]).float() - targets[batch].float()).square().mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    with torch.no_grad():
                        for s in scales:
                            s.clamp_(min=1e-8)
                    value = loss.item()
                    total += value * len(batch)
                    if on_step is not None:
                        on_step(value)
                losses.append(total / len(inputs))
    finally:
        for linear in linears:
            linear.freeze_weight()
        for q in quants:
            q.freeze_scale()
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return losses
