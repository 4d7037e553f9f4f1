"""Granularities: which elements of a tensor share one scale (and zero point), and the grouped view behind them.

Every quantizer function works on a *grouped view* ``g`` of the input: a tensor whose last dimension holds the
elements of one granule, so that per-granule statistics have shape ``g.shape[:-1] + (1,)`` and broadcast
against ``g``. The grouped view and the statistics shape for an input ``x`` of shape ``(*lead, D)`` are:

===============  ===========================================  =========================================
granularity      grouped view ``to_groups(x, gran)``           stats shape ``granule_shape(x.shape, gran)``
===============  ===========================================  =========================================
PerTensor()      ``(1, x.numel())``                            ``(1, 1)``
PerRow()         ``(*lead, D)`` (``x`` itself)                  ``(*lead, 1)``
PerGroup(n)      ``(*lead, ceil(D / n), n)`` (zero-padded)     ``(*lead, ceil(D / n), 1)``
PerAxis(a)       ``(x.shape[a], numel / x.shape[a])``          ``(x.shape[a], 1)``
===============  ===========================================  =========================================

For PerTensor and PerAxis the stats shape does not depend on the sizes of the reduced dimensions, so a static
observer can merge running statistics across batches of different batch size or sequence length with
``torch.minimum(old_min, new_min)`` and ``torch.maximum(old_max, new_max)``. For PerRow and PerGroup the stats
keep the leading dims, so merging needs same-shaped inputs (they are meant for dynamic, per-call scales).

PerGroup pads a last partial group with zeros only in the grouped view used to *apply* quantization (the padded
outputs are cut off by :func:`from_groups`); statistics are always reduced over real elements only
(:func:`reduce_granules` treats the partial group separately).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import Tensor


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerRow:
    """One scale per row of the last dimension (reduce over dim -1 only).

    Per-output-channel for weights ``[out, in]``, per-token for activations ``[..., hidden]``, per-token-per-head
    for a KV cache ``[B, H, S, D]``.
    """


@dataclass(frozen=True)
class PerGroup:
    """One scale per run of ``size`` consecutive elements along the last dim, per leading index.

    When the last dim is not a multiple of ``size`` the final group is partial and gets its own scale from its
    real elements only.
    """

    size: int

    def __post_init__(self) -> None:
        """Reject group sizes below 1, naming the bad value."""
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"PerGroup size must be an integer >= 1, got {self.size!r}")


@dataclass(frozen=True)
class PerAxis:
    """One scale per index along ``axis``, reduced over every other dim.

    Static per-head KV scales for ``[B, H, S, D]`` use ``axis=1``; per-channel static activation scales use
    ``axis=-1``. The stats shape ``(x.shape[axis], 1)`` does not depend on batch size or sequence length.
    """

    axis: int


Granularity: TypeAlias = PerTensor | PerRow | PerGroup | PerAxis

RangeFn: TypeAlias = Callable[[Tensor], tuple[Tensor, Tensor]]
"""Maps a grouped chunk ``(..., n)`` to per-granule ``(low, high)``, each of shape ``(..., 1)``."""


def _last_dim(shape: Sequence[int], gran: Granularity) -> int:
    """Size of the last dim, after checking that the tensor has one (PerRow/PerGroup need it)."""
    if len(shape) == 0:
        raise ValueError(f"{gran} needs a tensor with at least one dimension, got a 0-d tensor")
    return int(shape[-1])


def _axis(shape: Sequence[int], gran: PerAxis) -> int:
    """Normalise ``gran.axis`` to a non-negative index, with a ValueError naming the valid range."""
    ndim = len(shape)
    if not -ndim <= gran.axis < ndim:
        raise ValueError(f"PerAxis axis {gran.axis} is out of range for a {ndim}-d tensor (valid: {-ndim}..{ndim - 1})")
    return gran.axis % ndim


def _n_groups(shape: Sequence[int], gran: PerGroup) -> int:
    """Number of groups along the last dim, counting a partial last group: ``ceil(D / size)``."""
    return math.ceil(_last_dim(shape, gran) / gran.size)


def granule_shape(shape: Sequence[int], gran: Granularity) -> torch.Size:
    """Shape of per-granule statistics (scale, zero point, min, max) for an input of ``shape``; see module doc."""
    if isinstance(gran, PerTensor):
        return torch.Size((1, 1))
    if isinstance(gran, PerRow):
        _last_dim(shape, gran)
        return torch.Size((*shape[:-1], 1))
    if isinstance(gran, PerGroup):
        return torch.Size((*shape[:-1], _n_groups(shape, gran), 1))
    if isinstance(gran, PerAxis):
        return torch.Size((shape[_axis(shape, gran)], 1))
    raise TypeError(f"unknown granularity {gran!r}")


def to_groups(x: Tensor, gran: Granularity) -> Tensor:
    """Return the grouped view of ``x`` (granule elements along the last dim); see the module doc for shapes.

    PerGroup zero-pads a partial last group; only use this view to apply quantization, never for statistics.
    """
    if isinstance(gran, PerTensor):
        return x.reshape(1, -1)
    if isinstance(gran, PerRow):
        _last_dim(x.shape, gran)
        return x
    if isinstance(gran, PerGroup):
        pad = _n_groups(x.shape, gran) * gran.size - x.shape[-1]
        padded = torch.nn.functional.pad(x, (0, pad)) if pad else x
        return padded.reshape(*x.shape[:-1], -1, gran.size)
    if isinstance(gran, PerAxis):
        axis = _axis(x.shape, gran)
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    raise TypeError(f"unknown granularity {gran!r}")


def from_groups(g: Tensor, gran: Granularity, shape: Sequence[int]) -> Tensor:
    """Invert :func:`to_groups`: restore the original ``shape``, dropping PerGroup padding."""
    shape = torch.Size(shape)
    if isinstance(gran, (PerTensor, PerRow)):
        return g.reshape(shape)
    if isinstance(gran, PerGroup):
        flat = g.reshape(*shape[:-1], -1)
        return flat[..., : shape[-1]]
    if isinstance(gran, PerAxis):
        axis = _axis(shape, gran)
        moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
        return g.reshape(moved).movedim(0, axis)
    raise TypeError(f"unknown granularity {gran!r}")


def expand_to_elements(stat: Tensor, gran: Granularity, shape: Sequence[int]) -> Tensor:
    """Broadcast per-granule ``stat`` (e.g. a scale) to one value per element of a tensor of ``shape``."""
    grouped = to_groups(torch.empty(shape, device=stat.device, dtype=stat.dtype), gran)
    return from_groups(stat.expand_as(grouped), gran, shape)


def reduce_granules(x: Tensor, gran: Granularity, fn: RangeFn) -> tuple[Tensor, Tensor]:
    """Apply a per-granule range reduction ``fn`` over real elements only; outputs have ``granule_shape``.

    ``fn`` gets a chunk ``(..., n)`` and returns ``(low, high)`` of shape ``(..., 1)``. For a PerGroup with a
    partial last group, ``fn`` is called on the full groups and on the partial group separately (so padding never
    enters a statistic) and the results are concatenated along the group dim.
    """
    if not isinstance(gran, PerGroup) or _last_dim(x.shape, gran) % gran.size == 0:
        return fn(to_groups(x, gran))
    n_full = x.shape[-1] // gran.size
    tail_lo, tail_hi = fn(x[..., n_full * gran.size :].unsqueeze(-2))
    if n_full == 0:
        return tail_lo, tail_hi
    head = x[..., : n_full * gran.size].reshape(*x.shape[:-1], n_full, gran.size)
    head_lo, head_hi = fn(head)
    return torch.cat([head_lo, tail_lo], dim=-2), torch.cat([head_hi, tail_hi], dim=-2)


def _aminmax_last(g: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row ``(min, max)`` over the last dim, kept as a trailing size-1 dim."""
    lo, hi = torch.aminmax(g, dim=-1, keepdim=True)
    return lo, hi


def reduce_minmax(x: Tensor, gran: Granularity) -> tuple[Tensor, Tensor]:
    """Per-granule ``(min, max)`` of ``x`` over real elements, each of shape ``granule_shape(x.shape, gran)``.

    The outputs broadcast against ``to_groups(x, gran)``. Merge two calls' outputs (e.g. running calibration
    statistics) with ``torch.minimum`` / ``torch.maximum``; for PerTensor and PerAxis the shapes do not depend on
    the reduced dims' sizes.
    """
    return reduce_granules(x, gran, _aminmax_last)
