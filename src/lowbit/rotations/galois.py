"""Finite fields GF(p^k) for the Paley constructions, vectorized over numpy integer arrays.

An element of GF(p^k) is a polynomial of degree < k over GF(p), stored as the integer whose base-p digits are its
coefficients (constant term first): ``sum(c_i * p^i)``. So GF(p) elements are just ``0..p-1``, addition is
digit-wise modulo p, and multiplication is polynomial multiplication reduced modulo a monic irreducible polynomial
of degree k, found by search (the first in lexicographic order of its lower coefficients). Every operation takes and
returns int64 arrays (or anything ``np.asarray`` accepts), so a whole Jacobsthal matrix is built in a few array ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike, NDArray

IntArray = NDArray[np.int64]


def smallest_prime_factor(n: int) -> int:
    """Smallest prime dividing ``n >= 2``, by trial division (the orders here are small)."""
    if n < 2:
        raise ValueError(f"smallest_prime_factor needs n >= 2, got {n}")
    d = 2
    while d * d <= n:
        if n % d == 0:
            return d
        d += 1
    return n


def prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q == p**k`` for a prime p and k >= 1, or None when q is not a prime power."""
    if q < 2:
        return None
    p = smallest_prime_factor(q)
    k, rest = 0, q
    while rest % p == 0:
        rest //= p
        k += 1
    return (p, k) if rest == 1 else None


def _poly_rem(num: list[int], den: list[int], p: int) -> list[int]:
    """Remainder of ``num`` divided by the monic ``den`` over GF(p) (coefficients constant-first)."""
    rem = list(num)
    deg = len(den) - 1
    for top in range(len(rem) - 1, deg - 1, -1):
        coef = rem[top] % p
        if coef:
            for i, d in enumerate(den):
                rem[top - deg + i] = (rem[top - deg + i] - coef * d) % p
    return [c % p for c in rem[:deg]]


def _monic(lower: int, degree: int, p: int) -> list[int]:
    """The monic polynomial of ``degree`` whose lower coefficients are the base-p digits of ``lower``."""
    return [(lower // p**i) % p for i in range(degree)] + [1]


def is_irreducible(poly: list[int], p: int) -> bool:
    """Whether the monic ``poly`` (constant-first) is irreducible over GF(p): no monic factor of degree <= deg/2."""
    degree = len(poly) - 1
    for d in range(1, degree // 2 + 1):
        for lower in range(p**d):
            if not any(_poly_rem(poly, _monic(lower, d, p), p)):
                return False
    return True


def find_irreducible(p: int, k: int) -> tuple[int, ...]:
    """The first monic irreducible polynomial of degree k over GF(p), constant-first, searching lower coefficients."""
    for lower in range(p**k):
        poly = _monic(lower, k, p)
        if is_irreducible(poly, p):
            return tuple(poly)
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # impossible: one always exists


@dataclass(frozen=True)
class GaloisField:
    """GF(p^k) with elements encoded as integers ``0..q-1`` (base-p digits are polynomial coefficients).

    ``modulus`` is the monic irreducible polynomial (constant-first, length k+1) that defines multiplication.
    All operations are vectorized: they accept scalars or arrays and return int64 arrays, never modifying inputs.
    """

    p: int
    k: int
    modulus: tuple[int, ...]

    @property
    def order(self) -> int:
        """Number of elements, ``q = p**k``."""
        return int(self.p**self.k)

    @property
    def minus_one(self) -> int:
        """The encoding of -1, which is the constant polynomial p-1."""
        return self.p - 1

    def _digits(self, a: ArrayLike) -> IntArray:
        """Coefficient digits of elements, shape ``(*a.shape, k)``; rejects values outside ``0..q-1``."""
        arr = np.asarray(a, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.order):
            raise ValueError(f"elements of GF({self.order}) are integers 0..{self.order - 1}")
        powers = self.p ** np.arange(self.k, dtype=np.int64)
        return (arr[..., None] // powers) % self.p

    def _from_digits(self, digits: IntArray) -> IntArray:
        """Elements from coefficient digits (last axis), the inverse of ``_digits``."""
        powers = self.p ** np.arange(digits.shape[-1], dtype=np.int64)
        return (digits % self.p * powers).sum(axis=-1)

    def add(self, a: ArrayLike, b: ArrayLike) -> IntArray:
        """``a + b``: coefficient-wise addition modulo p."""
        return self._from_digits(self._digits(a) + self._digits(b))

    def sub(self, a: ArrayLike, b: ArrayLike) -> IntArray:
        """``a - b``: coefficient-wise subtraction modulo p."""
        return self._from_digits(self._digits(a) - self._digits(b))

    def neg(self, a: ArrayLike) -> IntArray:
        """``-a``."""
        return self._from_digits(-self._digits(a))

    def mul(self, a: ArrayLike, b: ArrayLike) -> IntArray:
        """``a * b``: polynomial product reduced modulo ``modulus``, highest degree first."""
        da, db = np.broadcast_arrays(self._digits(a), self._digits(b))
        k = self.k
        prod = np.zeros((*da.shape[:-1], 2 * k - 1), dtype=np.int64)
        for i in range(k):
            prod[..., i : i + k] += da[..., i : i + 1] * db
        prod %= self.p
        low = np.asarray(self.modulus[:k], dtype=np.int64)
        for top in range(2 * k - 2, k - 1, -1):
            coef = prod[..., top : top + 1]
            prod[..., top - k : top] = (prod[..., top - k : top] - coef * low) % self.p
        return self._from_digits(prod[..., :k])

    def power(self, a: ArrayLike, exponent: int) -> IntArray:
        """``a ** exponent`` for ``exponent >= 0`` by square-and-multiply (``0 ** 0 == 1``)."""
        if exponent < 0:
            raise ValueError(f"power needs a non-negative exponent, got {exponent}")
        base = np.asarray(a, dtype=np.int64)
        result = np.ones_like(base)
        while exponent:
            if exponent & 1:
                result = self.mul(result, base)
            base = self.mul(base, base)
            exponent >>= 1
        return result

    def inverse(self, a: ArrayLike) -> IntArray:
        """``a^-1 = a^(q-2)`` (Fermat); raises on zero, which has no inverse."""
        arr = np.asarray(a, dtype=np.int64)
        if np.any(arr == 0):
            raise ZeroDivisionError(f"0 has no inverse in GF({self.order})")
        return self.power(arr, self.order - 2)

    def quadratic_character(self, a: ArrayLike) -> IntArray:
        """Legendre-type character: 0 at 0, +1 on nonzero squares, -1 otherwise, via Euler's ``a^((q-1)/2)``.

        Only defined for odd q (in characteristic 2 every element is a square).
        """
        if self.p == 2:
            raise ValueError("the quadratic character needs an odd field order")
        euler = self.power(a, (self.order - 1) // 2)
        return np.where(np.asarray(a) == 0, 0, np.where(euler == 1, 1, -1)).astype(np.int64)

    def elements(self) -> IntArray:
        """All elements ``0..q-1``."""
        return np.arange(self.order, dtype=np.int64)


@lru_cache(maxsize=64)
def galois_field(q: int) -> GaloisField:
    """The field of order ``q`` (a prime power), with its irreducible modulus found by search; cached per q."""
    pk = prime_power(q)
    if pk is None:
        raise ValueError(f"GF({q}) does not exist: {q} is not a prime power")
    p, k = pk
    modulus = (0, 1) if k == 1 else find_irreducible(p, k)
    return GaloisField(p=p, k=k, modulus=modulus)
