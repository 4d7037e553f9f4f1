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
continues with exactly the learning rates it would have had.
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
