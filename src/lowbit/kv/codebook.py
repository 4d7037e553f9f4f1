"""Optimal scalar codebooks for the coordinates of a randomly rotated vector (the rotated-codebook KV cache).

After a uniformly random rotation, the unit vector ``x / ||x||`` in ``d`` dimensions is uniform on the sphere, so
each of its coordinates has the known density ``f(t) ∝ (1 - t^2)^((d-3)/2)`` on ``[-1, 1]`` (variance ``1/d``),
whatever ``x`` was. One scalar quantizer, optimal for that density, then serves every coordinate of every vector:
store the norm once and ``b`` bits per coordinate. This is the idea of TurboQuant (Zandieh, Daliri, Hadian,
Mirrokni, 2025, arXiv 2504.19874), from the authors of QJL. The codebook is the Lloyd–Max quantizer of ``f``: levels
at the conditional means of their cells, cell boundaries halfway between levels, found by Lloyd's iteration on a
fine grid (float64; symmetric about 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

_GRID = 200_001  # points on (-1, 1) for the numerical integrals
_ITERATIONS = 300


def coordinate_density(d: int, t: Tensor) -> Tensor:
    """Unnormalised density of one coordinate of a uniform random unit vector in ``d >= 2`` dimensions."""
    return (1.0 - t.pow(2)).clamp_min(0.0).pow((d - 3) / 2)


@dataclass(frozen=True, eq=False)
class Codebook:
    """A scalar quantizer: sorted ``levels`` ``[2^bits]`` and the ``boundaries`` ``[2^bits - 1]`` between them."""

    bits: int
    levels: Tensor
    boundaries: Tensor

    def encode(self, x: Tensor) -> Tensor:
        """Index (uint8) of the nearest level for every element."""
        return torch.bucketize(x.contiguous(), self.boundaries.to(x.device, x.dtype)).to(torch.uint8)

    def decode(self, codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """The levels the codes stand for."""
        levels = self.levels.to(codes.device, dtype)
        return levels.index_select(0, codes.reshape(-1).int()).reshape(codes.shape)  # faster than indexing on CPU


@lru_cache(maxsize=64)
def sphere_codebook(d: int, bits: int) -> Codebook:
    """The Lloyd–Max codebook with ``2^bits`` levels for a coordinate of a random unit vector in ``d`` dimensions."""
    if d < 2:
        raise ValueError(f"a sphere codebook needs d >= 2, got {d}")
    if not 1 <= bits <= 8:
        raise ValueError(f"codebook bits must be from 1 to 8, got {bits}")
    t = torch.linspace(-1.0, 1.0, _GRID, dtype=torch.float64)[1:-1]
    w = coordinate_density(d, t)
    w = w / w.sum()
    cdf = w.cumsum(0)
    k = 2**bits
    levels = t[torch.searchsorted(cdf, (torch.arange(k, dtype=torch.float64) + 0.5) / k).clamp_max(len(t) - 1)]
    for _ in range(_ITERATIONS):
        boundaries = (levels[1:] + levels[:-1]) / 2
        cells = torch.bucketize(t, boundaries)
        mass = torch.zeros(k, dtype=torch.float64).index_add_(0, cells, w)
        moment = torch.zeros(k, dtype=torch.float64).index_add_(0, cells, w * t)
        levels = torch.where(mass > 0, moment / mass.clamp_min(1e-300), levels)
    levels = (levels - levels.flip(0)) / 2  # exact symmetry about 0
    return Codebook(bits=bits, levels=levels, boundaries=(levels[1:] + levels[:-1]) / 2)


def codebook_mse(d: int, bits: int) -> float:
    """Expected squared error per coordinate of the codebook on its own density (times d: relative to 1/d)."""
    book = sphere_codebook(d, bits)
    t = torch.linspace(-1.0, 1.0, _GRID, dtype=torch.float64)[1:-1]
    w = coordinate_density(d, t)
    w = w / w.sum()
    err = (book.decode(book.encode(t), torch.float64) - t).pow(2)
    return float((w * err).sum())
