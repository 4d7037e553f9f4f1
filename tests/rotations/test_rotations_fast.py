"""The factored transform equals its dense equivalent, keeps dtype and shape, and lets gradients through."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.rotations import (
    block_diagonal_plan,
    dense_matrix,
    find_construction,
    hadamard_matrix,
    hadamard_transform,
    random_signs,
)

SIZES = [64, 576, 1536, 2048]
BATCH = (2, 3)


def _inputs(n: int, seed: int = 0) -> torch.Tensor:
    """A float64 batch of shape (2, 3, n) with heavy-ish tails (activations with outliers)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*BATCH, n, generator=g, dtype=torch.float64)
    return x * torch.where(torch.rand(*BATCH, n, generator=g) < 0.01, 30.0, 1.0).to(torch.float64)


@pytest.mark.parametrize("n", [*SIZES, 40, 280, 172 * 8])  # + fused tail, small trailing axis, searched factor
@pytest.mark.parametrize("with_signs", [False, True])
def test_matches_dense_float64(n: int, with_signs: bool) -> None:
    plan = find_construction(n)
    signs = random_signs(n, 1) if with_signs else None
    x = _inputs(n)
    expected = x @ dense_matrix(plan, signs)
    got = hadamard_transform(x, plan, signs)
    assert got.dtype == torch.float64 and got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12 * math.sqrt(n))


@pytest.mark.parametrize("n", SIZES)
def test_float32_error_within_twice_dense_float32(n: int) -> None:
    """As fast-hadamard-transform tests it: max error vs the float64 oracle <= 2 × that of torch's dense fp32 matmul."""
    plan = find_construction(n)
    signs = random_signs(n, 2)
    x = _inputs(n, seed=3)
    dense = dense_matrix(plan, signs)
    oracle = x.to(torch.float32).to(torch.float64) @ dense
    ours = hadamard_transform(x.to(torch.float32), plan, signs)
    baseline = x.to(torch.float32) @ dense.to(torch.float32)
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    ours_err = (ours.double() - oracle).abs().max().item()
    baseline_err = (baseline.double() - oracle).abs().max().item()
    assert ours_err <= 2 * baseline_err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_dtype_and_is_accurate(dtype: torch.dtype) -> None:
    n = 1536
    plan = find_construction(n)
    x = _inputs(n).to(dtype)
    got = hadamard_transform(x, plan)
    oracle = x.double() @ dense_matrix(plan)
    assert got.dtype == dtype and got.shape == x.shape
    eps = torch.finfo(dtype).eps
    assert (got.double() - oracle).abs().max().item() <= eps * oracle.abs().max().item()


def test_rows_of_the_transform_are_the_matrix() -> None:
    """The transform of the identity is ``H / sqrt(n)`` with H from hadamard_matrix (same Kronecker order)."""
    n = 172 * 4
    plan = find_construction(n)
    got = hadamard_transform(torch.eye(n, dtype=torch.float64), plan)
    torch.testing.assert_close(got * math.sqrt(n), hadamard_matrix(n).double(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(12,), (5, 12), (2, 1, 3, 12)])
def test_any_leading_shape(shape: tuple[int, ...]) -> None:
    plan = find_construction(12)
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x, plan), x @ dense_matrix(plan), rtol=0, atol=1e-13)


def test_block_diagonal_plan_transform() -> None:
    plan = block_diagonal_plan(184)  # 23 × sylvester(8)
    signs = random_signs(184, 0)
    x = _inputs(184)
    torch.testing.assert_close(hadamard_transform(x, plan, signs), x @ dense_matrix(plan, signs), rtol=0, atol=1e-13)


def test_gradient_flows() -> None:
    n = 576
    plan = find_construction(n)
    signs = random_signs(n, 4)
    x = _inputs(n).requires_grad_(True)
    weight = torch.randn(*BATCH, n, dtype=torch.float64)
    (hadamard_transform(x, plan, signs) * weight).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, weight @ dense_matrix(plan, signs).T, rtol=0, atol=1e-12)


def test_does_not_modify_input_and_rejects_bad_shapes() -> None:
    plan = find_construction(64)
    x = _inputs(64)
    before = x.clone()
    hadamard_transform(x, plan, random_signs(64, 0))
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="last dimension of 64"):
        hadamard_transform(torch.zeros(3, 63), plan)
    with pytest.raises(ValueError, match=r"signs must have shape \(64,\)"):
        hadamard_transform(x, plan, torch.ones(32))
    with pytest.raises(TypeError, match="floating-point"):
        hadamard_transform(torch.zeros(64, dtype=torch.int32), plan)
