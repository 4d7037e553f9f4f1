"""Decode-step attention over a packed KV cache against a dense cache: bytes held and time per token.

Run:  python benchmarks/kv_speed.py         (a few minutes on 2 CPU cores; run it on a quiet machine)
      python benchmarks/kv_speed.py --tables-only
      python benchmarks/kv_speed.py --contexts 2048 --repeats 3 --results /tmp/kv_speed.json   (a quick check: the
                                              table is printed, not written to the README)
Writes results/kv_speed.json (atomically, once every row is measured) and the table between the KVSPEED markers in
benchmarks/README.md.

One decoder layer of the default model's shape (9 query heads, 3 KV heads, head_dim 64) decodes one token against a
cache of 2k, 8k and 32k random tokens: the dense cache in bfloat16 and float32 through torch's scaled-dot-product
attention, and each packed preset through lowbit's attention over the packed form (exact sink and window stored in
bfloat16). Times are medians of repeated calls, measured side by side in one run; multiply by the model's 30 layers
for the attention share of a decode step (the linear layers cost the same with any cache).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from harness import HERE, add_flags, markdown_table, median_seconds, run_meta, write_block

from lowbit.kv.attend import packed_attention
from lowbit.kv.cache import PackedLayer
from lowbit.recipe import load_preset
from lowbit.report import write_json_atomic

RESULTS = HERE / "results" / "kv_speed.json"
PRESETS = ("kv-int3", "kv-kivi", "kv-kivi3", "kv-qjl", "kv-turbo3")
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def median_ms(fn, repeats: int) -> float:
    return median_seconds(fn, repeats) * 1e3


def dense_row(context: int, dtype: torch.dtype, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, KV_HEADS, context, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(1, HEADS, 1, HEAD_DIM, generator=gen).to(dtype)
    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), repeats)
    return {"cache": f"dense {str(dtype).removeprefix('torch.')}", "context": context, "ms": ms,
            "bytes": 2 * k.numel() * k.element_size()}


def packed_row(preset: str, context: int, repeats: int) -> dict:
    spec = load_preset(preset).kv_cache.spec()
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, KV_HEADS, context, HEAD_DIM, generator=gen).to(torch.bfloat16) for _ in range(2))
    layer = PackedLayer(spec)
    layer.store(k, v)
    q = torch.randn(1, HEADS, 1, HEAD_DIM, generator=gen).to(torch.bfloat16)
    packed = (layer.packed_keys, layer.packed_values)

    def step() -> None:
        packed_attention(q, spec, (layer.sink_keys, layer.sink_values), packed,
                         (layer.recent_keys, layer.recent_values), None, HEAD_DIM**-0.5)

    return {"cache": preset, "context": context, "ms": median_ms(step, repeats), "bytes": layer.nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_flags(parser, RESULTS, rows=None, data=False)
    parser.add_argument("--contexts", type=int, nargs="*", default=[2048, 8192, 32768])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    readme = args.results.resolve() == RESULTS.resolve()  # a check's file is printed, not rendered
    if args.tables_only:
        saved = json.loads(args.results.read_text())
    else:
        rows = []
        for context in args.contexts:
            rows += [dense_row(context, torch.bfloat16, args.repeats), dense_row(context, torch.float32, args.repeats)]
            rows += [packed_row(p, context, args.repeats) for p in PRESETS]
            print(f"context {context}: " + ", ".join(f"{r['cache']} {r['ms']:.2f} ms" for r in rows[-7:]), flush=True)
        saved = {"meta": run_meta("python benchmarks/kv_speed.py"), "rows": rows}  # one run: rows side by side
        write_json_atomic(args.results, saved)
    write_table(saved, readme)


def write_table(saved: dict, readme: bool = True) -> None:
    """The KVSPEED block of benchmarks/README.md (printed only unless ``readme``)."""
    rows, meta = saved["rows"], saved["meta"]
    lines = [f"One layer (9 query heads, 3 KV heads, head_dim 64), one decode step, {meta['threads']} CPU threads, "
             f"{meta['date']}; `python benchmarks/kv_speed.py`.", ""]
    cells = []
    for context in sorted({r["context"] for r in rows}):
        here = [r for r in rows if r["context"] == context]
        base = next(r for r in here if r["cache"] == "dense bfloat16")
        cells += [[str(context), r["cache"], f"{r['bytes'] / 2**20:.2f} MiB", f"{r['bytes'] / base['bytes']:.3f}×",
                   f"{r['ms']:.2f}", f"{r['ms'] / base['ms']:.2f}×"] for r in here]
    lines += markdown_table(["context", "cache", "KV bytes", "vs dense bf16", "ms per step", "vs dense bf16"], cells)
    write_block("KVSPEED", lines, readme)


if __name__ == "__main__":
    main()
