"""GPTQ: second-order weight quantization, as pure tensor math on one weight matrix and its input Hessian.

Reference: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", 2022, arXiv 2210.17323. The layer objective is, per output row ``w``,

    ``L(w_hat) = 1/2 (w - w_hat) H (w - w_hat)^T``  with  ``H = 2/N sum_n x_n^T x_n``  (so ``L = ||X dW^T||^2 / N``)

and GPTQ quantizes the columns one at a time in a fixed order, after each column spreading its rounding error
over the not-yet-quantized columns with the optimal-brain-surgeon update (paper eq. 2-3). The inverse Hessian
rows needed for that update are the rows of the upper Cholesky factor ``U`` of ``H^-1`` (paper section 3,
"Cholesky reformulation"): for column ``q``, with ``d = U[q, q]``,

    ``e = (w_q - quant(w_q)) / d``,   ``w_{q:} -= e * U[q, q:]``,   ``loss += e^2 / 2``.

Columns are processed in blocks of ``block_size`` ("lazy batch updates"): updates inside a block are applied
column by column, and the rest of the matrix receives the whole block's error at once,
``W[:, end:] -= E @ U[start:end, end:]``, which is the same arithmetic regrouped.

Everything here quantizes with :mod:`lowbit.quant` (``compute_qparams``, ``quantize``, ``dequantize`` and the
range observers), so the returned weight lies exactly on the grid described by the returned scale and zero point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lowbit.errors import CalibrationError
from lowbit.quant import (
    Format,
    Granularity,
    PerGroup,
    PerRow,
    QParams,
    ScaleDtype,
    bind_scale_unit,
    compute_qparams,
    dequantize,
    observe_range,
    quantize,
)

__all__ = ["GPTQConfig", "GPTQResult", "HessianAccumulator", "gptq_quantize"]

_SUB_BLOCK = 16  # columns per inner span of a block (see _quantize_block)


@dataclass(frozen=True)
class GPTQConfig:
    """Settings of the GPTQ solver (the defaults are the paper's and its reference implementation's).

    * ``block_size``: columns per lazy batch update; changes speed only, not the result (up to float rounding).
    * ``damp``: ``lambda = damp * mean(diag H)`` is added to the diagonal of ``H`` so that it is invertible
      even with few calibration tokens (paper section 3, "1% of the average diagonal value").
    * ``act_order``: quantize columns by descending ``diag(H)`` (the "act-order" heuristic of the reference code),
      so that the columns with the largest inputs are quantized first, while many columns remain to absorb errors.
    * ``static_groups``: with :class:`~lowbit.quant.PerGroup`, fit every group's scale up front on the original
      weight instead of on the error-updated weight when the loop first reaches one of the group's columns.
    * ``max_damp_retries``: when the Cholesky factorisation fails, retry with ``damp`` times 10, up to this many
      times, before raising :class:`~lowbit.errors.CalibrationError`.
    """

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    max_damp_retries: int = 5

    def __post_init__(self) -> None:
        """Reject settings that would make the solver loop forever, never damp, or never try at all."""
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"GPTQConfig block_size must be an integer >= 1, got {self.block_size!r}")
        if not 0.0 <= self.damp < math.inf:
            raise ValueError(f"GPTQConfig damp must be a finite number >= 0, got {self.damp!r}")
        retries = self.max_damp_retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"GPTQConfig max_damp_retries must be an integer >= 0, got {retries!r}")


@dataclass(frozen=True, eq=False)
class GPTQResult:
    """Output of :func:`gptq_quantize`. ``eq=False``: tensors have no single truth value.

    * ``weight``: the quantized weight, dequantized, in the input's dtype, shape and (original) column order.
    * ``scale`` / ``zero_point``: float32 quantization parameters in the layout that
      :func:`lowbit.quant.quantize` / :func:`lowbit.quant.dequantize` expect for the granularity on the
      original-order weight (``(out, 1)`` per row, ``(out, n_groups, 1)`` per group; ``zero_point`` is None for
      symmetric and float formats), so ``dequantize(quantize(weight, qp), qp) == weight``.
    * ``loss``: GPTQ's own estimate of the objective, ``sum e^2 / 2`` over all columns with
      ``e = (w_q - quant(w_q)) / U[q, q]`` (paper eq. 2). It equals ``1/2 tr(dW H_damped dW^T)`` with
      ``dW = W - weight`` (dead columns of ``W`` zeroed) and ``H_damped`` the Hessian after the dead-column fix
      and damping; with ``H = 2/N X^T X`` that is ``||X dW^T||^2 / N + damp_used * mean(diag H) * ||dW||^2 / 2``.
    * ``damp_used``: the damping fraction that made the Cholesky factorisation succeed (``damp * 10^k``).
    """

    weight: Tensor
    scale: Tensor
    zero_point: Tensor | None
    loss: float
    damp_used: float

    @property
    def qparams(self) -> QParams:
        """``scale`` and ``zero_point`` as a :class:`~lowbit.quant.QParams`, ready for quantize / dequantize."""
        return QParams(scale=self.scale, zero_point=self.zero_point)


class HessianAccumulator:
    """Running ``H = 2/N sum_n x_n^T x_n`` over the calibration inputs of one linear layer (GPTQ's Hessian).

    Each call to :meth:`add` takes a batch of inputs ``[..., in_features]`` (every leading index is one token)
    and updates a running mean, ``H <- H * N/(N+M) + 2/(N+M) X^T X``, so the result does not depend on how the
    tokens were split into batches (only on float rounding). Stored in ``dtype``: float32 by default, like the
    reference implementation (half the memory of float64 for ``in_features^2`` entries); pass
    ``dtype=torch.float64`` for very many tokens or badly scaled activations. ``device=None`` keeps ``H`` on the
    device of the first batch, so calibration on a GPU accumulates on that GPU without host copies.
    """

    def __init__(
        self, in_features: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> None:
        """Start an empty accumulator for inputs with ``in_features`` features (H is allocated on first add)."""
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"HessianAccumulator in_features must be an integer >= 1, got {in_features!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"HessianAccumulator dtype must be a floating-point dtype, got {dtype}")
        self._in_features = in_features
        self._dtype = dtype
        self._device = None if device is None else torch.device(device)
        self._h: Tensor | None = None
        self._tokens = 0

    @property
    def in_features(self) -> int:
        """Number of input features (the Hessian is ``in_features x in_features``)."""
        return self._in_features

    @property
    def tokens(self) -> int:
        """Number of tokens (input rows) accumulated so far."""
        return self._tokens

    @property
    def hessian(self) -> Tensor:
        """A copy of the current ``H = 2/N X^T X``; a CalibrationError if no token was added yet.

        A copy, so that callers cannot corrupt the running state.
        """
        if self._h is None or self._tokens == 0:
            raise CalibrationError(
                f"no calibration tokens reached this layer ({self.in_features} inputs), so it has no Hessian: "
                "check that the calibration data runs through the layer"
            )
        return _mirror_lower_blocks(self._h.clone())

    def _buffer(self, like: Tensor) -> Tensor:
        """The running H, allocated on first use on ``device`` or, if None, on the device of ``like``."""
        if self._h is None:
            device = like.device if self._device is None else self._device
            self._h = torch.zeros(self._in_features, self._in_features, dtype=self._dtype, device=device)
        return self._h

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """Add a batch of inputs ``[..., in_features]`` to the running mean; ``x`` itself is not modified.

        NaN or inf inputs raise a CalibrationError (they would poison every later Hessian entry).
        """
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs [..., {self.in_features}], got shape {tuple(x.shape)}")
        if x.numel() == 0:
            return
        h = self._buffer(x)
        rows = x.detach().reshape(-1, self.in_features).to(device=h.device, dtype=h.dtype)
        if not bool(torch.isfinite(rows).all()):
            raise CalibrationError(
                f"calibration inputs to a layer with {self.in_features} inputs contain NaN or inf; "
                "check the model in full precision on the calibration text"
            )
        total = self._tokens + int(rows.shape[0])
        _add_lower_blocks(h.mul_(self._tokens / total), rows, 2.0 / total)
        self._tokens = total


_GRAM_BLOCK = 1024  # column block of the Hessian's block-lower-triangular accumulation


def _add_lower_blocks(h: Tensor, rows: Tensor, alpha: float) -> None:
    """``h += alpha * rows^T rows`` on the block-lower triangle of ``h`` only (blocks of ``_GRAM_BLOCK`` columns).

    ``X^T X`` is symmetric, so the blocks above the diagonal are mirrors: with ``b`` blocks this computes
    ``b(b+1)/2`` of the ``b^2`` block products (60% of the work at 4864 inputs, 5 blocks). The blocks above the
    diagonal are left stale; :func:`_mirror_lower_blocks` fills them when the Hessian is read.
    """
    n = rows.shape[1]
    for start in range(0, n, _GRAM_BLOCK):
        stop = min(start + _GRAM_BLOCK, n)
        h[start:stop, :stop].addmm_(rows[:, start:stop].T, rows[:, :stop], alpha=alpha)


def _mirror_lower_blocks(h: Tensor) -> Tensor:
    """``h`` with each block above the diagonal set to the transpose of its mirror below (see _add_lower_blocks),
    and each diagonal block averaged with its transpose: a BLAS ``X^T X`` need not be bit-symmetric (it is not on
    some AMD CPUs), and the Cholesky factorisations downstream expect an exactly symmetric matrix."""
    n = h.shape[0]
    for start in range(0, n, _GRAM_BLOCK):
        stop = min(start + _GRAM_BLOCK, n)
        block = h[start:stop, start:stop]
        h[start:stop, start:stop] = (block + block.T) / 2
        h[:start, start:stop] = h[start:stop, :start].T
    return h


@dataclass(frozen=True, eq=False)
class _Grid:
    """Per-column quantization grid of the working (possibly permuted) weight.

    ``scale`` / ``zero`` have shape ``(out, n_groups)``; column ``k`` uses group ``col_group[k]``. ``fit_at``
    maps a working column to ``(group, members)``: the group's parameters are fitted there on the current weights
    of its working columns ``members`` (all at or after ``k``; dynamic groups: the tensors are filled in place as
    the loop first reaches each group).
    """

    scale: Tensor
    zero: Tensor | None
    col_group: tuple[int, ...]
    fit_at: Mapping[int, tuple[int, Tensor]]


@dataclass(frozen=True)
class _Fitter:
    """How to turn weights into quantization parameters: format, observer and its options, clip ratio, and the
    dtype scales are stored in (None: float32, unrounded)."""

    fmt: Format
    observer: str
    clip_ratio: float
    observer_kwargs: Mapping[str, Any]
    scale_dtype: ScaleDtype = None

    def fit(self, x: Tensor, gran: Granularity) -> QParams:
        """Observe the range of ``x`` per granule and compute its QParams (``lowbit.quant`` does both)."""
        lo, hi = observe_range(x, gran, self.fmt, self.observer, scale_dtype=self.scale_dtype,
                               **dict(self.observer_kwargs))
        return compute_qparams(lo, hi, self.fmt, clip_ratio=self.clip_ratio, scale_dtype=self.scale_dtype)


def _check_inputs(weight: Tensor, hessian: Tensor, gran: Granularity, config: GPTQConfig) -> None:
    """Reject shapes, dtypes and option combinations the solver cannot honour, naming the fix."""
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"GPTQ needs a floating-point weight [out, in], got {weight.dtype} {tuple(weight.shape)}")
    n = weight.shape[1]
    if hessian.shape != (n, n):
        raise ValueError(f"GPTQ needs a Hessian of shape ({n}, {n}) for this weight, got {tuple(hessian.shape)}")
    if not isinstance(gran, (PerRow, PerGroup)):
        raise ValueError(f"GPTQ supports PerRow() and PerGroup(size) granularities, got {gran!r}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"weight of shape {tuple(weight.shape)} contains NaN or inf")
    if not bool(torch.isfinite(hessian).all()):
        raise CalibrationError(
            f"the GPTQ Hessian of a layer with {n} inputs contains NaN or inf; check the calibration inputs"
        )


def _fix_dead_columns(weight: Tensor, hessian: Tensor) -> tuple[Tensor, Tensor]:
    """New float32 copies of ``weight`` and ``hessian`` with dead inputs neutralised (reference GPTQ).

    An input whose ``H_ii == 0`` was always zero in calibration: its weights cannot affect the objective, so they
    are set to 0 (exactly representable) and ``H_ii`` to 1 so that ``H`` stays invertible.
    """
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    return w, h


def _column_order(h: Tensor, act_order: bool) -> Tensor:
    """Processing order of the columns: natural, or descending ``diag(H)`` for act-order (stable on ties)."""
    n = h.shape[0]
    if not act_order:
        return torch.arange(n, device=h.device)
    return torch.argsort(h.diagonal(), descending=True, stable=True)


def _damp_schedule(config: GPTQConfig) -> list[float]:
    """Damping fractions to try: ``damp * 10^k`` for ``k = 0..max_damp_retries`` (just ``[0]`` when damp is 0)."""
    if config.damp == 0.0:
        return [0.0]
    return [config.damp * 10.0**k for k in range(config.max_damp_retries + 1)]


def _try_inverse_cholesky(h: Tensor, lam: Tensor) -> Tensor | None:
    """Upper Cholesky factor ``U`` of ``(H + lam I)^-1``, or None if ``H + lam I`` is not positive definite.

    Row ``q`` of ``U`` holds the inverse-Hessian row GPTQ needs once columns ``< q`` are fixed (the paper's
    Cholesky reformulation). Computed with one factorisation and one triangular solve instead of the reference's
    cholesky -> cholesky_inverse -> cholesky (about 40% less time at 4864 inputs): with ``J`` the reversal
    permutation and ``J (H + lam I) J = M M^T``, ``R = J M J`` is upper triangular with ``H + lam I = R R^T``, so
    ``U = R^-1`` is upper triangular with ``U^T U = (H + lam I)^-1``: the same unique factor.
    """
    damped = h.flip(0, 1)
    damped.diagonal().add_(lam)
    lower, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        return None
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    upper = torch.linalg.solve_triangular(lower.flip(0, 1), eye, upper=True)
    if not bool(torch.isfinite(upper).all()):
        return None
    return upper


def _inverse_cholesky(h: Tensor, config: GPTQConfig, out_features: int) -> tuple[Tensor, float]:
    """``U`` of the damped inverse Hessian and the damping fraction used; retries with 10x damping on failure.

    ``lambda = damp * mean(diag H)`` (paper section 3). Raises CalibrationError naming the layer and the fix.
    """
    mean_diag = h.diagonal().mean()
    schedule = _damp_schedule(config)
    for damp in schedule:
        upper = _try_inverse_cholesky(h, damp * mean_diag)
        if upper is not None:
            return upper, damp
    raise CalibrationError(
        f"GPTQ could not invert the Hessian of a {out_features}x{h.shape[0]} layer (out x in): it is not positive "
        f"definite even with damping {', '.join(f'{d:g}' for d in schedule)} x mean(diag H) "
        f"(mean(diag H) = {float(mean_diag):.3g}); calibrate on more tokens, or raise GPTQConfig.damp"
    )


def _initial_grid(w: Tensor, perm: Tensor, gran: Granularity, fitter: _Fitter, config: GPTQConfig) -> _Grid:
    """Quantization grid before the loop: per-row or static-group parameters fitted on the original ``w``.

    Groups are always the natural PerGroup layout (contiguous original columns). Dynamic groups (PerGroup without
    static_groups) get empty tensors and a ``fit_at`` schedule: each group is fitted when the loop reaches the
    first of its columns in the working order (reference GPTQ in natural order; with act-order the group's other
    columns are then still ahead, carrying the errors propagated into them so far).
    """
    n = w.shape[1]
    if isinstance(gran, PerRow):
        qp = fitter.fit(w, gran)
        return _Grid(qp.scale, qp.zero_point, (0,) * n, {})
    if not isinstance(gran, PerGroup):
        raise ValueError(f"GPTQ quantizes weights per row or per group, not {type(gran).__name__}")
    col_group = tuple(int(c) // gran.size for c in perm.tolist())
    if config.static_groups:
        qp = fitter.fit(w, gran)
        zero = None if qp.zero_point is None else qp.zero_point.squeeze(-1)
        return _Grid(qp.scale.squeeze(-1), zero, col_group, {})
    n_groups = math.ceil(n / gran.size)
    scale = torch.empty(w.shape[0], n_groups, device=w.device)
    zero = None if fitter.fmt.symmetric else torch.empty_like(scale)
    groups = torch.tensor(col_group, device=w.device)
    fit_at = {}
    for group in range(n_groups):
        members = torch.nonzero(groups == group).flatten()  # working positions, ascending
        fit_at[int(members[0])] = (group, members)
    return _Grid(scale, zero, col_group, fit_at)


def _column_qparams(grid: _Grid, k: int) -> QParams:
    """QParams of working column ``k`` as ``(out, 1)`` tensors, for lowbit.quant with PerRow on a column."""
    g = grid.col_group[k]
    zero = None if grid.zero is None else grid.zero[:, g : g + 1]
    return QParams(scale=grid.scale[:, g : g + 1], zero_point=zero)


def _quantize_column(col: Tensor, grid: _Grid, k: int, fmt: Format) -> Tensor:
    """``dequantize(quantize(col))`` of one column ``(out,)`` with its group's parameters (lowbit.quant maths).

    Using quantize / dequantize themselves keeps the result bit-identical to re-quantizing the final weight.
    """
    qp = _column_qparams(grid, k)
    codes = quantize(col.unsqueeze(1), qp, fmt, PerRow())
    return dequantize(codes, qp, fmt, PerRow()).squeeze(1)


def _current_columns(wt: Tensor, err: Tensor, u: Tensor, start: int, end: int, members: Tensor) -> Tensor:
    """The up-to-date weights ``(out, len(members))`` of working columns ``members`` while block ``[start, end)``
    runs, at the start of a sub-block (every member at or after it).

    Columns inside the block already hold the in-block updates; columns past it still lack the block's pending
    lazy update ``U[start:end, cols]^T @ err`` (rows of ``err`` are zero for columns not yet quantized).
    """
    current = wt[members]
    later = members >= end
    if bool(later.any()):
        current[later] -= u[start:end, members[later]].T @ err
    return current.T


def _fit_group(wt: Tensor, err: Tensor, u: Tensor, span: tuple[int, int, int], grid: _Grid, fitter: _Fitter) -> None:
    """Fit the dynamic group first reached at working column ``k`` on its current weights, writing into ``grid``.

    ``span`` is ``(start, end, k)`` of the block in progress. GPTQ fits a group when the loop reaches it, so its
    scale sees the errors already propagated into it.
    """
    start, end, k = span
    group, members = grid.fit_at[k]
    qp = fitter.fit(_current_columns(wt, err, u, start, end, members), PerRow())
    grid.scale[:, group] = qp.scale[:, 0]
    if grid.zero is not None and qp.zero_point is not None:
        grid.zero[:, group] = qp.zero_point[:, 0]


def _sub_blocks(start: int, end: int, fit_at: Mapping[int, tuple[int, Tensor]]) -> list[tuple[int, int]]:
    """Block ``[start, end)`` cut into spans of ``_SUB_BLOCK`` columns, and at every dynamic group's first column.

    Cutting where a group is fitted keeps every column from there to ``end`` up to date with the block's earlier
    errors when the group is fitted (what :func:`_current_columns` assumes).
    """
    cuts = sorted({*range(start, end, _SUB_BLOCK), *(k for k in fit_at if start <= k < end), end})
    return list(zip(cuts[:-1], cuts[1:]))


def _quantize_block(wt: Tensor, qt: Tensor, u: Tensor, grid: _Grid, fitter: _Fitter, span: tuple[int, int]) -> Tensor:
    """Quantize working columns ``[start, end)`` (rows of ``wt``) into ``qt``, updating ``wt`` inside the block.

    Per column (paper eq. 2-3 in Cholesky form): ``e = (w_k - q_k) / U[k, k]`` and
    ``w_j -= U[k, j] e`` for ``k < j < end``. The block is itself worked in sub-blocks, with the same lazy-update
    regrouping as the blocks: rank-1 updates reach only the rest of the sub-block, and the later columns of the
    block receive the sub-block's errors in one product (memory-bound rank-1 updates become a matrix product).
    Returns the block's scaled errors ``E`` (block x out) for the lazy update of the columns after the block;
    ``wt`` is the solver's own working copy, never the caller's tensor.
    """
    start, end = span
    err = torch.zeros(end - start, wt.shape[1], device=wt.device, dtype=wt.dtype)
    for a, b in _sub_blocks(start, end, grid.fit_at):
        for k in range(a, b):
            if k in grid.fit_at:
                _fit_group(wt, err, u, (start, end, k), grid, fitter)
            qt[k] = _quantize_column(wt[k], grid, k, fitter.fmt)
            e = (wt[k] - qt[k]) / u[k, k]
            wt[k + 1 : b].addr_(u[k, k + 1 : b], e, alpha=-1.0)
            err[k - start] = e
        wt[b:end].addmm_(u[a:b, b:end].T, err[a - start : b - start], alpha=-1.0)
    return err


def _gptq_loop(w: Tensor, u: Tensor, grid: _Grid, fitter: _Fitter, block_size: int) -> tuple[Tensor, float]:
    """Run GPTQ over the working weight ``w [out, in]`` in blocks; return the quantized weight and the loss.

    Works on the transpose ``wt [in, out]`` so that each column of ``W`` is a contiguous row (the per-column
    updates are then cache-friendly, ~4x faster on CPU than strided column slices). After each block,
    ``W[:, end:] -= E @ U[start:end, end:]`` (lazy batch update). The loss is ``sum E^2 / 2``.
    """
    n = w.shape[1]
    wt = w.T.contiguous()
    qt = torch.empty_like(wt)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        err = _quantize_block(wt, qt, u, grid, fitter, (start, end))
        wt[end:].addmm_(u[start:end, end:].T, err, alpha=-1.0)
        loss += err.to(torch.float64).square().sum() / 2
    return qt.T, float(loss)


def _output_qparams(grid: _Grid, gran: Granularity) -> tuple[Tensor, Tensor | None]:
    """Grid tensors in ``granule_shape(weight.shape, gran)``: ``(out, 1)`` per row, ``(out, n_groups, 1)`` per group."""
    if isinstance(gran, PerRow):
        return grid.scale, grid.zero
    zero = None if grid.zero is None else grid.zero.unsqueeze(-1)
    return grid.scale.unsqueeze(-1), zero


@torch.no_grad()
def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    fmt: Format,
    granularity: Granularity,
    *,
    observer: str = "minmax",
    clip_ratio: float = 1.0,
    config: GPTQConfig = GPTQConfig(),
    scale_dtype: ScaleDtype = None,
    **observer_kwargs: Any,
) -> GPTQResult:
    """Quantize ``weight [out, in]`` with GPTQ against the input Hessian ``hessian [in, in]`` (arXiv 2210.17323).

    Steps: dead inputs (``H_ii == 0``) get ``H_ii = 1`` and zero weights; scales are fitted with ``observer``
    (``"minmax"``, ``"percentile"`` or ``"mse"`` with ``observer_kwargs``) and ``clip_ratio`` - once on the whole
    weight for :class:`PerRow`, and per group for :class:`PerGroup`, either when the loop first reaches one of the
    group's columns, on its error-updated weights (reference GPTQ), or, with ``config.static_groups``, up front on
    the original weight;
    ``H`` is damped and inverted through Cholesky (retrying with 10x damping); columns are quantized in blocks,
    in natural order or, with ``config.act_order``, by descending ``diag(H)``, and returned in the original order.

    ``scale_dtype`` (e.g. float16 for GGUF blocks): every scale is rounded up to it before its codes are chosen
    (:func:`~lowbit.quant.compute_qparams`), so the result is exactly what a file with such scales holds; a
    relative one (NVFP4's E4M3 block scales) takes its per-tensor unit from the whole weight before the loop.

    Groups are always contiguous in the original column order, so the scales are plain PerGroup ones whatever the
    order. Inputs are not modified; the computation is float32 on the weight's device. See :class:`GPTQResult` for
    the outputs.
    """
    _check_inputs(weight, hessian, granularity, config)
    fitter = _Fitter(fmt, observer, clip_ratio, dict(observer_kwargs), bind_scale_unit(scale_dtype, weight, fmt))
    w, h = _fix_dead_columns(weight, hessian)
    perm = _column_order(h, config.act_order)
    grid = _initial_grid(w, perm, granularity, fitter, config)
    u, damp_used = _inverse_cholesky(h[perm][:, perm], config, w.shape[0])
    q, loss = _gptq_loop(w[:, perm], u, grid, fitter, config.block_size)
    q = q[:, torch.argsort(perm)]
    scale, zero = _output_qparams(grid, granularity)
    return GPTQResult(weight=q.to(weight.dtype), scale=scale, zero_point=zero, loss=loss, damp_used=damp_used)
