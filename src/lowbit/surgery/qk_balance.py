"""Query/key balancing: scale keys by ``a`` and queries by ``1 / a`` per KV head and RoPE channel pair (exact).

A key codec's error reaches the attention scores through the query: an error ``e`` in a stored key moves the score
by ``q . e``. QJL's estimate of ``q . k`` from ``m`` sign bits has variance ``((pi/2) |q|^2 |k|^2 - (q . k)^2) / m``,
and a per-token integer or codebook code's error grows with the key's size too. Scaling ``k -> a * k`` and
``q -> q / a`` leaves every score unchanged, and over a diagonal ``a`` the product the QJL variance grows with,
``E|q / a|^2 * E|a k|^2 = (sum_c E[q_c^2] / a_c^2) (sum_c a_c^2 E[k_c^2])``, is smallest (Cauchy-Schwarz) at
``a_c^2 = sqrt(E[q_c^2] / E[k_c^2])``: then queries and keys carry the same energy in every channel, and channels where
the queries are large (where a key error costs most) get the keys' larger share of a norm-relative code.
``alpha`` interpolates: ``a_c = (E[q_c^2] / E[k_c^2]) ** (alpha / 2)``, ``alpha = 0.5`` the balance, 0 nothing.

``a`` is constant over each RoPE pair (channels ``i`` and ``i + d/2`` turn together), so it commutes with RoPE and
folds into the q/k projections offline (their output rows; with their biases) and costs nothing at run time. Families
with per-head q/k norms (Gemma 3) fold it into the norm weights, which every head shares: one ``a`` for all heads.
Energies are measured where the scale applies (the projection or q/k norm output, before RoPE; a pair's energy is the
same after it), keys around their per-head mean when the KV quantizer keys around a centre (the part it quantizes).
KIVI-style per-channel key codes are unchanged by a per-channel scale (each channel has its own range).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.arch import ArchSpec, decoder_layers, get_module
from .head_stats import head_moments
from .offload import onloaded


@torch.no_grad()
def measure_energies(model: nn.Module, spec: ArchSpec, batches: Tensor,
                     centred: bool) -> list[tuple[Tensor, Tensor]]:
    """Per decoder layer, the mean square of the queries ``[heads, d]`` and keys ``[kv_heads, d]`` before RoPE over
    calibration ``batches`` ``[n, L]`` (keys around their mean when ``centred``)."""
    paths = spec.qk_norms if spec.qk_norms else (spec.q, spec.k)
    return [(q.energy(False), k.energy(centred)) for q, k in head_moments(model, spec, batches, tuple(paths))]


def pair_sum(energy: Tensor) -> Tensor:
    """``[..., d]`` -> ``[..., d/2]``: the energy of each RoPE pair (channels ``i`` and ``i + d/2``)."""
    half = energy.shape[-1] // 2
    return energy[..., :half] + energy[..., half:]


def balance_scales(query: Tensor, key: Tensor, alpha: float = 0.5) -> Tensor:
    """Key scales ``[kv_heads, d]`` from query energies ``[heads, d]`` and key energies ``[kv_heads, d]``.

    Query heads are summed over each KV head's group; the scale is constant per RoPE pair and normalised to a
    geometric mean of 1 per KV head. Pairs with no energy on either side keep the scale 1."""
    kv_heads = key.shape[0]
    eq = pair_sum(query.double().reshape(kv_heads, -1, query.shape[-1]).sum(1))
    ek = pair_sum(key.double())
    floor = 1e-12 * torch.maximum(eq.mean(-1, keepdim=True), ek.mean(-1, keepdim=True)).clamp_min(1e-30)
    live = (eq > floor) & (ek > floor)
    log_a = torch.where(live, (eq.clamp_min(1e-30).log() - ek.clamp_min(1e-30).log()) * (alpha / 2), 0.0)
    log_a = log_a - log_a.sum(-1, keepdim=True) / live.sum(-1, keepdim=True).clamp_min(1) * live
    return log_a.exp().repeat(1, 2).float()


def predicted_gain(query: Tensor, key: Tensor, scales: Tensor) -> float:
    """``E|q / a|^2 E|a k|^2`` over ``E|q|^2 E|k|^2`` (what QJL's score variance is multiplied by), mean over KV
    heads."""
    kv_heads, d = key.shape
    eq = query.double().reshape(kv_heads, -1, d).sum(1)
    a2 = scales.double().pow(2)
    return ((eq / a2).sum(-1) * (key.double() * a2).sum(-1) / (eq.sum(-1) * key.double().sum(-1))).mean().item()


def _scale_rows(linear: nn.Module, scale: Tensor) -> None:
    linear.weight.data.mul_(scale.to(linear.weight.dtype)[:, None])
    if getattr(linear, "bias", None) is not None:
        linear.bias.data.mul_(scale.to(linear.bias.dtype))


def _scale_norm(norm: nn.Module, scale: Tensor, offset: float) -> None:
    """A norm scaling by ``offset + w`` now scales by ``(offset + w) * scale``."""
    w = norm.weight.data
    w.copy_(((w.double() + offset) * scale.double() - offset).to(w.dtype))


@torch.no_grad()
def fold_balance(model: nn.Module, spec: ArchSpec, index: int, scales: Tensor) -> None:
    """Fold layer ``index``'s key scales ``[kv_heads, d]`` (queries get ``1 / scales``, per group) into its weights:
    the q/k projection rows, or with q/k norms (one scale shared by every head) the norm weights."""
    layer = decoder_layers(model, spec)[index]
    heads = model.config.num_attention_heads
    with onloaded(layer):
        if spec.qk_norms:
            if not torch.allclose(scales, scales[:1].expand_as(scales)):
                raise ValueError("a family with shared q/k norm weights takes one scale for every head")
            q_norm, k_norm = (get_module(layer, p) for p in spec.qk_norms)
            _scale_norm(k_norm, scales[0], spec.norm_offset)
            _scale_norm(q_norm, 1 / scales[0], spec.norm_offset)
            return
        group = heads // scales.shape[0]
        _scale_rows(get_module(layer, spec.k), scales.reshape(-1))
        _scale_rows(get_module(layer, spec.q), 1 / scales.repeat_interleave(group, 0).reshape(-1))


def layer_scales(model: nn.Module, spec: ArchSpec, energies: tuple[Tensor, Tensor], alpha: float) -> Tensor:
    """One layer's key scales ``[kv_heads, d]``: per KV head, or shared by all heads where the family's q/k norms
    are (their weights are per channel, not per head)."""
    query, key = energies
    if spec.qk_norms:
        shared = balance_scales(query.sum(0, keepdim=True), key.sum(0, keepdim=True), alpha)
        return shared.expand(key.shape[0], -1).clone()
    return balance_scales(query, key, alpha)
