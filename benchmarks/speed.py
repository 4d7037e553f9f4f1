"""Speed, memory and size of saved quantized models against the same model in float32 and bfloat16, in one run.

Run:  python benchmarks/speed.py                 (default model, 2 threads; resumes where it stopped)
      python benchmarks/speed.py --rows w8a8 fp32 bf16 --force
      python benchmarks/speed.py --tables-only
      python benchmarks/speed.py --model qwen2.5-coder-0.5b   (results/speed-qwen2.5-coder-0.5b.json, its own table
                                                             under the default model's)

Each quantized row quantizes the model (``--model``, default the embedded one; calibrated on the default text), saves it with ``lowbit.save`` and
loads it back with ``lowbit.load(..., lean=True)`` (real low-bit kernels, as ``lowbit bench`` runs them); the float
rows load the source model. Every model is measured with the functions of ``lowbit bench`` (:mod:`lowbit.bench`):
prefill of ``--prefill`` tokens at batch 1 (one forward: online Hadamards, activation quantization and a PrefixQuant
prefix included), decode of ``--new-tokens`` greedy tokens after a ``--prompt``-token prompt at batch 1 and 8,
resident bytes per part after loading (kernel layouts included), file size, and the peak resident memory of a fresh
process while it loads. Rows whose speed does not depend on how the weights were chosen use the RTN variant of a
preset (the same modules and kernels: GPTQ or fine-tuning only change the codes); the label says which preset's
structure it measures. The share of prefill time in online Hadamards is measured by timing the same forward with the
rotations replaced by identity. Results in
results/speed.json; the table goes between the SPEED markers of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from contextlib import contextmanager

import torch
from harness import (
    HERE,
    SECOND_MODEL,
    SECOND_MODEL_NAME,
    Results,
    add_flags,
    check_labels,
    command_line,
    markdown_table,
    model_file_name,
    model_results,
    results_paths,
    run_meta,
    variant,
    write_block,
)

import lowbit
from lowbit import bench as B
from lowbit.artifact import load, read_manifest, save
from lowbit.models.loading import cache_dir, load_model
from lowbit.recipe import Recipe, load_preset
from lowbit.surgery.rotate import OnlineRotation

RESULTS = HERE / "results" / "speed.json"


def _static_prefix() -> Recipe:
    """w4a4kv4-prefix's modules (R1-R4, prefix, static A4 per tensor, KV4 per head) without its slow searches."""
    def edit(data: dict) -> None:
        for step in data["steps"]:
            if step["method"] == "blockwise":
                step.update(epochs=0, grid=False)
    return variant("w4a4kv4-prefix", edit)


ROWS: list[tuple[str, str, Callable[[], Recipe] | None]] = [
    ("fp32", "the source model in float32", None),
    ("bf16", "the source model in bfloat16", None),
    ("w8a8", "w8a8-rtn: int8 weights per channel x int8 per-token activations", lambda: load_preset("w8a8-rtn")),
    ("w8a8-fp8", "w8a8-fp8: fp8 e4m3 weights and activations", lambda: load_preset("w8a8-fp8")),
    ("w4a16 g64", "w4a16-rtn-g64 (w4a16-gptq's kernel): int4 weights in groups of 64", lambda: load_preset("w4a16-rtn-g64")),
    ("w4a4kv4 dynamic", "w4a4kv4-quarot-rtn (w4a4kv4-quarot's modules): R1-R4, per-token A4, KV4",
     lambda: load_preset("w4a4kv4-quarot-rtn")),
    ("w4a4kv4 dynamic packed",
     "the same saved model loaded with packed=True: int4 codes two per byte, unpacked per call",
     lambda: load_preset("w4a4kv4-quarot-rtn")),
    ("w4a4kv4 static prefix", "w4a4kv4-prefix's modules: R1-R4, prefix, static per-tensor A4, static KV4",
     _static_prefix),
    ("kv-turbo3", "kv-turbo3: float weights, packed 3-bit KV cache", lambda: load_preset("kv-turbo3")),
]


PACKED = {"w4a4kv4 dynamic packed": "w4a4kv4 dynamic"}
"""Rows that load another row's saved model with ``lowbit.load(..., packed=True)``."""


def saved_model(label: str, recipe: Recipe, source: str) -> str:
    """The row's quantized model saved under the lowbit cache (reused when its recipe is unchanged)."""
    folder = cache_dir() / "speed" / ("" if source == "default" else model_file_name(source)) / label.replace(" ", "-")
    if folder.is_dir():
        manifest = read_manifest(folder)
        if manifest["recipe"] == recipe.model_dump(mode="json") and manifest.get("source") == source:
            return str(folder)
        shutil.rmtree(folder)
    loaded = load_model(source)
    data = lowbit.prepare_data(lowbit.DataConfig(seq_len=512, windows=1), loaded.tokenizer)
    save(lowbit.quantize(loaded.model, recipe, data), folder, loaded.tokenizer, source=source)
    return str(folder)


@contextmanager
def rotations_off(model: torch.nn.Module):
    """Online rotations pass their input through (timing only: the outputs are wrong meanwhile)."""
    rotations = [m for m in model.modules() if isinstance(m, OnlineRotation)]
    saved = [m.forward for m in rotations]
    for m in rotations:
        m.forward = lambda x: x
    try:
        yield len(rotations)
    finally:
        for m, forward in zip(rotations, saved):
            m.forward = forward


def measure(model: torch.nn.Module, args, folder: str | None, packed: bool = False) -> dict:
    prefill_s = B.prefill_seconds(model, args.prefill, args.repeats)
    row = {"prefill_tokens_per_s": args.prefill / prefill_s}
    with rotations_off(model) as n:
        if n:
            row["hadamard_share"] = 1 - B.prefill_seconds(model, args.prefill, args.repeats) / prefill_s
    for b in (1, 8):
        d = B.decode(model, args.prompt, args.new_tokens, b, args.repeats)
        row[f"decode_b{b}_tokens_per_s"], row[f"cache_b{b}_bytes"] = d["tokens_per_s"], d["cache_bytes"]
    row["resident_bytes"] = B.resident_bytes(model)
    row["profile"] = B.decode_profile(model)
    if folder is not None:
        manifest = read_manifest(folder)
        row["file_bytes"] = sum(f["bytes"] for f in manifest["files"].values())
        row["load_memory"] = B.load_memory(folder, packed=packed)
        row["bits"] = manifest["bits"]
    return row


def run(args, results: Results, labels: list[str]) -> None:
    recipes = {label: factory for label, _, factory in ROWS}
    for label in labels:
        factory = recipes[label]
        if factory is None:
            dtype = torch.float32 if label == "fp32" else torch.bfloat16
            row = measure(load_model(args.model, dtype=dtype).model, args, None)
        else:
            packed = label in PACKED
            folder = saved_model(PACKED.get(label, label), factory(), args.model)
            row = measure(load(folder, lean=True, packed=packed), args, folder, packed)
        results.put(label, {"label": label, **row})
        print(f"{label}: prefill {row['prefill_tokens_per_s']:.0f} tok/s, decode b1 "
              f"{row['decode_b1_tokens_per_s']:.1f} tok/s", flush=True)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def table(results: Results, name: str = "Default model") -> list[str]:
    rows = results.rows
    fp32, bf16 = results.rows.get("fp32"), results.rows.get("bf16")

    def linears(row: dict) -> int:
        return row["resident_bytes"].get("quantized linears", 0) + row["resident_bytes"].get("other linears", 0)

    def speed(row: dict, key: str) -> str:
        ratios = " / ".join(f"{row[key] / r[key]:.2f}x" for r in (fp32, bf16) if r is not None)
        return f"{row[key]:.1f} ({ratios})"

    setup = results.meta.get("setup", {})
    shapes = (f"prefill {setup['prefill']} tokens, decode {setup['new_tokens']} tokens after a {setup['prompt']}-token "
              "prompt, batch 1 and 8; " if setup else "")
    lines = [f"{name}, {results.meta.get('threads')} threads, torch {results.meta.get('torch')}, "
             f"{results.meta.get('date')}, `{results.meta.get('command')}`; {shapes}tokens/s (speed-up over fp32 / "
             "bf16)."]
    body = []
    for label, what, _ in ROWS:
        if label not in rows:
            continue
        r = rows[label]
        parts = r["resident_bytes"]
        body.append([label, speed(r, "prefill_tokens_per_s"), speed(r, "decode_b1_tokens_per_s"),
                     speed(r, "decode_b8_tokens_per_s"),
                     f"{r['hadamard_share']:.0%}" if "hadamard_share" in r else "-",
                     _mib(linears(r)) + (f" ({linears(r) / linears(bf16):.2f}x)" if bf16 else ""),
                     _mib(sum(parts.values())), _mib(r["file_bytes"]) if "file_bytes" in r else "-",
                     f"{r['load_memory']['peak_load_mib']:.0f}" if "load_memory" in r else "-",
                     ", ".join(f"{p['op'].removeprefix('aten::')} {p['share']:.0%}" for p in r["profile"][:3])])
    header = ["row", "prefill tok/s", "decode b1 tok/s", "decode b8 tok/s", "Hadamard share of prefill",
              "linears MiB (vs bf16)", "resident MiB", "file MiB", "load peak MiB", "decode step: top ops"]
    return lines + [""] + markdown_table(header, body)


def main() -> None:
    parser = add_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]), RESULTS, data=False)
    parser.add_argument("--model", default="default", help="model source as lowbit.load_model takes it")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = Results(*results_paths(args, parser.get_default("results")))
    todo = results.todo(check_labels(parser, args.rows, [label for label, _, _ in ROWS]), args.force)
    if todo and not args.tables_only:
        setup = {"model": args.model, "prefill": args.prefill, "prompt": args.prompt, "new_tokens": args.new_tokens}
        results.check_setup(setup)
        command = command_line("python benchmarks/speed.py", args, parser, ("prefill", "prompt", "new_tokens", "repeats"))
        results.meta.update(run_meta(command))
        run(args, results, todo)
    if results.renders:
        write_tables()
    else:
        print("\n".join(table(results, args.model)))


def write_tables() -> None:
    """The SPEED block of benchmarks/README.md: the default model's table, then the second real model's where its
    file has rows."""
    lines = table(Results(RESULTS))
    second = Results(model_results(RESULTS, SECOND_MODEL))
    if second.rows:
        lines += ["", *table(second, SECOND_MODEL_NAME)]
    write_block("SPEED", lines)


if __name__ == "__main__":
    main()
