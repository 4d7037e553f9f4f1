"""EfficientQAT-style fine-tuning of one decoder layer: weights and quantizer scales, MSE to the full-precision output.

Every quantized linear of the layer trains its latent weight and its per-channel weight scale through the quantizer
(:meth:`QuantLinear.learn_weight`); every static activation/KV quantizer trains its scale
(:meth:`ActQuantizer.learn_scale`). Rounding is straight-through and scales get the LSQ gradient. AdamW (no weight
decay), a short linear warmup and a cosine learning-rate decay to zero, in the shared loop of :mod:`.train`; the
layer's other parameters (norms) stay frozen. At the end the weights are rounded with their learned scales and
everything is frozen again.

Learning rates are scale-free: Adam moves every parameter by about its learning rate per step, so each tensor gets
its own rate, ``lr_weight`` in units of that linear's mean quantization step for weights and ``lr_scale`` relative
to the mean of each scale tensor. Weight scales around 0.01 and activation scales around 1 then move alike, and the
same settings suit any model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .linear import QuantLinear
from .offload import onloaded
from .quantizer import ActQuantizer
from .train import Trainer, cosine


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int
    batch: int
    lr_weight: float
    lr_scale: float
    seed: int = 0
    relative: bool = False  # the loss: each token's squared error relative to its target's (see output_error)


WARMUP = 0.1  # share of the steps over which the learning rate rises linearly before the cosine decay


def output_error(out: Tensor, target: Tensor, relative: bool = False) -> Tensor:
    """The mean squared error of a layer's outputs ``[..., hidden]``; ``relative``: each token's squared error
    divided by its target's squared norm, then the mean over tokens. Every consumer of the residual stream normalises
    each token first (RMSNorm), so a token's error matters relative to its own norm; the plain MSE is instead ruled
    by the few tokens with massive activations (the first token's can be 1000x the median)."""
    error = (out.float() - target.float()).square()
    if not relative:
        return error.mean()
    return (error.sum(-1) / target.float().square().sum(-1).clamp_min(1e-12)).mean()


def warmup_cosine(step: int, steps: int) -> float:
    """Learning-rate factor: :func:`~lowbit.surgery.train.cosine` with a linear warmup over the first ``WARMUP``
    share of ``steps`` (at least one step): starting from a good quantized state, the warmup keeps Adam's first,
    full-size updates from undoing it."""
    return cosine(step, steps, warmup=max(1, round(WARMUP * steps)))


def trainable(module: nn.Module) -> tuple[list[QuantLinear], list[ActQuantizer]]:
    """What quantization-aware training can train inside ``module``: the quantized linears (latent weights and weight
    scales) and the calibrated static activation/KV quantizers (scales); dynamic quantizers have no scale to learn."""
    linears = [m for m in module.modules() if isinstance(m, QuantLinear) and m.weight_scheme is not None]
    quants = [m for m in module.modules() if isinstance(m, ActQuantizer) and m.static and m.calibrated and m.enabled]
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

    ``inputs``/``targets``: ``[n, T, hidden]`` samples; ``forward`` runs the layer on a batch of them. ``on_step``
    sees each step's loss. ``latent``: the float weights before rounding, where known (RTN), to train from instead
    of the rounded ones.
    """
    linears, quants = trainable(layer)
    if not linears and not quants or config.epochs == 0:
        return []
    frozen = gradient_flags(layer)
    layer.requires_grad_(False)
    groups, scales = learn(linears, quants, config.lr_weight, config.lr_scale, latent)
    order = shuffled_batches(len(inputs), config.batch, config.seed, config.epochs)

    def loss_at(step: int) -> Tensor:
        batch = order[step]
        return output_error(forward(inputs[batch]), targets[batch], config.relative)

    trainer = Trainer([torch.optim.AdamW(groups, weight_decay=0.0)], len(order), warmup_cosine,
                      after_step=sign_keeper(scales))
    try:
        losses = trainer.run(loss_at, on_step=None if on_step is None else lambda _, seen: on_step(seen[-1]))
    finally:
        freeze(linears, quants, layer, frozen)
    return _epoch_means(losses, order, len(inputs), config.epochs)


def gradient_flags(module: nn.Module) -> dict[str, bool]:
    """Each parameter's ``requires_grad`` by name (names outlive the tensors an offload store swaps in and out)."""
    return {name: p.requires_grad for name, p in module.named_parameters()}


def freeze(linears: list[QuantLinear], quants: list[ActQuantizer], module: nn.Module, flags: dict[str, bool]) -> None:
    """Round the weights with their learned scales (an offloaded weight is brought in for it and written back), fix
    every scale, and give ``module``'s parameters back their gradient ``flags`` (:func:`gradient_flags`)."""
    for linear in linears:
        with onloaded(linear):
            linear.freeze_weight()
    for q in quants:
        q.freeze_scale()
    for name, p in module.named_parameters():
        p.requires_grad_(flags.get(name, False))


def learn(linears: list[QuantLinear], quants: list[ActQuantizer], lr_weight: float, lr_scale: float,
          latent: dict[QuantLinear, Tensor] | None = None, weights: bool = True) -> tuple[list[dict], list[Tensor]]:
    """Make the weights (unless ``weights`` is false) and scales trainable; returns AdamW's parameter groups (each
    with its scale-free learning rate: ``lr_weight`` in quantization steps, ``lr_scale`` relative to the scale) and
    the scales."""
    groups, scales = [], []
    for linear in linears:
        w, s = linear.learn_weight(None if latent is None else latent.get(linear), codes_fixed=not weights)
        step = float(s.detach().abs().mean())
        if weights:
            groups.append({"params": [w], "lr": lr_weight * step})
        groups.append({"params": [s], "lr": lr_scale * step})
        scales.append(s)
    for q in quants:
        s = q.learn_scale()
        groups.append({"params": [s], "lr": lr_scale * float(s.detach().abs().mean())})
        scales.append(s)
    return groups, scales


def shuffled_batches(n: int, batch: int, seed: int, epochs: int) -> list[Tensor]:
    """The sample indices of every step: each epoch a seeded shuffle of the ``n`` samples, ``batch`` a step."""
    generator = torch.Generator().manual_seed(seed)
    return [b for _ in range(epochs) for b in torch.randperm(n, generator=generator).split(batch)]


def sign_keeper(scales: list[Tensor]) -> Callable[[], None]:
    """An after-step hook that keeps every trained scale on the side of zero it started on, at least 1e-8 from it.

    Scales are positive except on full-range int grids (``int_range: full``), whose signed scale puts each granule's
    largest-magnitude value on the grid's negative end: a step must neither flip that sign nor reach zero."""
    signs = [torch.where(s.detach() < 0, -1.0, 1.0).to(s.dtype) for s in scales]

    @torch.no_grad()
    def keep() -> None:
        for s, sign in zip(scales, signs, strict=True):
            s.copy_(sign * (s * sign).clamp(min=1e-8))

    return keep


def _epoch_means(losses: list[float], order: list[Tensor], n: int, epochs: int) -> list[float]:
    """The sample-weighted mean loss of each epoch."""
    per_epoch = len(order) // epochs
    means = []
    for e in range(epochs):
        total = 0.0
        for value, batch in zip(losses[e * per_epoch:(e + 1) * per_epoch], order[e * per_epoch:(e + 1) * per_epoch]):
            total += value * len(batch)
        means.append(total / n)
    return means
