"""Apply a (randomized, normalized) Hadamard matrix without materializing it: ``x @ H · diag(s) / sqrt(b)``.

For ``H = I_blocks ⊗ F_1 ⊗ ... ⊗ F_r`` the last dimension of x is viewed as ``(blocks, m_1, ..., m_r)`` (row-major,
the Kronecker index order) and each factor acts on its own axis: ``y[..., j_k, ...] = sum_i x[..., i, ...] F_k[i, j_k]``.
Dense factors (Paley, Goethals–Seidel, small Sylvester) are one batched matmul each; a large Sylvester factor
``2^k`` is split into a fast Walsh–Hadamard butterfly on its high bits (``k - 6`` passes of ``(a + b, a - b)`` via
reshapes, O(n log n)) and a dense 64×64 Sylvester product on its low bits. The cost per row is therefore
``O(n · (sum of dense orders + log2 of the Sylvester order))`` instead of ``O(n²)``. Everything is plain reshapes,
matmuls and stacks, so autograd differentiates it as is.
"""

from __future__ import annotations

import math
from typing import Final

import torch
from torch import Tensor

from lowbit.rotations.hadamard import HadamardFactor, HadamardPlan, factor_tensor, plan_matrix

_DENSE_SYLVESTER_MAX: Final = 64  # Sylvester orders up to this are a dense matmul; larger ones add butterflies


def _check_signs(signs: Tensor | None, n: int) -> None:
    """Reject a sign vector of the wrong shape, naming both sizes."""
    if signs is not None and tuple(signs.shape) != (n,):
        raise ValueError(f"signs must have shape ({n},) to match the plan, got {tuple(signs.shape)}")


def dense_matrix(plan: HadamardPlan, signs: Tensor | None = None) -> Tensor:
    """The dense float64 matrix that :func:`hadamard_transform` applies: ``blockdiag(H_b) · diag(signs) / sqrt(b)``.

    ``b`` is the block order (``plan.n`` for a true Hadamard plan). Orthogonal when the signs are ±1. Meant for
    tests and for benchmarking the factored transform against a dense matmul.
    """
    _check_signs(signs, plan.n)
    dense = plan_matrix(plan).to(torch.float64) / math.sqrt(plan.block_size)
    return dense if signs is None else dense * signs.to(torch.float64)[None, :]


def _apply_dense(y: Tensor, matrix: Tensor, trailing: int) -> Tensor:
    """Contract the axis of size ``m = matrix.shape[0]`` (followed by ``trailing`` elements) with ``matrix``.

    ``y`` is viewed as ``(lead, m, trailing)`` and becomes ``matrixᵀ @ y`` per lead, i.e. ``y[i] · M[i, j]`` summed.
    """
    m = matrix.shape[0]
    if trailing == 1:
        return y.reshape(-1, m) @ matrix
    return torch.matmul(matrix.T, y.reshape(-1, m, trailing))


def _apply_butterflies(y: Tensor, order: int, trailing: int) -> Tensor:
    """Unnormalized Walsh–Hadamard transform of size ``order`` (a power of two) on the axis before ``trailing``.

    One pass per bit: view as ``(-1, 2, stride)`` where ``stride = bit · trailing`` and replace each pair
    ``(a, b)`` by ``(a + b, a - b)``, i.e. apply ``[[1, 1], [1, -1]]`` to that bit of the index.
    """
    bit = 1
    while bit < order:
        pairs = y.reshape(-1, 2, bit * trailing)
        y = torch.stack((pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]), dim=1)
        bit *= 2
    return y


def _apply_factor(y: Tensor, factor: HadamardFactor, trailing: int) -> Tensor:
    """Apply one unnormalized factor on its axis; large Sylvester factors use butterflies on their high bits."""
    if factor.is_sylvester and factor.order > _DENSE_SYLVESTER_MAX:
        low = HadamardFactor("sylvester", _DENSE_SYLVESTER_MAX)
        y = _apply_dense(y, factor_tensor(low).to(device=y.device, dtype=y.dtype), trailing)
        return _apply_butterflies(y, factor.order // _DENSE_SYLVESTER_MAX, trailing * _DENSE_SYLVESTER_MAX)
    return _apply_dense(y, factor_tensor(factor).to(device=y.device, dtype=y.dtype), trailing)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32 and the 16-bit floats are computed in float32 (like fused kernels do)."""
    if not dtype.is_floating_point:
        raise TypeError(f"hadamard_transform needs a floating-point tensor, got {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


def hadamard_transform(x: Tensor, plan: HadamardPlan, signs: Tensor | None = None) -> Tensor:
    """``x @ dense_matrix(plan, signs)`` over the last dimension, without building the n×n matrix.

    Exact dense equivalent: ``(x.double() @ blockdiag(H_b) @ diag(signs) / sqrt(b)).to(x.dtype)`` where ``H_b`` is
    the ±1 matrix of one block (``hadamard_matrix(plan.n)`` for a true Hadamard plan) and ``b`` its order; signs
    scale the output columns. Any leading shape; float16/bfloat16 are computed in float32 and cast back, so the
    result always has x's dtype and shape. x is never modified; gradients flow through the reshapes and matmuls.
    """
    n = plan.n
    if x.ndim == 0 or x.shape[-1] != n:
        raise ValueError(f"hadamard_transform needs a last dimension of {n}, got shape {tuple(x.shape)}")
    _check_signs(signs, n)
    y = x.to(_compute_dtype(x.dtype)).reshape(-1, n)
    trailing = plan.block_size
    for factor in plan.factors:
        trailing //= factor.order
        y = _apply_factor(y, factor, trailing)
    scale = torch.full((n,), 1.0 / math.sqrt(plan.block_size), dtype=y.dtype, device=y.device)
    if signs is not None:
        scale = scale * signs.to(dtype=y.dtype, device=y.device)
    return (y.reshape(-1, n) * scale).reshape(x.shape).to(x.dtype)
