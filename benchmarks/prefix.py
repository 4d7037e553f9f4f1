"""PrefixQuant on the default model: the paper's ablation (RTN -> + rotation -> + grid search -> + prefix ->
+ fine-tuning) for static W4A4KV4, and the PrefixQuant presets beside dynamic QuaRot, in one run.

Run:  python benchmarks/prefix.py            (about 40 minutes on 2 CPU cores; resumes where it stopped)
      python benchmarks/prefix.py --rows "+ prefix" --force
      python benchmarks/prefix.py --tables-only

Every row quantizes the same model with the same calibration text and is evaluated on the same windows against one
full-precision reference. The ablation rows are static W4A4KV4 (weights per channel with the MSE clip search, RTN,
activations per tensor, KV per head): "RTN" takes its static scales from calibration maxima; each later row adds one
component (the last row is the ``w4a4kv4-prefix`` preset). Bits count the prefix's full-precision keys/values amortised over the window. The table goes between the
PREFIX markers in benchmarks/README.md; results in results/prefix.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from harness import HERE, Results, add_flags, run_labelled, step_update, variant, write_block

from lowbit.recipe import Recipe, load_preset

RESULTS = HERE / "results" / "prefix.json"


def _without(*methods: str) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        data["steps"] = [s for s in data["steps"] if s["method"] not in methods]

    return edit


def ablation(*edits: Callable[[dict], None]) -> Callable[[], Recipe]:
    """``w4a4kv4-prefix`` with components taken away (each ablation row adds one back)."""
    return lambda: variant("w4a4kv4-prefix", *edits)


NO_FT = step_update("blockwise", epochs=0)
ALL_IN = "w4a4-spin-prefix-turbo3"
ALL_IN_ROTATIONS = HERE / "results" / f"{ALL_IN}-rotations.safetensors"  # learned by the all-in row, reused after
LEARN_ROTATIONS = step_update("spinquant", checkpoint=str(ALL_IN_ROTATIONS))
LOAD_ROTATIONS = step_update("spinquant", rotations=str(ALL_IN_ROTATIONS))


def _static_kv4(data: dict) -> None:
    """The packed cache replaced by ``w4a4kv4-prefix``'s static KV4 per head."""
    data.pop("kv_cache", None)
    data["kv"] = load_preset("w4a4kv4-prefix").kv.model_dump()


def all_in(*edits: Callable[[dict], None]) -> Callable[[], Recipe]:
    """The all-in preset; its SpinQuant rotations checkpointed to (or, in later rows, loaded from) one file."""
    return lambda: variant(ALL_IN, *edits)


ROWS: list[tuple[str, str, Callable[[], Recipe]]] = [
    ("RTN", "static scales from calibration maxima, RTN weights, no rotation",
     ablation(NO_FT, step_update("blockwise", grid=False), _without("quarot", "prefix"))),
    ("+ rotation", "QuaRot R1-R4", ablation(NO_FT, step_update("blockwise", grid=False), _without("prefix"))),
    ("+ grid search", "clip factors searched per quantizer", ablation(NO_FT, _without("prefix"))),
    ("+ prefix", "outlier tokens in a full-precision prefix", ablation(NO_FT)),
    ("+ fine-tuning = w4a4kv4-prefix", "block-wise, weights and scales", lambda: load_preset("w4a4kv4-prefix")),
    ("w4a4kv4-prefix-noft", "preset: GPTQ weights instead of fine-tuning",
     lambda: load_preset("w4a4kv4-prefix-noft")),
    ("w4a4kv4-prefix-dynamic", "preset: prefix, dynamic per-token scales", lambda: load_preset("w4a4kv4-prefix-dynamic")),
    ("w4a4kv4-quarot", "dynamic QuaRot (the bar for the static preset)", lambda: load_preset("w4a4kv4-quarot")),
    ("w8a8kv8-prefix", "preset: static 8-bit, per-tensor KV", lambda: load_preset("w8a8kv8-prefix")),
    ("all in, fine-tuning on 32 samples", "SpinQuant rotations (learned in this row; later rows load them), the "
     "prefix, static W4A4 with grid search and fine-tuning on 32 sequences as w4a4kv4-prefix, kv-turbo3's packed "
     "cache", all_in(LEARN_ROTATIONS, step_update("blockwise", samples=32))),
    (ALL_IN, "preset, all in: the same with fine-tuning on 128 sequences", all_in(LOAD_ROTATIONS)),
    ("all in, static KV4", "the preset with w4a4kv4-prefix's static KV4 per head for the packed cache",
     all_in(LOAD_ROTATIONS, _static_kv4)),
]


def _finetune_seconds(row: dict) -> str:
    """Block-wise fine-tuning wall time summed over layers ("-" without fine-tuning or from older runs)."""
    layers = row.get("blockwise", {}).get("layers", [])
    times = [layer["finetune_s"] for layer in layers if "finetune_s" in layer]
    return f"{sum(times):.0f}" if times else "-"


def write_table(results: Results) -> None:
    """The PREFIX table in benchmarks/README.md, rows in the order of ROWS."""
    meta = results.meta
    lines = [f"Default model and text, {meta.get('windows')} windows × {meta.get('seq_len')} tokens, "
             f"{meta.get('threads')} CPU threads, {meta.get('date')}; `python benchmarks/prefix.py`.", "",
             "| row | what it adds | ratio | KL | top-1 | bits W / A / KV | prefix | quantize s | fine-tune s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, what, _ in ROWS:
        r = results.rows.get(label)
        if r is not None:
            prefix = ", ".join(r.get("prefix_text", [])) or "-"
            lines.append(f"| {label} | {what} | {r['ratio']:.4g} | {r['kl']:.4f} | {r['top1']:.4f} | "
                         f"{r['bits_w']:.2f} / {r['bits_a']:.2f} / {r['bits_kv']:.2f} | {prefix} | "
                         f"{r['quantize_s']:.0f} | {_finetune_seconds(r)} |")
    write_block("PREFIX", lines, results.renders)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_flags(parser, RESULTS)
    write_table(run_labelled(parser, parser.parse_args(), ROWS, "python benchmarks/prefix.py"))


if __name__ == "__main__":
    main()
