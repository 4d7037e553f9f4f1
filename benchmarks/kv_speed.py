"""Decode-step attention over a packed KV cache against a dense cache: bytes held and time per token.

Run:  python benchmarks/kv_speed.py         (a few minutes on 2 CPU cores; run it on a quiet machine)
Writes results/kv_speed.json and the table between the KVSPEED markers in benchmarks/README.md.

One decoder layer of the default model's shape (9 query heads, 3 KV heads, head_dim 64) decodes one token against a
cache of 2k, 8k and 32k random tokens: the dense cache in bfloat16 and float32 through torch's scaled-dot-product
attention, and each packed preset through lowbit's attention over the packed form (exact sink and window stored in
bfloat16). Times are medians of repeated calls, measured side by side in one run; multiply by the model's 30 layers
for the attention share of a decode step (the linear layers cost the same with any cache).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hadamard import median_seconds
from presets import replace_block

from lowbit.kv.attend import packed_attention
from lowbit.kv.cache import PackedLayer
from lowbit.recipe import load_preset

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "kv_speed.json"
BEGIN, END = "<!-- KVSPEED:BEGIN -->", "<!-- KVSPEED:END -->"
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
    parser.add_argument("--contexts", type=int, nargs="*", default=[2048, 8192, 32768])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--tables-only", action="store_true")
    args = parser.parse_args()
    if args.tables_only:
        saved = json.loads(RESULTS.read_text())
    else:
        rows = []
        for context in args.contexts:
            rows += [dense_row(context, torch.bfloat16, args.repeats), dense_row(context, torch.float32, args.repeats)]
            rows += [packed_row(p, context, args.repeats) for p in PRESETS]
            print(f"context {context}: " + ", ".join(f"{r['cache']} {r['ms']:.2f} ms" for r in rows[-7:]), flush=True)
        saved = {"meta": {"threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                          "command": "python benchmarks/kv_speed.py"}, "rows": rows}
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(saved, indent=2) + "\n")
    write_table(saved)


def write_table(saved: dict) -> None:
    rows, meta = saved["rows"], saved["meta"]
    lines = [f"One layer (9 query heads, 3 KV heads, head_dim 64), one decode step, {meta['threads']} CPU threads, "
             f"{meta['date']}; `python benchmarks/kv_speed.py`.", "",
             "| context | cache | KV bytes | vs dense bf16 | ms per step | vs dense bf16 |", "|---|---|---|---|---|---|"]
    for context in sorted({r["context"] for r in rows}):
        here = [r for r in rows if r["context"] == context]
        base = next(r for r in here if r["cache"] == "dense bfloat16")
        lines += [f"| {context} | {r['cache']} | {r['bytes'] / 2**20:.2f} MiB | {r['bytes'] / base['bytes']:.3f}× | "
                  f"{r['ms']:.2f} | {r['ms'] / base['ms']:.2f}× |" for r in here]
    replace_block(HERE / "README.md", BEGIN, END, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
