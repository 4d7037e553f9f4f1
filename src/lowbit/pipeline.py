"""The main job: load a model, quantize a copy with a recipe, evaluate it against the original, report.

Python use::

    import lowbit
    report = lowbit.run(model="default", recipe="w8a8-rtn", report_path="w8a8.json")

or step by step with :func:`lowbit.load_model`, :func:`lowbit.quantize` and :func:`lowbit.evaluate.evaluate`.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .apply import quantize, quantize_with_session
from .artifact import check_new_folder, check_savable, save
from .bits import activation_bits, kv_bits, weight_bits
from .data import DataConfig, TokenData, check_source, prepare_data
from .errors import ArtifactError, DataError
from .evaluate import evaluate
from .methods import Session
from .methods.quarot import RotationResult
from .methods.session import Progress
from .models.arch import head_dim
from .models.loading import check_context, load_model
from .recipe import Recipe, load_recipe
from .report import check_output_file, write_json_atomic
from .state import quant_state
from .version import __version__


def run(
    model: str = "default",
    recipe: Recipe | str = "w8a8-rtn",
    data: DataConfig | None = None,
    report_path: str | Path | None = None,
    progress: Progress | None = None,
    tasks: list[str] | None = None,
    task_limit: int | None = None,
    save_path: str | Path | None = None,
) -> dict:
    """Load, quantize, evaluate against full precision in the same run, and return (and optionally write) the report.

    ``save_path``: also write the quantized model there (:func:`lowbit.save`; checked before anything runs).
    ``tasks`` (lm-eval task names, needs the ``lm-eval`` extra) adds zero-shot scores of the quantized model under
    the report's ``tasks`` key; ``task_limit`` caps the examples per task.
    """
    recipe = load_recipe(recipe)
    data = data or DataConfig()
    if not isinstance(data, DataConfig):
        raise DataError(f"data must be a lowbit.DataConfig(calib=..., eval=...), got {type(data).__name__}")
    for source in {data.calib, data.eval}:
        check_source(source)
    if report_path is not None:
        check_output_file(report_path)
    if tasks:
        from .integrations.harness import check_tasks

        check_tasks(tasks)
    if save_path is not None:
        if not quantizes(recipe):
            raise ArtifactError(f"recipe '{recipe.name}' quantizes nothing, so there is no model to save: drop --save")
        check_savable(recipe)
        check_new_folder(Path(save_path))
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(model)
    tokens = prepare_data(data, loaded.tokenizer)
    check_context(loaded.model.config, data.seq_len)
    seconds["load"] = time.perf_counter() - start
    qmodel, session = loaded.model, None
    if quantizes(recipe):
        qmodel, session = quantize_with_session(loaded.model, recipe, tokens, progress=progress)
    seconds["calibrate"] = session.seconds["calibrate"] if session else 0.0
    seconds["quantize"] = session.seconds["quantize"] if session else 0.0
    if save_path is not None:
        start = time.perf_counter()
        save(qmodel, save_path, loaded.tokenizer, source=loaded.source)
        seconds["save"] = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate(loaded.model, qmodel, tokens.eval_windows, progress=progress)
    seconds["eval"] = time.perf_counter() - start
    report = build_report(loaded.source, recipe, data, tokens, result, qmodel, loaded.spec, seconds, session)
    add_rotation_invariance(report, loaded.model, recipe, tokens, session)
    if save_path is not None:
        report["saved"] = str(save_path)
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
            from .methods.spinquant import save_rotations

            path = Path(folder) / "rotations.safetensors"
            save_rotations(path, learned, {"recipe": recipe.name})
            steps = [s.model_copy(update={"rotations": str(path)}) if s.method == "spinquant" else s
                     for s in rotations.steps]
            rotations = rotations.model_copy(update={"steps": steps})
        rotated = quantize(fp_model, rotations, seed=tokens.seed)
    window = tokens.eval_windows[0, :INVARIANCE_TOKENS].unsqueeze(0)
    diff = (rotated(window, use_cache=False).logits - fp_model(window, use_cache=False).logits).abs().max()
    return {"max_abs_logit_diff_vs_fp": diff.item(), "invariance_tokens": window.shape[1]}


def add_rotation_invariance(report: dict, fp_model: nn.Module, recipe: Recipe, tokens: TokenData,
                            session: Session | None) -> None:
    """Add :func:`rotation_invariance` to the report's ``rotation`` section when a step rotated the model."""
    rotation = session.get(RotationResult) if session is not None else None
    if rotation is not None:
        report["rotation"].update(rotation_invariance(fp_model, recipe, tokens, rotation.learned))


def quantizes(recipe: Recipe) -> bool:
    """True when the recipe changes the model at all (``fp`` does not)."""
    schemes = (recipe.weights, recipe.activations, recipe.kv, recipe.kv_cache, recipe.embeddings, recipe.lm_head)
    return any(s is not None for s in schemes) or bool(recipe.steps)


def _kv_bits(recipe: Recipe, qmodel: nn.Module, context: int) -> float:
    """Bits per cached K/V element: the fake-quant scheme's, or the packed cache's at the evaluation context."""
    if recipe.kv_cache is not None:
        from .kv.cache import cache_bits

        return cache_bits(quant_state(qmodel).cache_spec, head_dim(qmodel.config), context)
    return kv_bits(recipe.kv, head_dim(qmodel.config))


def build_report(source, recipe, data, tokens, result, qmodel, spec, seconds, session: Session | None = None) -> dict:
    """The report mapping (see the README for its keys), with each method's section from ``session``."""
    wbits = weight_bits(qmodel, spec)
    report = {
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
    if session is not None:
        report.update(session.report())
    if "prefix" in report:
        n, kv = len(report["prefix"]["tokens"]), report["bits"]["kv"]
        report["prefix"]["kv_bits_with_prefix"] = (n * 16 + data.seq_len * kv) / (n + data.seq_len)
    return report
