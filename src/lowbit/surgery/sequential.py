"""Layer-streamed calibration: run calibration text through the decoder one layer at a time.

Weight methods that need each layer's inputs use :class:`LayerStream` (GPTQ through :func:`stream_layers`, its
one-stream form; block-wise reconstruction with two streams, full-precision targets and quantized inputs). It embeds
the calibration samples, then for each decoder layer in order moves that layer alone to the compute device, lets
the caller observe the layer's linear inputs and quantize it, and computes the layer's outputs *with its quantized
weights* as the next layer's inputs. So calibration inputs flow through the already-quantized earlier layers, and
only one decoder layer (plus one layer's activations) needs to be on the compute device at a time; the rest of the
model may live on the CPU, or be offloaded by accelerate (to CPU memory or disk: :mod:`lowbit.surgery.offload`
brings each layer in and writes its quantized weights back).

The embeddings, rotary tables and layers are called directly through the architecture spec, with the causal mask
implied by transformers' sdpa path (``attention_mask=None``) or, for sliding-window layers and cached prefixes, an
explicit one; a caller that only records inputs may stop each layer's forward at the last module it needs
(``run(until=...)``).

With a PrefixQuant prefix (a full-precision cache of the prefix tokens), every sample runs *after* the prefix, as
every request will: each layer attends to that layer's cached prefix keys/values (exact, from the full-precision
model) before the sample's own, and positions start after the prefix. Only the sample's tokens flow between layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from ..models.arch import ArchSpec, decoder_layers, get_module
from .offload import execution_device, on_device
from .prefix import cache_argument

LayerCallback = Callable[[int, nn.Module, Callable[..., object]], None]


class _StopForward(Exception):
    """Ends a layer's forward at a module whose input was all a caller needed (see StreamedLayer.chunks)."""


def _stop_forward(module: nn.Module, args: tuple) -> None:
    raise _StopForward


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
    """What a decoder layer needs besides its hidden states: positions, rotary tables, mask and prefix cache.

    A family whose layers differ in attention kind (:attr:`ArchSpec.layer_types`: full or sliding window) has one
    rotary table and mask per kind in ``by_kind`` and each layer's kind in ``kinds``; others use ``cos_sin``/``mask``.
    """

    positions: torch.Tensor
    cos_sin: tuple
    mask: torch.Tensor | None = None  # [1, 1, T, P + T] bool when a prefix is cached, else None (plain causal)
    prefix: object = None  # a transformers cache holding the prefix's keys/values per layer, or None
    kinds: tuple[str, ...] = ()
    by_kind: dict = field(default_factory=dict)  # kind -> (cos_sin, mask)

    def prefix_kv(self, index: int, device) -> PrefixKV | None:
        if self.prefix is None:
            return None
        layer = self.prefix.layers[index]
        return PrefixKV(layer.keys.to(device), layer.values.to(device))

    def for_layer(self, index: int) -> tuple[tuple, torch.Tensor | None]:
        """Rotary tables and mask of decoder layer ``index``."""
        return self.by_kind[self.kinds[index]] if self.kinds else (self.cos_sin, self.mask)

    def run(self, layer: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """``layer`` (decoder layer ``index``) on hidden states ``[b, T, hidden]``."""
        cache = {cache_argument(type(layer).forward): self.prefix_kv(index, hidden.device)}
        cos_sin, mask = self.for_layer(index)
        out = layer(hidden, attention_mask=mask, position_ids=self.positions, position_embeddings=cos_sin, **cache)
        return out[0] if isinstance(out, tuple) else out


def causal_mask(length: int, offset: int, device, window: int | None = None) -> torch.Tensor | None:
    """``[1, 1, T, P + T]`` bool mask of ``length`` queries after ``offset`` cached positions (a query at position
    ``q`` sees keys ``k <= q``, and with a sliding ``window`` only ``q - k < window``); None when plain causal
    attention (sdpa's default) is the same."""
    if not offset and (window is None or length <= window):
        return None
    query = torch.arange(offset, offset + length, device=device)[:, None]
    key = torch.arange(offset + length, device=device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= query - key < window
    return allowed[None, None]


SLIDING = "sliding_attention"  # transformers' ``config.layer_types`` name of a sliding-window layer


def layer_inputs(model: nn.Module, spec: ArchSpec, length: int, device, prefix=None) -> LayerInputs:
    """Positions, rotary tables and masks for samples of ``length`` tokens after an optional cached ``prefix``."""
    offset = prefix.get_seq_length() if prefix is not None else 0
    embed = get_module(model, spec.embed)
    home = execution_device(embed)
    positions = torch.arange(offset, offset + length, device=device)[None]
    probe = torch.zeros(1, length, model.config.hidden_size, device=home, dtype=embed.weight.dtype)
    rotary = get_module(model, spec.rotary)
    prefix = prefix if offset else None
    if spec.layer_types:
        kinds = tuple(model.config.layer_types[: len(decoder_layers(model, spec))])
        window = getattr(model.config, "sliding_window", None)
        by_kind = {kind: (tuple(t.to(device) for t in rotary(probe, positions.to(home), kind)),
                          causal_mask(length, offset, device, window if kind == SLIDING else None))
                   for kind in set(kinds)}
        return LayerInputs(positions, (), None, prefix, kinds, by_kind)
    cos_sin = tuple(t.to(device) for t in rotary(probe, positions.to(home)))
    return LayerInputs(positions, cos_sin, causal_mask(length, offset, device), prefix)


def embed_batches(model: nn.Module, spec: ArchSpec, batches: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    """The token embeddings ``[n, L, hidden]`` of ``batches`` ``[n, L]``, embedded ``batch_size`` rows at a time, on
    ``device``."""
    embed = get_module(model, spec.embed)
    home = execution_device(embed)
    return torch.cat([embed(chunk.to(home)).to(device) for chunk in batches.split(batch_size)])


def use_sdpa_masks(model: nn.Module) -> None:
    """The explicit masks and the causal default below follow transformers' sdpa path (lowbit's wraps it)."""
    if model.config._attn_implementation not in ("sdpa", "lowbit"):
        model.set_attn_implementation("sdpa")


@dataclass
class StreamedLayer:
    """One decoder layer, on the compute device, with the inputs ``[n, T, hidden]`` of each stream."""

    index: int
    layer: nn.Module
    inputs: list[torch.Tensor]
    context: LayerInputs
    batch_size: int

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layer on one batch of hidden states ``[b, T, hidden]`` (with gradients when enabled: training)."""
        return self.context.run(self.layer, self.index, hidden)

    def chunks(self, hidden: torch.Tensor, until: nn.Module | None = None) -> list[torch.Tensor] | None:
        """The layer's outputs on ``hidden`` ``[n, T, hidden]``, ``batch_size`` samples at a time.

        ``until``: a submodule of the layer at which each batch's forward stops, once that module's forward
        pre-hooks registered before this call have run (a caller that only observes inputs, up to that module's,
        skips the rest of the layer); returns None then.
        """
        if until is None:
            return [self.forward(h) for h in hidden.split(self.batch_size)]
        handle = until.register_forward_pre_hook(_stop_forward)
        try:
            for h in hidden.split(self.batch_size):
                try:
                    self.forward(h)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return None

    def run(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's outputs on ``hidden`` ``[n, T, hidden]`` as one tensor, ``batch_size`` samples at a time
        (written into one buffer, so the stream never holds the outputs twice)."""
        out = None
        for start, h in zip(range(0, len(hidden), self.batch_size), hidden.split(self.batch_size)):
            y = self.forward(h)
            if out is None:
                out = y.new_empty((len(hidden), *y.shape[1:]))
            out[start:start + len(y)] = y
        if out is None:
            raise ValueError("no samples to run through the layer")
        return out


StreamCallback = Callable[[StreamedLayer], "list[torch.Tensor] | None"]


class LayerStream:
    """Calibration samples carried through the decoder one layer at a time, in one or more streams.

    The samples are embedded once; every stream starts from those embeddings. :meth:`walk` brings each decoder
    layer alone to the compute device and hands it, with each stream's inputs, to a callback that quantizes it and
    returns each stream's outputs: the next layer's inputs. GPTQ keeps one stream (the samples through the layers
    as quantized so far); block-wise reconstruction keeps two (the full-precision targets and the quantized inputs).
    """

    def __init__(self, model: nn.Module, spec: ArchSpec, batches: torch.Tensor, streams: int = 1,
                 device: torch.device | str | None = None, batch_size: int = 8, prefix=None) -> None:
        """``batches`` ``[n, L]``: the token samples; ``device``: where each layer is computed (default: where the
        embeddings are); ``batch_size``: samples per layer call; ``prefix``: a cache of prefix tokens every sample
        continues (PrefixQuant)."""
        use_sdpa_masks(model)
        self.model, self.spec, self.batch_size = model, spec, batch_size
        home = execution_device(get_module(model, spec.embed))
        self.device = torch.device(device) if device is not None else home
        embedded = embed_batches(model, spec, batches, self.device, batch_size)
        self.hidden = [embedded] * streams  # the streams share the embeddings until a layer's outputs replace them
        self.context = layer_inputs(model, spec, batches.shape[1], self.device, prefix)

    def walk(self, on_layer: StreamCallback) -> None:
        """Call ``on_layer(streamed)`` for each decoder layer in order, that layer alone on the compute device.

        The callback returns each stream's outputs (the next layer's inputs), or None to run every stream through
        the layer as the callback left it.
        """
        for i, layer in enumerate(decoder_layers(self.model, self.spec)):
            with on_device(layer, self.device):
                current = StreamedLayer(i, layer, list(self.hidden), self.context, self.batch_size)
                outputs = on_layer(current)
                self.hidden = [current.run(h) for h in self.hidden] if outputs is None else list(outputs)
            if len(self.hidden) != len(current.inputs):
                raise ValueError(f"layer {i}: {len(self.hidden)} outputs for {len(current.inputs)} streams")


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
    """Run token ``batches`` ``[n, L]`` layer by layer in one stream; ``on_layer(i, layer, run)`` quantizes layer ``i``.

    ``run()`` pushes every calibration sample through the current layer (with whatever hooks ``on_layer`` set) and
    returns the outputs batch by batch, so the callback can observe inputs as often as it needs; ``run(until=m)``
    stops each batch at submodule ``m`` (after its pre-hooks) and returns None. After the callback the layer's
    outputs become the next inputs. Arguments as for :class:`LayerStream`.
    """
    stream = LayerStream(model, spec, batches, 1, device, batch_size, prefix)
    tick = progress("layer-streamed calibration", len(decoder_layers(model, spec))) if progress else (lambda: None)

    def step(current: StreamedLayer) -> list[torch.Tensor]:
        hidden = current.inputs[0]
        on_layer(current.index, current.layer, partial(current.chunks, hidden))
        outputs = [current.run(hidden)]
        tick()
        return outputs

    stream.walk(step)
