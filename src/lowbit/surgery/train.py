"""One training loop for everything lowbit learns: SpinQuant's rotations and clips, block-wise fine-tuning (and QAT).

The loop knows no model. The caller gives the loss of each step and the optimizers of what trains; the loop owns
the order of a step, so every method steps alike:

1. every parameter group's learning rate becomes its peak (the group's ``initial_lr``, which is its ``lr`` when
   the loop first sees it, as torch's schedulers record it) times the schedule's factor for the step;
2. the gradients are cleared, the loss computed and back-propagated;
3. ``after_backward(loss)`` may change the gradients (average them over processes) and returns the loss to report;
4. every optimizer steps, then ``after_step()`` may fix the parameters up (clamp scales, keep optimizer state);
5. ``on_step(step, losses)`` sees this run's losses so far (checkpointing) and the progress bar ticks.

``start``/``stop`` run one slice of a schedule that spans ``total`` steps, so a run resumed from a checkpoint
continues with exactly the learning rates it would have had. Data parallel training over torch.distributed (gloo or
NCCL) is :func:`average_gradients` as ``after_backward``, each process computing the loss of its own share of the
step's batch (:func:`rank_and_world`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Schedule = Callable[[int, int], float]  # (step, total steps) -> learning-rate factor
Progress = Callable[[str, int], Callable[..., None]]  # (description, total) -> tick(status)


def cosine(step: int, total: int, warmup: int = 0) -> float:
    """The learning-rate factor at ``step`` of ``total``: linear warmup to 1 over the first ``warmup`` steps, then
    a cosine decay from 1 toward 0 over the rest.

    Without warmup this is SpinQuant's schedule; block-wise fine-tuning warms up because Adam's first updates move
    every parameter by about the full learning rate whatever its gradient, which would undo a good starting point.
    """
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclass
class Trainer:
    """The optimizers of what trains, the schedule over ``total`` steps and the hooks around each step."""

    optimizers: Sequence[torch.optim.Optimizer]
    total: int
    schedule: Schedule = cosine
    after_backward: Callable[[Tensor], Tensor] | None = None
    after_step: Callable[[], None] | None = None

    def run(
        self,
        loss_at: Callable[[int], Tensor],
        start: int = 0,
        stop: int | None = None,
        on_step: Callable[[int, list[float]], None] | None = None,
        progress: Progress | None = None,
        label: str = "training",
    ) -> list[float]:
        """Steps ``start`` to ``stop`` (default: ``total``) on ``loss_at(step)``; returns their losses.

        Runs with gradients enabled (recipes run under ``no_grad``).
        """
        stop = self.total if stop is None else min(stop, self.total)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        tick = progress(label, stop - start) if progress else (lambda *_: None)
        losses: list[float] = []
        with torch.enable_grad():
            for step in range(start, stop):
                losses.append(self.step(loss_at, step))
                if on_step is not None:
                    on_step(step, losses)
                tick(f"loss {losses[-1]:.3f}")
        return losses

    def step(self, loss_at: Callable[[int], Tensor], step: int) -> float:
        """One step (see the module docstring); returns its loss."""
        factor = self.schedule(step, self.total)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            optimizer.zero_grad(set_to_none=True)
        loss = loss_at(step)
        loss.backward()
        if self.after_backward is not None:
            loss = self.after_backward(loss)
        for optimizer in self.optimizers:
            optimizer.step()
        if self.after_step is not None:
            self.after_step()
        return float(loss.detach())


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, or (0, 1) when not distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(optimizers: Sequence[torch.optim.Optimizer], loss: Tensor) -> Tensor:
    """Under torch.distributed, all-reduce the trained parameters' gradients and the loss to their mean over
    processes (gloo or NCCL), so that every process takes the same step; returns the loss to report."""
    _, world = rank_and_world()
    if world == 1:
        return loss
    import torch.distributed as dist

    for p in (p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]):
        if p.grad is not None:  # the same on every process: each runs the same graph
            dist.all_reduce(p.grad)
            p.grad /= world
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total / world


def autocast(kind: str, device: torch.device):
    """bfloat16 autocast on ``device``'s type for ``kind == "bf16"``, a no-op context for ``"off"`` (training steps
    run faster under it on CPUs with bf16 instructions; what they train stays float32)."""
    if kind not in ("off", "bf16"):
        raise ValueError(f"autocast must be 'off' or 'bf16', got {kind!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=kind == "bf16")
