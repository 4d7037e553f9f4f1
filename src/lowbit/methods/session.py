"""The typed state a recipe's steps share while they quantize one model, and what they leave for the report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ..errors import CalibrationError
from ..models.arch import ArchSpec
from ..surgery.teacher import Teacher
from .registry import MethodResult

if TYPE_CHECKING:
    from ..recipe import Recipe

Progress = Callable[..., Callable[..., None]]  # (description, total) -> tick(status=None)
R = TypeVar("R", bound=MethodResult)


@dataclass
class Calibration:
    """Calibration text: ``default()`` gives the recipe's ``[samples, seq_len]`` batches, ``sample(n, L)`` others
    (methods with their own sample counts and lengths; ``reserve=T`` keeps clear of the text's last T tokens), and
    ``held_out(n, L)`` consecutive windows of those last tokens (validation text). All are seeded and disjoint from
    evaluation text."""

    default: Callable[[], torch.Tensor]
    sample: Callable[..., torch.Tensor]
    held_out: Callable[[int, int], torch.Tensor] | None = None


@dataclass
class Prefix:
    """PrefixQuant's prefix: its token ids and their full-precision key/value cache (a transformers cache)."""

    tokens: list[int]
    cache: Any


@dataclass
class Session:
    """What the steps of one :func:`lowbit.apply.apply_recipe` call share.

    Inputs: the recipe, the model's architecture, the seed, calibration text and a progress callback. Filled by the
    steps: the prefix (PrefixQuant), learned clip ratios by quantizer name, and each method's typed result.
    """

    recipe: Recipe
    spec: ArchSpec
    seed: int = 0
    calibration: Calibration | None = None
    progress: Progress | None = None
    prefix: Prefix | None = None
    clip_ratios: dict[str, float] = field(default_factory=dict)
    teacher: Teacher | None = None  # the full-precision model's distributions, for the ``train`` step
    results: list[MethodResult] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: {"quantize": 0.0, "calibrate": 0.0, "train": 0.0})

    def calibration_text(self, what: str) -> Calibration:
        """The calibration text, or a clear error naming ``what`` needs it."""
        if self.calibration is None:
            raise CalibrationError(f"{what} needs calibration text: pass calibration data (--calib-data)")
        return self.calibration

    @property
    def default_calibration(self) -> Callable[[], torch.Tensor] | None:
        """The calibration text's default batches as a callable (what quantizers that measure something on
        calibration text take), or None without calibration text."""
        return self.calibration.default if self.calibration is not None else None

    def tick(self, description: str, total: int) -> Callable[..., None]:
        """A progress tick for ``total`` units of work (a no-op without a progress callback)."""
        return self.progress(description, total) if self.progress else (lambda *_: None)

    def get(self, kind: type[R]) -> R | None:
        """The result of type ``kind`` a step recorded, if any."""
        return next((r for r in self.results if isinstance(r, kind)), None)

    def report(self) -> dict[str, dict]:
        """Each result's report section under its key."""
        return {r.key: r.report() for r in self.results}
