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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def _forward_all(layer: nn.Module, hidden: list[torch.Tensor], positions: torch.Tensor, cos_sin: tuple) -> list:
    """One decoder layer over every batch of hidden states (causal, no padding)."""
    return [layer(h, attention_mask=None, position_ids=positions, position_embeddings=cos_sin) for h in hidden]


@torch.no_grad()
def stream_layers(
    model: nn.Module,
    spec: ArchSpec,
    batches: torch.Tensor,
    on_layer: LayerCallback,
    device: torch.device | str | None = None,
    progress=None,
    batch_size: int = 8,
) -> None:
    """Run token ``batches`` ``[n, L]`` layer by layer; ``on_layer(i, layer, run)`` quantizes layer ``i``.

    ``run()`` pushes every calibration sample through the current layer (with whatever hooks ``on_layer`` set), so
    the callback can observe inputs as often as it needs; after the callback the layer's outputs become the next
    inputs. ``device`` is where each layer is computed (default: where the embeddings are); samples go through a
    layer ``batch_size`` at a time.
    """
    if model.config._attn_implementation not in ("sdpa", "lowbit"):
        model.set_attn_implementation("sdpa")  # the causal mask below relies on sdpa's is_causal path
    embed = get_module(model, spec.embed)
    home = execution_device(embed)
    device = torch.device(device) if device is not None else home
    chunks = batches.split(batch_size)
    hidden = [embed(chunk.to(home)).to(device) for chunk in chunks]  # [≤batch_size, L, hidden] each
    positions = torch.arange(batches.shape[1], device=device)[None]
    rotary = get_module(model, spec.rotary)
    cos_sin = tuple(t.to(device) for t in rotary(hidden[0].to(home), positions.to(home)))
    layers = decoder_layers(model, spec)
    tick = progress("layer-streamed calibration", len(layers)) if progress else (lambda: None)
    for i, layer in enumerate(layers):
        run = partial(_forward_all, layer, hidden, positions, cos_sin)
        with on_device(layer, device):
            on_layer(i, layer, run)
            hidden = run()
        tick()
