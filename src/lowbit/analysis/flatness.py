"""Activation flatness: how evenly a token's activation vector spreads over its channels, as a per-token quantizer sees
it. A rotation is good for quantization when it makes these vectors flat (no channel far above the rest).

Two measures per token vector ``x`` (one row of a linear's input), averaged over tokens:

* ``max_over_median``: ``max |x_i| / median |x_i|``. A per-token scale follows the largest entry, so this is how many
  steps of the grid the typical entry is below the top one (Gaussian vectors of 576 channels: about 5).
* ``kurtosis``: ``mean((x - mean x)^4) / var(x)^2`` over the channels (3 for Gaussian values, 1.0 for ±c, large when
  a few channels dominate).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from ..models.arch import ArchSpec, decoder_layers, get_module
from ..surgery.sequential import capture_inputs


def token_flatness(x: Tensor) -> dict[str, float]:
    """The two measures (module doc) of the vectors along the last dimension of ``x``, averaged over the others."""
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    a = x.abs()
    ratio = a.amax(-1) / a.median(-1).values.clamp_min(torch.finfo(torch.float64).tiny)
    centred = x - x.mean(-1, keepdim=True)
    var = centred.square().mean(-1)
    kurtosis = centred.pow(4).mean(-1) / var.square().clamp_min(torch.finfo(torch.float64).tiny)
    return {"max_over_median": ratio.mean().item(), "kurtosis": kurtosis.mean().item()}


@torch.no_grad()
def linear_input_flatness(model: nn.Module, spec: ArchSpec, tokens: Tensor,
                          roles: tuple[str, ...] = ("q", "o", "down")) -> dict[str, dict[str, float]]:
    """Per linear role, :func:`token_flatness` of the inputs its weights see (after any online rotation) on
    ``tokens`` ``[1, L]``, averaged over the decoder layers."""
    modules = {f"{i}.{role}": get_module(layer, spec.linear_roles[role])
               for i, layer in enumerate(decoder_layers(model, spec)) for role in roles}
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)

    def sink(name: str, x: Tensor) -> None:
        role = name.split(".", 1)[1]
        for key, value in token_flatness(x).items():
            sums[role][key] += value
        counts[role] += 1

    with capture_inputs(modules, sink):
        model(tokens, use_cache=False)
    return {role: {key: value / counts[role] for key, value in sums[role].items()} for role in roles}
