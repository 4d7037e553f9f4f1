"""Cayley SGD: gradient descent that keeps matrices orthonormal (SpinQuant's optimizer for learned rotations).

Reference: Li, Li, Todorovic, "Efficient Riemannian Optimization on the Stiefel Manifold via the Cayley
Transform", ICLR 2020 (arXiv 2002.01113); used by SpinQuant (arXiv 2405.16406) to learn R1 and R2.

A parameter ``X`` (``n × p``, ``p <= n``, orthonormal columns: a rotation when square) with Euclidean gradient
``G`` (plus optional heavy-ball momentum ``M <- beta M + G``) moves along the curve

    ``Y(a) = (I + a/2 W)^-1 (I - a/2 W) X``,   ``W = W_hat - W_hat^T``,   ``W_hat = M X^T - 1/2 X (X^T M X^T)``

``W`` is skew-symmetric, so ``Y(a)`` is exactly orthonormal for every step ``a`` (the Cayley transform of a skew
matrix is orthogonal), and ``dY/da = -W X`` at ``a = 0`` is a descent direction (the projection of ``-G`` onto the
tangent space). The step is ``a = min(lr, 1 / ||W||)`` with the matrix 1-norm by default (largest column sum of
``|W|``, as the reference code of Li et al. and SpinQuant use): unlike the Frobenius or spectral norm it depends on
the basis, and it is large when the direction concentrates on a few coordinates (a gradient driven by a few
massive-activation channels), so such steps stay small; ``norm="fro"`` bounds the Frobenius norm instead.
The update is solved exactly (the default: one ``n × n`` linear solve, cheap for rotations of a few thousand rows) or by the fixed-point iteration
``Y <- X - a/2 W (X + Y)`` started from ``X - a W X`` (what the reference does with 2 iterations; its error shrinks
only like ``(a ||W|| / 2)^k``, up to 1/2 per iteration at the largest step, so orthogonality drifts unless the
iterations are many or the clean-up frequent). Every ``reorthonormalize_every`` steps a QR factorisation (signs
fixed so the matrix does not jump) removes float drift.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer


def skew_direction(x: Tensor, m: Tensor) -> Tensor:
    """The skew-symmetric ``W`` (``n × n``) of the Cayley update for point ``x`` (``n × p``) and direction ``m``."""
    w_hat = m @ x.T - 0.5 * x @ (x.T @ m @ x.T)
    return w_hat - w_hat.T


def cayley_step(x: Tensor, w: Tensor, step: float, exact: bool = False, iterations: int = 2) -> Tensor:
    """``(I + step/2 W)^-1 (I - step/2 W) x``, exactly or by ``iterations`` fixed-point steps."""
    if exact:
        eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        return torch.linalg.solve(eye + (step / 2) * w, (eye - (step / 2) * w) @ x)
    y = x - step * (w @ x)
    for _ in range(iterations):
        y = x - (step / 2) * (w @ (x + y))
    return y


def reorthonormalize(x: Tensor) -> Tensor:
    """The nearest-in-sign orthonormal matrix from QR: ``Q`` with columns flipped so ``diag(R) > 0``."""
    q, r = torch.linalg.qr(x)
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)[None, :]


STEP_NORMS = {"one": 1, "fro": "fro"}  # name -> torch.linalg.matrix_norm's ord


class CayleySGD(Optimizer):
    """SGD on the Stiefel manifold with the Cayley transform; every parameter must be ``n × p`` orthonormal.

    ``lr``: largest step (the actual one is ``min(lr, 1/||W||)``); ``momentum``: heavy-ball factor (0: none, as in
    SpinQuant); ``exact``: solve the Cayley update instead of iterating; ``iterations``: fixed-point iterations;
    ``reorthonormalize_every``: QR clean-up period in steps (0: never); ``norm``: ``"one"`` or ``"fro"``, the norm of
    ``W`` that caps the step. Computed in float64 internally.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.0,
        exact: bool = True,
        iterations: int = 2,
        reorthonormalize_every: int = 50,
        norm: str = "one",
    ) -> None:
        if not lr > 0:
            raise ValueError(f"CayleySGD lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"CayleySGD momentum must be in [0, 1), got {momentum}")
        if iterations < 1 or reorthonormalize_every < 0:
            raise ValueError("CayleySGD needs iterations >= 1 and reorthonormalize_every >= 0")
        if norm not in STEP_NORMS:
            raise ValueError(f"CayleySGD norm must be one of {sorted(STEP_NORMS)}, got {norm!r}")
        defaults = {"lr": lr, "momentum": momentum, "exact": exact, "iterations": iterations,
                    "reorthonormalize_every": reorthonormalize_every, "norm": norm}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2 or p.shape[0] < p.shape[1]:
                    raise ValueError(f"CayleySGD needs n x p parameters with p <= n, got {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        """One Cayley step for every parameter that has a gradient; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        x, g = p.detach().double(), p.grad.detach().double()
        if group["momentum"]:
            m = state["momentum"] = group["momentum"] * state.get("momentum", torch.zeros_like(g)) + g
        else:
            m = g
        w = skew_direction(x, m)
        norm = float(torch.linalg.matrix_norm(w, ord=STEP_NORMS[group["norm"]]))
        step = min(group["lr"], 1.0 / norm) if norm > 0 else 0.0
        y = cayley_step(x, w, step, group["exact"], group["iterations"])
        state["steps"] = state.get("steps", 0) + 1
        period = group["reorthonormalize_every"]
        if period and state["steps"] % period == 0:
            y = reorthonormalize(y)
        p.copy_(y.to(p.dtype))
