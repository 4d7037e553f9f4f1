"""QJL's score estimate: unbiased within its predicted standard error, error falling like 1/sqrt(m)."""

import math

import pytest
import torch

from lowbit.kv.qjl import (
    estimate_scores,
    mean_chi,
    predicted_std,
    qjl_projection,
    sketch_keys,
)


def test_mean_chi_matches_monte_carlo():
    g = torch.randn(200_000, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert mean_chi(64) == pytest.approx(float(g.norm(dim=1).mean()), rel=1e-3)
    assert mean_chi(64) == pytest.approx(7.9688, abs=1e-4)


def test_projection_rows_are_orthogonal_within_blocks_with_mean_chi_norm():
    s = qjl_projection(16, 40, seed=3).double()
    assert s.shape == (40, 16)
    assert torch.allclose(s.norm(dim=1), torch.full((40,), mean_chi(16), dtype=torch.float64), rtol=1e-5)
    block = s[:16] / mean_chi(16)
    assert torch.allclose(block @ block.T, torch.eye(16, dtype=torch.float64), atol=1e-5)
    assert torch.equal(qjl_projection(16, 40, seed=3), s.float()) and not torch.equal(qjl_projection(16, 40, 4), s.float())


def _pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n query/key pairs of head_dim 64, keys partly aligned with their queries (large true scores)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 64, generator=gen)
    k = torch.rand(n, 1, generator=gen) * q + torch.randn(n, 64, generator=gen)
    return q, k


def _estimates(q, k, m: int, seeds) -> torch.Tensor:
    """``[seeds, pairs]`` estimates of each pair's q·k, one fresh sketch matrix per seed."""
    rows = []
    for seed in seeds:
        s = qjl_projection(64, m, seed)
        rows.append(estimate_scores(q, sketch_keys(k, s, norm_dtype=torch.float32), s).diagonal())
    return torch.stack(rows).double()


@pytest.mark.parametrize("m", [64, 256])
def test_unbiased_within_predicted_standard_error(m):
    """Over 300 seeds every pair's mean estimate is within 4.5 predicted standard errors of the exact score."""
    q, k = _pairs(48, seed=1)
    est = _estimates(q, k, m, range(300))
    exact = (q.double() * k.double()).sum(-1)
    stderr = predicted_std(q, k, m) / math.sqrt(est.shape[0])
    z = (est.mean(0) - exact) / stderr
    assert float(z.abs().max()) < 4.5
    assert abs(float(z.mean())) < 1.5  # no common bias across pairs (z's are not independent: a loose bound)
    assert bool((est.std(0) <= 1.05 * predicted_std(q, k, m)).all())  # orthogonal rows: at most the i.i.d. spread


def test_error_falls_like_one_over_sqrt_m():
    q, k = _pairs(16, seed=2)
    spread = {m: _estimates(q, k, m, range(150)).std(0) for m in (64, 256, 1024)}
    for small, large in ((64, 256), (256, 1024)):
        ratio = float((spread[small] / spread[large]).median())
        assert ratio == pytest.approx(2.0, rel=0.2)


def test_orthogonal_rows_beat_iid_rows():
    """Block-orthogonal rows give a smaller spread than i.i.d. Gaussian rows of the same m."""
    q, k = _pairs(16, seed=5)
    ortho = _estimates(q, k, 128, range(200)).std(0)
    iid = []
    for seed in range(200):
        s = torch.randn(128, 64, generator=torch.Generator().manual_seed(10_000 + seed))
        iid.append(estimate_scores(q, sketch_keys(k, s, norm_dtype=torch.float32), s).diagonal())
    assert float((ortho / torch.stack(iid).double().std(0)).median()) < 0.9


def test_batched_shapes_and_bytes():
    s = qjl_projection(64, 128, seed=0)
    keys, queries = torch.randn(2, 3, 10, 64), torch.randn(2, 3, 4, 64)
    sketch = sketch_keys(keys, s)
    assert sketch.signs.shape == (2, 3, 10, 16) and sketch.norm.dtype == torch.float16
    assert sketch.nbytes == 2 * 3 * 10 * (16 + 2)
    assert estimate_scores(queries, sketch, s).shape == (2, 3, 4, 10)
