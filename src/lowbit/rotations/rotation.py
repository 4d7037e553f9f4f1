"""Seeded random orthogonal rotations: randomized Hadamard ``H · diag(±1) / sqrt(n)`` and the explicit fallbacks.

:func:`random_hadamard` is the rotation used for quantization (QuaRot-style): orthogonal, float64, reproducible from
the seed, and applied in O(n log n)-ish time through its plan. When n has no Hadamard construction it raises
:class:`~lowbit.rotations.hadamard.HadamardError` unless the caller named a fallback: ``"block_diagonal"``
(:func:`block_diagonal_hadamard`, still fast) or ``"random_orthogonal"`` (:func:`random_orthogonal`, dense).
A fallback is never chosen silently, and it is only used when n has no construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import torch
from torch import Tensor

from lowbit.rotations.fast import dense_matrix, hadamard_transform, output_scale
from lowbit.rotations.hadamard import (
    FALLBACKS,
    HadamardPlan,
    block_diagonal_plan,
    find_construction,
    try_find_construction,
)

DENSE_UP_TO: Final = 256  # rotations up to this size apply as one cached dense product


@dataclass(frozen=True, eq=False)
class RotationMatrix:
    """An n×n orthogonal rotation ``Q`` applied as ``x @ Q``; compared by identity (it holds tensors).

    ``plan`` and ``signs`` define ``Q = dense_matrix(plan, signs)`` for the Hadamard kinds; ``matrix`` holds the
    dense float64 Q only when it was asked for (always for ``random_orthogonal``, which has no factored form).
    ``fallback`` is None for a true randomized Hadamard, else the name of the fallback that produced Q.
    """

    n: int
    description: str
    plan: HadamardPlan | None
    signs: Tensor | None
    matrix: Tensor | None = None
    fallback: str | None = None
    _dense_cache: dict = field(default_factory=dict, init=False, repr=False)
    _scale_cache: dict = field(default_factory=dict, init=False, repr=False)  # the factored path's output scale

    def dense(self) -> Tensor:
        """The dense float64 Q: the stored matrix, or built from the plan and signs (a fresh tensor each call)."""
        if self.matrix is not None:
            return self.matrix.clone()
        if self.plan is None:
            raise ValueError("a rotation needs a matrix or a plan: build it with a constructor of this module")
        return dense_matrix(self.plan, self.signs)

    def apply(self, x: Tensor) -> Tensor:
        """``x @ Q`` over the last dimension, keeping x's dtype.

        Sizes above ``DENSE_UP_TO`` with a plan use the factored transform; smaller ones (and the dense fallback)
        one product with Q, cached per device and compute dtype (float64 for float64 inputs, else float32), since a
        single small GEMM beats the factored stages' overhead there (``benchmarks/hadamard.py``).
        """
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        key = (x.device, dtype)
        if self.plan is not None and self.n > DENSE_UP_TO:
            scale = self._scale_cache.get(key)
            if scale is None:
                scale = self._scale_cache[key] = output_scale(self.plan, self.signs, dtype, x.device)
            return hadamard_transform(x, self.plan, self.signs, scale)
        if key not in self._dense_cache:
            self._dense_cache[key] = self.dense().to(device=x.device, dtype=dtype)
        return (x.to(dtype) @ self._dense_cache[key]).to(x.dtype)


def _generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``, so that rotations are reproducible on any device."""
    return torch.Generator().manual_seed(seed)


def random_signs(n: int, seed: int) -> Tensor:
    """n random ±1 values (float64) drawn from ``seed``."""
    bits = torch.randint(0, 2, (n,), generator=_generator(seed), dtype=torch.int64)
    return (bits * 2 - 1).to(torch.float64)


def random_orthogonal(n: int, seed: int) -> tuple[Tensor, str]:
    """A seeded Haar-random orthogonal n×n float64 matrix (QR of a Gaussian, columns sign-fixed by diag(R)).

    The sign fix makes the factorisation unique, so the distribution is uniform over the orthogonal group.
    Returns the matrix and a description.
    """
    gaussian = torch.randn(n, n, generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    diag = torch.diagonal(r)
    q = q * torch.where(diag < 0, -1.0, 1.0).to(q.dtype)[None, :]
    return q, f"random_orthogonal(n={n}, seed={seed}): QR of a Gaussian with sign fix"


def block_diagonal_hadamard(n: int) -> tuple[Tensor, str]:
    """Block-diagonal normalized Hadamard of order n (largest constructible block b dividing n), float64, orthogonal.

    Returns ``blockdiag(H_b, ..., H_b) / sqrt(b)`` and a description such as ``block_diagonal(107 × sylvester(128))``.
    """
    plan = block_diagonal_plan(n)
    return dense_matrix(plan), plan.describe()


def _hadamard_rotation(plan: HadamardPlan, seed: int, materialize: bool, fallback: str | None) -> RotationMatrix:
    """Randomized (block) Hadamard rotation from a plan: signs from the seed, dense matrix only when asked."""
    signs = random_signs(plan.n, seed)
    what = "random Hadamard" if fallback is None else "fallback block-diagonal random Hadamard"
    description = f"{what} {plan.describe()} · diag(±1, seed={seed}) / sqrt({plan.block_size})"
    matrix = dense_matrix(plan, signs) if materialize else None
    return RotationMatrix(plan.n, description, plan, signs, matrix, fallback)


def random_hadamard(n: int, seed: int, fallback: str | None = None, *, materialize: bool = False) -> RotationMatrix:
    """The orthogonal rotation ``Q = H · diag(s) / sqrt(n)`` with H from :func:`find_construction` and s = ±1 from seed.

    Deterministic per seed. ``materialize=True`` also stores the dense float64 Q. When n has no construction this
    raises :class:`HadamardError`, unless ``fallback`` names one of ``"block_diagonal"`` (``blockdiag(H_b) ·
    diag(s) / sqrt(b)``) or ``"random_orthogonal"`` (:func:`random_orthogonal`); a fallback is used only then.
    """
    if fallback is not None and fallback not in FALLBACKS:
        raise ValueError(f"unknown Hadamard fallback {fallback!r}; choose one of {', '.join(FALLBACKS)} or None")
    plan = try_find_construction(n)
    if plan is None and fallback is None:
        plan = find_construction(n)  # raises HadamardError naming n and the explicit fallbacks
    if plan is not None:
        return _hadamard_rotation(plan, seed, materialize, None)
    if fallback == "block_diagonal":
        return _hadamard_rotation(block_diagonal_plan(n), seed, materialize, fallback)
    matrix, description = random_orthogonal(n, seed)
    return RotationMatrix(n, f"fallback {description}", None, None, matrix, fallback)


def rotation_record(rotation: RotationMatrix) -> tuple[dict, dict[str, Tensor]]:
    """What a saved model keeps of a rotation: its size, fallback and plan (JSON-able) and its signs (int8) or,
    without a plan, its dense matrix. :func:`rotation_from_record` rebuilds the same rotation from both."""
    meta = {"n": rotation.n, "fallback": rotation.fallback, "description": rotation.description,
            "plan": rotation.plan.describe() if rotation.plan is not None else None}
    if rotation.plan is None:
        return meta, {"matrix": rotation.dense()}
    return meta, ({} if rotation.signs is None else {"signs": rotation.signs.to(torch.int8)})


def rotation_from_record(meta: dict, tensors: dict[str, Tensor]) -> RotationMatrix:
    """The rotation a :func:`rotation_record` describes; the plan is rebuilt from ``n`` and must match the record."""
    n, fallback = int(meta["n"]), meta.get("fallback")
    if meta.get("plan") is None:
        return RotationMatrix(n, meta["description"], None, None, tensors["matrix"].to(torch.float64), fallback)
    plan = block_diagonal_plan(n) if fallback == "block_diagonal" else find_construction(n)
    if plan.describe() != meta["plan"]:
        raise ValueError(f"rotation of size {n} was saved as {meta['plan']} but this lowbit builds {plan.describe()}")
    signs = tensors.get("signs")
    return RotationMatrix(n, meta["description"], plan, None if signs is None else signs.to(torch.float64), None,
                          fallback)
