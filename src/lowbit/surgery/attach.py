"""Attach a recipe's schemes to a model: swap linears for :class:`QuantLinear`, attach activation and KV quantizers,
quantize the embedding table and lm_head with their own schemes, set learned clip ratios and calibrate static scales.
Methods (:mod:`lowbit.methods`) build on these."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import RecipeError
from ..models.arch import ArchSpec, decoder_layers, get_module, set_module
from ..schemes import QuantScheme
from .attention import KVQuantHook, add_attention_hook, attention_hooks
from .embedding import QuantEmbedding
from .key_centre import attach_key_centres, key_centres_for
from .linear import QuantLinear
from .offload import carry_hook, onloaded
from .quantizer import ActQuantizer


def untie_lm_head(model: nn.Module, spec: ArchSpec) -> int:
    """Give ``lm_head`` its own copy of a tied embedding matrix; returns the bytes this adds (0 when untied)."""
    head, embed = get_module(model, spec.lm_head), get_module(model, spec.embed)
    if head.weight is not embed.weight:
        return 0
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    return head.weight.numel() * head.weight.element_size()


def target_paths(model: nn.Module, spec: ArchSpec, targets: list[str]) -> list[str]:
    """Dotted paths (from the model root) of every linear a recipe's ``targets`` names, in forward order."""
    paths = []
    for i, _ in enumerate(decoder_layers(model, spec)):
        paths += [f"{spec.layers}.{i}.{spec.linear_roles[r]}" for r in spec.linear_roles if r in targets]
    if "lm_head" in targets:
        paths.append(spec.lm_head)
    return paths


def as_quant_linear(parent: nn.Module, path: str) -> QuantLinear:
    """The :class:`QuantLinear` at ``parent.<path>``, swapped in for an ``nn.Linear`` first if needed (keeping hooks)."""
    module = get_module(parent, path)
    if isinstance(module, QuantLinear):
        return module
    swapped = QuantLinear(module)
    carry_hook(module, swapped)
    set_module(parent, path, swapped)
    return swapped


def swap_linears(model: nn.Module, spec: ArchSpec, targets: list[str]) -> list[QuantLinear]:
    """Replace every targeted ``nn.Linear`` with a :class:`QuantLinear` (idempotent) and return them in order."""
    if "lm_head" in targets:
        untie_lm_head(model, spec)
    return [as_quant_linear(model, path) for path in target_paths(model, spec, targets)]


def quantize_embeddings(model: nn.Module, spec: ArchSpec, scheme: QuantScheme) -> int:
    """Swap the token embedding table for a :class:`QuantEmbedding` rounded to nearest with ``scheme``; returns the
    bytes that untying a tied lm_head added (the lm_head keeps its own full-precision copy unless it is quantized)."""
    untied = untie_lm_head(model, spec)
    embed = get_module(model, spec.embed)
    if not isinstance(embed, QuantEmbedding):
        swapped = QuantEmbedding(embed)
        carry_hook(embed, swapped)
        set_module(model, spec.embed, swapped)
        embed = swapped
    with onloaded(embed):
        embed.quantize_weight_rtn(scheme)
    return untied


def quantize_lm_head(model: nn.Module, spec: ArchSpec, scheme: QuantScheme) -> int:
    """Round ``lm_head`` to nearest with its own ``scheme`` (a :class:`QuantLinear`); returns the untied bytes."""
    untied = untie_lm_head(model, spec)
    head = as_quant_linear(model, spec.lm_head)
    with onloaded(head):
        head.quantize_weight_rtn(scheme)
    return untied


def quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """Every :class:`QuantLinear` in the model with its dotted name."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def quantization_parts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module lowbit put into ``model`` with its dotted path: quantized linears, quantizers, online rotations,
    attention hooks and the model's :class:`~lowbit.state.QuantState` (what a save writes and a load rebuilds)."""
    for name, module in model.named_modules():
        if module.__class__.__module__.startswith("lowbit."):
            yield name, module


def act_quantizers(model: nn.Module) -> Iterator[ActQuantizer]:
    """Every :class:`ActQuantizer` in the model (linear inputs and KV)."""
    for module in model.modules():
        if isinstance(module, ActQuantizer):
            yield module


@contextmanager
def _every_quantizer(module: nn.Module, flag: str, value: bool) -> Iterator[None]:
    """Set one flag on every activation/KV quantizer in ``module`` for the duration, then restore each one's own."""
    quantizers = list(act_quantizers(module))
    before = [getattr(q, flag) for q in quantizers]
    for q in quantizers:
        setattr(q, flag, value)
    try:
        yield
    finally:
        for q, was in zip(quantizers, before):
            setattr(q, flag, was)


def quantizers_off(module: nn.Module):
    """Context: every activation/KV quantizer in ``module`` passes its input through (the full-precision path)."""
    return _every_quantizer(module, "enabled", False)


def scale_gradients(module: nn.Module, on: bool = True):
    """Context: dynamic quantizers in ``module`` pass gradient through their scales (``on``) or detach them."""
    return _every_quantizer(module, "scale_grad", on)


def attach_activation_quantizers(model: nn.Module, scheme: QuantScheme) -> None:
    """Give every quantized linear without one an input quantizer with the activation ``scheme``."""
    for name, linear in quant_linears(model):
        if linear.input_quant is None:
            linear.input_quant = ActQuantizer(scheme, "activation", name=f"{name}.input")


def attach_kv_quantizers(model: nn.Module, spec: ArchSpec, scheme: QuantScheme, calibration=None) -> None:
    """Hook a key and a value quantizer (post-RoPE, per head) into every attention module; with the scheme's
    ``key_centre``, give them their key centres (``mean``: measured on ``calibration()`` batches first, so the
    centres see the model as quantized so far but without KV quantizers)."""
    centres = key_centres_for(model, spec, scheme.key_centre, calibration) if scheme.key_centre else None
    for i, layer in enumerate(decoder_layers(model, spec)):
        attn = get_module(layer, spec.attn)
        if any(isinstance(h, KVQuantHook) for h in attention_hooks(attn)):
            continue
        prefix = f"{spec.layers}.{i}.{spec.attn}"
        hook = KVQuantHook(
            ActQuantizer(scheme, "kv", name=f"{prefix}.k"), ActQuantizer(scheme, "kv", name=f"{prefix}.v")
        )
        add_attention_hook(model, attn, hook)
    if centres is not None:
        attach_key_centres(model, spec, centres)


def set_clip_ratios(model: nn.Module, ratios: dict[str, float]) -> None:
    """Give each named dynamic quantizer its learned clip ratio (a step learned them on quantizers of the same
    names); a quantizer the ratios do not name, or a static one, is an error rather than a silent default."""
    if not ratios:
        return
    for q in act_quantizers(model):
        if q.name not in ratios or q.static:
            raise RecipeError(f"quantizer {q.name} has no learned clip ratio (learned: {len(ratios)}); "
                                   "learn clips with the recipe's own dynamic activation and KV schemes")
        q.scheme = q.scheme.model_copy(update={"clip_ratio": ratios[q.name]})


@torch.no_grad()
def calibrate(model: nn.Module, batches: torch.Tensor, progress=None) -> None:
    """Run calibration token batches ``[n, seq_len]`` through the model to fit every static quantizer's scales
    (after the model's prefix, when it has one: the prefix positions never reach the quantizers)."""
    static = [q for q in act_quantizers(model) if q.static and not q.calibrated]  # a blockwise step did the rest
    if not static:
        return
    tick = progress("calibrating static scales", len(batches)) if progress else (lambda: None)

    def run() -> None:
        for row in batches:
            model(row.unsqueeze(0), use_cache=False)
            tick()

    calibrate_quantizers(static, run)


def calibrate_quantizers(quantizers: list[ActQuantizer], run: Callable[[], object]) -> None:
    """Fit the static ones among ``quantizers`` to the tensors they see while ``run()`` runs."""
    static = [q for q in quantizers if q.static]
    for q in static:
        q.start_calibration()
    try:
        run()
    finally:
        for q in static:
            q.calibrating = False
    for q in static:
        q.finish_calibration()
