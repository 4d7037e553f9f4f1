"""``lowbit export --format gguf``: load a model (or a folder lowbit saved), quantize it onto the GGUF grid with a
recipe, and write the file (:func:`export_gguf`).

Every check that needs no model runs first (the type, the target file, whether the recipe can be exported), so
bad input costs no loading or calibration.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..apply import quantize_with_session
from ..artifact import load, load_tokenizer, read_manifest
from ..artifact.save import MANIFEST
from ..data import DataConfig, prepare_data
from ..errors import LowbitError, RecipeError
from ..models.loading import load_model, resolve_source
from ..recipe import Recipe, load_recipe
from ..schemes import LINEAR_ROLES
from .gguf import FULL_PRECISION, check_new_file, check_type, gguf_arch, preset_for, write_gguf
from .gguf_tensors import fits


def check_recipe(recipe: Recipe, gguf_type: str) -> None:
    """Refuse, before any work, a recipe whose result llama.cpp cannot run, naming the preset that can."""
    use = f"use --recipe {preset_for(gguf_type)} (QuaRot R1/R2 folded into the weights, GPTQ onto {gguf_type})"
    parts = [("activations", "quantizes activations"), ("kv", "quantizes the KV cache"),
             ("kv_cache", "packs the KV cache")]
    for field, what in parts:
        if getattr(recipe, field) is not None:
            raise RecipeError(f"recipe '{recipe.name}' {what}, which llama.cpp cannot run: {use}")
    for step in recipe.steps:
        online = [r for r in ("r3", "r4", "o_rotation") if getattr(step, r, False)]
        if online:
            raise RecipeError(f"recipe '{recipe.name}' rotates online ({step.method} {', '.join(online)}), which "
                              f"llama.cpp cannot run: {use}")
        if gguf_type in FULL_PRECISION:
            continue
        if step.method in ("prefix", "blockwise"):
            raise RecipeError(f"recipe '{recipe.name}' has a {step.method} step (a prefix or trained scales, not on "
                              f"the float16 block grid): {use}")
    if gguf_type in FULL_PRECISION:  # floats hold whatever weights the recipe leaves
        return
    missing = [role for role in LINEAR_ROLES if role not in recipe.targets]
    if missing:
        raise RecipeError(f"recipe '{recipe.name}' leaves the {', '.join(missing)} linears in full precision, and "
                          f"llama.cpp's {gguf_type} files hold every decoder linear in {gguf_type}: {use}")
    if not fits(recipe.weights, gguf_type):
        have = recipe.weights.describe() if recipe.weights is not None else "none"
        raise RecipeError(f"recipe '{recipe.name}' puts weights on {have}, not on the {gguf_type} grid (int, groups "
                          f"of 32, float16 scales): {use}")


def source_gguf(source: str | None) -> Path | None:
    """The GGUF file a model was loaded from (its tokenizer is copied), or None."""
    if not source:
        return None
    try:
        kind, path = resolve_source(source)
    except LowbitError:
        return None
    return path if kind == "gguf" else None


def _saved(folder: Path, recipe: str | Recipe | None):
    """A folder ``lowbit quantize --save`` wrote: its fake-quant model, tokenizer and source GGUF."""
    if recipe is not None:
        raise RecipeError(f"{folder} is already quantized (a lowbit folder): drop --recipe, or export its source "
                          "model with the recipe")
    return load(folder, simulate=True), load_tokenizer(folder), source_gguf(read_manifest(folder).get("source"))


def export_gguf(model: str = "default", out: str | Path = "model.gguf", gguf_type: str = "Q4_0",
                recipe: str | Recipe | None = None, float_type: str = "F16", calib: str = "default",
                seed: int = 0, progress=None) -> dict:
    """Write ``model`` as a GGUF file ``out`` with its decoder linears in ``gguf_type`` blocks; returns a summary.

    ``model``: a folder lowbit saved (exported as is; its weights must be on the grid), or any model lowbit loads,
    quantized first with ``recipe`` (default: the ``gguf-<type>`` preset, calibrated on ``calib`` as ``lowbit
    quantize`` does; for ``F32`` / ``F16``: none, the model is written as it is). See :func:`~lowbit.export.gguf.write_gguf` for the file.
    """
    start = time.perf_counter()
    gguf_type, out = check_type(gguf_type), Path(out).expanduser()
    check_new_file(out)
    folder = Path(model).expanduser()
    if (folder / MANIFEST).is_file():
        qmodel, tokenizer, vocab = _saved(folder, recipe)
        name = "saved"
    else:
        full = gguf_type in FULL_PRECISION and recipe is None
        chosen = None if full else load_recipe(recipe or preset_for(gguf_type))
        if chosen is not None:
            check_recipe(chosen, gguf_type)
        loaded = load_model(model)
        gguf_arch(loaded.model)
        qmodel, name = loaded.model, "none (full precision)"
        if chosen is not None:
            tokens = prepare_data(DataConfig(calib=calib, seed=seed), loaded.tokenizer)
            qmodel, _ = quantize_with_session(loaded.model, chosen, tokens, progress=progress, inplace=True)
            name = chosen.name
        tokenizer, vocab = loaded.tokenizer, source_gguf(model)
    write_gguf(qmodel, out, gguf_type, tokenizer=tokenizer, vocab_gguf=vocab, float_type=float_type)
    return {"file": str(out), "bytes": out.stat().st_size, "type": gguf_type, "recipe": name,
            "tokenizer": "copied from " + str(vocab) if vocab else "built from the Hugging Face tokenizer",
            "seconds": round(time.perf_counter() - start, 1)}
