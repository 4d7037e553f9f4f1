"""Apply a (randomized, normalized) Hadamard matrix without materializing it: ``x @ H · diag(s) / sqrt(b)``.

For ``H = I_blocks ⊗ F_1 ⊗ ... ⊗ F_r`` the last dimension of x is viewed as ``(blocks, m_1, ..., m_r)``
(row-major, the Kronecker index order) and each factor acts on its own axis:
``y[..., j_k, ...] = sum_i x[..., i, ...] F_k[i, j_k]``.
The plan is compiled once (cached) into stages:

* a Sylvester factor ``2^k > 64`` becomes fast Walsh–Hadamard butterflies on its high ``k - 6`` bits (one pass of
  ``(a + b, a - b)`` per bit via reshapes, O(n log n)) and a dense 64×64 Sylvester product on its low bits;
* every other factor (Paley, Goethals–Seidel, small Sylvester) is one dense product on its axis;
* the trailing dense stages are fused into one Kronecker block while its order stays <= 256, so that the last
  stage is a single large GEMM instead of many tiny batched ones (e.g. 44 ⊗ 2 is applied as one 88×88 product).

The cost per row is ``O(n · (sum of dense stage orders + number of butterfly passes))`` instead of ``O(n²)``.
Everything is plain reshapes, matmuls and stacks, so autograd differentiates it as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final

import torch
from torch import Tensor

from lowbit.rotations.hadamard import (
    HadamardFactor,
    HadamardPlan,
    factor_tensor,
    plan_matrix,
)

_DENSE_SYLVESTER_MAX: Final = 64  # Sylvester orders up to this are a dense product; larger ones add butterflies
_FUSE_MAX: Final = 256  # trailing dense stages are fused into one Kronecker block up to this order
_SMALL_TRAILING: Final = 16  # below this many trailing elements, move the axis last for one GEMM


@dataclass(frozen=True, eq=False)
class _Stage:
    """One step of the transform: a dense ±1 matrix (int8) or butterflies of ``order``, on an axis with ``trailing``."""

    order: int
    trailing: int
    matrix: Tensor | None  # None: Walsh–Hadamard butterflies
    cast: dict = field(default_factory=dict, compare=False, repr=False)  # the matrix by (device, dtype), built once


def _pieces(plan: HadamardPlan) -> list[tuple[int, Tensor | None]]:
    """The plan's factors as (order, dense int8 matrix or None for butterflies), Sylvester split high/low."""
    pieces: list[tuple[int, Tensor | None]] = []
    for factor in plan.factors:
        if factor.is_sylvester and factor.order > _DENSE_SYLVESTER_MAX:
            low = factor_tensor(HadamardFactor("sylvester", _DENSE_SYLVESTER_MAX))
            pieces += [(factor.order // _DENSE_SYLVESTER_MAX, None), (_DENSE_SYLVESTER_MAX, low)]
        else:
            pieces.append((factor.order, factor_tensor(factor)))
    return pieces


def _fuse_tail(pieces: list[tuple[int, Tensor | None]]) -> list[tuple[int, Tensor | None]]:
    """Replace the longest run of trailing dense pieces with order product <= _FUSE_MAX by their Kronecker product."""
    fused: Tensor | None = None
    while pieces and pieces[-1][1] is not None:
        order, matrix = pieces[-1]  # not None: the loop condition
        size = order * (1 if fused is None else fused.shape[0])
        if fused is not None and size > _FUSE_MAX:
            break
        fused = matrix if fused is None else torch.kron(matrix, fused)
        pieces = pieces[:-1]
    return pieces if fused is None else [*pieces, (fused.shape[0], fused)]


@lru_cache(maxsize=64)
def _stages(plan: HadamardPlan) -> tuple[_Stage, ...]:
    """Compile a plan into stages with their trailing sizes (cached; the int8 matrices are never handed out)."""
    stages = []
    trailing = plan.block_size
    for order, matrix in _fuse_tail(_pieces(plan)):
        trailing //= order
        stages.append(_Stage(order, trailing, matrix))
    return tuple(stages)


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

    ``y`` is viewed as ``(lead, m, trailing)`` and each ``y[l, :, t]`` becomes ``y[l, :, t] @ matrix``. A small
    trailing size moves the axis last (one GEMM); a large one uses a batched ``matrixᵀ @ y[l]``.
    """
    m = matrix.shape[0]
    if trailing == 1:
        return y.reshape(-1, m) @ matrix
    view = y.reshape(-1, m, trailing)
    if trailing < _SMALL_TRAILING:
        return (view.transpose(1, 2) @ matrix).transpose(1, 2)
    return torch.matmul(matrix.T, view)


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


def _apply_stage(y: Tensor, stage: _Stage) -> Tensor:
    """Apply one unnormalized stage on its axis, with its ±1 matrix in y's dtype and device (cast once, cached)."""
    if stage.matrix is None:
        return _apply_butterflies(y, stage.order, stage.trailing)
    key = (y.device, y.dtype)
    matrix = stage.cast.get(key)
    if matrix is None:
        matrix = stage.cast[key] = stage.matrix.to(device=y.device, dtype=y.dtype)
    return _apply_dense(y, matrix, stage.trailing)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32 and the 16-bit floats are computed in float32 (like fused kernels do)."""
    if not dtype.is_floating_point:
        raise TypeError(f"hadamard_transform needs a floating-point tensor, got {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


def hadamard_transform(x: Tensor, plan: HadamardPlan, signs: Tensor | None = None,
                       out_scale: Tensor | None = None) -> Tensor:
    """``x @ dense_matrix(plan, signs)`` over the last dimension, without building the n×n matrix.

    Exact dense equivalent: ``(x.double() @ blockdiag(H_b) @ diag(signs) / sqrt(b)).to(x.dtype)`` where ``H_b`` is
    the ±1 matrix of one block (``hadamard_matrix(plan.n)`` for a true Hadamard plan) and ``b`` its order; signs
    scale the output columns. Any leading shape; float16/bfloat16 are computed in float32 and cast back, so the
    result always has x's dtype and shape. x is never modified; gradients flow through the reshapes and matmuls.
    ``out_scale``: :func:`output_scale` of the same plan and signs, precomputed (a caller applying one rotation many
    times keeps it); by default built on each call.
    """
    n = plan.n
    if x.ndim == 0 or x.shape[-1] != n:
        raise ValueError(f"hadamard_transform needs a last dimension of {n}, got shape {tuple(x.shape)}")
    _check_signs(signs, n)
    y = x.to(_compute_dtype(x.dtype)).reshape(-1, n)
    for stage in _stages(plan):
        y = _apply_stage(y, stage)
    scale = output_scale(plan, signs, y.dtype, y.device) if out_scale is None else out_scale
    y = y.reshape(-1, n)
    y = y * scale if y.data_ptr() == x.data_ptr() else y.mul_(scale)  # in place on the last stage's fresh output
    return y.reshape(x.shape).to(x.dtype)


def output_scale(plan: HadamardPlan, signs: Tensor | None, dtype: torch.dtype, device) -> Tensor:
    """``signs / sqrt(block)`` (or the constant) as a ``plan.n``-vector of ``dtype`` (the compute dtype of
    :func:`hadamard_transform`: float32, or float64 for float64 inputs)."""
    scale = torch.full((plan.n,), 1.0 / math.sqrt(plan.block_size), dtype=dtype, device=device)
    return scale if signs is None else scale * signs.to(dtype=dtype, device=device)
