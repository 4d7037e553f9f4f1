"""Hadamard matrices of a requested order, found by automatic search over constructions and Kronecker products.

A :class:`HadamardPlan` is a Kronecker product of :class:`HadamardFactor` s (Sylvester 2^k, Paley I, Paley II,
Goethals–Seidel), optionally repeated as ``blocks`` copies on the diagonal (the explicit block-diagonal fallback).
:func:`find_construction` searches the factorisations of n and keeps the cheapest one for the fast transform
(smallest sum of dense factor orders, Sylvester counted as log2 of its order), preferring the closed-form
Sylvester/Paley constructions over the searched Goethals–Seidel circulants. :func:`hadamard_matrix` materializes a
plan as an exact int8 ±1 matrix. Orders without a construction raise :class:`HadamardError`, which names the
explicit fallbacks; nothing falls back silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, Literal

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.rotations import constructions
from lowbit.rotations.galois import prime_power

FactorKind = Literal["sylvester", "paley1", "paley2", "goethals_seidel"]
FALLBACKS: Final = ("block_diagonal", "random_orthogonal")

_CLOSED_FORM: Final = 1  # planner tier: Sylvester and Paley only
_WITH_SEARCH: Final = 2  # planner tier: also Goethals–Seidel circulants found by search


class HadamardError(LowbitError, ValueError):
    """No Hadamard matrix of the requested order is known to lowbit; the message names the explicit fallbacks."""


@dataclass(frozen=True)
class HadamardFactor:
    """One base construction: ``kind`` with ``param`` = order (sylvester), q (paley1/paley2) or w (goethals_seidel)."""

    kind: FactorKind
    param: int

    def __post_init__(self) -> None:
        """Reject parameters the construction cannot take, so that every factor describes a real matrix."""
        if not _valid_factor(self.kind, self.param):
            raise ValueError(f"invalid Hadamard factor {self.kind}({self.param})")

    @property
    def order(self) -> int:
        """Order of the factor's matrix."""
        return {
            "sylvester": self.param,
            "paley1": self.param + 1,
            "paley2": 2 * (self.param + 1),
            "goethals_seidel": 4 * self.param,
        }[self.kind]

    @property
    def is_sylvester(self) -> bool:
        """Whether this is a Sylvester factor (applied by a fast Walsh–Hadamard transform, not a dense product)."""
        return self.kind == "sylvester"

    def describe(self) -> str:
        """Human-readable form, e.g. ``paley1(q=19)``, ``sylvester(256)``, ``goethals_seidel(w=43)``."""
        if self.kind == "sylvester":
            return f"sylvester({self.param})"
        name = "w" if self.kind == "goethals_seidel" else "q"
        return f"{self.kind}({name}={self.param})"

    def matrix(self) -> torch.Tensor:
        """The factor's exact ±1 matrix as a fresh int8 tensor (built once, cached, copied on return)."""
        return factor_tensor(self).clone()


def _valid_factor(kind: str, param: int) -> bool:
    """Whether ``kind(param)`` is a construction that exists (Goethals–Seidel is checked lazily by its search)."""
    if not isinstance(param, int) or isinstance(param, bool) or param < 1:
        return False
    if kind == "sylvester":
        return param & (param - 1) == 0
    if kind in ("paley1", "paley2"):
        residue = 3 if kind == "paley1" else 1
        return prime_power(param) is not None and param % 4 == residue
    return kind == "goethals_seidel" and param % 2 == 1


@lru_cache(maxsize=128)
def factor_tensor(factor: HadamardFactor) -> torch.Tensor:
    """Cached int8 matrix of a factor. Internal: callers must not modify it (public code returns copies)."""
    build = {
        "sylvester": constructions.sylvester,
        "paley1": constructions.paley1,
        "paley2": constructions.paley2,
        "goethals_seidel": constructions.goethals_seidel,
    }[factor.kind]
    return torch.from_numpy(build(factor.param))


@dataclass(frozen=True)
class HadamardPlan:
    """A (block-diagonal) Kronecker product of Hadamard factors.

    The matrix is ``I_blocks ⊗ (F_1 ⊗ F_2 ⊗ ... ⊗ F_r)``; with ``blocks == 1`` it is a true Hadamard matrix of
    order n, otherwise a block-diagonal one (the explicit fallback, orthogonal after scaling but not ±1 everywhere).
    """

    factors: tuple[HadamardFactor, ...]
    blocks: int = 1

    def __post_init__(self) -> None:
        """Reject an empty factor list or a non-positive block count, which describe no matrix."""
        if not self.factors or self.blocks < 1:
            raise ValueError(f"a Hadamard plan needs at least one factor and blocks >= 1, got {self!r}")

    @property
    def block_size(self) -> int:
        """Order of one diagonal block: the product of the factor orders."""
        return math.prod(f.order for f in self.factors)

    @property
    def n(self) -> int:
        """Order of the whole matrix."""
        return self.blocks * self.block_size

    @property
    def is_hadamard(self) -> bool:
        """Whether the plan is a full Hadamard matrix (no block-diagonal fallback)."""
        return self.blocks == 1

    def describe(self) -> str:
        """E.g. ``paley1(q=19) ⊗ sylvester(256)`` or ``block_diagonal(107 × sylvester(128))``."""
        inner = " ⊗ ".join(f.describe() for f in self.factors)
        return inner if self.blocks == 1 else f"block_diagonal({self.blocks} × {inner})"


def _divisors(n: int) -> list[int]:
    """All positive divisors of n, ascending."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _odd_part(n: int) -> int:
    """n with all factors of two removed."""
    return n // (n & -n)


def _base_factor(order: int, tier: int) -> HadamardFactor | None:
    """One non-Sylvester construction of exactly ``order``: Paley I, Paley II, then (tier 2) Goethals–Seidel."""
    q1, q2, w = order - 1, order // 2 - 1, order // 4
    if prime_power(q1) is not None and q1 % 4 == 3:
        return HadamardFactor("paley1", q1)
    if order % 2 == 0 and prime_power(q2) is not None and q2 % 4 == 1:
        return HadamardFactor("paley2", q2)
    if tier >= _WITH_SEARCH and order % 8 == 4 and constructions.goethals_seidel_sequences(w) is not None:
        return HadamardFactor("goethals_seidel", w)
    return None


def _cost(factors: tuple[HadamardFactor, ...]) -> tuple[float, int, str]:
    """Planner ranking: per-element work of the fast transform, then fewer factors, then a stable name order."""
    work = sum(math.log2(f.order) if f.is_sylvester else f.order for f in factors)
    return (work, len(factors), " ⊗ ".join(f.describe() for f in factors))


def _normalize(factors: tuple[HadamardFactor, ...]) -> tuple[HadamardFactor, ...]:
    """Dense factors sorted by order (then name), Sylvester last; drops a trivial sylvester(1) next to others."""
    dense = sorted((f for f in factors if not f.is_sylvester), key=lambda f: (f.order, f.describe()))
    two = math.prod(f.order for f in factors if f.is_sylvester)
    tail = [HadamardFactor("sylvester", two)] if two > 1 or not dense else []
    return tuple(dense + tail)


@lru_cache(maxsize=4096)
def _best_factors(n: int, tier: int) -> tuple[HadamardFactor, ...] | None:
    """Cheapest factorisation of n into base constructions (a Sylvester power of two times dense factors), or None.

    Every dense factor is a multiple of 4 with an odd part > 1, so recursion on ``n // d`` terminates.
    """
    if _odd_part(n) == 1:
        return (HadamardFactor("sylvester", n),)
    best: tuple[HadamardFactor, ...] | None = None
    for d in _divisors(n):
        if d % 4 or _odd_part(d) == 1:
            continue
        base = _base_factor(d, tier)
        rest = _best_factors(n // d, tier) if base is not None else None
        if base is not None and rest is not None:
            candidate = _normalize((base, *rest))
            if best is None or _cost(candidate) < _cost(best):
                best = candidate
    return best


def _check_order(n: int) -> None:
    """Reject non-integer or non-positive orders with a HadamardError naming the value."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise HadamardError(f"a Hadamard order must be a positive integer, got {n!r}")


def try_find_construction(n: int) -> HadamardPlan | None:
    """:func:`find_construction` that returns None instead of raising when no construction is known."""
    _check_order(n)
    factors = _best_factors(n, _CLOSED_FORM) or _best_factors(n, _WITH_SEARCH)
    return None if factors is None else HadamardPlan(factors)


def _no_construction_message(n: int) -> str:
    """One line: which order failed, why, and the explicit fallbacks that fix it."""
    if n > 2 and n % 4:
        why = "Hadamard matrices exist only for orders 1, 2 and multiples of 4"
    else:
        two = n & -n
        why = (
            f"{n} = {two} · {n // two} and no Kronecker product of Sylvester, Paley I/II or "
            "Goethals–Seidel constructions has that order"
        )
    blocks = block_diagonal_plan(n)
    return (
        f"no Hadamard matrix of order {n} is known to lowbit ({why}); fix: choose an explicit fallback, "
        f"fallback='block_diagonal' (a block-diagonal Hadamard: {blocks.describe()}) or "
        f"fallback='random_orthogonal' (a seeded random orthogonal matrix), or rotate a dimension that has one"
    )


def find_construction(n: int) -> HadamardPlan:
    """The Kronecker factorisation lowbit uses for a Hadamard matrix of order n (cached search).

    Raises :class:`HadamardError` when no construction is known; the message names the explicit fallbacks.
    """
    plan = try_find_construction(n)
    if plan is None:
        raise HadamardError(_no_construction_message(n))
    return plan


def block_diagonal_plan(n: int, max_block: int | None = None) -> HadamardPlan:
    """Block-diagonal plan: the largest constructible block order b dividing n (and at most ``max_block``),
    ``n // b`` blocks on the diagonal.

    b = 1 (the identity) is always possible, so this never fails. Without ``max_block`` it is the explicit fallback
    for sizes with no construction; with it, the block-diagonal rotation kind (:mod:`lowbit.rotations.kinds`).
    """
    _check_order(n)
    for b in reversed([b for b in _divisors(n) if max_block is None or b <= max_block]):
        inner = try_find_construction(b)
        if inner is not None:
            return HadamardPlan(inner.factors, blocks=n // b)
    raise AssertionError("unreachable: order 1 always has a construction")


def plan_matrix(plan: HadamardPlan) -> torch.Tensor:
    """The plan's exact unnormalized matrix ``I_blocks ⊗ F_1 ⊗ ... ⊗ F_r`` as a fresh int8 tensor (entries 0, ±1)."""
    h = np.ones((1, 1), dtype=np.int8)
    for factor in plan.factors:
        h = np.kron(h, factor_tensor(factor).numpy())
    if plan.blocks > 1:
        h = np.kron(np.eye(plan.blocks, dtype=np.int8), h)
    return torch.from_numpy(np.ascontiguousarray(h))


def hadamard_matrix(n: int) -> torch.Tensor:
    """An exact Hadamard matrix of order n: int8, entries ±1, ``H @ H.T == n * I``.

    The plan and the base factors are cached; the returned tensor is always a fresh copy, so callers may modify
    it. Raises :class:`HadamardError` when no construction is known (see :func:`find_construction`).
    """
    return plan_matrix(find_construction(n))
