"""Exported files scored by the program that runs them: lowbit's compressed-tensors exports loaded by plain transformers.

Run:  python benchmarks/export.py                      (w4a16-rtn-g64; a few minutes on 2 CPU cores)
      python benchmarks/export.py --rows ct:w4a16-gptq  (GPTQ: about 8 more minutes)
      python benchmarks/export.py --rows llmcompressor:w4a16-g64  (llm-compressor's export of the same job)
      python benchmarks/export.py --tables-only
      python benchmarks/export.py --keep DIR --force     (keep the folders; then benchmarks/vllm_check.py on a GPU)
Writes benchmarks/results/export.json and the table between the EXPORT_CT markers in benchmarks/README.md.

Each row quantizes the default model with a recipe (scored by lowbit against full precision, as every table here),
writes it with :func:`lowbit.export.compressed.write_compressed_tensors`, and scores the folder in a separate process
that cannot import lowbit (``_ct_loader.py``: transformers + compressed-tensors only) on the same windows: its
perplexity, the largest difference of a token's negative log-likelihood from lowbit's fake-quant model and the
arg-max agreement with it, the checkpoint size and transformers' load time. llm-compressor's export of the same
scheme (row ``llmcompressor:w4a16-g64``: its ``GPTQModifier`` W4A16, groups of 64, on the calibration tokens of
lowbit's ``w4a16-gptq``, saved with ``save_compressed=True``) is made in the peer environment of
``peers.py`` (created on first use) and scored the same way.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from harness import HERE, Bench, Results, add_flags, data_config, markdown_table, num, run_meta, write_block

from lowbit.export.compressed import check_recipe, write_compressed_tensors
from lowbit.recipe import load_recipe

RESULTS = HERE / "results" / "export.json"
LOADER = HERE / "_ct_loader.py"
ROWS = {"ct:w4a16-rtn-g64": "w4a16-rtn-g64", "ct:w4a16-gptq": "w4a16-gptq"}
PEER_ROW, PEER_LOWBIT = "llmcompressor:w4a16-g64", "w4a16-gptq"  # llm-compressor's export of lowbit's w4a16-gptq job
DEFAULT_ROWS = ["ct:w4a16-rtn-g64"]


def _token_nll(model: torch.nn.Module, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window next-token NLLs and arg-max tokens of ``model`` (computed as the loader computes them)."""
    nll, top1 = [], []
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0, :-1].float(), dim=-1)
            nll.append(-logp.gather(-1, w[1:, None])[:, 0])
            top1.append(logp.argmax(-1))
    return torch.stack(nll), torch.stack(top1)


def _score_folder(folder: Path, bench: Bench, tmp: Path) -> tuple[dict, dict]:
    """Score a compressed-tensors folder with transformers in a process that cannot import lowbit: the row's
    fields and the raw per-token NLLs / arg-maxes."""
    torch.save(bench.windows, tmp / "windows.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    subprocess.run([sys.executable, str(LOADER), str(folder), str(tmp / "windows.pt"), str(tmp / "scored.pt")],
                   check=True, env=env, cwd=tmp)
    got = torch.load(tmp / "scored.pt")
    if got["lowbit_imported"]:
        raise SystemExit("the transformers loader imported lowbit: its score would not be independent")
    return {"transformers_ppl": math.exp(got["nll"].mean().item()), "dequantize": got["dequantize"],
            "load_s": got["load_s"], "transformers_eval_s": got["eval_s"],
            "bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors"))}, got


def _score_export(model: torch.nn.Module, bench: Bench, tmp: Path) -> dict:
    """Export ``model``, score the folder with transformers (no lowbit) and compare with lowbit's own tokens."""
    folder = write_compressed_tensors(model, tmp / "export", tokenizer=bench.loaded.tokenizer)
    row, got = _score_folder(folder, bench, tmp)
    nll, top1 = _token_nll(model, bench.windows)
    return {**row, "lowbit_token_ppl": math.exp(nll.mean().item()),
            "max_nll_diff": (got["nll"] - nll).abs().max().item(),
            "top1_agreement": (got["top1"] == top1).float().mean().item()}


def measure_peer(bench: Bench) -> dict:
    """llm-compressor's W4A16 export (GPTQModifier, groups of 64, ``save_compressed=True``) made in the peer venv
    on the calibration tokens lowbit's ``w4a16-gptq`` row gets, scored the same way as lowbit's folders."""
    import peers as peer

    calibration = load_recipe(PEER_LOWBIT).calibration
    settings = {"calib_samples": calibration.samples, "calib_seq_len": calibration.seq_len, "layers": None}
    versions = peer.ensure_venv(peer.LLMCOMPRESSOR.venv)
    with tempfile.TemporaryDirectory(prefix="lowbit-ct-peer-") as tmp:
        tmp = Path(tmp)
        peer.save_data(bench.data, settings, tmp / "data.pt")
        folder = tmp / "peer-export"
        run = SimpleNamespace(peer_actorder="static", verbose=False)
        row = peer.run_peer(peer.JOBS["w4a16-g64"], peer.LLMCOMPRESSOR.venv, peer.model_folder(bench.loaded.source),
                            tmp / "data.pt", settings, run, extra=("--save", str(folder)))
        if "error" in row:
            raise SystemExit(f"llm-compressor's job failed: {row['error']}")
        row["export"], _ = _score_folder(folder, bench, tmp)
    return {**row, "peer_versions": versions}


def measure(bench: Bench, label: str, keep: Path | None) -> dict:
    recipe = load_recipe(ROWS[label])
    check_recipe(recipe)
    with tempfile.TemporaryDirectory(prefix="lowbit-ct-") as tmp:
        row = bench.measure(recipe, extra=lambda model: {"export": _score_export(model, bench, Path(tmp))})
        if keep is not None:  # the folder and windows for vllm_check.py on a GPU machine
            keep.mkdir(parents=True, exist_ok=True)
            shutil.move(Path(tmp) / "export", keep / label.replace(":", "-"))
            shutil.copy(Path(tmp) / "windows.pt", keep / "windows.pt")
    return row


def _versions() -> dict:
    import compressed_tensors
    import transformers

    return {"transformers": transformers.__version__, "compressed_tensors": compressed_tensors.__version__}


def table(results: Results) -> list[str]:
    m = results.meta
    intro = (f"Default model (SmolLM2-135M-Instruct, fp32), default text, {m.get('windows')} windows × "
             f"{m.get('seq_len')} tokens, {m.get('threads')} CPU threads, torch {m.get('torch')}, transformers "
             f"{m.get('transformers')} + compressed-tensors {m.get('compressed_tensors')} in a process without lowbit, "
             f"{m.get('date')}.")
    rows = []
    for label, r in results.rows.items():
        e = r["export"]
        if label == PEER_ROW:
            v = r.get("peer_versions", {})
            rows.append([f"llm-compressor {v.get('llmcompressor', '')} W4A16 g64 (GPTQModifier, save_compressed)",
                         num(r["fp_ppl"]), f"{num(r['ppl'])} (in memory)", num(e["transformers_ppl"]), "-", "-",
                         f"{e['bytes'] / 1e6:.1f}", f"{e['load_s']:.1f}"])
            continue
        rows.append([f"lowbit `{ROWS[label]}` -> compressed-tensors", num(r["fp_ppl"]), num(r["ppl"]),
                     num(e["transformers_ppl"]), f"{e['max_nll_diff']:.2g}", f"{e['top1_agreement']:.4f}",
                     f"{e['bytes'] / 1e6:.1f}", f"{e['load_s']:.1f}"])
    if PEER_ROW not in results.rows:
        rows.append(["llm-compressor W4A16 (GPTQModifier, save_compressed)", "-", "-", "not measured yet (needs the "
                     "peer venv of peers.py)", "-", "-", "-", "-"])
    header = ["export", "fp ppl", "ppl (the tool's model)", "ppl (transformers, from the folder)",
              "max abs NLL diff", "top-1 = lowbit", "safetensors MB", "load s"]
    return [intro, "", *markdown_table(header, rows)]


def main() -> None:
    parser = add_flags(argparse.ArgumentParser(description=__doc__.split("\n")[0]), RESULTS)
    parser.add_argument("--keep", type=Path, help="keep each export (and the windows) in this folder, e.g. for "
                        "vllm_check.py on a GPU machine")
    args = parser.parse_args()
    results = Results(args.results, parser.get_default("results"))
    labels = args.rows or DEFAULT_ROWS
    unknown = set(labels) - set(ROWS) - {PEER_ROW}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; rows: {[*ROWS, PEER_ROW]}")
    todo = results.todo(labels, args.force)
    if todo and not args.tables_only:
        bench = Bench.load(args.model, data_config(args))
        results.check_setup(bench.setup())
        results.meta.update(run_meta("python benchmarks/export.py " + " ".join(sys.argv[1:]), bench), **_versions())
        for label in todo:
            row = measure_peer(bench) if label == PEER_ROW else measure(bench, label, args.keep)
            results.put(label, row)
            print(f"{label}: ppl {row['ppl']:.4f}, transformers ppl {row['export']['transformers_ppl']:.4f}",
                  flush=True)
    write_block("EXPORT_CT", table(results), write=results.renders and bool(results.rows))


if __name__ == "__main__":
    main()
