"""Kinds of offline rotation (QuaRot's R1 and R2), to compare what makes a rotation good for quantization.

Every kind is a seeded n×n matrix ``Q`` applied as ``x @ Q`` and folded into the weights (readers ``W @ Q``, writers
``Q.T @ W``), which leaves the model's outputs unchanged exactly when ``Q`` is orthogonal:

* ``hadamard``: the randomized Hadamard ``H · diag(±1) / sqrt(n)`` (QuaRot;
  :func:`~lowbit.rotations.random_hadamard`).
* ``hadamard_unsigned``: the same Hadamard without the random signs, ``H / sqrt(n)``: whether the signs matter.
* ``block_hadamard``: randomized Hadamards of order ``block`` (the largest constructible divisor of n up to it) on
  the diagonal: spreads an outlier over one block only, the cheap kind for online use.
* ``orthogonal``: Haar-random, the QR of a Gaussian (:func:`~lowbit.rotations.random_orthogonal`).
* ``bernoulli``: the random ±1/sqrt(n) matrix of random-projection arguments, used as it is. It is only nearly
  orthogonal (``Q Q^T = I + E`` with entries of E about 1/sqrt(n)), so folding it changes the model: the kind
  measures how much.
* ``bernoulli_orthogonalised``: that matrix's polar factor ``U V^T`` (from its SVD ``U S V^T``), the orthogonal
  matrix nearest to it in Frobenius norm, so the ±1 spread is kept as far as orthogonality allows.

Learned rotations (SpinQuant) are the fifth family; they come from :mod:`lowbit.methods.spinquant`, not from here.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

import torch
from torch import Tensor

from lowbit.rotations.fast import dense_matrix
from lowbit.rotations.hadamard import block_diagonal_plan
from lowbit.rotations.rotation import RotationMatrix, random_hadamard, random_orthogonal, random_signs

RotationKind = Literal["hadamard", "hadamard_unsigned", "block_hadamard", "orthogonal", "bernoulli",
                       "bernoulli_orthogonalised"]
KINDS: Final[tuple[str, ...]] = get_args(RotationKind)
DEFAULT_BLOCK: Final = 64


def bernoulli(n: int, seed: int) -> Tensor:
    """A seeded n×n float64 matrix of independent ±1/sqrt(n) entries (rows of unit norm, not orthogonal)."""
    bits = torch.randint(0, 2, (n, n), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
    return (bits * 2 - 1).to(torch.float64) / n**0.5


def polar_factor(m: Tensor) -> Tensor:
    """The orthogonal matrix nearest to the square matrix ``m`` in Frobenius norm: ``U V^T`` of ``m = U S V^T``."""
    u, _, vh = torch.linalg.svd(m)
    return u @ vh


def _dense(n: int, description: str, matrix: Tensor) -> RotationMatrix:
    return RotationMatrix(n, description, None, None, matrix)


def offline_rotation(kind: RotationKind, n: int, seed: int, fallback: str | None = None,
                     block: int | None = None) -> RotationMatrix:
    """The ``kind`` rotation of order ``n`` from ``seed`` (module doc). ``fallback`` applies to the Hadamard kinds
    when n has no construction (as in :func:`random_hadamard`); ``block`` is the block order of ``block_hadamard``
    (default 64)."""
    if kind == "hadamard":
        return random_hadamard(n, seed, fallback)
    if kind == "hadamard_unsigned":
        signed = random_hadamard(n, seed, fallback)
        if signed.plan is None:  # the random_orthogonal fallback has no Hadamard to take the signs from
            return signed
        return RotationMatrix(n, f"Hadamard {signed.plan.describe()} / sqrt({signed.plan.block_size}), no signs",
                              signed.plan, None, None, signed.fallback)
    if kind == "block_hadamard":
        plan = block_diagonal_plan(n, block or DEFAULT_BLOCK)
        signs = random_signs(n, seed)
        return _dense(n, f"block-diagonal random Hadamard {plan.describe()} · diag(±1, seed={seed}) / "
                         f"sqrt({plan.block_size})", dense_matrix(plan, signs))
    if kind == "orthogonal":
        matrix, description = random_orthogonal(n, seed)
        return _dense(n, description, matrix)
    if kind == "bernoulli":
        return _dense(n, f"Bernoulli ±1/sqrt({n}) (seed={seed}), not orthogonalised", bernoulli(n, seed))
    if kind == "bernoulli_orthogonalised":
        return _dense(n, f"polar factor of Bernoulli ±1/sqrt({n}) (seed={seed})", polar_factor(bernoulli(n, seed)))
    raise ValueError(f"unknown rotation kind {kind!r}; choose one of {', '.join(KINDS)}")
