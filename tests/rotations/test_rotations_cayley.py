"""Cayley SGD keeps rotations orthogonal and optimizes on the manifold (Procrustes, hidden rotation)."""

import pytest
import torch

from lowbit.rotations.cayley import (
    CayleySGD,
    cayley_step,
    reorthonormalize,
    skew_direction,
)


def _orthogonal(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return reorthonormalize(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)


def _defect(x: torch.Tensor) -> float:
    x = x.detach().double()
    return float((x.T @ x - torch.eye(x.shape[1], dtype=torch.float64)).abs().max())


@pytest.mark.parametrize(("exact", "iterations", "period"), [(True, 2, 0), (False, 8, 10)])
def test_stays_orthogonal_over_many_steps(exact, iterations, period):
    x = torch.nn.Parameter(_orthogonal(32, 0))
    opt = CayleySGD([x], lr=0.5, exact=exact, iterations=iterations, reorthonormalize_every=period)
    gen = torch.Generator().manual_seed(1)
    for _ in range(500):
        x.grad = torch.randn(32, 32, generator=gen)
        opt.step()
    assert _defect(x) < 1e-5


def _procrustes(n=16, seed=2):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 200, generator=gen, dtype=torch.float64)
    hidden = _orthogonal(n, seed + 1, torch.float64)
    if torch.linalg.det(hidden) < 0:  # the Cayley flow never leaves SO(n), where the start (I) lies
        hidden[:, 0] = -hidden[:, 0]
    b = hidden @ a + 0.05 * torch.randn(n, 200, generator=gen, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(b @ a.T)
    best = u @ vh
    assert torch.linalg.det(best) > 0
    return a, b, best, hidden  # the Procrustes optimum of min ||X a - b|| over rotations X


@pytest.mark.parametrize("momentum", [0.0, 0.8])
def test_reaches_the_procrustes_optimum_and_recovers_the_hidden_rotation(momentum):
    a, b, best, hidden = _procrustes()
    x = torch.nn.Parameter(torch.eye(16, dtype=torch.float64))
    opt = CayleySGD([x], lr=0.05, momentum=momentum)
    losses = []
    for _ in range(400):
        opt.zero_grad()
        loss = (x @ a - b).pow(2).sum() / a.shape[1]
        loss.backward()
        opt.step()
        losses.append(float(loss))
    optimum = float((best @ a - b).pow(2).sum() / a.shape[1])
    assert losses[-1] == pytest.approx(optimum, rel=1e-3) and losses[0] > 10 * optimum
    assert float((x.detach() - hidden).abs().max()) < 0.05
    assert _defect(x) < 1e-10


def test_exact_and_fixed_point_updates_agree_for_small_steps():
    x = _orthogonal(12, 4, torch.float64)
    w = skew_direction(x, torch.randn(12, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    step = 0.1 / float(torch.linalg.matrix_norm(w))
    exact, iterated = cayley_step(x, w, step, exact=True), cayley_step(x, w, step, iterations=4)
    assert float((exact - iterated).abs().max()) < 1e-8
    assert _defect(exact) < 1e-12


def test_stiefel_columns_and_descent_direction():
    """A tall n x p parameter keeps orthonormal columns, and a small step lowers a linear objective."""
    x0 = _orthogonal(10, 6, torch.float64)[:, :4]
    g = torch.randn(10, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y = cayley_step(x0, skew_direction(x0, g), 1e-3, exact=True)
    assert _defect(y) < 1e-12
    assert float((g * y).sum()) < float((g * x0).sum())


def test_bad_settings():
    with pytest.raises(ValueError, match="lr must be > 0"):
        CayleySGD([torch.nn.Parameter(torch.eye(3))], lr=0)
    with pytest.raises(ValueError, match="p <= n"):
        CayleySGD([torch.nn.Parameter(torch.zeros(2, 3))], lr=0.1)
    with pytest.raises(ValueError, match="norm must be one of"):
        CayleySGD([torch.nn.Parameter(torch.eye(3))], lr=0.1, norm="spectral")


def _moved(norm: str, grad: torch.Tensor) -> float:
    x = torch.nn.Parameter(torch.eye(grad.shape[0], dtype=torch.float64))
    x.grad = grad
    CayleySGD([x], lr=10.0, norm=norm).step()
    return float(torch.linalg.matrix_norm(x.detach() - torch.eye(grad.shape[0], dtype=torch.float64)))


def test_one_norm_cap_keeps_steps_small_when_the_gradient_sits_on_one_coordinate():
    """A gradient tied to one coordinate (a massive-activation channel) moves the 1-norm-capped step less than the
    Frobenius-capped one; a gradient spread over every coordinate moves both by comparable amounts."""
    n, gen = 64, torch.Generator().manual_seed(8)
    concentrated = torch.zeros(n, n, dtype=torch.float64)
    concentrated[:, 0] = torch.randn(n, generator=gen, dtype=torch.float64)
    spread = torch.randn(n, n, generator=gen, dtype=torch.float64)
    assert _moved("one", concentrated) < 0.3 * _moved("fro", concentrated)
    assert 0.5 < _moved("one", spread) / _moved("fro", spread) < 2.0


def _quantization_error(r: torch.Tensor, x: torch.Tensor, scale_grad: bool) -> torch.Tensor:
    """Mean squared error of per-token int4 quantization of ``x`` in the basis ``r``, mapped back."""
    from lowbit.quant import IntFormat, PerRow, fake_quantize

    return ((fake_quantize(x @ r, IntFormat(4, True), PerRow(), scale_grad=scale_grad) @ r.T - x) ** 2).mean()


@pytest.mark.parametrize("scale_grad", [True, False])
def test_a_rotation_learns_to_flatten_an_outlier_channel_only_through_the_scale_gradient(scale_grad):
    """Tokens with one channel 10x the others: a learned rotation can spread it and cut the int4 error. With the
    dynamic scale detached, the straight-through gradient of this error is exactly zero (the rounding error is
    treated as a constant), so nothing is learned; with ``scale_grad`` the error falls several-fold."""
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:, 0] *= 10
    r = torch.nn.Parameter(torch.eye(32, dtype=torch.float64))
    opt = CayleySGD([r], lr=0.5)
    before = float(_quantization_error(r, x, scale_grad))
    for _ in range(60):
        opt.zero_grad()
        _quantization_error(r, x, scale_grad).backward()
        opt.step()
    after = float(_quantization_error(r, x, scale_grad))
    if scale_grad:
        assert after < before / 3
    else:
        assert after == pytest.approx(before, rel=1e-6)
