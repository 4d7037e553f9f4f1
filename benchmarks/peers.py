"""Side by side with peers: the same quantization jobs through lowbit, llm-compressor 0.14 and Brevitas 0.13.

Run:  python benchmarks/peers.py            (about 30 minutes a tool on 2 CPU cores)
      python benchmarks/peers.py --tools brevitas --jobs w4a4-rotated   (part of the table)
      python benchmarks/peers.py --smoke    (tiny settings, a minute or two; never touches real results)
      python benchmarks/peers.py --tables-only
Writes benchmarks/results/peers.json and the table between the PEER markers in benchmarks/README.md.

Every tool quantizes the same model (lowbit's default, the GGUF dequantized to fp32) with the same calibration token
samples, and every result is scored by lowbit's own :func:`lowbit.evaluate.evaluate` on the same evaluation windows
against a full-precision copy. lowbit runs in this process. Each peer runs in its own virtual environment (their
pins clash with lowbit's), created on first use under ``~/.cache/lowbit``: a worker script (``_peer_worker.py`` for
llm-compressor, ``_brevitas_worker.py`` for Brevitas) runs there once per job and reports back through a JSON file.
A job that fails on any side is recorded with its error message instead of stopping the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _peer_worker import (
    keep_layers,  # same truncation on both sides (the worker imports only torch at top level)
)
from harness import HERE, Bench, num, step_update, variant, write_block

import lowbit
from lowbit.models.loading import hf_folder
from lowbit.recipe import Recipe
from lowbit.report import write_json_atomic

REPO = HERE.parent
RESULTS = HERE / "results" / "peers.json"
SMOKE_RESULTS = HERE / "results" / "peers-smoke.json"
TORCH_PIN = "torch==2.13.0"  # installed first from the local CPU wheel; a bare torch pulls the CUDA packages
# What importing lowbit needs besides torch and transformers (lowbit itself comes from src/ via PYTHONPATH).
LOWBIT_LIGHT_DEPS = ["safetensors", "pydantic", "pyyaml", "rich", "numpy"]


@dataclass(frozen=True)
class Peer:
    """A peer tool: its virtual environment, the packages pinned there, and the worker script run there per job.

    ``versions`` are the packages whose versions are recorded; ``prefixes`` maps some of them to the version prefix
    that must be installed; ``job_field`` is the attribute of :class:`Job` holding the worker's job description.
    """

    name: str
    title: str
    venv: Path
    pins: tuple[str, ...]
    versions: tuple[str, ...]
    prefixes: dict
    worker: Path
    job_field: str


LLMCOMPRESSOR = Peer(
    "llmcompressor", "llm-compressor", Path.home() / ".cache" / "lowbit" / "peer-llmcompressor-venv",
    ("llmcompressor==0.14.*", "transformers==5.17.*", "gguf", "accelerate"),
    ("torch", "transformers", "llmcompressor", "compressed-tensors", "pydantic", "rich"),
    {"llmcompressor": "0.14", "transformers": "5.17"}, HERE / "_peer_worker.py", "peer")
BREVITAS = Peer(
    "brevitas", "Brevitas", Path.home() / ".cache" / "lowbit" / "peer-brevitas-venv",
    # accelerate 1.16 reads an attribute off every module value when removing hooks, which Brevitas' injector
    # classes answer with an error: its quantized models then fail at the end of quantize_llm.
    ("brevitas[llm]==0.13.4", "accelerate<1.16", "gguf"), ("torch", "transformers", "brevitas", "accelerate"),
    {"brevitas": "0.13", "accelerate": "1.15"},
    HERE / "_brevitas_worker.py", "brevitas")
PEERS = {p.name: p for p in (LLMCOMPRESSOR, BREVITAS)}
TOOLS = ("lowbit", *PEERS)

FULL = {"windows": 6, "seq_len": 2048, "calib_samples": 64, "calib_seq_len": 512, "layers": None}  # None: all
# The GPTQ solver's cost does not shrink with the calibration size, so the smoke run also cuts the model to 2 layers.
SMOKE = {"windows": 1, "seq_len": 256, "calib_samples": 4, "calib_seq_len": 128, "layers": 2}


# --- jobs ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One row pair: a lowbit recipe and the llm-compressor configuration meant to do the same thing.

    ``peer`` is plain data for llm-compressor's worker: ``weights`` / ``activations`` are quantization arguments
    (int, symmetric), ``rotations`` (or None) names SpinQuant-style rotations and the transform type. ``brevitas`` is
    ``{"flags": [...]}``, the command-line flags of Brevitas' LLM entry point for the same job (empty: not run).
    """

    name: str
    description: str
    lowbit_preset: str
    lowbit_changes: dict = field(default_factory=dict)
    lowbit_edits: tuple[Callable[[dict], None], ...] = ()  # edits of the preset's plain-dict form, as rows' variants
    peer: dict = field(default_factory=dict)
    brevitas: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)  # tool -> what differs from the plain description, for the table

    def recipe(self, calib_samples: int, calib_seq_len: int) -> Recipe:
        """The lowbit recipe, its calibration size set to the one the peer gets."""
        base = variant(self.lowbit_preset, *self.lowbit_edits)
        changes = {k: ({**getattr(base, k).model_dump(), **v} if isinstance(v, dict) else v)
                   for k, v in self.lowbit_changes.items()}
        return base.updated(**changes, calibration={"samples": calib_samples, "seq_len": calib_seq_len})


W4_GROUP64 = {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 64}
W4_CHANNEL = {"num_bits": 4, "symmetric": True, "strategy": "channel"}
A4_TOKEN = {"num_bits": 4, "symmetric": True, "strategy": "token", "dynamic": True}
# Brevitas' flags: int4 symmetric weights by GPTQ with act-order (its weight scales are absmax statistics recomputed
# from the weights being updated, no search; its LLM entry point sets narrow_range False: 16 codes [-8, 7] at
# absmax / 8), one decoder layer at a time on cached inputs (its faster GPxQ path; the worker keeps it on the CPU).
B_W4 = ["--weight-bit-width", "4", "--weight-quant-type", "sym", "--gptq", "--gpxq-act-order",
        "--gpxq-block-name", "model.layers"]
B_CHANNEL = [*B_W4, "--weight-quant-granularity", "per_channel"]
# Hadamard R1 fused into the weights (its fused_no_fx path), online Hadamards where none can be fused (the "orphan"
# o_proj and down_proj inputs), A4 symmetric per token, dynamic (Brevitas' own default input quantizer is asym).
B_ROTATED_A4 = [*B_CHANNEL, "--rotation", "fused_no_fx", "--replace-rmsnorm", "--rotation-orphan-sink",
                "--input-bit-width", "4", "--input-quant-type", "sym", "--input-quant-granularity", "per_row",
                "--input-scale-type", "dynamic"]

JOBS = {
    job.name: job
    for job in (
        Job("w4a16-g64", "W4A16 GPTQ, int4 sym, groups of 64, no rotation", "w4a16-gptq",
            peer={"weights": W4_GROUP64},
            brevitas={"flags": [*B_W4, "--weight-quant-granularity", "per_group", "--weight-group-size", "64"]},
            notes={"brevitas": "--gptq --gpxq-act-order, per_group 64, absmax/8 weight scales on [-8, 7]",
                   "lowbit": "preset w4a16-gptq: full 16-level grid, act-order, static groups, MSE weight clip "
                             "search",
                   "llmcompressor": "GPTQModifier, group 64 on Linear, lm_head ignored"}),
        Job("w4a16-channel", "W4A16 GPTQ, int4 sym, per channel, no rotation", "w4a16-gptq",
            lowbit_changes={"name": "w4a16-gptq-channel",
                            "weights": {"granularity": "channel", "group_size": None}},
            peer={"weights": W4_CHANNEL},
            brevitas={"flags": B_CHANNEL},
            notes={"brevitas": "--gptq --gpxq-act-order, per_channel, absmax/8 weight scales on [-8, 7]",
                   "lowbit": "w4a16-gptq with per-channel weights: full 16-level grid, act-order, MSE weight clip "
                             "search",
                   "llmcompressor": "GPTQModifier, channel strategy"}),
        Job("w4a4-rotated", "R1+R2+R4 random Hadamard, W4 per channel GPTQ, A4 per token dynamic, KV 16 bits",
            "w4a4-quarot",
            peer={"weights": W4_CHANNEL, "activations": A4_TOKEN,
                  "rotations": {"rotations": ["R1", "R2", "R4"], "transform_type": "random-hadamard"}},
            brevitas={"flags": B_ROTATED_A4},
            notes={"brevitas": "--rotation fused_no_fx --rotation-orphan-sink (online Hadamards at o_proj and "
                               "down_proj inputs), A4 sym per_row dynamic absmax, then GPTQ",
                   "lowbit": "preset w4a4-quarot: full 16-level W4 grid, MSE weight clip search, A4 clip 0.9",
                   "llmcompressor": "SpinQuantModifier random-hadamard (its plain hadamard needs 2^n sizes), "
                                    "then GPTQModifier"}),
        # Brevitas' w4a4-rotated run already has this placement; llm-compressor has no such rotation: lowbit only.
        Job("w4a4-rotated-o", "w4a4-rotated with an online Hadamard at o_proj's input, where Brevitas' orphan sink "
            "puts one", "w4a4-quarot",
            lowbit_changes={"name": "w4a4-quarot-o"}, lowbit_edits=(step_update("quarot", o_rotation=True),),
            notes={"lowbit": "w4a4-quarot with o_rotation: Brevitas' rotation placement (its row: w4a4-rotated), "
                             "full 16-level W4 grid"}),
    )
}


# --- the peer's virtual environment -------------------------------------------------------------------------------


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _pip(venv: Path, *args: str) -> None:
    cmd = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def peer_versions(venv: Path, packages: tuple[str, ...]) -> dict | None:
    """Installed versions of ``packages`` in the peer venv, or None when it is missing or incomplete."""
    probe = f"import json, importlib.metadata as m; print(json.dumps({{p: m.version(p) for p in {packages!r}}}))"
    if not venv_python(venv).is_file():
        return None
    done = subprocess.run([str(venv_python(venv)), "-c", probe], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else None


def _pins_hold(peer: Peer, versions: dict | None) -> bool:
    return bool(versions) and versions["torch"].split("+")[0] == TORCH_PIN.split("==")[1] \
        and all(versions[name].startswith(prefix) for name, prefix in peer.prefixes.items())


def ensure_venv(venv: Path, peer: Peer = LLMCOMPRESSOR) -> dict:
    """Create (or complete) the peer's venv at ``venv`` and return its package versions.

    torch goes in first, alone, from the local CPU wheel; the rest is installed with torch held by a constraints file
    so that the peer's own torch requirement cannot replace it with a CUDA build.
    """
    versions = peer_versions(venv, peer.versions)
    if _pins_hold(peer, versions):
        return versions
    if not venv_python(venv).is_file():
        print(f"creating the {peer.title} venv at {venv}", flush=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _pip(venv, TORCH_PIN)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write(TORCH_PIN + "\n")
    try:
        _pip(venv, "-c", constraints.name, *peer.pins, *LOWBIT_LIGHT_DEPS)
    finally:
        os.unlink(constraints.name)
    versions = peer_versions(venv, peer.versions)
    if not _pins_hold(peer, versions):
        raise SystemExit(f"the {peer.title} venv at {venv} does not hold the pinned versions: {versions}")
    return versions


# --- running the jobs ---------------------------------------------------------------------------------------------


def model_folder(source: str) -> Path:
    """The Hugging Face folder behind a model source: for a GGUF file, lowbit's converted copy in its cache."""
    return hf_folder(source)


def _row(job: Job, tool: str, **fields) -> dict:
    return {"job": job.name, "tool": tool, "description": job.description, "note": job.notes.get(tool, ""), **fields}


def _scores(result: dict) -> dict:
    """Row fields from an :class:`~lowbit.evaluate.EvalResult` mapping."""
    return {
        "fp_ppl": result["fp_ppl"], "ppl": result["ppl"], "ratio": result["ppl"] / result["fp_ppl"],
        "kl": result["kl_vs_fp"], "top1": result["top1_agreement"], "tokens": result["tokens"],
        "eval_s": result["seconds"],
    }


def run_lowbit(job: Job, bench: Bench, settings: dict) -> dict:
    """Quantize a copy with lowbit (timed end to end, like the peer's oneshot) and evaluate it, the harness's way."""
    recipe = job.recipe(settings["calib_samples"], settings["calib_seq_len"])
    config = recipe.model_dump(mode="json")
    try:
        row = bench.measure(recipe)
    except Exception as exc:  # a failing configuration is a result, not a crash of the benchmark
        return _row(job, "lowbit", error=f"{type(exc).__name__}: {exc}".splitlines()[0], config=config)
    scores = {k: row[k] for k in ("fp_ppl", "ppl", "ratio", "kl", "top1", "tokens", "eval_s")}
    return _row(job, "lowbit", quantize_s=row["quantize_s"], **scores, config=config)


def worker_args(peer: Peer, job: Job, settings: dict, args) -> list[str]:
    """The worker's arguments besides data, model and job: the layer cut and threads, llm-compressor's act-order."""
    layers = ["--layers", str(settings["layers"])] if settings["layers"] is not None else []
    if peer is BREVITAS:
        return [*layers, "--threads", str(args.brevitas_threads or torch.get_num_threads())]
    return ["--actorder", args.peer_actorder, *layers, "--threads", str(torch.get_num_threads())]


def run_peer(job: Job, venv: Path, folder: Path, data_file: Path, settings: dict, args, extra: tuple = (),
             peer: Peer = LLMCOMPRESSOR) -> dict:
    """Run ``peer``'s worker for one job in its venv and turn its JSON answer into a row (``extra``: more worker
    arguments, e.g. ``--save DIR``)."""
    with tempfile.TemporaryDirectory(prefix="lowbit-peer-") as tmp:
        out, log = Path(tmp) / "result.json", Path(tmp) / "worker.log"
        specific = worker_args(peer, job, settings, args)
        cmd = [
            str(venv_python(venv)), str(peer.worker), "--data", str(data_file), "--model-dir", str(folder),
            "--job", json.dumps(getattr(job, peer.job_field)), "--out", str(out), *specific, *extra,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false"}
        with log.open("w") as sink:
            done = subprocess.run(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=tmp)
        answer = json.loads(out.read_text()) if out.is_file() else {}
        if args.verbose or "error" in answer or done.returncode:
            print(log.read_text()[-4000:], flush=True)
    config = {"job": getattr(job, peer.job_field), "worker_args": specific,
              "recipe": answer.get("recipe") or answer.get("argv")}
    if "eval" not in answer:
        error = answer.get("error") or f"worker exited with status {done.returncode} and no result"
        return _row(job, peer.name, error=error, config=config)
    return _row(job, peer.name, quantize_s=answer["quantize_s"], **_scores(answer["eval"]),
                config=config, quantized=answer["quantized"], versions=answer["versions"])


def save_data(data, settings: dict, path: Path) -> None:
    """The evaluation windows and the calibration samples, for the worker: both tools see exactly these tokens."""
    calib = data.calibration(settings["calib_samples"], settings["calib_seq_len"])
    torch.save({"windows": data.eval_windows, "calibration": calib}, path)


def run_all(args, settings: dict, venvs: dict[str, Path], save: Callable[[list[dict]], None]) -> None:
    """Every selected job on every selected tool, in order; prints each row as it lands and ``save``s the rows so
    far after each one (an interrupted run keeps what it measured)."""
    bench = Bench.load(args.model, lowbit.DataConfig(seq_len=settings["seq_len"], windows=settings["windows"]))
    keep_layers(bench.model, settings["layers"])  # before the reference is computed, on first use
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit-peer-data-") as tmp:
        data_file = Path(tmp) / "tokens.pt"
        save_data(bench.data, settings, data_file)
        for name in args.jobs:
            job = JOBS[name]
            for tool in args.tools:
                print(f"--- {name} / {tool}", flush=True)
                if tool == "lowbit":
                    row = run_lowbit(job, bench, settings)
                elif not getattr(job, PEERS[tool].job_field):
                    continue  # the peer has no configuration for this job
                else:
                    row = run_peer(job, venvs[tool], model_folder(args.model), data_file, settings, args,
                                   peer=PEERS[tool])
                row["date"] = time.strftime("%Y-%m-%d")
                rows.append(row)
                save(rows)
                print(_table_row(row), flush=True)
                if "quantized" in row:
                    print(f"    {tool} left on the model: {row['quantized']}", flush=True)


# --- results and tables -------------------------------------------------------------------------------------------


COMPARABLE = ("model", "settings", "peer_actorder", "threads")  # saved rows are kept only when all of these match


def merge(saved: dict | None, rows: list[dict], meta: dict) -> list[dict]:
    """New rows replace saved ones of the same (job, tool) when the run is comparable; ordered as JOBS × TOOLS.

    So ``--jobs`` / ``--tools`` can redo part of the table without losing the rest.
    """
    keep = {}
    if saved and all(saved["meta"].get(k) == meta[k] for k in COMPARABLE):
        keep = {(r["job"], r["tool"]): r for r in saved["rows"]}
    keep.update({(r["job"], r["tool"]): r for r in rows})
    order = {(j, t): i for i, (j, t) in enumerate((j, t) for j in JOBS for t in TOOLS)}
    return sorted(keep.values(), key=lambda r: order.get((r["job"], r["tool"]), len(order)))


def _note(row: dict) -> str:
    """The note column: the failure message when the job failed, else the job's note for that tool."""
    note = f"failed: {row['error']}" if row.get("error") else row.get("note", "")
    return note.replace("|", "\\|").replace("\n", " ")


def _table_row(row: dict) -> str:
    if "ratio" not in row:
        return f"| {row['job']} | {row['tool']} | – | – | – | – | {row.get('date', '–')} | {_note(row)} |"
    return (
        f"| {row['job']} | {row['tool']} | {num(row['ratio'])} | {row['kl']:.4f} | {row['top1']:.4f} | "
        f"{row['quantize_s']:.1f} | {row.get('date', '–')} | {_note(row)} |"
    )


def table(rows: list[dict], meta: dict) -> list[str]:
    """The markdown table with a line saying what was measured and how."""
    s = meta["settings"]
    model = "Default model (SmolLM2-135M-Instruct, fp32)" if meta["model"] == "default" else f"Model {meta['model']}"
    if s.get("layers"):
        model += f" cut to its first {s['layers']} decoder layers"
    peers = []
    for peer in PEERS.values():
        versions = next((r["versions"] for r in rows if r["tool"] == peer.name and r.get("versions")), None)
        if versions:
            peers.append(f"{peer.title} {versions[peer.name]} (transformers {versions['transformers']})")
    threads = next((r["config"]["worker_args"] for r in rows if r["tool"] == "brevitas" and "config" in r), None)
    lines = [
        f"{model}, default text, {s['windows']} windows × {s['seq_len']} tokens, calibration {s['calib_samples']} × "
        f"{s['calib_seq_len']} tokens (the same samples for every tool), {meta['threads']} CPU threads"
        + (f" (Brevitas: {threads[-1]}, its GPTQ is faster on one)" if threads else "")
        + f", torch {meta['torch']}, lowbit {meta['lowbit']} vs {' and '.join(peers) or 'no peer yet'}; "
        f"llm-compressor's GPTQ actorder {meta['peer_actorder']}; `{meta['command']}` (last run).",
        "",
        "| job | tool | ppl ratio | KL | top-1 | quantize s | date | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return lines + [_table_row(r) for r in rows]


def write_table(rows: list[dict], meta: dict, readme: bool) -> None:
    """Print the table, and put it between the PEER markers of benchmarks/README.md when ``readme``."""
    write_block("PEER", table(rows, meta), readme)


# --- command line -------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model source as lowbit.load_model takes it")
    parser.add_argument("--windows", type=int, default=None, help=f"evaluation windows (default {FULL['windows']})")
    parser.add_argument("--seq-len", type=int, default=None, help=f"tokens per window (default {FULL['seq_len']})")
    parser.add_argument("--calib-samples", type=int, default=None,
                        help=f"calibration samples (default {FULL['calib_samples']})")
    parser.add_argument("--calib-seq-len", type=int, default=None,
                        help=f"tokens per calibration sample (default {FULL['calib_seq_len']})")
    parser.add_argument("--layers", type=int, default=None,
                        help="keep only the first N decoder layers (default: all; --smoke: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for every tool")
    parser.add_argument("--brevitas-threads", type=int, default=None,
                        help="torch CPU threads of the Brevitas worker (default: --threads; its GPTQ runs far faster "
                             "on one thread than on two here)")
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--peer-actorder", default="static", choices=["static", "weight", "none"],
                        help="llm-compressor GPTQ activation ordering (static, its default, matches lowbit's "
                             "act-order with static groups; 'none' is plain GPTQ)")
    parser.add_argument("--venv", type=Path, default=LLMCOMPRESSOR.venv, help="the llm-compressor virtual environment")
    parser.add_argument("--brevitas-venv", type=Path, default=BREVITAS.venv, help="the Brevitas virtual environment")
    parser.add_argument("--setup-only", action="store_true", help="create or check the peer venvs, then stop")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny settings {SMOKE} for a quick check; writes {SMOKE_RESULTS.name}, not the README")
    parser.add_argument("--tables-only", action="store_true", help=f"rewrite the README table from {RESULTS.name}")
    parser.add_argument("--verbose", action="store_true", help="print the worker's log for every peer job")
    return parser.parse_args()


def settings_from(args: argparse.Namespace) -> dict:
    """Run sizes: the defaults (or the smoke ones), each overridable by its option."""
    base = SMOKE if args.smoke else FULL
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}


def main() -> None:
    args = parse_args()
    results = SMOKE_RESULTS if args.smoke else RESULTS
    if args.tables_only:
        if not results.is_file():
            raise SystemExit(f"{results} does not exist yet: run the benchmark first")
        saved = json.loads(results.read_text())
        write_table(saved["rows"], saved["meta"], readme=not args.smoke)
        return
    venvs = {"llmcompressor": args.venv, "brevitas": args.brevitas_venv}
    for name in [t for t in args.tools if t in PEERS]:  # before any long run: fail fast on a broken venv
        print(f"{name} venv {venvs[name]}: {ensure_venv(venvs[name], PEERS[name])}", flush=True)
    if args.setup_only:
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_from(args)
    saved = json.loads(results.read_text()) if results.is_file() else None
    meta = {
        "command": " ".join(["python", "benchmarks/peers.py", *sys.argv[1:]]),
        "model": args.model, "settings": settings, "peer_actorder": args.peer_actorder,
        "lowbit": lowbit.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
    }
    merged: list[dict] = []

    def save(rows: list[dict]) -> None:
        merged[:] = merge(saved, rows, meta)
        write_json_atomic(results, {"meta": meta, "rows": merged})

    run_all(args, settings, venvs, save)
    write_table(merged, meta, readme=not args.smoke)


if __name__ == "__main__":
    main()
