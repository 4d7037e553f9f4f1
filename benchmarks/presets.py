"""Every preset on the default model and text: quality against full precision, bits, time, fake-quant overhead.

Run:  python benchmarks/presets.py            (about 10 minutes on 2 CPU cores)
Writes benchmarks/results/presets.json and the table between the PRESETS markers in benchmarks/README.md.
All presets are evaluated on the same windows in one run; the full-precision reference runs once per window.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch

import lowbit
from lowbit.bits import activation_bits, kv_bits, weight_bits
from lowbit.evaluate import evaluate_many
from lowbit.models.arch import head_dim
from lowbit.recipe import load_preset, preset_names

HERE = Path(__file__).parent
BEGIN, END = "<!-- PRESETS:BEGIN -->", "<!-- PRESETS:END -->"


def forward_seconds(model, window: torch.Tensor) -> float:
    """Wall time of one full forward pass over a window."""
    with torch.no_grad():
        start = time.perf_counter()
        model(window.unsqueeze(0), use_cache=False)
        return time.perf_counter() - start


def overhead_vs_fp(fp_model, model, window: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(median quantized / median FP forward time, median FP time), the two measured alternately side by side."""
    if model is fp_model:
        return 1.0, statistics.median(forward_seconds(fp_model, window) for _ in range(repeats))
    fp_times, q_times = [], []
    for _ in range(repeats):
        fp_times.append(forward_seconds(fp_model, window))
        q_times.append(forward_seconds(model, window))
    return statistics.median(q_times) / statistics.median(fp_times), statistics.median(fp_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--presets", nargs="*", default=None, help="default: every preset")
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--tables-only", action="store_true", help="rewrite the tables from results/presets.json")
    parser.add_argument("--timing-only", action="store_true",
                        help="re-measure only the forward-vs-FP column of results/presets.json (on a quiet machine)")
    args = parser.parse_args()
    if args.tables_only or args.timing_only:
        saved = json.loads((HERE / "results" / "presets.json").read_text())
        if args.timing_only:
            retime(saved, args.timing_repeats)
        write_tables(saved["rows"], saved["meta"])
        return
    names = args.presets or preset_names()

    loaded = lowbit.load_model("default")
    data = lowbit.prepare_data(lowbit.DataConfig(seq_len=args.seq_len, windows=args.windows), loaded.tokenizer)
    models, seconds = {}, {}
    for name in names:
        if name == "fp":
            models[name], seconds[name] = loaded.model, {}
        else:
            models[name], session = lowbit.quantize_with_session(loaded.model, name, data)
            seconds[name] = session.seconds
        print(f"quantized {name}", flush=True)
    results = evaluate_many(loaded.model, models, data.eval_windows)

    window, fp_times = data.eval_windows[0], []
    rows = []
    for name in names:
        r, q, recipe = results[name], models[name], load_preset(name)
        secs = seconds[name]
        wb = weight_bits(q, loaded.spec)
        overhead, fp_time = overhead_vs_fp(loaded.model, q, window, args.timing_repeats)
        fp_times.append(fp_time)
        rows.append({
            "recipe": name, "fp_ppl": r.fp_ppl, "ppl": r.ppl, "ratio": r.ppl / r.fp_ppl, "kl": r.kl_vs_fp,
            "top1": r.top1_agreement, "bits_w": wb["weight"], "bits_a": activation_bits(q, loaded.spec),
            "bits_kv": kv_bits(recipe.kv, head_dim(q.config)),
            "quantize_s": secs.get("quantize", 0.0) + secs.get("calibrate", 0.0), "eval_s": r.seconds,
            "forward_vs_fp": overhead,
        })
        print(f"{name}: ratio {rows[-1]['ratio']:.4f}", flush=True)
    meta = {
        "command": "python benchmarks/presets.py", "seq_len": args.seq_len, "windows": args.windows,
        "tokens": results[names[0]].tokens, "fp_forward_s": statistics.median(fp_times), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "presets.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_tables(rows, meta)


def retime(saved: dict, repeats: int) -> None:
    """Re-measure the forward-vs-FP ratio of every saved row, one preset at a time, and store it back."""
    meta = saved["meta"]
    loaded = lowbit.load_model("default")
    data = lowbit.prepare_data(lowbit.DataConfig(seq_len=meta["seq_len"], windows=meta["windows"]), loaded.tokenizer)
    fp_times = []
    for row in saved["rows"]:
        name = row["recipe"]
        model = lowbit.quantize(loaded.model, name, data) if name != "fp" else loaded.model
        row["forward_vs_fp"], fp_time = overhead_vs_fp(loaded.model, model, data.eval_windows[0], repeats)
        fp_times.append(fp_time)
        print(f"{name}: forward {row['forward_vs_fp']:.2f}x FP", flush=True)
    meta["fp_forward_s"] = statistics.median(fp_times)
    (HERE / "results" / "presets.json").write_text(json.dumps(saved, indent=2) + "\n")


def _num(x: float) -> str:
    return f"{x:.4g}" if x < 1e4 else f"{x:.3g}"


def replace_block(path: Path, begin: str, end: str, lines: list[str]) -> None:
    """Replace the text between two marker lines of a markdown file."""
    text = path.read_text() if path.exists() else f"{begin}\n{end}\n"
    block = f"{begin}\n" + "\n".join(lines) + f"\n{end}"
    path.write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.DOTALL))


def write_tables(rows: list[dict], meta: dict) -> None:
    """The full table in benchmarks/README.md and a short one in the project README."""
    lines = [
        f"Default model (SmolLM2-135M-Instruct, fp32), default text, {meta['windows']} windows × {meta['seq_len']} "
        f"tokens ({meta['tokens']} predicted tokens), {meta['threads']} CPU threads, {meta['date']}. "
        f"Full-precision forward of one window: {meta['fp_forward_s']:.2f} s (median).",
        "",
        "| recipe | FP ppl | ppl | ratio | KL | top-1 | bits W | bits A | bits KV | quantize s | eval s | forward vs FP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['fp_ppl']:.3f} | {_num(r['ppl'])} | {_num(r['ratio'])} | {r['kl']:.4f} | "
            f"{r['top1']:.4f} | {r['bits_w']:.2f} | {r['bits_a']:.2f} | {r['bits_kv']:.2f} | {r['quantize_s']:.1f} | "
            f"{r['eval_s']:.1f} | {r['forward_vs_fp']:.2f}× |"
        )
    replace_block(HERE / "README.md", BEGIN, END, lines)
    short = ["| recipe | ppl ratio | KL | top-1 | bits W / A / KV |", "|---|---|---|---|---|"]
    short += [
        f"| {r['recipe']} | {_num(r['ratio'])} | {r['kl']:.4f} | {r['top1']:.4f} | "
        f"{r['bits_w']:.2f} / {r['bits_a']:.2f} / {r['bits_kv']:.2f} |"
        for r in rows
    ]
    replace_block(HERE.parent / "README.md", "<!-- RESULTS:BEGIN -->", "<!-- RESULTS:END -->", short)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
