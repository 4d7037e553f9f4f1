"""Sphere codebooks: Lloyd–Max optimal, symmetric, and better than a uniform grid on the same density."""

import pytest
import torch

from lowbit.kv.codebook import codebook_mse, sphere_codebook


def test_levels_are_sorted_symmetric_and_centroids():
    book = sphere_codebook(64, 3)
    assert book.levels.shape == (8,) and book.boundaries.shape == (7,)
    assert bool((book.levels.diff() > 0).all())
    assert torch.allclose(book.levels, -book.levels.flip(0), atol=1e-12)
    # centroid condition on samples of the true distribution (normalised Gaussians are uniform on the sphere)
    g = torch.randn(200_000, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = (g / g.norm(dim=1, keepdim=True)).flatten()
    codes = book.encode(x)
    for c in range(8):
        assert float(x[codes == c].mean()) == pytest.approx(float(book.levels[c]), abs=2e-3 / 8)


def test_beats_a_uniform_grid_and_halves_error_per_bit_roughly():
    """Per coordinate (in units of the variance 1/d): 1 bit ~0.36, 2 bits ~0.117, 3 bits ~0.034 (Gaussian-like)."""
    d = 64
    mse = {b: codebook_mse(d, b) * d for b in (1, 2, 3, 4)}
    assert mse[1] == pytest.approx(1 - 2 / torch.pi, rel=0.03)  # the Gaussian 1-bit optimum
    assert mse[2] == pytest.approx(0.1175, rel=0.05) and mse[3] == pytest.approx(0.03454, rel=0.05)
    assert mse[4] < mse[3] / 3
    # a uniform 3-bit grid over +-3 standard deviations does worse
    std = d**-0.5
    g = torch.randn(100_000, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = (g / g.norm(dim=1, keepdim=True)).flatten()
    step = 6 * std / 8
    uniform = ((x / step - 0.5).round().clamp(-4, 3) + 0.5) * step
    assert float((uniform - x).pow(2).mean()) * d > mse[3]


def test_bad_arguments():
    with pytest.raises(ValueError, match="d >= 2"):
        sphere_codebook(1, 2)
    with pytest.raises(ValueError, match="from 1 to 8"):
        sphere_codebook(64, 9)
