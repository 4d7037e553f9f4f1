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
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from presets import replace_block

import lowbit
from lowbit.bits import activation_bits, kv_bits, weight_bits
from lowbit.evaluate import evaluate, reference_log_probs
from lowbit.models.arch import head_dim
from lowbit.recipe import Recipe, load_preset

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "quarot.json"
BEGIN, END = "<!-- QUAROT:BEGIN -->", "<!-- QUAROT:END -->"


def variant(preset: str, edit: Callable[[dict], None]) -> Recipe:
    """``preset`` with ``edit`` applied to its plain-dict form (validated again)."""
    data = load_preset(preset).model_dump()
    edit(data)
    return Recipe.from_dict(data, origin=f"variant of {preset}")


def _step(data: dict, method: str) -> dict:
    return next(s for s in data["steps"] if s["method"] == method)


def _set(path: str, value) -> Callable[[dict], None]:
    """An edit that sets ``steps.<method>.<field>`` or ``<section>.<field>`` to ``value``."""
    head, field = path.rsplit(".", 1)

    def edit(data: dict) -> None:
        target = _step(data, head.split(".", 1)[1]) if head.startswith("steps.") else data[head]
        target[field] = value

    return edit


def _no_rotation(data: dict) -> None:
    data["steps"] = [s for s in data["steps"] if s["method"] != "quarot"]


def _rtn(data: dict) -> None:
    data["steps"] = [s if s["method"] != "gptq" else {"method": "rtn"} for s in data["steps"]]


# (label, what it shows, recipe factory). Ablations change one thing of the full W4A4KV4 preset.
ROWS: list[tuple[str, str, Callable[[], Recipe]]] = [
    ("w4a16-gptq", "GPTQ g64, no rotation (llm-compressor: 1.233)", lambda: load_preset("w4a16-gptq")),
    ("w4a16-gptq per channel", "GPTQ per channel, no rotation (llm-compressor: 1.371)",
     lambda: variant("w4a16-gptq", lambda d: d["weights"].update(granularity="channel", group_size=None))),
    ("w4a16-gptq per channel, no act-order", "GPTQ per channel (clip search) in natural column order",
     lambda: variant("w4a16-gptq", lambda d: (d["weights"].update(granularity="channel", group_size=None),
                                              _step(d, "gptq").update(act_order=False)))),
    ("w4a16-gptq per channel, no clip search", "GPTQ per channel with min/max weight ranges",
     lambda: variant("w4a16-gptq", lambda d: d["weights"].update(granularity="channel", group_size=None,
                                                                 observer="minmax"))),
    ("w4a16-quarot", "rotations + GPTQ g64", lambda: load_preset("w4a16-quarot")),
    ("w4a4-quarot", "W4A4, KV16 (llm-compressor with rotations: 2.404)", lambda: load_preset("w4a4-quarot")),
    ("w4a4kv4-quarot", "the full W4A4KV4 recipe", lambda: load_preset("w4a4kv4-quarot")),
    ("- rotation", "no QuaRot step", lambda: variant("w4a4kv4-quarot", _no_rotation)),
    ("- R4", "no online Hadamard on the down_proj input", lambda: variant("w4a4kv4-quarot", _set("steps.quarot.r4", False))),
    ("- R3", "no online Hadamard on Q/K", lambda: variant("w4a4kv4-quarot", _set("steps.quarot.r3", False))),
    ("GPTQ -> RTN", "RTN weights with the same clip search", lambda: variant("w4a4kv4-quarot", _rtn)),
    ("- act-order", "GPTQ in natural column order", lambda: variant("w4a4kv4-quarot", _set("steps.gptq.act_order", False))),
    ("- clip search", "min/max weight ranges instead of the MSE search",
     lambda: variant("w4a4kv4-quarot", _set("weights.observer", "minmax"))),
    ("calibration 64x512", "twice the preset's calibration tokens",
     lambda: variant("w4a4kv4-quarot", _set("calibration.samples", 64))),
]


def measure(recipe: Recipe, loaded, data, reference) -> dict:
    """Quantize with ``recipe`` and evaluate against the cached full-precision reference.

    KV bits include a PrefixQuant prefix's full-precision keys/values amortised over the window.
    """
    start = time.perf_counter()
    model, session = lowbit.quantize_with_session(loaded.model, recipe, data)
    quantize_s = time.perf_counter() - start
    result = evaluate(loaded.model, model, data.eval_windows, reference=reference)
    seq_len, kv = int(data.eval_windows.shape[1]), kv_bits(recipe.kv, head_dim(loaded.model.config))
    report = session.report()
    prefix = report.get("prefix", {}).get("tokens", [])
    row = {
        "recipe": recipe.model_dump(mode="json"), "ppl": result.ppl, "fp_ppl": result.fp_ppl,
        "ratio": result.ppl / result.fp_ppl, "kl": result.kl_vs_fp, "top1": result.top1_agreement,
        "bits_w": weight_bits(model, loaded.spec)["weight"], "bits_a": activation_bits(model, loaded.spec),
        "bits_kv": (len(prefix) * 16 + seq_len * kv) / (len(prefix) + seq_len), "quantize_s": quantize_s,
        "calibration_tokens": recipe.calibration.samples * recipe.calibration.seq_len
        if any(s.method == "gptq" for s in recipe.steps) else 0,
    }
    if prefix:
        row["prefix"] = report["prefix"]
        row["prefix_text"] = [loaded.tokenizer.decode([t]) for t in prefix]
    if "blockwise" in report:
        row["blockwise"] = report["blockwise"]
    return row


def run_rows(todo: list, saved: dict, results: Path = RESULTS, command: str = "python benchmarks/quarot.py") -> None:
    """Measure each (label, what, recipe factory) row and save ``results`` after every one."""
    if not todo:
        return
    loaded = lowbit.load_model("default")
    data = lowbit.prepare_data(lowbit.DataConfig(), loaded.tokenizer)
    reference = reference_log_probs(loaded.model, data.eval_windows)
    saved["meta"] = {"command": command, "windows": len(data.eval_windows),
                     "seq_len": int(data.eval_windows.shape[1]), "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    for label, _, factory in todo:
        saved["rows"][label] = measure(factory(), loaded, data, reference)
        results.parent.mkdir(exist_ok=True)
        results.write_text(json.dumps(saved, indent=2) + "\n")
        row = saved["rows"][label]
        print(f"{label}: ratio {row['ratio']:.4f} KL {row['kl']:.4f} quantize {row['quantize_s']:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=None, help="labels of the rows to run (default: all)")
    parser.add_argument("--force", action="store_true", help="re-measure rows already in results/quarot.json")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the table from results/quarot.json")
    parser.add_argument("--wall-time", action="store_true",
                        help="time w4a4kv4-quarot end to end (calibration text prepared, rotations, GPTQ) alone")
    args = parser.parse_args()
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"meta": {}, "rows": {}}
    if args.wall_time:
        saved["wall_time"] = wall_time("w4a4kv4-quarot")
        RESULTS.write_text(json.dumps(saved, indent=2) + "\n")
    elif not args.tables_only:
        run_rows(rows_to_run(parser, args, ROWS, saved), saved)
    write_table(saved)


def rows_to_run(parser: argparse.ArgumentParser, args, rows: list, saved: dict) -> list:
    """The rows ``--rows`` names (default: all) that are not saved yet, or all of them with ``--force``."""
    labels = args.rows or [label for label, _, _ in rows]
    unknown = set(labels) - {label for label, _, _ in rows}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; rows: {[label for label, _, _ in rows]}")
    return [row for row in rows if row[0] in labels and (args.force or row[0] not in saved["rows"])]


def wall_time(preset: str) -> dict:
    """Seconds from raw text to quantized model for ``preset``: tokenize and sample calibration text, quantize."""
    loaded = lowbit.load_model("default")
    start = time.perf_counter()
    data = lowbit.prepare_data(lowbit.DataConfig(), loaded.tokenizer)
    prepared = time.perf_counter()
    lowbit.quantize(loaded.model, preset, data)
    done = time.perf_counter()
    result = {"recipe": preset, "data_s": prepared - start, "quantize_s": done - prepared, "total_s": done - start,
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"{preset}: {result['total_s']:.0f} s end to end ({result['data_s']:.1f} s of it preparing text)")
    return result


def write_table(saved: dict) -> None:
    """The QUAROT table in benchmarks/README.md, rows in the order of ROWS."""
    meta = saved["meta"]
    lines = [
        f"Default model and text, {meta.get('windows')} windows × {meta.get('seq_len')} tokens, "
        f"{meta.get('threads')} CPU threads, {meta.get('date')}; `python benchmarks/quarot.py`.",
        "",
        "| row | what it shows | ratio | KL | top-1 | bits W / A / KV | calib tokens | quantize s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, what, _ in ROWS:
        r = saved["rows"].get(label)
        if r is None:
            continue
        lines.append(
            f"| {label} | {what} | {r['ratio']:.4g} | {r['kl']:.4f} | {r['top1']:.4f} | "
            f"{r['bits_w']:.2f} / {r['bits_a']:.2f} / {r['bits_kv']:.2f} | {r['calibration_tokens']} | "
            f"{r['quantize_s']:.0f} |"
        )
    if "wall_time" in saved:
        w = saved["wall_time"]
        lines += ["", f"Wall time of `{w['recipe']}` measured alone (`python benchmarks/quarot.py --wall-time`, "
                      f"{w['threads']} threads, {w['date']}): **{w['total_s']:.0f} s** from raw text to quantized model "
                      f"({w['data_s']:.1f} s tokenizing and sampling the calibration text, {w['quantize_s']:.0f} s "
                      "rotations and GPTQ). The `quantize s` column above ran while other jobs shared the cores."]
    replace_block(HERE / "README.md", BEGIN, END, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
