"""Hadamard matrices and seeded orthogonal rotations for rotation-based quantization (pure tensor math).

Layers, each depending only on the ones before it:

1. :mod:`~lowbit.rotations.galois` — finite fields GF(p^k) (irreducible modulus found by search, quadratic character).
2. :mod:`~lowbit.rotations.constructions` — base ±1 matrices: Sylvester, Paley I/II, Goethals–Seidel circulants.
3. :mod:`~lowbit.rotations.hadamard` — :func:`find_construction` searches Kronecker factorisations of n and returns a
   :class:`HadamardPlan`; :func:`hadamard_matrix` materializes it exactly; :class:`HadamardError` when none is known.
4. :mod:`~lowbit.rotations.fast` — :func:`hadamard_transform` applies ``x @ H · diag(s) / sqrt(n)`` factor by factor
   (dense small factors, Walsh–Hadamard butterflies) and :func:`dense_matrix` is its dense equivalent.
5. :mod:`~lowbit.rotations.rotation` — :func:`random_hadamard` (a :class:`RotationMatrix`) and the explicit fallbacks
   :func:`block_diagonal_hadamard` and :func:`random_orthogonal`.
"""

from lowbit.rotations.fast import dense_matrix, hadamard_transform
from lowbit.rotations.galois import GaloisField, galois_field, prime_power
from lowbit.rotations.hadamard import (
    FALLBACKS,
    HadamardError,
    HadamardFactor,
    HadamardPlan,
    block_diagonal_plan,
    find_construction,
    hadamard_matrix,
    try_find_construction,
)
from lowbit.rotations.rotation import (
    RotationMatrix,
    block_diagonal_hadamard,
    random_hadamard,
    random_orthogonal,
    random_signs,
    rotation_from_record,
    rotation_record,
)

__all__ = [
    "FALLBACKS",
    "GaloisField",
    "HadamardError",
    "HadamardFactor",
    "HadamardPlan",
    "RotationMatrix",
    "block_diagonal_hadamard",
    "block_diagonal_plan",
    "dense_matrix",
    "find_construction",
    "galois_field",
    "hadamard_matrix",
    "hadamard_transform",
    "prime_power",
    "random_hadamard",
    "random_orthogonal",
    "random_signs",
    "rotation_from_record",
    "rotation_record",
    "try_find_construction",
]
