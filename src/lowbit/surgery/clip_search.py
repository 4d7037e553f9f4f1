"""PrefixQuant's clip-factor grid search for static scales, one decoder layer at a time.

Every static quantizer of a layer starts from its calibration range. In forward order, each one (quantizers that
read the same tensor move together) gets the clip factor that minimises an error on a few calibration samples,
with everything else in the layer as it stands: for the key quantizer the error of the attention probabilities
softmax(QK^T), for the others the mean squared error of the layer's output against the full-precision target.
The search is coarse (0.25 to 0.95 by 0.1, and 1.0: no clipping), then fine (±0.025 and ±0.05 around the best).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..kv.attend import group_queries, masked_softmax
from ..models.arch import ArchSpec, get_module
from .attention import KVQuantHook, attention_hooks
from .linear import QuantLinear
from .quantizer import ActQuantizer

COARSE = (0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95, 1.0)
FINE = (-0.05, -0.025, 0.025, 0.05)


def search_factor(loss: Callable[[float], float], coarse=COARSE, fine=FINE) -> tuple[float, float]:
    """The factor in (0, 1] with the lowest ``loss(factor)`` on a coarse grid refined around its best point.

    Returns ``(factor, loss)``; ``loss`` is called once per distinct candidate.
    """
    seen: dict[float, float] = {}

    def best_of(candidates) -> tuple[float, float]:
        for c in candidates:
            c = round(min(max(c, 0.01), 1.0), 4)
            if c not in seen:
                seen[c] = loss(c)
        return min(seen.items(), key=lambda kv: kv[1])

    best, _ = best_of(coarse)
    return best_of([best + d for d in fine])


def kv_hook(layer: nn.Module, spec: ArchSpec) -> KVQuantHook | None:
    """The layer's KV fake-quantization hook, if any."""
    hooks = [h for h in attention_hooks(get_module(layer, spec.attn)) if isinstance(h, KVQuantHook)]
    return hooks[0] if hooks else None


def static_groups(layer: nn.Module, spec: ArchSpec) -> list[tuple[str, list[ActQuantizer]]]:
    """The layer's static quantizers in forward order, those reading one tensor together: q/k/v inputs, keys,
    values, o input, gate/up inputs, down input."""
    groups = []
    hook = kv_hook(layer, spec)
    for roles in spec.input_groups:
        linears = [get_module(layer, spec.linear_roles[r]) for r in roles]
        quants = [m.input_quant for m in linears if isinstance(m, QuantLinear) and m.input_quant is not None]
        quants = [q for q in quants if q.static]
        if quants:
            groups.append(("+".join(roles) + " input", quants))
        if roles == spec.input_groups[0] and hook is not None:
            groups += [(name, [q]) for name, q in (("keys", hook.k_quant), ("values", hook.v_quant)) if q.static]
    return groups


@contextmanager
def captured_qk(hook: KVQuantHook) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """Record the (query, key) pairs that reach the KV hook (post-RoPE, after online rotations)."""
    seen: list[tuple[Tensor, Tensor]] = []
    handle = hook.register_forward_pre_hook(lambda module, args: seen.append((args[0].detach(), args[1].detach())))
    try:
        yield seen
    finally:
        handle.remove()


def attention_probs(query: Tensor, key: Tensor) -> Tensor:
    """Causal softmax(QK^T / sqrt(d)) with GQA, keys before the queries (a prefix) visible to all."""
    q = group_queries(query.float(), key.shape[1])
    return masked_softmax(q @ key.float().transpose(-1, -2) * query.shape[-1] ** -0.5, None, query.shape[2])


def key_error(hook: KVQuantHook, pairs: list[tuple[Tensor, Tensor]], exact: list[Tensor]) -> float:
    """Mean squared error of the attention probabilities with quantized keys against exact ones."""
    total = sum(float((attention_probs(q, hook.quantize_key(k)) - p).square().mean())
                for (q, k), p in zip(pairs, exact, strict=True))
    return total / len(pairs)


def set_group_clip(quants: list[ActQuantizer], factor: float) -> None:
    for q in quants:
        q.set_clip(factor)


def _output_loss(quants: list[ActQuantizer], run: Callable[[], Tensor], target: Tensor) -> Callable[[float], float]:
    def loss(factor: float) -> float:
        set_group_clip(quants, factor)
        return float((run() - target).square().mean())

    return loss


def _key_loss(layer: nn.Module, spec: ArchSpec, quants: list[ActQuantizer], run) -> Callable[[float], float]:
    hook = kv_hook(layer, spec)
    with captured_qk(hook) as pairs:
        run()
    exact = [attention_probs(q, k) for q, k in pairs]

    def loss(factor: float) -> float:
        set_group_clip(quants, factor)
        return key_error(hook, pairs, exact)

    return loss


@torch.no_grad()
def grid_search_layer(layer: nn.Module, spec: ArchSpec, run: Callable[[], Tensor], target: Tensor) -> dict:
    """Search the clip factor of each static quantizer group of ``layer`` in forward order.

    ``run()`` computes the layer's output on the search samples; ``target`` is the full-precision output.
    Returns ``{group name: factor}``.
    """
    chosen = {}
    for name, quants in static_groups(layer, spec):
        loss = _key_loss(layer, spec, quants, run) if name == "keys" else _output_loss(quants, run, target)
        factor, _ = search_factor(loss)
        set_group_clip(quants, factor)
        chosen[name] = factor
    return chosen
