"""GGUF files scored by llama.cpp itself: lowbit's Q4_0 / Q8_0 exports against llama.cpp's own quantizer.

Run:  python benchmarks/llamacpp.py                              (default model; GPTQ makes it tens of minutes)
      python benchmarks/llamacpp.py --model qwen2.5-coder-0.5b   (the Qwen2-family model; its own results file)
      python benchmarks/llamacpp.py --tables-only
Needs a virtual environment with llama-cpp-python (it compiles llama.cpp, 10-20 minutes on 2 cores; never in CI):
      python -m venv /work/venvs/llamacpp
      CMAKE_ARGS="-DGGML_NATIVE=ON" /work/venvs/llamacpp/bin/pip install llama-cpp-python numpy
Writes benchmarks/results/llamacpp-<model>.json and the table between the LLAMACPP markers in benchmarks/README.md.

One run, one model, the same windows for every file. lowbit writes the model as loaded in F32 (the reference);
llama.cpp's quantizer (``llama_model_quantize``, what ``llama-quantize`` runs; no importance matrix) makes its
Q8_0, Q4_0, Q4_1 and Q4_K_M from that file; lowbit quantizes the same model with its ``gguf-*`` presets and writes
its own codes (:func:`lowbit.export.gguf.write_gguf`). Every file is then scored by ``_llamacpp_worker.py`` in the
llama.cpp venv (no lowbit there): perplexity from llama.cpp's logits, KL from and top-1 agreement with the F32
file's logits, prefill and batch-1 decode speed. lowbit's own perplexity of its fake-quant model is shown beside.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from harness import (
    HERE,
    Bench,
    Results,
    add_flags,
    data_config,
    markdown_table,
    model_file_name,
    num,
    run_meta,
    write_block,
)

import lowbit
from lowbit.bench import decode, prefill_seconds
from lowbit.export.gguf import write_gguf
from lowbit.export.gguf_job import source_gguf
from lowbit.recipe import load_recipe

WORKER = HERE / "_llamacpp_worker.py"
VENV = Path("/work/venvs/llamacpp")
PEERS = {"llama.cpp Q8_0": "Q8_0", "llama.cpp Q4_0": "Q4_0", "llama.cpp Q4_1": "Q4_1", "llama.cpp Q4_K_M": "Q4_K_M"}
Q4_0_GRID = load_recipe("gguf-q4_0").weights.model_dump()  # the preset's own Q4_0 scheme, for a Q4_0 table
LOWBIT = {  # label: (--lowbit name, preset, recipe changes, GGUF type)
    "lowbit Q8_0 (QuaRot R1/R2 + GPTQ)": ("q8_0", "gguf-q8_0", {}, "Q8_0"),
    "lowbit Q8_0 (GPTQ, no rotation)": ("q8_0-norot", "gguf-q8_0", {"steps": [{"method": "gptq"}]}, "Q8_0"),
    "lowbit Q4_0 (GPTQ, no rotation)": ("q4_0", "gguf-q4_0", {"steps": [{"method": "gptq"}]}, "Q4_0"),
    "lowbit Q4_0 (QuaRot R1/R2 + GPTQ, Q8_0 table)": ("q4_0-quarot-q8table", "gguf-q4_0", {}, "Q4_0"),
    "lowbit Q4_0 (QuaRot R1/R2 + GPTQ, Q4_0 table)": ("q4_0-quarot-q4table", "gguf-q4_0", {"embeddings": Q4_0_GRID},
                                                      "Q4_0"),
}
REFERENCE = "F32 (lowbit, unquantized)"
ROWS = [REFERENCE, *PEERS, *LOWBIT]


def results_path(model: str) -> Path:
    return HERE / "results" / f"llamacpp-{model_file_name(model)}.json"


def _worker(python: Path, log: Path, *args: str) -> None:
    """Run the llama.cpp side; its (verbose) output goes to ``log``."""
    with open(log, "a") as out:
        subprocess.run([str(python), str(WORKER), *args], check=True, cwd=HERE, stdout=out, stderr=subprocess.STDOUT)


def runtime_speed(model, seq_len: int) -> dict:
    """lowbit's (PyTorch's) own prefill of one window (median of 3) and batch-1 decode of 128 tokens after 512 (one
    timed run after a warm-up: group-wise int8 tables dequantize per call and decode slowly), on ``model``."""
    return {"runtime_prefill_tok_s": seq_len / prefill_seconds(model, seq_len, 3),
            "runtime_decode_tok_s": decode(model, 512, 128, 1, 1)["tokens_per_s"]}


def _export_and_run(model, path: Path, kind: str, tokenizer, vocab: Path | None, folder: Path, seq_len: int,
                    speed) -> dict:
    """Write the GGUF; save the model with lowbit and time its real kernels (lean load) on the same work."""
    info = {"bytes": write_gguf(model, path, kind, tokenizer=tokenizer, vocab_gguf=vocab).stat().st_size}
    saved = folder / (path.stem + "-lowbit")
    lowbit.save(model, saved, tokenizer=tokenizer)
    return {**info, **speed(lowbit.load(saved, lean=True), seq_len)}


def make_files(bench: Bench, folder: Path, python: Path, args: argparse.Namespace) -> tuple[dict[str, Path], dict]:
    """Every row's GGUF file in ``folder`` and lowbit's own scores of its quantized models (``args.rtn``: RTN in
    place of GPTQ, to check the pipeline quickly; ``args.lowbit``: which of lowbit's rows; ``args.no_runtime``: skip
    lowbit's runtime speed)."""
    threads = args.threads
    speed = (lambda model, seq_len: {}) if args.no_runtime else runtime_speed
    vocab = source_gguf(bench.loaded.source)
    tokenizer = bench.loaded.tokenizer
    files = {REFERENCE: write_gguf(bench.model, folder / "f32.gguf", "F32", tokenizer=tokenizer, vocab_gguf=vocab)}
    seq_len = int(bench.windows.shape[1])
    bf16 = lowbit.load_model(bench.loaded.source, dtype=torch.bfloat16).model
    own = {REFERENCE: {**speed(bench.model, seq_len), "bf16": speed(bf16, seq_len)}}
    for label, kind in PEERS.items():
        if kind not in args.peers:
            continue
        files[label] = folder / f"llamacpp-{kind}.gguf"
        _worker(python, folder / "llamacpp.log", "quantize", str(files[REFERENCE]), str(files[label]), kind,
                str(threads))
    for i, (label, (name, preset, changes, kind)) in enumerate(LOWBIT.items()):
        if name not in args.lowbit:
            continue
        recipe = load_recipe(preset).updated(**changes) if changes else load_recipe(preset)
        if args.rtn:
            recipe = recipe.updated(steps=[s.model_dump() if s.method != "gptq" else {"method": "rtn"}
                                           for s in recipe.steps])
        files[label] = folder / f"lowbit-{i}-{kind}.gguf"
        own[label] = bench.measure(recipe, extra=lambda model, path=files[label], kind=kind: _export_and_run(
            model, path, kind, tokenizer, vocab, folder, seq_len, speed))
        print(f"{label}: lowbit ppl {own[label]['ppl']:.4f} in {own[label]['quantize_s']:.0f} s", flush=True)
        own[REFERENCE]["ppl"] = own[label]["fp_ppl"]  # lowbit's own full-precision perplexity on these windows
    return files, own


def score(files: dict[str, Path], bench: Bench, folder: Path, python: Path, threads: int) -> dict[str, dict]:
    """llama.cpp's perplexity, KL / top-1 against the reference file and speed, per row."""
    np.save(folder / "windows.npy", bench.windows.numpy().astype(np.int32))
    out = folder / "scored.json"
    _worker(python, folder / "llamacpp.log", "score", str(out), str(folder / "windows.npy"), str(threads),
            *(str(files[r]) for r in ROWS if r in files))
    got = json.loads(out.read_text())
    rows = {}
    for label in (r for r in ROWS if r in files):
        g = got[str(files[label])]
        nll = np.asarray(g["nll"], dtype=np.float64)
        rows[label] = {"ppl": math.exp(nll.mean()), "kl": float(np.mean(g["kl_vs_ref"])),
                       "top1": float(np.mean(g["top1_vs_ref"])), "bytes": files[label].stat().st_size, **g["speed"],
                       "llama_cpp": got["llama_cpp_version"]}
    return rows


def table(results: Results, model: str) -> list[str]:
    m, rows = results.meta, results.rows
    intro = (f"**{model}** ({m.get('source_format')}), {m.get('windows')} windows × {m.get('seq_len')} tokens of the "
             f"default text, llama-cpp-python {m.get('llama_cpp')} built here, {m.get('threads')} threads, "
             f"{m.get('date')}. Perplexity, KL and top-1 from llama.cpp's logits; speed: llama.cpp, batch 1, prefill "
             "of one window, decode of 128 tokens after 512 (llama.cpp's files in llama.cpp; the same models in "
             "lowbit's runtime, loaded lean from a lowbit save: real kernels; the reference row is PyTorch fp32, "
             "bf16 beside).")
    ref = rows[REFERENCE]["ppl"]
    q4 = rows.get("llama.cpp Q4_0", {}).get("ppl")
    out = []
    for label in ROWS:
        r = rows.get(label)
        if r is None:
            continue
        closed = "-"
        if q4 is not None and label.startswith("lowbit Q4_0"):
            closed = f"{(q4 - r['ppl']) / (q4 - ref):.0%}"
        out.append([label, f"{r['bytes'] / 1e6:.1f}", num(r["ppl"]), f"{r['ppl'] / ref:.4f}", f"{r['kl']:.4f}",
                    f"{r['top1']:.4f}", closed, num(r["lowbit_ppl"]) if "lowbit_ppl" in r else "-",
                    f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}", _runtime(r)])
    header = ["file", "MB", "ppl (llama.cpp)", "x F32", "KL vs F32", "top-1 = F32", "Q4_0 gap closed",
              "ppl (lowbit's model)", "llama.cpp prefill tok/s", "llama.cpp decode tok/s",
              "lowbit runtime prefill / decode tok/s"]
    return [intro, "", *markdown_table(header, out)]


def _runtime(r: dict) -> str:
    """lowbit's own runtime on the row's model (the reference: fp32, and bf16 after the slash pair)."""
    if "runtime_prefill_tok_s" not in r:
        return "-"
    text = f"{r['runtime_prefill_tok_s']:.0f} / {r['runtime_decode_tok_s']:.1f}"
    if "bf16" in r:
        text += f" (bf16: {r['bf16']['runtime_prefill_tok_s']:.0f} / {r['bf16']['runtime_decode_tok_s']:.1f})"
    return text


def main() -> None:
    parser = add_flags(argparse.ArgumentParser(description=__doc__.split("\n")[0]), None, rows=None)
    parser.add_argument("--venv", type=Path, default=VENV, help="virtual environment with llama-cpp-python")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--keep", type=Path, help="keep the GGUF files and windows in this (new) folder")
    parser.add_argument("--rtn", action="store_true", help="RTN instead of GPTQ in lowbit's rows: a quick check of "
                        "the pipeline (pass --results elsewhere; not a result)")
    names = [name for name, *_ in LOWBIT.values()]
    parser.add_argument("--lowbit", nargs="*", choices=names, default=names, help="lowbit's rows (default: all)")
    parser.add_argument("--peers", nargs="*", choices=list(PEERS.values()), default=list(PEERS.values()),
                        help="llama.cpp's own quantizations to make and score (default: all)")
    parser.add_argument("--no-runtime", action="store_true", help="skip lowbit's runtime speed columns")
    parser.add_argument("--results", type=Path, help="results file (default benchmarks/results/llamacpp-MODEL.json; "
                        "another file is printed, not written to the README)")
    args = parser.parse_args()
    results = Results(args.results or results_path(args.model), results_path(args.model))
    if not args.tables_only:
        python = args.venv / "bin" / "python"
        if not python.is_file():
            raise SystemExit(f"no Python at {python}: build llama-cpp-python into a venv (see this file's docstring)")
        bench = Bench.load(args.model, data_config(args))
        results.check_setup(bench.setup())
        results.meta.update(run_meta("python benchmarks/llamacpp.py " + " ".join(sys.argv[1:]), bench))
        results.meta["source_format"] = _source_format(bench)
        with tempfile.TemporaryDirectory(prefix="lowbit-llamacpp-") as tmp:
            folder = args.keep or Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            files, own = make_files(bench, folder, python, args)
            for label, row in score(files, bench, folder, python, args.threads).items():
                mine = own.get(label, {})
                runtime = {k: v for k, v in mine.items() if (k.startswith("runtime_") or k == "bf16") and v}
                if not runtime:  # --no-runtime: keep the lowbit-runtime columns an earlier run measured for it
                    runtime = {k: v for k, v in results.rows.get(label, {}).items()
                               if k.startswith("runtime_") or k == "bf16"}
                row.update(runtime)
                if "ppl" in mine:
                    row.update(lowbit_ppl=mine["ppl"], lowbit=mine)
                results.put(label, row)
        results.meta["llama_cpp"] = results.rows[REFERENCE]["llama_cpp"]
        results.save()
    if not results.renders:
        print("\n".join(table(results, args.model)))
        return
    blocks = [table(Results(p), p.stem.removeprefix("llamacpp-")) for p in sorted(HERE.glob("results/llamacpp-*.json"))]
    write_block("LLAMACPP", [line for block in blocks for line in [*block, ""]][:-1])


def _source_format(bench: Bench) -> str:
    """Which file the "full precision" came from (both real models ship as quantized GGUFs)."""
    import gguf

    path = source_gguf(bench.loaded.source)
    if path is None:
        return "a Hugging Face folder"
    kinds = {}
    for t in gguf.GGUFReader(path).tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + int(t.n_elements)
    total = sum(kinds.values())
    mix = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    return f"dequantized from {path.name}: {mix} of its weights"


if __name__ == "__main__":
    main()
