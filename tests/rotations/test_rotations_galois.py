"""GF(p^k) arithmetic: field axioms on GF(7^3) samples, the irreducible modulus, and the quadratic character."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.rotations.galois import (
    GaloisField,
    galois_field,
    is_irreducible,
    prime_power,
)

SAMPLES = 3000


@pytest.fixture(scope="module")
def gf343() -> GaloisField:
    """GF(7^3), the field behind Paley I of order 344 (and so of 11008 = 344 · 32)."""
    return galois_field(343)


def _triples(q: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three arrays of random field elements."""
    rng = np.random.default_rng(seed)
    a, b, c = rng.integers(0, q, size=(3, SAMPLES))
    return a, b, c


@pytest.mark.parametrize(("q", "expected"), [(2, (2, 1)), (27, (3, 3)), (343, (7, 3)), (1024, (2, 10)), (12, None)])
def test_prime_power(q: int, expected: tuple[int, int] | None) -> None:
    assert prime_power(q) == expected


def test_modulus_is_monic_irreducible_of_degree_k(gf343: GaloisField) -> None:
    assert (gf343.p, gf343.k, gf343.order) == (7, 3, 343)
    assert len(gf343.modulus) == 4 and gf343.modulus[-1] == 1
    assert is_irreducible(list(gf343.modulus), 7)
    assert not is_irreducible([0, 0, 0, 1], 7)  # x^3 = x · x · x


def test_field_axioms_on_samples(gf343: GaloisField) -> None:
    f = gf343
    a, b, c = _triples(f.order)
    assert np.array_equal(f.add(a, b), f.add(b, a))
    assert np.array_equal(f.mul(a, b), f.mul(b, a))
    assert np.array_equal(f.add(f.add(a, b), c), f.add(a, f.add(b, c)))
    assert np.array_equal(f.mul(f.mul(a, b), c), f.mul(a, f.mul(b, c)))
    assert np.array_equal(f.mul(a, f.add(b, c)), f.add(f.mul(a, b), f.mul(a, c)))
    assert np.array_equal(f.add(a, 0), a) and np.array_equal(f.mul(a, 1), a)
    assert np.all(f.add(a, f.neg(a)) == 0) and np.array_equal(f.sub(a, b), f.add(a, f.neg(b)))
    nonzero = a[a != 0]
    assert np.all(f.mul(nonzero, f.inverse(nonzero)) == 1)


def test_multiplicative_group_is_cyclic_of_order_q_minus_1(gf343: GaloisField) -> None:
    """Every nonzero x satisfies x^(q-1) = 1, and no zero divisors exist (the modulus really is irreducible)."""
    f = gf343
    elems = f.elements()[1:]
    assert np.all(f.power(elems, f.order - 1) == 1)
    products = f.mul(elems[:, None], elems[None, :])
    assert np.all(products != 0)


def test_quadratic_character_is_multiplicative_and_balanced(gf343: GaloisField) -> None:
    f = gf343
    elems = f.elements()
    chi = f.quadratic_character(elems)
    products = f.mul(elems[:, None], elems[None, :])
    assert np.array_equal(chi[products], chi[:, None] * chi[None, :])
    squares = np.unique(f.mul(elems, elems))
    assert set(np.flatnonzero(chi == 1)) == set(squares) - {0}
    assert (chi == 1).sum() == (chi == -1).sum() == (f.order - 1) // 2 and chi[0] == 0
    assert chi[f.minus_one] == -1  # q ≡ 3 (mod 4): -1 is a non-square, so the Jacobsthal matrix is skew


@pytest.mark.parametrize("p", [3, 7, 11, 43, 107])
def test_prime_field_character_matches_euler(p: int) -> None:
    f = galois_field(p)
    elems = np.arange(p)
    expected = [0] + [1 if pow(int(x), (p - 1) // 2, p) == 1 else -1 for x in elems[1:]]
    assert f.quadratic_character(elems).tolist() == expected


def test_rejects_non_prime_power_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="not a prime power"):
        galois_field(6)
    with pytest.raises(ValueError, match="0..8"):
        galois_field(9).add(9, 1)
