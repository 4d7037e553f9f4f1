"""QuaRot + GPTQ on the default model: the presets, and one ablation row per component.

Run:  python benchmarks/quarot.py            (about 45 minutes on 2 CPU cores; resumes where it stopped)
      python benchmarks/quarot.py --rows w4a4kv4-quarot "- R4" --force   (re-measure some rows)
      python benchmarks/quarot.py --tables-only

Each row is a recipe: a preset, or a preset with one component changed (the ablations). Rows run one at a time
(quantize, then evaluate against full-precision log-probabilities computed once for the run), and every finished row
is saved to results/quarot.json at once, so an interrupted run resumes with the rows still missing. The table goes
between the QUAROT markers in benchmarks/README.md. Quantize seconds are wall time on whatever else the machine was
doing: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from harness import (
    HERE,
    SECOND_MODEL,
    SECOND_MODEL_NAME,
    Results,
    add_flags,
    model_results,
    results_paths,
    run_labelled,
    set_field,
    step_update,
    variant,
    write_block,
)

import lowbit
from lowbit.models.arch import decoder_layers
from lowbit.recipe import Recipe, load_preset

RESULTS = HERE / "results" / "quarot.json"


def _no_rotation(data: dict) -> None:
    data["steps"] = [s for s in data["steps"] if s["method"] != "quarot"]


def _rtn(data: dict) -> None:
    data["steps"] = [s if s["method"] != "gptq" else {"method": "rtn"} for s in data["steps"]]


# w4a16-gptq's and w4a4-quarot's weight grid before 2026-12-05, that of the rows measured then
_FIFTEEN = set_field("weights.int_range", "restricted")


def _CHANNEL(data: dict) -> None:
    data["weights"].update(granularity="channel", group_size=None)


# (label, what it shows, recipe factory). Ablations change one thing of the full W4A4KV4 preset.
ROWS: list[tuple[str, str, Callable[[], Recipe]]] = [
    ("w4a16-gptq", "GPTQ g64 on the full 16-level grid, no rotation (the preset since 2026-12-05)",
     lambda: load_preset("w4a16-gptq")),
    ("w4a16-gptq, 15 levels", "GPTQ g64 on [-7, 7], no rotation (llm-compressor: 1.233)",
     lambda: variant("w4a16-gptq", _FIFTEEN)),
    ("w4a16-gptq per channel, 15 levels", "GPTQ per channel, no rotation (llm-compressor: 1.371)",
     lambda: variant("w4a16-gptq", _FIFTEEN, _CHANNEL)),
    ("w4a16-gptq per channel, 15 levels, no act-order", "GPTQ per channel (clip search) in natural column order",
     lambda: variant("w4a16-gptq", _FIFTEEN, _CHANNEL, step_update("gptq", act_order=False))),
    ("w4a16-gptq per channel, 15 levels, no clip search", "GPTQ per channel with min/max weight ranges",
     lambda: variant("w4a16-gptq", _FIFTEEN, _CHANNEL, set_field("weights.observer", "minmax"))),
    ("w4a16-quarot", "rotations + GPTQ g64", lambda: load_preset("w4a16-quarot")),
    ("w4a16-quarot, sequential GPTQ", "rotations + GPTQ g64, each input group's Hessian after the groups before it "
     "are quantized", lambda: variant("w4a16-quarot", set_field("steps.gptq.sequential", True))),
    ("w4a16-quarot, asymmetric GPTQ", "rotations + GPTQ g64 fitted to the full-precision outputs (Qronos/GPTAQ; "
     "sequential)", lambda: variant("w4a16-quarot", set_field("steps.gptq.asymmetric", True))),
    ("w4a16-quarot g32, asymmetric GPTQ", "the same in groups of 32",
     lambda: variant("w4a16-quarot", set_field("steps.gptq.asymmetric", True), set_field("weights.group_size", 32))),
    ("w4a16-quarot, asymmetric GPTQ and weights", "asymmetric GPTQ on a grid with a zero point per group",
     lambda: variant("w4a16-quarot", set_field("steps.gptq.asymmetric", True), set_field("weights.symmetric", False))),
    ("w4a16-quarot, asymmetric weights", "rotations + GPTQ g64 on a grid with a zero point per group",
     lambda: variant("w4a16-quarot", set_field("weights.symmetric", False))),
    ("w4a16-quarot, full grid", "rotations + GPTQ g64 on the full 16-level grid (signed group scales)",
     lambda: variant("w4a16-quarot", set_field("weights.int_range", "full"))),
    ("w4a16-quarot g32", "rotations + GPTQ in groups of 32", lambda: variant("w4a16-quarot", set_field("weights.group_size", 32))),
    ("w4a4-quarot", "W4A4, KV16, W4 on the full 16-level grid (the preset since 2026-12-05)",
     lambda: load_preset("w4a4-quarot")),
    ("w4a4-quarot, A4 full grid", "the preset with activations on the full 16-level grid too (a signed scale per "
     "token)", lambda: variant("w4a4-quarot", set_field("activations.int_range", "full"))),
    ("w4a4-quarot, 15 levels", "W4A4, KV16, W4 on [-7, 7] (llm-compressor with rotations: 2.404)",
     lambda: variant("w4a4-quarot", _FIFTEEN)),
    ("w4a4-quarot, 15 levels, A4 asymmetric", "activations per token with a zero point (Brevitas' default input "
     "quantizer)", lambda: variant("w4a4-quarot", _FIFTEEN, set_field("activations.symmetric", False))),
    ("w4a4-quarot, 15 levels, A4 no clip", "activations at their per-token absmax (Brevitas' setting), not clipped "
     "to 0.9", lambda: variant("w4a4-quarot", _FIFTEEN, set_field("activations.clip_ratio", 1.0))),
    ("w4a4-quarot, 15 levels + o_proj rotation", "an online Hadamard across heads at o_proj's input (as Brevitas' "
     "orphan sink)", lambda: variant("w4a4-quarot", _FIFTEEN, set_field("steps.quarot.o_rotation", True))),
    ("w4a4-quarot, 15 levels, A4 asymmetric + o_proj rotation", "both of the above",
     lambda: variant("w4a4-quarot", _FIFTEEN, set_field("activations.symmetric", False),
                     set_field("steps.quarot.o_rotation", True))),
    ("w4a4kv4-quarot", "the full W4A4KV4 recipe", lambda: load_preset("w4a4kv4-quarot")),
    ("w4a4kv4-quarot, A4 asymmetric", "activations per token with a zero point",
     lambda: variant("w4a4kv4-quarot", set_field("activations.symmetric", False))),
    ("- rotation", "no QuaRot step", lambda: variant("w4a4kv4-quarot", _no_rotation)),
    ("- R4", "no online Hadamard on the down_proj input", lambda: variant("w4a4kv4-quarot", set_field("steps.quarot.r4", False))),
    ("- R3", "no online Hadamard on Q/K", lambda: variant("w4a4kv4-quarot", set_field("steps.quarot.r3", False))),
    ("- key centre", "keys rounded as they are, not around their pre-RoPE mean",
     lambda: variant("w4a4kv4-quarot", set_field("kv.key_centre", None))),
    ("GPTQ -> RTN", "RTN weights with the same clip search", lambda: variant("w4a4kv4-quarot", _rtn)),
    ("- act-order", "GPTQ in natural column order", lambda: variant("w4a4kv4-quarot", set_field("steps.gptq.act_order", False))),
    ("- clip search", "min/max weight ranges instead of the MSE search",
     lambda: variant("w4a4kv4-quarot", set_field("weights.observer", "minmax"))),
    ("calibration 64x512", "twice the preset's calibration tokens",
     lambda: variant("w4a4kv4-quarot", set_field("calibration.samples", 64))),
    ("+ sequential GPTQ", "each input group's Hessian after the groups before it are quantized",
     lambda: variant("w4a4kv4-quarot", set_field("steps.gptq.sequential", True))),
    ("+ asymmetric GPTQ", "GPTQ fitted to the full-precision outputs on the inputs each layer will see (Qronos/GPTAQ; "
     "sequential)", lambda: variant("w4a4kv4-quarot", set_field("steps.gptq.asymmetric", True))),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_flags(parser, RESULTS)
    parser.add_argument("--wall-time", action="store_true",
                        help="time w4a4kv4-quarot end to end (calibration text prepared, rotations, GPTQ) alone")
    args = parser.parse_args()
    if args.wall_time:
        results = Results(*results_paths(args, RESULTS))
        results.saved["wall_time"] = wall_time("w4a4kv4-quarot", args.model)
        results.save()
    else:
        results = run_labelled(parser, args, ROWS, "python benchmarks/quarot.py")
    write_table(results)


def wall_time(preset: str, model: str = "default") -> dict:
    """Seconds from raw text to quantized model for ``preset``: tokenize and sample calibration text, quantize; and
    the quantize time per billion parameters of the decoder linears it quantizes."""
    loaded = lowbit.load_model(model)
    layers = decoder_layers(loaded.model)
    linears = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    start = time.perf_counter()
    data = lowbit.prepare_data(lowbit.DataConfig(), loaded.tokenizer)
    prepared = time.perf_counter()
    lowbit.quantize(loaded.model, preset, data)
    done = time.perf_counter()
    result = {"recipe": preset, "model": model, "data_s": prepared - start, "quantize_s": done - prepared,
              "total_s": done - start, "linear_params": linears, "s_per_billion": (done - prepared) / linears * 1e9,
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"{preset}: {result['total_s']:.0f} s end to end ({result['data_s']:.1f} s of it preparing text)")
    return result


def write_table(results: Results) -> None:
    """The QUAROT table in benchmarks/README.md, rows in the order of ROWS, with the second model's columns when
    its results file exists (a check's own results file is printed alone)."""
    if results.renders:
        results = Results(RESULTS)
    other = Results(model_results(RESULTS, SECOND_MODEL)) if results.renders else None
    second = other if other is not None and other.rows else None  # its columns, once it has rows
    meta = results.meta
    lines = [
        f"Default model and text, {meta.get('windows')} windows × {meta.get('seq_len')} tokens, "
        f"{meta.get('threads')} CPU threads, {meta.get('date')}; `python benchmarks/quarot.py`.",
    ]
    head = "| row | what it shows | ratio | KL | top-1 | bits W / A / KV | calib tokens | quantize s |"
    rule = "|---|---|---|---|---|---|---|---|"
    if second is not None:
        m = second.meta
        lines.append(f"{SECOND_MODEL_NAME} columns (Q:): the same text, {m.get('windows')} windows × "
                     f"{m.get('seq_len')} tokens, {m.get('threads')} CPU threads, {m.get('date')}; `{m.get('command')}`"
                     " (a row not measured yet reads –).")
        head += " Q: ratio | Q: KL | Q: top-1 | Q: quantize s |"
        rule += "---|---|---|---|"
    lines += ["", head, rule]
    for label, what, _ in ROWS:
        r = results.rows.get(label)
        if r is None:
            continue
        line = (f"| {label} | {what} | {r['ratio']:.4g} | {r['kl']:.4f} | {r['top1']:.4f} | "
                f"{r['bits_w']:.2f} / {r['bits_a']:.2f} / {r['bits_kv']:.2f} | {r['calibration_tokens']} | "
                f"{r['quantize_s']:.0f} |")
        if second is not None:
            q = second.rows.get(label)
            line += (f" {q['ratio']:.4g} | {q['kl']:.4f} | {q['top1']:.4f} | {q['quantize_s']:.0f} |" if q
                     else " – | – | – | – |")
        lines.append(line)
    for res in (results, other):
        if res is not None and "wall_time" in res.saved:
            lines += ["", wall_time_line(res.saved["wall_time"])]
    write_block("QUAROT", lines, results.renders)


def wall_time_line(w: dict) -> str:
    """The sentence for one ``--wall-time`` measurement."""
    model = SECOND_MODEL_NAME if w.get("model") == SECOND_MODEL else "the default model"
    flag = f" --model {w['model']}" if w.get("model", "default") != "default" else ""
    per_billion = (f", {w['s_per_billion']:.0f} s per billion parameters of decoder linears "
                   f"({w['linear_params'] / 1e6:.0f} M)") if "s_per_billion" in w else ""
    return (f"Wall time of `{w['recipe']}` on {model}, measured alone (`python benchmarks/quarot.py --wall-time{flag}`, "
            f"{w['threads']} threads, {w['date']}): **{w['total_s']:.0f} s** from raw text to quantized model "
            f"({w['data_s']:.1f} s tokenizing and sampling the calibration text, {w['quantize_s']:.0f} s rotations "
            f"and GPTQ{per_billion}). The `quantize s` columns above ran while other jobs shared the cores.")


if __name__ == "__main__":
    main()
