"""The main job: load a model, quantize a copy with a recipe, evaluate it against the original, report.

Python use::

    import lowbit
    report = lowbit.run(model="default", recipe="w8a8-rtn", report_path="w8a8.json")

or step by step with :func:`lowbit.load_model`, :func:`quantize` and :func:`lowbit.evaluate.evaluate`.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .bits import activation_bits, kv_bits, weight_bits
from .data import DataConfig, TokenData, check_source, prepare_data
from .errors import ModelError
from .evaluate import evaluate
from .models.arch import ArchSpec, head_dim, spec_for
from .models.loading import load_model
from .recipe import Recipe, load_recipe
from .report import write_json_atomic
from .surgery.apply import StepContext, apply_recipe
from .surgery.offload import is_offloaded

Progress = Callable[[str, int], Callable[..., None]]  # (description, total) -> tick(status=None)


def quantize(
    model: nn.Module,
    recipe: Recipe | str,
    data: TokenData | None = None,
    progress: Progress | None = None,
    inplace: bool = False,
    info: dict | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Quantize ``model`` (a copy unless ``inplace``) as ``recipe`` says and return it.

    A model offloaded by accelerate (``device_map`` with an offload folder, ``cpu_offload``, ``disk_offload``) is
    quantized part by part, one decoder layer in memory at a time for GPTQ; it must be quantized ``inplace``.
    ``data`` provides calibration text when the recipe has static scales (or a calibrated method). ``info``, when
    given, receives timings and method statistics. ``seed`` (default: the data's seed, else 0) seeds rotations.
    """
    recipe = load_recipe(recipe)
    spec: ArchSpec = spec_for(model)
    if is_offloaded(model) and not inplace:
        raise ModelError(
            "this model's weights are offloaded by accelerate, and a copy would share its offload store: "
            "quantize it in place with inplace=True"
        )
    target = model if inplace else copy.deepcopy(model)
    calibration = sample = None
    if data is not None:
        cal = recipe.calibration
        calibration = lambda: data.calibration(cal.samples, cal.seq_len)
        sample = data.calibration
    seed = seed if seed is not None else (data.seed if data is not None else 0)
    ctx = StepContext(recipe=recipe, spec=spec, seed=seed, calibration=calibration, sample_calibration=sample,
                      progress=progress, info=info or {})
    with torch.no_grad():
        apply_recipe(target, ctx)
    if info is not None:
        info.update(ctx.info)
    if ctx.prefix is not None:
        from .surgery.prefix import PrefixedModel

        return PrefixedModel(target, *ctx.prefix)
    return target


def run(
    model: str = "default",
    recipe: Recipe | str = "w8a8-rtn",
    data: DataConfig | None = None,
    report_path: str | Path | None = None,
    progress: Progress | None = None,
    tasks: list[str] | None = None,
    task_limit: int | None = None,
) -> dict:
    """Load, quantize, evaluate against full precision in the same run, and return (and optionally write) the report.

    ``tasks`` (lm-eval task names, needs the ``lm-eval`` extra) adds zero-shot scores of the quantized model under
    the report's ``tasks`` key; ``task_limit`` caps the examples per task.
    """
    recipe = load_recipe(recipe)
    data = data or DataConfig()
    for source in {data.calib, data.eval}:
        check_source(source)
    torch.manual_seed(data.seed)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(model)
    tokens = prepare_data(data, loaded.tokenizer)
    seconds["load"] = time.perf_counter() - start
    info: dict = {}
    qmodel = quantize(loaded.model, recipe, tokens, progress=progress, info=info) if _quantizes(recipe) else loaded.model
    seconds["calibrate"] = info.get("seconds", {}).get("calibrate", 0.0)
    seconds["quantize"] = info.get("seconds", {}).get("quantize", 0.0)
    start = time.perf_counter()
    result = evaluate(loaded.model, qmodel, tokens.eval_windows, progress=progress)
    seconds["eval"] = time.perf_counter() - start
    report = build_report(loaded.source, recipe, data, tokens, result, qmodel, loaded.spec, seconds)
    if "prefix" in info:
        n, kv = len(info["prefix"]["tokens"]), report["bits"]["kv"]
        report["prefix"] = {**info["prefix"], "kv_bits_with_prefix": (n * 16 + data.seq_len * kv) / (n + data.seq_len)}
    if "gptq" in info:
        report["gptq"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in info["gptq"].items()}
    if "rotation" in info:
        learned = info.get("learned_rotations")
        report["rotation"] = {**info["rotation"], **rotation_invariance(loaded.model, recipe, tokens, learned)}
    if tasks:
        from .integrations.harness import run_tasks

        start = time.perf_counter()
        report["tasks"] = run_tasks(qmodel, loaded.tokenizer, tasks, limit=task_limit)
        report["seconds"]["tasks"] = round(time.perf_counter() - start, 3)
    if report_path is not None:
        write_json_atomic(report_path, report)
    return report


INVARIANCE_TOKENS = 512


@torch.no_grad()
def rotation_invariance(fp_model: nn.Module, recipe: Recipe, tokens: TokenData, learned=None) -> dict:
    """Largest |logit difference| between the rotated full-precision model and the original on evaluation text.

    Measured on the first ``INVARIANCE_TOKENS`` tokens of the first evaluation window, every run: the proof that the
    rotations alone change nothing. ``learned`` rotations (SpinQuant) are reused rather than learned again.
    """
    rotations = recipe.rotations_only()
    with tempfile.TemporaryDirectory() as folder:
        if learned is not None:
            from .surgery.spinquant_step import save_rotations

            path = Path(folder) / "rotations.safetensors"
            save_rotations(path, learned, {"recipe": recipe.name})
            steps = [s.model_copy(update={"rotations": str(path)}) if s.method == "spinquant" else s
                     for s in rotations.steps]
            rotations = rotations.model_copy(update={"steps": steps})
        rotated = quantize(fp_model, rotations, seed=tokens.seed)
    window = tokens.eval_windows[0, :INVARIANCE_TOKENS].unsqueeze(0)
    diff = (rotated(window, use_cache=False).logits - fp_model(window, use_cache=False).logits).abs().max()
    return {"max_abs_logit_diff_vs_fp": diff.item(), "invariance_tokens": window.shape[1]}


def _quantizes(recipe: Recipe) -> bool:
    schemes = (recipe.weights, recipe.activations, recipe.kv, recipe.kv_cache)
    return any(s is not None for s in schemes) or bool(recipe.steps)


def _kv_bits(recipe: Recipe, qmodel: nn.Module, context: int) -> float:
    """Bits per cached K/V element: the fake-quant scheme's, or the packed cache's at the evaluation context."""
    if recipe.kv_cache is not None:
        from .kv.cache import SPEC_ATTR, cache_bits

        return cache_bits(getattr(qmodel, SPEC_ATTR), head_dim(qmodel.config), context)
    return kv_bits(recipe.kv, head_dim(qmodel.config))


def build_report(source, recipe, data, tokens, result, qmodel, spec, seconds) -> dict:
    """The report mapping (see the README for its keys)."""
    wbits = weight_bits(qmodel, spec)
    return {
        "lowbit_version": __version__,
        "model": source,
        "recipe": recipe.name,
        "recipe_config": recipe.model_dump(mode="json"),
        "eval": {
            "data": data.eval,
            "calib_data": data.calib,
            "seq_len": data.seq_len,
            "windows": int(tokens.eval_windows.shape[0]),
            "tokens": result.tokens,
            "seed": data.seed,
        },
        "fp": {"ppl": result.fp_ppl},
        "quantized": {
            "ppl": result.ppl,
            "ppl_ratio": result.ppl / result.fp_ppl,
            "kl_vs_fp": result.kl_vs_fp,
            "top1_agreement": result.top1_agreement,
        },
        "bits": {
            "weight": wbits["weight"],
            "weight_all": wbits["weight_all"],
            "activation": activation_bits(qmodel, spec),
            "kv": _kv_bits(recipe, qmodel, data.seq_len),
        },
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "data_config": asdict(data),
    }
