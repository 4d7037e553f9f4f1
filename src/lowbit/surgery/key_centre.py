"""Key centres: remove each KV head's shared pre-RoPE key offset exactly before the KV fake-quantizer rounds keys.

Some families' keys carry a large offset common to every token: Qwen2's k_proj bias adds the same vector to every
pre-RoPE key, and in some layers of Qwen2.5-Coder-0.5B the mean key is 30-110 times larger than what tells tokens
apart. A per-token quantizer then spends its range on the offset. RoPE turns that offset with the position (fast in
the high-frequency channel pairs), so after RoPE no per-channel constant removes it; before RoPE one vector does.

A :class:`KeyCentre` holds that vector ``c`` per KV head (``[kv_heads, head_dim]``) and gives, for cache positions
``t``, the offset ``o_t = RoPE_t(c)`` as the KV quantizer sees keys (after any online rotation of queries and keys,
R3). The quantizer rounds ``k - o`` and adds ``o`` back: exact in the centre (``o`` is recomputed, never stored),
zero bits per token, one vector per head and layer. ``c`` comes from the k_proj bias (``bias``: no calibration, a
no-op on families without one) or from the mean pre-RoPE key over calibration text (``mean``: also removes the part
of the mean that the inputs, not the bias, put there).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import CalibrationError
from ..kv.attention import KEY_CENTRE_ATTR
from ..models.arch import ArchSpec, decoder_layers, get_module, head_dim
from .attention import KVQuantHook, attention_hooks
from .head_stats import head_moments

Rope = Callable[[Tensor], tuple[Tensor, Tensor]]  # positions [T] -> (cos, sin), each [T, head_dim]


def rotate_half(x: Tensor) -> Tensor:
    """transformers' RoPE pairing: channel ``i`` turns with channel ``i + d/2`` (written here: importing a modelling
    module at lowbit's import time pulls in transformers' optional-kernel probing)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_offsets(centre: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``RoPE_t(c)`` for each position: ``centre`` ``[H, d]``, ``cos``/``sin`` ``[T, d]`` -> ``[1, H, T, d]``."""
    c = centre[None, :, None, :]
    return c * cos[None, None] + rotate_half(c) * sin[None, None]


class KeyCentre(nn.Module):
    """One layer's pre-RoPE key centre and how to turn it into the offsets its KV quantizer sees (module doc).

    The offsets of positions ``[0, n)`` are computed once and kept (a non-persistent buffer, grown by doubling): a
    packed cache asks for every position at every decode step, and recomputing them there would run RoPE and R3 over
    the whole context per token."""

    def __init__(self, centre: Tensor, rope: Rope, after: tuple[Callable[[Tensor], Tensor], ...] = ()) -> None:
        super().__init__()
        self.register_buffer("centre", centre.detach().float().clone())
        self.register_buffer("table", None, persistent=False)
        self._rope, self._after = rope, after  # plain attributes: neither is a submodule of this one
        self._table_of: Tensor | None = None  # the centre the table was computed from (a load assigns a new one)

    def offsets(self, positions: Tensor) -> Tensor:
        """``[1, kv_heads, T, d]`` float32 offsets at cache ``positions`` ``[T]``, in the quantizer's basis."""
        positions = positions.to(self.centre.device)
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if self._table_of is not self.centre or self.table.shape[2] < needed:
            held = self.table.shape[2] if self._table_of is self.centre else 0
            self.table = self._compute(torch.arange(max(needed, 2 * held), device=self.centre.device))
            self._table_of = self.centre
        return self.table.index_select(2, positions)

    def _compute(self, positions: Tensor) -> Tensor:
        cos, sin = self._rope(positions)
        out = rope_offsets(self.centre, cos.float(), sin.float())
        for transform in self._after:
            out = transform(out)
        return out


def rope_for_layer(model: nn.Module, spec: ArchSpec, index: int) -> Rope:
    """The rotary table of decoder layer ``index`` as a function of positions (a family with per-layer attention
    kinds picks that layer's table)."""
    rotary = get_module(model, spec.rotary)
    kind = (model.config.layer_types[index],) if spec.layer_types else ()

    def rope(positions: Tensor) -> tuple[Tensor, Tensor]:
        probe = torch.zeros(1, 1, 1, device=positions.device)
        cos, sin = rotary(probe, positions[None], *kind)
        return cos[0], sin[0]

    return rope


def bias_centres(model: nn.Module, spec: ArchSpec) -> list[Tensor]:
    """Each layer's k_proj bias as ``[kv_heads, d]`` (zeros where the family has none)."""
    d, heads, out = head_dim(model.config), model.config.num_key_value_heads, []
    for layer in decoder_layers(model, spec):
        bias = getattr(get_module(layer, spec.k), "bias", None)
        out.append(bias.detach().float().reshape(heads, d) if bias is not None else torch.zeros(heads, d))
    return out


def measure_centres(model: nn.Module, spec: ArchSpec, batches: Tensor) -> list[Tensor]:
    """Each layer's mean pre-RoPE key ``[kv_heads, d]`` over calibration ``batches`` ``[n, L]``: the k_proj output,
    or the key norm's where the family normalizes keys before RoPE (its output is ``[B, heads, T, d]``)."""
    where = spec.qk_norms[1] if spec.qk_norms else spec.k
    return [k.mean() for (k,) in head_moments(model, spec, batches, (where,))]


def _key_transform(hook: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda x: hook(x, x, x)[1]


def key_centres_for(model: nn.Module, spec: ArchSpec, source: str, calibration=None) -> list[Tensor]:
    """Each layer's centre from ``source``: ``bias`` (k_proj's) or ``mean`` (measured on ``calibration()``)."""
    if source == "bias":
        return bias_centres(model, spec)
    if calibration is None:
        raise CalibrationError("key_centre: mean measures the mean key on calibration text: pass some")
    return measure_centres(model, spec, calibration())


def _centre(model: nn.Module, spec: ArchSpec, index: int, centre: Tensor, before: list[nn.Module]) -> KeyCentre:
    """Layer ``index``'s :class:`KeyCentre`, turning its offsets as the attention ``before`` hooks turn keys."""
    layer = decoder_layers(model, spec)[index]
    device = next((t.device for t in (*layer.parameters(), *layer.buffers()) if t.device.type != "meta"), None)
    return KeyCentre(centre.to(device), rope_for_layer(model, spec, index), tuple(_key_transform(h) for h in before))


def attach_key_centre(model: nn.Module, spec: ArchSpec, index: int, centre: Tensor) -> None:
    """Give decoder layer ``index``'s KV fake-quantizer its key centre ``[kv_heads, d]`` (the hooks that run before
    it, R3, turn the offsets as they turn the keys)."""
    hooks = attention_hooks(get_module(decoder_layers(model, spec)[index], spec.attn))
    kv = next(j for j, h in enumerate(hooks) if isinstance(h, KVQuantHook))
    hooks[kv].centre = _centre(model, spec, index, centre, hooks[:kv])


def attach_key_centres(model: nn.Module, spec: ArchSpec, centres: list[Tensor], cache: bool = False) -> None:
    """:func:`attach_key_centre` (or, for a packed cache, :func:`attach_cache_key_centre`) for every decoder layer,
    ``centres`` in layer order."""
    if len(centres) != len(decoder_layers(model, spec)):
        raise ValueError(f"{len(centres)} key centres for {len(decoder_layers(model, spec))} layers")
    attach = attach_cache_key_centre if cache else attach_key_centre
    for i, centre in enumerate(centres):
        attach(model, spec, i, centre)


def attach_cache_key_centre(model: nn.Module, spec: ArchSpec, index: int, centre: Tensor) -> None:
    """Give decoder layer ``index``'s attention module the key centre its packed cache stores keys around (every
    attention hook runs before the cache: their turns apply)."""
    attn = get_module(decoder_layers(model, spec)[index], spec.attn)
    attn.register_module(KEY_CENTRE_ATTR, _centre(model, spec, index, centre, attention_hooks(attn)))
