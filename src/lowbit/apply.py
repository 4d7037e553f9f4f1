"""Quantize a model with a recipe: run its steps through the method registry, then attach and calibrate quantizers.

Python use::

    qmodel = lowbit.quantize(model, "w4a4kv4-quarot", data)               # a quantized copy
    qmodel, session = lowbit.quantize_with_session(model, recipe, data)    # and what each method did

:func:`apply_recipe` imports no method: each step is dispatched to the method registered for its type
(:mod:`lowbit.methods`).
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from .data import TokenData
from .errors import CalibrationError, DataError, ModelError
from .methods import Calibration, Session, method_for
from .models.arch import ArchSpec, spec_for
from .recipe import Recipe, load_recipe
from .state import ensure_state
from .surgery.attach import (
    attach_activation_quantizers,
    attach_kv_quantizers,
    calibrate,
    quantization_parts,
    quantize_embeddings,
    quantize_lm_head,
    set_clip_ratios,
    swap_linears,
)
from .surgery.kvcache import apply_kv_cache, use_decode_cache
from .surgery.offload import is_offloaded
from .surgery.prefix import attach_prefix


def check_calibration(session: Session) -> None:
    """Fail before any work when a step or a static scheme needs calibration text and none was given."""
    for step in session.recipe.steps:
        if step.needs_calibration():
            session.calibration_text(f"the {step.method} step")
    if session.recipe.needs_calibration and session.calibration is None:
        raise CalibrationError("this recipe fits static scales or a mean key centre (key_centre: mean) on "
                               "calibration text and needs calibration data: pass some")


def apply_recipe(model: nn.Module, session: Session) -> None:
    """Quantize ``model`` in place as ``session.recipe`` says: swap linears, run the steps, round the embedding table
    and lm_head with their own schemes (after the steps: rotations folded into them are included; lm_head weight
    only), attach the activation and KV quantizers (with learned clip ratios), attach a packed cache, calibrate static
    scales."""
    recipe, start = session.recipe, time.perf_counter()
    check_calibration(session)
    calibration = session.default_calibration
    training = [step for step in recipe.steps if step.phase == "train"]
    for step in recipe.steps:  # on the untouched model: what a train step learns from
        prepare = method_for(step).prepare
        if prepare is not None:
            prepare(model, step, session)
    if recipe.weights is not None or recipe.activations is not None:
        swap_linears(model, session.spec, recipe.targets)
    for step in recipe.steps:
        if step.phase != "train":
            _run(model, step, session)
    if recipe.embeddings is not None:
        quantize_embeddings(model, session.spec, recipe.embeddings)
    if recipe.activations is not None:
        attach_activation_quantizers(model, recipe.activations)
    if recipe.lm_head is not None:  # after the input quantizers: not a target, its input stays full precision
        quantize_lm_head(model, session.spec, recipe.lm_head)
    if recipe.kv is not None:
        attach_kv_quantizers(model, session.spec, recipe.kv, calibration)
    set_clip_ratios(model, session.clip_ratios)
    ensure_state(model).recipe = recipe.model_dump(mode="json")
    if session.prefix is not None:
        attach_prefix(model, session.spec, session.prefix.tokens, session.prefix.cache)
    if recipe.kv_cache is not None:
        apply_kv_cache(model, session.spec, recipe.kv_cache, calibration)
    use_decode_cache(model)
    session.seconds["quantize"] += time.perf_counter() - start
    if recipe.needs_calibration:
        start = time.perf_counter()
        calibrate(model, session.calibration.default(), session.progress)
        session.seconds["calibrate"] += time.perf_counter() - start
    start = time.perf_counter()
    for step in training:  # on the finished quantized model: every quantizer attached and calibrated
        _run(model, step, session)
    session.teacher = None
    session.seconds["train"] += time.perf_counter() - start


def _run(model: nn.Module, step, session: Session) -> None:
    """Apply one step through the method registry and keep its result."""
    result = method_for(step).apply(model, step, session)
    if result is not None:
        session.results.append(result)


def quantize_with_session(
    model: nn.Module,
    recipe: Recipe | str,
    data: TokenData | None = None,
    progress=None,
    inplace: bool = False,
    seed: int | None = None,
) -> tuple[nn.Module, Session]:
    """:func:`quantize`, also returning the :class:`~lowbit.methods.Session`: each method's typed result
    (``session.get(GPTQResult)``, ``session.report()``), the prefix, learned clip ratios and timings."""
    recipe = load_recipe(recipe)
    if data is not None and not isinstance(data, TokenData):
        raise DataError(f"data must be token data from lowbit.prepare_data(DataConfig(...), tokenizer), got "
                        f"{type(data).__name__}: tokenize the text first")
    spec: ArchSpec = spec_for(model)
    if next(quantization_parts(model), None) is not None:
        raise ModelError("this model is already quantized by lowbit (quantizing it again would stack schemes on the "
                         "old quantizers): quantize the full-precision model instead")
    if is_offloaded(model) and not inplace:
        raise ModelError(
            "this model's weights are offloaded by accelerate, and a copy would share its offload store: "
            "quantize it in place with inplace=True"
        )
    target = model if inplace else copy.deepcopy(model)
    calibration = None
    if data is not None:
        cal = recipe.calibration
        calibration = Calibration(default=lambda: data.calibration(cal.samples, cal.seq_len), sample=data.calibration,
                                  held_out=data.held_out)
    seed = seed if seed is not None else (data.seed if data is not None else 0)
    session = Session(recipe=recipe, spec=spec, seed=seed, calibration=calibration, progress=progress)
    with torch.no_grad():
        apply_recipe(target, session)
    return target, session


def quantize(
    model: nn.Module,
    recipe: Recipe | str,
    data: TokenData | None = None,
    progress=None,
    inplace: bool = False,
    seed: int | None = None,
) -> nn.Module:
    """Quantize ``model`` (a copy unless ``inplace``) as ``recipe`` says and return it.

    A model offloaded by accelerate (``device_map`` with an offload folder, ``cpu_offload``, ``disk_offload``) is
    quantized part by part, one decoder layer in memory at a time for GPTQ; it must be quantized ``inplace``.
    ``data`` provides calibration text when the recipe has static scales (or a calibrated method). ``seed``
    (default: the data's seed, else 0) seeds rotations. The result is the same transformers model type (a
    PrefixQuant prefix is held in its state and prepended by a forward hook: :mod:`lowbit.surgery.prefix`).
    """
    return quantize_with_session(model, recipe, data, progress, inplace, seed)[0]
