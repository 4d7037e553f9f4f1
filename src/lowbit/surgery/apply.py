"""Apply a recipe's schemes to a model: swap linears, run weight steps, attach activation/KV quantizers, calibrate."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CalibrationError, RecipeError
from ..models.arch import ArchSpec, decoder_layers, get_module, set_module
from ..recipe import Recipe
from .attention import KVQuantHook, add_attention_hook, attention_hooks
from .linear import QuantLinear
from .offload import carry_hook, onloaded
from .quantizer import ActQuantizer


@dataclass
class StepContext:
    """What a step may use besides the model: the recipe, calibration batches, and a progress callback."""

    recipe: Recipe
    spec: ArchSpec
    seed: int = 0
    calibration: Callable[[], torch.Tensor] | None = None
    sample_calibration: Callable[[int, int], torch.Tensor] | None = None  # (samples, seq_len) -> token batches
    progress: Callable[[str, int], Callable[[], None]] | None = None
    info: dict = field(default_factory=dict)
    prefix: tuple[list[int], object] | None = None  # PrefixQuant: prefix token ids and their full-precision cache
    clip_ratios: dict[str, float] = field(default_factory=dict)  # learned by a step, by quantizer name


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


def quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """Every :class:`QuantLinear` in the model with its dotted name."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def act_quantizers(model: nn.Module) -> Iterator[ActQuantizer]:
    """Every :class:`ActQuantizer` in the model (linear inputs and KV)."""
    for module in model.modules():
        if isinstance(module, ActQuantizer):
            yield module


@contextmanager
def quantizers_set(module: nn.Module, attribute: str, value: bool) -> Iterator[None]:
    """Set ``attribute`` (``enabled``: off runs the full-precision path; ``scale_grad``) on every activation/KV
    quantizer in ``module`` for the duration, then restore each one's own value."""
    quantizers = list(act_quantizers(module))
    before = [getattr(q, attribute) for q in quantizers]
    for q in quantizers:
        setattr(q, attribute, value)
    try:
        yield
    finally:
        for q, was in zip(quantizers, before):
            setattr(q, attribute, was)


def rtn_step(model: nn.Module, step, ctx: StepContext) -> None:
    """Round-to-nearest on every quantized linear's weight."""
    linears = list(quant_linears(model))
    tick = ctx.progress("RTN weights", len(linears)) if ctx.progress else (lambda: None)
    for _, linear in linears:
        with onloaded(linear):
            linear.quantize_weight_rtn(ctx.recipe.weights)
        tick()


def _step_handlers() -> dict[str, Callable[[nn.Module, object, StepContext], None]]:
    from .blockwise import blockwise_step
    from .gptq import gptq_step
    from .prefix import prefix_step
    from .rotate import quarot_step
    from .spinquant_step import spinquant_step

    return {"rtn": rtn_step, "gptq": gptq_step, "quarot": quarot_step, "spinquant": spinquant_step,
            "prefix": prefix_step, "blockwise": blockwise_step}


def attach_activation_quantizers(model: nn.Module, recipe: Recipe) -> None:
    """Give every quantized linear without one an input quantizer with the recipe's activation scheme."""
    for name, linear in quant_linears(model):
        if linear.input_quant is None:
            linear.input_quant = ActQuantizer(recipe.activations, "activation", name=f"{name}.input")


def attach_kv_quantizers(model: nn.Module, spec: ArchSpec, recipe: Recipe) -> None:
    """Hook a key and a value quantizer (post-RoPE, per head) into every attention module."""
    for i, layer in enumerate(decoder_layers(model, spec)):
        attn = get_module(layer, spec.attn)
        if any(isinstance(h, KVQuantHook) for h in attention_hooks(attn)):
            continue
        prefix = f"{spec.layers}.{i}.{spec.attn}"
        hook = KVQuantHook(
            ActQuantizer(recipe.kv, "kv", name=f"{prefix}.k"), ActQuantizer(recipe.kv, "kv", name=f"{prefix}.v")
        )
        add_attention_hook(model, attn, hook)


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
def calibrate(model: nn.Module, batches: torch.Tensor, progress=None, forward: nn.Module | None = None) -> None:
    """Run calibration token batches ``[n, seq_len]`` through the model to fit every static quantizer's scales.

    ``forward`` runs the batches instead of ``model`` (a :class:`~lowbit.surgery.prefix.PrefixedModel` around it,
    so that the prefix positions never reach the quantizers).
    """
    forward = forward or model
    static = [q for q in act_quantizers(model) if q.static and not q.calibrated]  # a blockwise step did the rest
    if not static:
        return
    tick = progress("calibrating static scales", len(batches)) if progress else (lambda: None)

    def run() -> None:
        for row in batches:
            forward(row.unsqueeze(0), use_cache=False)
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


def apply_recipe(model: nn.Module, ctx: StepContext) -> None:
    """Quantize ``model`` in place as ``ctx.recipe`` says: swap linears, run steps, attach quantizers, calibrate."""
    recipe, seconds = ctx.recipe, ctx.info.setdefault("seconds", {"quantize": 0.0, "calibrate": 0.0})
    start = time.perf_counter()
    if recipe.weights is not None or recipe.activations is not None:
        swap_linears(model, ctx.spec, recipe.targets)
    handlers = _step_handlers()
    for step in recipe.steps:
        handlers[step.method](model, step, ctx)
    if recipe.activations is not None:
        attach_activation_quantizers(model, recipe)
    if recipe.kv is not None:
        attach_kv_quantizers(model, ctx.spec, recipe)
    set_clip_ratios(model, ctx.clip_ratios)
    forward = None
    if ctx.prefix is not None:
        from .prefix import PrefixedModel, keep_prefix_exact

        keep_prefix_exact(model, ctx.spec, len(ctx.prefix[0]))
        forward = PrefixedModel(model, *ctx.prefix)
    if recipe.kv_cache is not None:
        from .kvcache import apply_kv_cache

        apply_kv_cache(model, ctx.spec, recipe.kv_cache, ctx.calibration)
    seconds["quantize"] += time.perf_counter() - start
    if recipe.needs_calibration:
        if ctx.calibration is None:
            raise CalibrationError("this recipe has static scales and needs calibration data: pass some")
        start = time.perf_counter()
        calibrate(model, ctx.calibration(), ctx.progress, forward)
        seconds["calibrate"] += time.perf_counter() - start
