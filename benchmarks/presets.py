"""Every preset on the default model and text: quality against full precision, bits, time, fake-quant overhead.

Run:  python benchmarks/presets.py            (about 10 minutes on 2 CPU cores; resumes where it stopped)
      python benchmarks/presets.py --presets w8a8-rtn kv4 --force   (re-measure some presets)
      python benchmarks/presets.py --tables-only
Writes benchmarks/results/presets.json (after every preset) and the table between the PRESETS markers in
benchmarks/README.md (with a short one in the project README). All presets are evaluated on the same windows against
one full-precision reference computed once per run; presets already saved are skipped unless ``--force``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from harness import (
    HERE,
    SECOND_MODEL,
    SECOND_MODEL_NAME,
    Bench,
    Results,
    add_flags,
    check_labels,
    command_line,
    data_config,
    measure_rows,
    model_results,
    num,
    replace_block,
    results_paths,
    run_meta,
    seconds,
    write_block,
)

import lowbit
from lowbit.recipe import load_preset, preset_names

RESULTS = HERE / "results" / "presets.json"


def forward_seconds(model, window: torch.Tensor) -> float:
    """Wall time of one full forward pass over a window."""
    with torch.no_grad():
        return seconds(lambda: model(window.unsqueeze(0), use_cache=False))


def overhead_vs_fp(fp_model, model, window: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(median quantized / median FP forward time, median FP time), the two measured alternately side by side."""
    if model is fp_model:
        return 1.0, statistics.median(forward_seconds(fp_model, window) for _ in range(repeats))
    fp_times, q_times = [], []
    for _ in range(repeats):
        fp_times.append(forward_seconds(fp_model, window))
        q_times.append(forward_seconds(model, window))
    return statistics.median(q_times) / statistics.median(fp_times), statistics.median(fp_times)


def measure(bench: Bench, name: str, repeats: int) -> dict:
    """One preset's row: the harness's measurement plus the forward time against full precision."""

    def forward(model) -> dict:
        overhead, fp_time = overhead_vs_fp(bench.model, model, bench.windows[0], repeats)
        return {"forward_vs_fp": overhead, "fp_forward_s": fp_time}

    return bench.measure(name, extra=forward if repeats > 0 else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_flags(parser, RESULTS, rows="--presets")
    parser.add_argument("--timing-repeats", type=int, default=3,
                        help="forward passes timed per preset for the forward-vs-FP column (0: not timed)")
    parser.add_argument("--timing-only", action="store_true",
                        help="re-measure only the forward-vs-FP column of results/presets.json (on a quiet machine)")
    args = parser.parse_args()
    results = Results(*results_paths(args, RESULTS), list_key="recipe")
    if args.timing_only:
        retime(results, args.timing_repeats)
    elif not args.tables_only:
        names = check_labels(parser, args.presets, preset_names())
        bench = Bench.load(args.model, data_config(args))
        results.check_setup(bench.setup())
        results.meta.update(run_meta(command_line("python benchmarks/presets.py", args), bench))
        measure_rows(results, results.todo(names, args.force), lambda name: measure(bench, name, args.timing_repeats))
        summarize(results)
    render(results)


def render(results: Results) -> None:
    """The tables from the saved files of both models (a check's own results file: its table printed alone)."""
    if not results.renders:
        write_tables(list(results.rows.values()), results.meta, None, readme=False)
        return
    main = Results(RESULTS, list_key="recipe")
    second = Results(model_results(RESULTS, SECOND_MODEL), list_key="recipe")
    write_tables(list(main.rows.values()), main.meta, second if second.rows else None)


def summarize(results: Results) -> None:
    """The meta fields the table's first line reads: predicted tokens and the median FP forward time."""
    rows = list(results.rows.values())
    fp_times = [r["fp_forward_s"] for r in rows if "fp_forward_s" in r]
    if fp_times:
        results.meta["fp_forward_s"] = statistics.median(fp_times)
    results.meta["tokens"] = rows[0]["tokens"] if rows and "tokens" in rows[0] else results.meta.get("tokens")
    results.save()


def retime(results: Results, repeats: int) -> None:
    """Re-measure the forward-vs-FP ratio of every saved row, one preset at a time, and store it back."""
    meta = results.meta
    bench = Bench.load("default", lowbit.DataConfig(seq_len=meta["seq_len"], windows=meta["windows"]))
    for name, row in results.rows.items():
        model = bench.quantize(load_preset(name))[0]
        row["forward_vs_fp"], row["fp_forward_s"] = overhead_vs_fp(bench.model, model, bench.windows[0], repeats)
        print(f"{name}: forward {row['forward_vs_fp']:.2f}x FP", flush=True)
    summarize(results)


def _forward_vs_fp(row: dict) -> str:
    """The fake-quant forward's time against full precision, or "–" for a row measured without timing."""
    return f"{row['forward_vs_fp']:.2f}×" if "forward_vs_fp" in row else "–"


def write_tables(rows: list[dict], meta: dict, second: Results | None, readme: bool = True) -> None:
    """The full table in benchmarks/README.md, with the second model's columns when ``second`` has rows, and a short
    one of the default model in the project README (printed only unless ``readme``)."""
    lines = [
        f"Default model (SmolLM2-135M-Instruct, fp32), default text, {meta['windows']} windows × {meta['seq_len']} "
        f"tokens ({meta['tokens']} predicted tokens), {meta['threads']} CPU threads, {meta['date']}. "
        f"Full-precision forward of one window: {meta['fp_forward_s']:.2f} s (median).",
    ]
    head = "| recipe | FP ppl | ppl | ratio | KL | top-1 | bits W | bits A | bits KV | quantize s | eval s | forward vs FP |"
    rule = "|---|---|---|---|---|---|---|---|---|---|---|---|"
    if second is not None:
        m = second.meta
        lines.append(f"{SECOND_MODEL_NAME} columns (Q:): the same text, {m['windows']} windows × {m['seq_len']} tokens "
                     f"({m['tokens']} predicted tokens), {m['threads']} CPU threads, {m['date']}; `{m['command']}`.")
        head += " Q: ratio | Q: KL | Q: top-1 | Q: quantize s |"
        rule += "---|---|---|---|"
    lines += ["", head, rule]
    for r in rows:
        line = (
            f"| {r['recipe']} | {r['fp_ppl']:.3f} | {num(r['ppl'])} | {num(r['ratio'])} | {r['kl']:.4f} | "
            f"{r['top1']:.4f} | {r['bits_w']:.2f} | {r['bits_a']:.2f} | {r['bits_kv']:.2f} | {r['quantize_s']:.1f} | "
            f"{r['eval_s']:.1f} | {_forward_vs_fp(r)} |"
        )
        if second is not None:
            q = second.rows.get(r["recipe"])
            line += (f" {num(q['ratio'])} | {q['kl']:.4f} | {q['top1']:.4f} | {q['quantize_s']:.1f} |" if q
                     else " – | – | – | – |")
        lines.append(line)
    short = ["| recipe | ppl ratio | KL | top-1 | bits W / A / KV |", "|---|---|---|---|---|"]
    short += [
        f"| {r['recipe']} | {num(r['ratio'])} | {r['kl']:.4f} | {r['top1']:.4f} | "
        f"{r['bits_w']:.2f} / {r['bits_a']:.2f} / {r['bits_kv']:.2f} |"
        for r in rows
    ]
    if readme:
        replace_block(HERE.parent / "README.md", "<!-- RESULTS:BEGIN -->", "<!-- RESULTS:END -->", short)
    write_block("PRESETS", lines, readme)


if __name__ == "__main__":
    main()
