"""Randomized Hadamard rotations and the explicit fallbacks: orthogonal, seeded, self-describing, never silent."""

from __future__ import annotations

import pytest
import torch

from lowbit.rotations import (
    HadamardError,
    block_diagonal_hadamard,
    random_hadamard,
    random_orthogonal,
)


def _assert_orthogonal(q: torch.Tensor) -> None:
    """``Q Qᵀ = I`` to 1e-10 in float64."""
    assert q.dtype == torch.float64
    torch.testing.assert_close(q @ q.T, torch.eye(q.shape[0], dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [1, 2, 12, 20, 36, 52, 156, 172, 576])
def test_random_hadamard_is_orthogonal(n: int) -> None:
    rot = random_hadamard(n, seed=0)
    _assert_orthogonal(rot.dense())
    assert rot.fallback is None and rot.matrix is None and rot.plan is not None
    assert rot.plan.describe() in rot.description and "seed=0" in rot.description


def test_random_hadamard_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    a, b, c = random_hadamard(576, 7), random_hadamard(576, 7), random_hadamard(576, 8)
    assert a.signs is not None and b.signs is not None and c.signs is not None
    assert torch.equal(a.signs, b.signs) and torch.equal(a.dense(), b.dense())
    assert not torch.equal(a.signs, c.signs) and not torch.equal(a.dense(), c.dense())
    assert set(a.signs.unique().tolist()) == {-1.0, 1.0}


def test_materialize_stores_the_dense_matrix_and_apply_matches_it() -> None:
    rot = random_hadamard(172, 3, materialize=True)
    assert rot.matrix is not None
    assert torch.equal(rot.matrix, random_hadamard(172, 3).dense())
    x = torch.randn(4, 172, dtype=torch.float64)
    torch.testing.assert_close(rot.apply(x), x @ rot.matrix, rtol=0, atol=1e-12)


def test_no_silent_fallback() -> None:
    with pytest.raises(HadamardError, match="no Hadamard matrix of order 184"):
        random_hadamard(184, 0)
    with pytest.raises(ValueError, match="unknown Hadamard fallback"):
        random_hadamard(184, 0, fallback="identity")


def test_fallback_is_ignored_when_a_construction_exists() -> None:
    assert random_hadamard(12, 0, fallback="random_orthogonal").fallback is None


def test_block_diagonal_fallback_rotation() -> None:
    rot = random_hadamard(184, 5, fallback="block_diagonal")
    assert rot.fallback == "block_diagonal" and rot.plan is not None and not rot.plan.is_hadamard
    assert "block_diagonal(23 × sylvester(8))" in rot.description
    _assert_orthogonal(rot.dense())


def test_block_diagonal_fallback_on_13696_is_fast_and_norm_preserving() -> None:
    """13696 = 32 · 428 has no construction; the block fallback applies 107 Sylvester blocks without a dense matrix."""
    rot = random_hadamard(13696, 0, fallback="block_diagonal")
    assert rot.matrix is None and "block_diagonal(107 × sylvester(128))" in rot.description
    x = torch.randn(3, 13696, dtype=torch.float64)
    torch.testing.assert_close(rot.apply(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


def test_random_orthogonal_fallback_rotation() -> None:
    rot = random_hadamard(184, 5, fallback="random_orthogonal")
    assert rot.fallback == "random_orthogonal" and rot.plan is None and rot.matrix is not None
    assert "random_orthogonal(n=184, seed=5)" in rot.description
    _assert_orthogonal(rot.dense())
    x = torch.randn(2, 184, dtype=torch.float32)
    got = rot.apply(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), x.double() @ rot.matrix, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [6, 10, 184])
def test_block_diagonal_hadamard(n: int) -> None:
    q, description = block_diagonal_hadamard(n)
    _assert_orthogonal(q)
    assert description.startswith("block_diagonal(")


def test_random_orthogonal_is_seeded_and_orthogonal() -> None:
    q1, d1 = random_orthogonal(100, 0)
    q2, _ = random_orthogonal(100, 0)
    q3, _ = random_orthogonal(100, 1)
    _assert_orthogonal(q1)
    assert torch.equal(q1, q2) and not torch.equal(q1, q3)
    assert d1 == "random_orthogonal(n=100, seed=0): QR of a Gaussian with sign fix"
