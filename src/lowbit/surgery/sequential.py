"""Layer-streamed calibration: run calibration text through the decoder one layer at a time.

Weight methods that need each layer's inputs (GPTQ) use :func:`stream_layers`: it embeds the calibration samples,
then for each decoder layer in order moves that layer alone to the compute device, lets the caller observe the
layer's linear inputs and quantize it, and computes the layer's outputs *with its quantized weights* as the next
layer's inputs. So calibration inputs flow through the already-quantized earlier layers, and only one decoder layer
(plus one layer's activations) needs to be on the compute device at a time; the rest of the model may live on the
CPU, or be offloaded by accelerate (to CPU memory or disk: :mod:`lowbit.surgery.offload` brings each layer in and
writes its quantized weights back).

No forward pass is interrupted: the embeddings, rotary tables and layers are called directly through the
architecture spec, with the causal mask implied by transformers' sdpa path (``attention_mask=None``).

With a PrefixQuant prefix (a full-precision cache of the prefix tokens), every sample runs *after* the prefix, as
every request will: each layer attends to that layer's cached prefix keys/values (exact, from the full-precision
model) before the sample's own, and positions start after the prefix. Only the sample's tokens flow between layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..models.arch import ArchSpec, decoder_layers, get_module
from .offload import execution_device, on_device

LayerCallback = Callable[[int, nn.Module, Callable[[], object]], None]


@contextmanager
def capture_inputs(modules: dict[str, nn.Module], sink: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``sink(name, x)`` with the input each module's weight actually sees (after any online input rotation)."""

    def hook(name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            transform = getattr(module, "input_transform", None)
            sink(name, transform(x) if transform is not None else x)

        return pre_hook

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class PrefixKV:
    """A stand-in cache for one layer's forward: prepends that layer's fixed prefix keys/values, stores nothing."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.key, self.value = key, value

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        b = key.shape[0]
        return (torch.cat([self.key.expand(b, -1, -1, -1), key], dim=2),
                torch.cat([self.value.expand(b, -1, -1, -1), value], dim=2))


@dataclass
class LayerInputs:
    """What a decoder layer needs besides its hidden states: positions, rotary tables, mask and prefix cache."""

    positions: torch.Tensor
    cos_sin: tuple
    mask: torch.Tensor | None = None  # [1, 1, T, P + T] bool when a prefix is cached, else None (plain causal)
    prefix: object = None  # a transformers cache holding the prefix's keys/values per layer, or None

    def prefix_kv(self, index: int, device) -> PrefixKV | None:
        if self.prefix is None:
            return None
        layer = self.prefix.layers[index]
        return PrefixKV(layer.keys.to(device), layer.values.to(device))

    def run(self, layer: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """``layer`` (decoder layer ``index``) on hidden states ``[b, T, hidden]``."""
        out = layer(hidden, attention_mask=self.mask, position_ids=self.positions, position_embeddings=self.cos_sin,
                    past_key_values=self.prefix_kv(index, hidden.device))
        return out[0] if isinstance(out, tuple) else out


def layer_inputs(model: nn.Module, spec: ArchSpec, length: int, device, prefix=None) -> LayerInputs:
    """Positions, rotary tables and mask for samples of ``length`` tokens after an optional cached ``prefix``."""
    offset = prefix.get_seq_length() if prefix is not None else 0
    embed = get_module(model, spec.embed)
    home = execution_device(embed)
    positions = torch.arange(offset, offset + length, device=device)[None]
    probe = torch.zeros(1, length, model.config.hidden_size, device=home, dtype=embed.weight.dtype)
    cos_sin = tuple(t.to(device) for t in get_module(model, spec.rotary)(probe, positions.to(home)))
    mask = None
    if offset:
        mask = torch.ones(length, offset + length, dtype=torch.bool, device=device).tril(diagonal=offset)[None, None]
    return LayerInputs(positions, cos_sin, mask, prefix if offset else None)


def embed_batches(model: nn.Module, spec: ArchSpec, batches: torch.Tensor, device, batch_size: int) -> list:
    """The token embeddings of ``batches`` ``[n, L]``, ``batch_size`` rows at a time, on ``device``."""
    embed = get_module(model, spec.embed)
    home = execution_device(embed)
    return [embed(chunk.to(home)).to(device) for chunk in batches.split(batch_size)]


def use_sdpa_masks(model: nn.Module) -> None:
    """The explicit masks and the causal default below follow transformers' sdpa path (lowbit's wraps it)."""
    if model.config._attn_implementation not in ("sdpa", "lowbit"):
        model.set_attn_implementation("sdpa")


def _forward_all(inputs: LayerInputs, layer: nn.Module, index: int, hidden: list[torch.Tensor]) -> list:
    """One decoder layer over every batch of hidden states."""
    return [inputs.run(layer, index, h) for h in hidden]


@torch.no_grad()
def stream_layers(
    model: nn.Module,
    spec: ArchSpec,
    batches: torch.Tensor,
    on_layer: LayerCallback,
    device: torch.device | str | None = None,
    progress=None,
    batch_size: int = 8,
    prefix=None,
) -> None:
    """Run token ``batches`` ``[n, L]`` layer by layer; ``on_layer(i, layer, run)`` quantizes layer ``i``.

    ``run()`` pushes every calibration sample through the current layer (with whatever hooks ``on_layer`` set), so
    the callback can observe inputs as often as it needs; after the callback the layer's outputs become the next
    inputs. ``device`` is where each layer is computed (default: where the embeddings are); samples go through a
    layer ``batch_size`` at a time. ``prefix``: a cache of prefix tokens every sample continues (PrefixQuant).
    """
    use_sdpa_masks(model)
    home = execution_device(get_module(model, spec.embed))
    device = torch.device(device) if device is not None else home
    hidden = embed_batches(model, spec, batches, device, batch_size)  # [≤batch_size, L, hidden] each
    inputs = layer_inputs(model, spec, batches.shape[1], device, prefix)
    layers = decoder_layers(model, spec)
    tick = progress("layer-streamed calibration", len(layers)) if progress else (lambda: None)
    for i, layer in enumerate(layers):
        run = partial(_forward_all, inputs, layer, i, hidden)
        with on_device(layer, device):
            on_layer(i, layer, run)
            hidden = run()
        tick()
