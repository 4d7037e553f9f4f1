"""Quantization-aware training on top of the W4A4KV4 recipes: what trains, on which text, for how long.

Run:  python benchmarks/qat.py                      (about 25 minutes a row on 2 CPU cores; resumes)
      python benchmarks/qat.py --rows "w4a4kv4-quarot" "+ qat" --force
      python benchmarks/qat.py --tables-only

Each row is a PTQ recipe, or the same recipe followed by a `qat` step (lowbit.methods.qat) with one setting changed
from the step's defaults (200 steps of one 512-token sequence, 64 calibration sequences, weights + scales + norms
trained, KL from the full-precision model; 8 held-out sequences from the end of the calibration text measured every
25 steps, the best measurement's values kept). Evaluation on the usual windows against full precision; the
calibration text (and so the QAT text) comes from after the evaluation windows. Every row is also scored on the
other text (Wikipedia; with ``--text T``, calibrated on T, the default text), and rows with a packed KV cache also
with exact keys and values. PTQ rows the QAT rows start from, or compare with, sit in the same table (the
NVFP4 ones included). The table goes between the QAT markers in benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from formats import FORMATS, format_edit
from harness import (
    HERE,
    Bench,
    Results,
    labelled_script,
    markdown_table,
    num,
    recipe_step,
    set_field,
    step_update,
    variant,
)

from lowbit.evaluate import evaluate, reference_log_probs
from lowbit.recipe import Recipe, load_preset
from lowbit.surgery.kvcache import packed_cache_suspended

RESULTS = HERE / "results" / "qat.json"
SPIN_ROTATIONS = HERE / "results" / "w4a4kv4-spinquant-rotations.safetensors"
CROSS_TEXT = HERE / "results" / "enwiki.txt"  # benchmarks/heldout_text.py's Wikipedia text
SPIN_ASYM_ROTATIONS = HERE / "results" / "w4a4kv4-spinquant-asym-o-rotations.safetensors"  # benchmarks/spinquant.py's


def _with_qat(preset: str, *edits: Callable[[dict], None], **qat) -> Callable[[], Recipe]:
    """``preset`` with ``edits``, then a ``qat`` step with the fields ``qat`` (``train: weights`` unless they say:
    the step's default when most rows were measured)."""
    def add_qat(data: dict) -> None:
        data["steps"] = [*data["steps"], {"method": "qat", "train": "weights", **qat}]

    return lambda: variant(preset, *edits, add_qat)


def _spin_rotations(data: dict, path: Path = SPIN_ROTATIONS) -> None:
    recipe_step(data, "spinquant")["rotations"] = str(path)


def _spin_asym(data: dict) -> None:
    """benchmarks/recipes/w4a4kv4-spinquant-asym-o.yaml's setting (asymmetric A4, the rotation at o_proj's input),
    its learned rotations and clips."""
    data["activations"]["symmetric"] = False
    recipe_step(data, "spinquant")["o_rotation"] = True
    _spin_rotations(data, SPIN_ASYM_ROTATIONS)


def _spin_asym_g64(data: dict) -> None:
    """:func:`_spin_asym` with INT4 weights in groups of 64 (4.25 bits with their scales) instead of per channel."""
    _spin_asym(data)
    data["weights"].update(granularity="group", group_size=64)


def _spin_asym_a32(data: dict) -> None:
    """:func:`_spin_asym_g64` with activations in groups of 32 (one float16 scale and zero point per 32 values of a
    token) instead of one per token, at the recipe's clip 0.9: the saved rotations' clip ratios were learned for one
    scale per token and are not loaded (with them this row measured 2.163)."""
    _spin_asym_g64(data)
    recipe_step(data, "spinquant")["learn"] = ["rotations"]
    data["activations"].update(granularity="group", group_size=32, scale_dtype="float16")


def _kv16(data: dict) -> None:
    """The KV cache in 16 bits (W4A4)."""
    data["kv"] = None


def _turbo3(data: dict) -> None:
    """kv-turbo3's packed cache instead of the KV fake quantizers (its rows are also measured with exact keys and
    values: the W4A4 KV16 result of the same model)."""
    _kv16(data)
    data["kv_cache"] = load_preset("kv-turbo3").model_dump()["kv_cache"]


_asym_gptq = step_update("gptq", asymmetric=True)  # GPTQ fitted to the full-precision outputs


_asym_weights = set_field("weights.symmetric", False)  # a zero point per weight group (or channel)


def _blockwise(**fields) -> Callable[[dict], None]:
    """An edit that replaces the recipe's GPTQ step with block-wise fine-tuning (EfficientQAT's Block-AP) started
    from GPTQ's weights: each decoder layer's weights and weight scales trained towards the full-precision layer's
    outputs on its quantized inputs, 128 calibration sequences, 2 epochs; ``fields`` change the step."""
    def edit(data: dict) -> None:
        steps = data["steps"]
        at = next(i for i, s in enumerate(steps) if s["method"] == "gptq")
        steps[at] = {"method": "blockwise", "init": "gptq", "grid": False, "epochs": 2, "samples": 128, **fields}

    return edit


def _nvfp4_kv(data: dict) -> None:
    """Keys and values in NVFP4 too (FP4 E2M1 in blocks of 16 along each head's channels, an E4M3 scale per block,
    dynamic, at the block's absmax)."""
    data["kv"] = {**FORMATS["NVFP4"][1], "dynamic": True}


def _nvfp4(clip: float = 1.0) -> Callable[[dict], None]:
    """formats.py's "NVFP4 / no rotation" edit of w4a4-quarot (weights and activations in NVFP4, no rotation), its
    activations clipped to ``clip`` of each block's absmax."""
    def edit(data: dict) -> None:
        format_edit("NVFP4", rotated=False)(data)
        data["activations"]["clip_ratio"] = clip

    return edit


def _prefix(data: dict) -> None:
    """PrefixQuant's prefix after the rotations: its tokens' keys and values computed in full precision and kept, so
    every later step (and block-wise fine-tuning's loss) sees only the tokens after it."""
    data["steps"].insert(1, {"method": "prefix"})


def _spin_asym_prefix(data: dict) -> None:
    """:func:`_spin_asym` with the prefix step before GPTQ."""
    _spin_asym(data)
    _prefix(data)


ROWS: list[tuple[str, str, Callable[[], Recipe]]] = [
    ("w4a4kv4-quarot", "the PTQ start: QuaRot + GPTQ", lambda: load_preset("w4a4kv4-quarot")),
    ("+ qat", "then QAT: weights, scales and norms, 200 steps", _with_qat("w4a4kv4-quarot")),
    ("+ qat lr x10, no holdout", "ten times the learning rates, no held-out validation (the last step's values kept)",
     _with_qat("w4a4kv4-quarot", holdout=0, lr_weight=0.02, lr_scale=0.005, lr_norm=1e-4)),
    ("+ qat clips", "and every dynamic activation/KV quantizer's clip ratio", _with_qat("w4a4kv4-quarot", clips=True)),
    ("+ qat scales", "QAT of the weight scales only, on GPTQ's fixed codes",
     _with_qat("w4a4kv4-quarot", train="scales", lr_scale=0.001)),
    ("+ qat scales_norms", "QAT of the scales (on fixed codes) and norm weights",
     _with_qat("w4a4kv4-quarot", train="scales_norms", lr_scale=0.001)),
    ("+ qat self-generated", "QAT on text sampled from the full-precision model",
     _with_qat("w4a4kv4-quarot", data="self")),
    ("+ qat 100 steps", "half as long", _with_qat("w4a4kv4-quarot", steps=100)),
    ("+ qat scales 100 steps", "the scales on fixed codes, half as long",
     _with_qat("w4a4kv4-quarot", train="scales", steps=100, lr_scale=0.001)),
    ("+ qat scales lr x4 400 steps", "the scales on fixed codes at four times the scale learning rate, twice as "
     "long on twice the sequences", _with_qat("w4a4kv4-quarot", train="scales", lr_scale=0.004, steps=400,
                                              samples=128)),
    ("+ qat scales lr x4", "the scales on fixed codes at four times the scale learning rate",
     _with_qat("w4a4kv4-quarot", train="scales", lr_scale=0.004)),
    ("+ qat 600 steps", "three times longer", _with_qat("w4a4kv4-quarot", steps=600, samples=128)),
    ("+ qat bf16", "the training steps under bfloat16 autocast", _with_qat("w4a4kv4-quarot", autocast="bf16")),
    ("+ qat bf16 400 steps", "twice the steps under bfloat16 autocast",
     _with_qat("w4a4kv4-quarot", autocast="bf16", steps=400, samples=128)),
    ("w4a4kv4-spinquant + qat", "learned rotations and clips (saved), GPTQ, then QAT",
     _with_qat("w4a4kv4-spinquant", _spin_rotations)),
    ("w4a4kv4-spinquant + qat clips", "the same, the clip ratios training on from SpinQuant's",
     _with_qat("w4a4kv4-spinquant", _spin_rotations, clips=True)),
    ("w4a4kv4-spinquant-asym-o + qat clips", "asymmetric A4 and the o_proj rotation, learned rotations and clips "
     "(saved), GPTQ, then QAT with clips", _with_qat("w4a4kv4-spinquant", _spin_asym, clips=True)),
    ("w4a4kv4-spinquant-asym-o + qat scales lr x4, clips", "the same QAT of the weight scales on GPTQ's fixed "
     "codes (four times the scale learning rate) and the clips",
     _with_qat("w4a4kv4-spinquant", _spin_asym, train="scales", lr_scale=0.004, clips=True)),
    ("w4a4kv4-spinquant-asym-o + qat scales lr x4, clips, top-64 teacher", "the same QAT distilled from the "
     "full-precision model's 64 most likely next tokens at each position, cached before any step (the teacher an "
     "offloaded model trains from; no second model in memory)",
     _with_qat("w4a4kv4-spinquant", _spin_asym, train="scales", lr_scale=0.004, clips=True, teacher="topk")),
    ("w4a4kv4-spinquant-asym-o + qat scales lr x4, clips, top-1024 teacher", "the same from its 1024 most likely "
     "next tokens (97% of the full-precision model's probability on average, against 86% for 64)",
     _with_qat("w4a4kv4-spinquant", _spin_asym, train="scales", lr_scale=0.004, clips=True, teacher="topk",
               top_k=1024)),
    ("w4a4kv4-spinquant-asym-o + qat scales lr x4, clips, seed 1", "the same with another seed for the order of "
     "QAT's training sequences (how far a seed moves the result)",
     _with_qat("w4a4kv4-spinquant", _spin_asym, train="scales", lr_scale=0.004, clips=True, seed=1)),
    ("w4a4kv4-spinquant-asym-o g64", "the same PTQ recipe with weights in groups of 64 (no QAT)",
     partial(variant, "w4a4kv4-spinquant", _spin_asym_g64)),
    ("w4a4kv4-spinquant-asym-o g64 + qat clips", "weights in groups of 64, then QAT with clips",
     _with_qat("w4a4kv4-spinquant", _spin_asym_g64, clips=True)),
    ("w4a4-spinquant-asym-o g64", "W4A4 with a 16-bit KV cache: the same rotations, weights in groups of 64 (no QAT)",
     partial(variant, "w4a4kv4-spinquant", _spin_asym_g64, _kv16)),
    ("w4a4-spinquant-asym-o g64 + qat clips", "W4A4 KV16, weights in groups of 64, then QAT with clips",
     _with_qat("w4a4kv4-spinquant", _spin_asym_g64, _kv16, clips=True)),
    ("w4a4kv4-spinquant-asym-o g64 a32", "weights in groups of 64, activations in groups of 32 (no QAT)",
     partial(variant, "w4a4kv4-spinquant", _spin_asym_a32)),
    ("w4a4kv4-spinquant-asym-o g64 a32 + qat clips", "weights in groups of 64, activations in groups of 32, then QAT "
     "with clips", _with_qat("w4a4kv4-spinquant", _spin_asym_a32, clips=True)),
    ("w4a4-spinquant-asym-o g64 a32", "W4A4 KV16, weights in groups of 64, activations in groups of 32 (no QAT)",
     partial(variant, "w4a4kv4-spinquant", _spin_asym_a32, _kv16)),
    ("w4a4-spinquant-asym-o g64 a32 + qat clips", "W4A4 KV16, weights in groups of 64, activations in groups of 32, "
     "then QAT with clips", _with_qat("w4a4kv4-spinquant", _spin_asym_a32, _kv16, clips=True)),
    ("w4a4kv4-spinquant-asym-o g64 a32 + qat clips, fixed scales", "the same QAT with the weights' group scales "
     "fixed (weights, norms and clips train)",
     _with_qat("w4a4kv4-spinquant", _spin_asym_a32, clips=True, lr_scale=0)),
    ("w4a4-spinquant-asym-o g64 a32, turbo3 KV", "W4A4 with kv-turbo3's packed cache (3-bit rotated codebook, "
     "first token and last 64 exact) instead of KV4 per head (no QAT)",
     partial(variant, "w4a4kv4-spinquant", _spin_asym_a32, _turbo3)),
    ("w4a4-spinquant-asym-o g64 a32, turbo3 KV, asymmetric GPTQ", "the same with asymmetric GPTQ (fitted to the "
     "full-precision outputs, sequential; no QAT)",
     partial(variant, "w4a4kv4-spinquant", _spin_asym_a32, _turbo3, _asym_gptq)),
    ("w4a4-spinquant-asym-o g64 a32, turbo3 KV, asymmetric GPTQ and weights", "the same on a weight grid with a "
     "zero point per group (no QAT)", partial(variant, "w4a4kv4-spinquant", _spin_asym_a32, _turbo3, _asym_gptq,
                                               _asym_weights)),
    ("w4a4-spinquant-turbo3", "the preset: the row above as one recipe, its rotations learned in the run (for "
     "A4 in groups of 32, not loaded)", lambda: load_preset("w4a4-spinquant-turbo3")),
    ("w4a4-spinquant-asym-o g64 a32, turbo3 KV, asymmetric GPTQ and weights + qat clips, fixed scales", "the "
     "zero-point row, then QAT with clips and the weights' group scales and zero points fixed",
     _with_qat("w4a4kv4-spinquant", _spin_asym_a32, _turbo3, _asym_gptq, _asym_weights, clips=True, lr_scale=0)),
    ("w4a4-spinquant-asym-o g64 a32 + asymmetric GPTQ + qat clips, fixed scales, turbo3 KV", "that, then QAT with "
     "clips and the weights' group scales fixed",
     _with_qat("w4a4kv4-spinquant", _spin_asym_a32, _turbo3, _asym_gptq, clips=True, lr_scale=0)),
    ("w4a4-spinquant-asym-o g64 a32 + qat clips, fixed scales, turbo3 KV", "the same, then QAT with clips and the "
     "weights' group scales fixed (training sees exact KV: the cache's codes have no gradient)",
     _with_qat("w4a4kv4-spinquant", _spin_asym_a32, _turbo3, clips=True, lr_scale=0)),
    ("nvfp4, turbo3 KV", "no rotation, weights and activations in NVFP4 (blocks of 16, E4M3 scales; activations at "
     "their block's absmax), GPTQ, kv-turbo3's packed cache (no QAT)",
     partial(variant, "w4a4-quarot", _nvfp4(), _turbo3)),
    ("nvfp4, turbo3 KV, asymmetric GPTQ", "the same with asymmetric GPTQ",
     partial(variant, "w4a4-quarot", _nvfp4(), _turbo3, _asym_gptq)),
    ("nvfp4, turbo3 KV, asymmetric GPTQ + qat scales", "then QAT of the weights' E4M3 block scales on the fixed codes",
     _with_qat("w4a4-quarot", _nvfp4(), _turbo3, _asym_gptq, train="scales")),
    ("nvfp4, turbo3 KV, asymmetric GPTQ + qat scales, top-1024 teacher", "the same QAT from the full-precision "
     "model's 1024 most likely next tokens, cached (the teacher an offloaded model trains from)",
     _with_qat("w4a4-quarot", _nvfp4(), _turbo3, _asym_gptq, train="scales", teacher="topk")),
    ("nvfp4 kv4", "the same with NVFP4 keys and values (dynamic, blocks of 16 along each head) instead of turbo3",
     partial(variant, "w4a4-quarot", _nvfp4(), _nvfp4_kv)),
    ("nvfp4 kv4, asymmetric GPTQ", "NVFP4 keys and values, asymmetric GPTQ",
     partial(variant, "w4a4-quarot", _nvfp4(), _nvfp4_kv, _asym_gptq)),
    ("w4a16-quarot", "the W4A16 PTQ start: QuaRot + GPTQ g64 (activations in 16 bits)",
     lambda: load_preset("w4a16-quarot")),
    ("w4a16-quarot, asymmetric GPTQ and weights", "QuaRot + asymmetric GPTQ g64 (fitted to the full-precision "
     "outputs) on a grid with a zero point per group", partial(variant, "w4a16-quarot", _asym_gptq, _asym_weights)),
    ("w4a16-quarot + qat", "QuaRot + GPTQ g64 (activations in 16 bits), then QAT", _with_qat("w4a16-quarot")),
    ("w4a16-quarot + qat, fixed scales", "the same QAT with the group scales fixed (weights and norms train)",
     _with_qat("w4a16-quarot", lr_scale=0)),
    ("w4a16-quarot + block-wise fine-tuning", "QuaRot, then GPTQ g64 fine-tuned block by block (weights and group "
     "scales, 128 sequences, 2 epochs)", partial(variant, "w4a16-quarot", _blockwise())),
    ("w4a4-spinquant-asym-o g64 a32, turbo3 KV, block-wise fine-tuning", "the turbo3 row's recipe with GPTQ "
     "fine-tuned block by block (weights and group scales, 128 sequences, 2 epochs)",
     partial(variant, "w4a4kv4-spinquant", _spin_asym_a32, _turbo3, _blockwise())),
    ("w4a4-spinquant-asym-o g64 a32, turbo3 KV, prefix, block-wise fine-tuning", "the same with PrefixQuant's "
     "prefix first: the attention sink is the prefix's, exact, and out of the fine-tuning loss",
     partial(variant, "w4a4kv4-spinquant", _spin_asym_a32, _turbo3, _prefix, _blockwise())),
    ("w4a16-quarot + block-wise fine-tuning, relative loss", "the same, each token's error relative to its norm "
     "(the massive first token no longer rules the loss)",
     partial(variant, "w4a16-quarot", _blockwise(loss="relative"))),
    ("w4a4-spinquant-asym-o g64 a32, turbo3 KV, block-wise fine-tuning, relative loss", "the same, each token's "
     "error relative to its norm", partial(variant, "w4a4kv4-spinquant", _spin_asym_a32, _turbo3,
                                           _blockwise(loss="relative"))),
    ("w4a4kv4-spinquant-asym-o + prefix + qat clips", "the same with PrefixQuant's prefix before GPTQ: the clips "
     "train with the prefix in place", _with_qat("w4a4kv4-spinquant", _spin_asym_prefix, clips=True)),
    ("w4a4kv4-prefix + qat", "PrefixQuant static (prefix, static scales, block-wise fine-tuning), then QAT of "
     "weights, static scales and norms", _with_qat("w4a4kv4-prefix")),
]


def _scores(bench: Bench, model, windows: torch.Tensor, reference: list[torch.Tensor]) -> dict:
    r = evaluate(bench.model, model, windows, reference=reference)
    return {"ratio": r.ppl / r.fp_ppl, "kl": r.kl_vs_fp, "top1": r.top1_agreement}


def _measure(bench: Bench, label: str, recipe: Recipe) -> dict:
    """A row, also measured on the other text's windows (``cross``: Wikipedia for a run calibrated on the default
    text, the default text for one calibrated on another with ``--text``); a packed-cache recipe's also with exact keys
    and values (``exact_kv``) on the same model. On another text, saved rotations are that text's own
    (:func:`_rotations_of`), so nothing was learned on the evaluation text."""
    calibrated_elsewhere = bench.config.calib != "default"
    other = "default" if calibrated_elsewhere else str(CROSS_TEXT)
    if calibrated_elsewhere:
        recipe = _rotations_of(recipe, Path(bench.config.calib).stem)

    def more(model) -> dict:
        found = {}
        if recipe.kv_cache is not None:
            with packed_cache_suspended(model):
                found["exact_kv"] = _scores(bench, model, bench.windows, bench.reference)
        if other != "default" and not CROSS_TEXT.exists():
            print(f"no {CROSS_TEXT} for the cross-domain columns: run python benchmarks/heldout_text.py", flush=True)
            return found
        windows = bench.windows_of(other)
        return {**found, "cross": _scores(bench, model, windows, reference_log_probs(bench.model, windows))}

    return bench.measure(recipe, extra=more)


def _rotations_of(recipe: Recipe, text: str) -> Recipe:
    """``recipe`` with each saved rotations file ``results/<row>-rotations.safetensors`` replaced by the one
    ``python benchmarks/spinquant.py --text <text file>`` learns on that text (``<row>@<text>-rotations``)."""
    data = recipe.model_dump()
    for step in data["steps"]:
        saved = step.get("rotations")
        if saved:
            own = Path(saved).with_name(Path(saved).name.replace("-rotations", f"@{text}-rotations"))
            if not own.is_file():
                raise SystemExit(f"no {own}: learn the rotations on this text first (python benchmarks/spinquant.py "
                                 f"--text <its file> --recipes <the recipe>)")
            step["rotations"] = str(own)
    return Recipe.from_dict(data, origin=f"{text}'s rotations")


def table(results: Results) -> list[str]:
    m = results.meta
    own = m.get("setup", {}).get("calib", "default") == "default"
    text = "default text" if own else "Wikipedia text (calibration and windows; disjoint parts)"
    lines = [f"Default model, {text}, {m.get('windows')} windows × {m.get('seq_len')} tokens, {m.get('threads')} CPU "
             f"threads, {m.get('date')}; `{m.get('command')}`.", ""]
    other = "Wikipedia" if own else "default text"
    header = ["row", "what", "bits W / A / KV", "ratio", "KL", "top-1", "exact KV: ratio / KL", f"{other}: ratio / KL",
              "QAT KL first 10 -> last 10 steps", "held-out KL start -> kept (step)", "quantize s"]
    rows = []
    for label, what, _ in ROWS:
        r = results.rows.get(label)
        if r is None:
            continue
        qat = r.get("qat")
        trend = f"{qat['kl_first_10']:.3f} -> {qat['kl_last_10']:.3f}" if qat else "-"
        exact, cross = (f"{num(r[k]['ratio'])} / {r[k]['kl']:.4f}" if k in r else "-" for k in ("exact_kv", "cross"))
        bits = " / ".join(f"{r[k]:.2f}" if r.get(k) is not None else "16" for k in ("bits_w", "bits_a", "bits_kv"))
        rows.append([label, what, bits, num(r["ratio"]), f"{r['kl']:.4f}", f"{r['top1']:.4f}", exact, cross, trend,
                     _held_out(qat), f"{r['quantize_s']:.0f}"])
    return lines + markdown_table(header, rows)


def _held_out(qat: dict | None) -> str:
    """The held-out KL before training and at the step the model kept ("-" for rows without validation)."""
    held = (qat or {}).get("held_out_kl")
    if not held:
        return "-"
    kept = str(qat["kept_step"])
    return f"{held['0']:.3f} -> {held[kept]:.3f} ({kept})"


def main() -> None:
    labelled_script(__doc__, RESULTS, ROWS, "QAT", table, _measure)


if __name__ == "__main__":
    main()
