"""Asymmetric calibration (Qronos, GPTAQ): quantize a layer for the inputs it will really see.

GPTQ minimises ``||X~ W^T - X~ Q^T||^2``: the quantized weight ``Q`` should reproduce the layer's own outputs on its
quantized-model inputs ``X~``. But the target is the full-precision model's output ``X W^T`` on the full-precision
inputs ``X``, and ``X~`` differs from ``X`` by every earlier layer's error and by this layer's own activation
quantizer. The objective that says so is ``||X W^T - X~ Q^T||^2``. With ``W* = W C^T H^-1`` its unconstrained
minimiser (``H = X~^T X~``, ``C = X~^T X``), the residual ``X W^T - X~ W*^T`` is orthogonal to every ``X~ V^T``, so

    ||X W^T - X~ Q^T||^2 = ||X W^T - X~ W*^T||^2 + ||X~ (W* - Q)^T||^2,

and GPTQ run on the target ``W*`` with the Hessian ``H`` minimises exactly the part ``Q`` can change. The first
term is what no weight can fix. (Qronos reaches the same split by correcting its first column with the mismatch and
then updating as GPTQ does; GPTAQ adds the mismatch term to GPTQ's column updates.) This module is that algebra; :mod:`lowbit.surgery.gptq` captures ``X`` and ``X~``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import CalibrationError


class CrossAccumulator:
    """Running ``C = 2/N sum_n x~_n^T x_n`` over pairs of inputs of one linear: ``x~`` as the quantized model feeds it,
    ``x`` as the full-precision model does (the same tokens). Scaled like
    :class:`~lowbit.gptq.HessianAccumulator`, so ``C`` and ``H`` combine directly; float32 unless told."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32) -> None:
        self.in_features, self.dtype = in_features, dtype
        self._c: Tensor | None = None
        self.tokens = 0

    @torch.no_grad()
    def add(self, quantized: Tensor, full: Tensor) -> None:
        """Add a batch of paired inputs ``[..., in_features]`` (the same tokens, in the same order)."""
        if quantized.shape != full.shape or quantized.shape[-1] != self.in_features:
            raise ValueError(f"paired inputs must both be [..., {self.in_features}], got {tuple(quantized.shape)} "
                             f"and {tuple(full.shape)}")
        q = quantized.detach().reshape(-1, self.in_features).to(self.dtype)
        x = full.detach().reshape(-1, self.in_features).to(device=q.device, dtype=self.dtype)
        if self._c is None:
            self._c = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=q.device)
        total = self.tokens + q.shape[0]
        self._c.mul_(self.tokens / total).addmm_(q.T, x, alpha=2.0 / total)
        self.tokens = total

    @property
    def cross(self) -> Tensor:
        """A copy of the current ``C``; a CalibrationError when no pair was added."""
        if self._c is None:
            raise CalibrationError("no calibration tokens reached this layer, so it has no input cross-product")
        return self._c.clone()


@torch.no_grad()
def least_squares_target(weight: Tensor, hessian: Tensor, cross: Tensor, damp: float = 0.01) -> Tensor:
    """The target ``W*`` (module docstring) for ``weight`` ``[out, in]``, regularised towards ``W``: the minimiser of
    ``||X W^T - X~ V^T||^2 + lambda ||V - W||^2``, ``W* = W + W (C - H)^T (H + lambda I)^-1`` with ``lambda = damp *
    mean(diag H)``, so that directions the calibration inputs barely reach keep their weights and ``X~ == X``
    (``C == H``) gives ``W`` exactly. Computed in float64, returned in float32."""
    h = hessian.to(torch.float64)
    lam = damp * torch.diagonal(h).mean().clamp(min=1e-12)
    factor = torch.linalg.cholesky(h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
    w = weight.to(torch.float64)
    rhs = (cross.to(torch.float64) - h) @ w.T  # (C - H) W^T: [in, out]
    return (w + torch.cholesky_solve(rhs, factor).T).to(torch.float32)
