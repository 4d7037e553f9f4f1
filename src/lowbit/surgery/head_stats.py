"""Per-head statistics of queries and keys before RoPE over calibration text (key centres, query/key balance)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.arch import ArchSpec, decoder_layers, get_module, head_dim


def per_head(out: Tensor, d: int) -> Tensor:
    """A projection's output ``[..., heads * d]`` or a q/k norm's ``[B, heads, T, d]`` as ``[tokens, heads, d]``."""
    heads = out.float().reshape(*out.shape[:-1], -1, d) if out.shape[-1] != d else out.float().transpose(1, 2)
    return heads.reshape(-1, *heads.shape[-2:])


class HeadMoments:
    """Running per-head sums of ``x`` and ``x^2`` over tokens."""

    def __init__(self) -> None:
        self.sum: Tensor | None = None
        self.square: Tensor | None = None
        self.count = 0

    def add(self, x: Tensor) -> None:
        s, sq = x.sum(0), x.pow(2).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.square = sq if self.square is None else self.square + sq
        self.count += x.shape[0]

    def mean(self) -> Tensor:
        """Mean per head and channel ``[heads, d]``."""
        return self.sum.cpu() / self.count

    def energy(self, centred: bool) -> Tensor:
        """Mean square per head and channel ``[heads, d]`` (around the mean when ``centred``)."""
        mean_square = self.square.cpu() / self.count
        return (mean_square - self.mean().pow(2)).clamp_min(0) if centred else mean_square


@torch.no_grad()
def head_moments(model: nn.Module, spec: ArchSpec, batches: Tensor, paths: tuple[str, ...]) -> list[list[HeadMoments]]:
    """Per decoder layer, the :class:`HeadMoments` of the outputs of the modules at ``paths`` (each a q/k projection
    or q/k norm of the layer) over calibration ``batches`` ``[n, L]``."""
    d = head_dim(model.config)
    moments = [[HeadMoments() for _ in paths] for _ in decoder_layers(model, spec)]
    handles = []
    for layer, ms in zip(decoder_layers(model, spec), moments, strict=True):
        for path, m in zip(paths, ms, strict=True):
            handles.append(get_module(layer, path).register_forward_hook(
                lambda module, args, out, m=m: m.add(per_head(out, d))))
    try:
        for row in batches:
            model(row.unsqueeze(0), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return moments
