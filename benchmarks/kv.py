"""Packed KV caches on the default model: quality against bits all-in, with and without an exact sink token.

Run:  python benchmarks/kv.py                 (about 2 hours on 2 CPU cores, 3 minutes a row; resumes where it stopped)
      python benchmarks/kv.py --no-rows --peers --generation   (transformers' QuantizedCache, greedy continuations;
                                              written to results/kv-peers.json, so it may run beside the rows)
      python benchmarks/kv.py --smoke         (1 window of 512 tokens, a few configurations; separate results file)
      python benchmarks/kv.py --tables-only
      python benchmarks/kv.py --rows "int4 w64 +sink" --force   (re-measure single rows; they are marked in the table)
      python benchmarks/kv.py --rows "turbo3 w64 +sink" --seq-len 512 --windows 1 --results /tmp/kv.json
                                              (a quick check: its table is printed, not written to the README)
      python benchmarks/kv.py --presets kv-turbo3 kv-kivi3 --model qwen2.5-coder-0.5b --windows 1
                                              (the KV presets on a model: results/kv-presets-<model>.json, one file
                                              per model, rendered side by side between the KVPRESETS markers)

Every configuration is a ``kv_cache`` recipe section; the model's weights and activations stay in full precision,
so the rows measure the cache alone. Evaluation: the default text at 4096-token windows, one decode-equivalent
forward per window (each query sees its exact recent window and the packed older tokens, exactly as step-by-step
decoding would), against full-precision log-probabilities computed once. Bits are counted from the tensors a cache
holds at 4096 tokens (exact sink and window at 16 bits), as the pipeline's report counts them. Model, text and
reference come from the benchmark harness (harness.Bench). Writes results/kv.json after every row (atomically; rows of
another window size or count are refused), the table between the KV markers in benchmarks/README.md and
results/kv_pareto.png (KL against bits) when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import lru_cache

import torch
from harness import (
    HERE,
    Bench,
    Results,
    add_flags,
    check_labels,
    command_line,
    markdown_table,
    model_file_name,
    run_meta,
    write_block,
)

import lowbit
from lowbit.analysis.plotting import pyplot
from lowbit.data import DataConfig
from lowbit.kv.cache import cache_bits
from lowbit.kv.config import KVCacheConfig
from lowbit.recipe import Recipe, load_preset
from lowbit.report import write_json_atomic

RESULTS = HERE / "results" / "kv.json"
SMOKE_RESULTS = HERE / "results" / "kv-smoke.json"
COMMAND = "python benchmarks/kv.py"

INT = lambda bits, **kw: {"codec": "int", "bits": bits, **kw}
KIVI_K = lambda bits, group=32: {"codec": "int", "bits": bits, "axis": "channel", "group": group}
QJL = lambda m, outliers=4, group=32: {"codec": "qjl", "m": m, "outliers": outliers, "group": group}
TURBO = lambda bits, residual=False: {"codec": "turbo", "bits": bits, "residual_qjl": residual}

# family -> [(label, keys, values, window)]; each runs with sink 0 and sink 1.
CONFIGS: dict[str, list[tuple[str, dict, dict, int]]] = {
    "int": [("int2", INT(2), INT(2), 64), ("int3 k / int2 v", INT(3), INT(2), 64), ("int3", INT(3), INT(3), 64),
            ("int4 k / int3 v", INT(4), INT(3), 64), ("int4", INT(4), INT(4), 64)],
    "kivi": [("kivi2 k64 v64", KIVI_K(2, group=64), INT(2, group=64), 32),
             ("kivi2 v64", KIVI_K(2), INT(2, group=64), 64), ("kivi2", KIVI_K(2), INT(2, group=32), 128),
             ("kivi3 v64", KIVI_K(3), INT(3, group=64), 64), ("kivi3", KIVI_K(3), INT(3, group=32), 128),
             ("kivi4", KIVI_K(4), INT(4, group=32), 64)],
    "qjl": [("qjl m64 o2 v64", QJL(64, outliers=2), INT(2, group=64), 64), ("qjl m64", QJL(64), INT(2, group=32), 64),
            ("qjl m128", QJL(128), INT(2, group=32), 64), ("qjl m192", QJL(192), INT(2, group=32), 64),
            ("qjl m128 v3", QJL(128), INT(3, group=32), 64), ("qjl m256", QJL(256), INT(2, group=32), 64)],
    "turbo": [("turbo2", TURBO(2), TURBO(2), 64), ("turbo2 k / turbo3 v", TURBO(2), TURBO(3), 64),
              ("turbo3", TURBO(3), TURBO(3), 64), ("turbo2+qjl k / turbo3 v", TURBO(2, True), TURBO(3), 64),
              ("turbo3 k / turbo4 v", TURBO(3), TURBO(4), 64), ("turbo4", TURBO(4), TURBO(4), 64)],
}
SMOKE = {"int": CONFIGS["int"][2:3], "qjl": CONFIGS["qjl"][3:4], "turbo": CONFIGS["turbo"][2:3]}


def configurations(table: dict) -> list[tuple[str, str, KVCacheConfig]]:
    """Every (family, label, cache config), each with and without an exact first token."""
    out = []
    for family, rows in table.items():
        for label, keys, values, window in rows:
            for sink in (0, 1):
                config = KVCacheConfig(keys=keys, values=values, window=window, sink=sink)
                out.append((family, f"{label} w{window}" + (" +sink" if sink else ""), config))
    return out


def measure(bench: Bench, family: str, config: KVCacheConfig) -> dict:
    """Attach one configuration's cache to the full-precision model and evaluate it against the reference.

    Bits are the pipeline report's packed-cache bits at the evaluation window length (``bench.config.seq_len``).
    """
    row = bench.measure(Recipe(name="kv", kv_cache=config))
    return {"family": family, "config": config.model_dump(mode="json"), "ratio": row["ratio"], "kl": row["kl"],
            "top1": row["top1"], "bits": row["bits_kv"], "eval_s": row["eval_s"]}


KV_PRESETS = ("kv-int3", "kv-int3-centred", "kv-kivi", "kv-kivi3", "kv-kivi3-turbo", "kv-qjl",
              "kv-turbo3", "kv-turbo3-centred")
PRESET_MODELS = ("default", "qwen2.5-coder-0.5b")  # the models whose preset files the KVPRESETS table shows


def presets_file(model: str):
    """The presets results file of one model (its name made safe for a file name)."""
    return HERE / "results" / f"kv-presets-{model_file_name(model)}.json"


def measure_presets(args: argparse.Namespace) -> None:
    """Measure the KV presets asked for on ``--model`` (saved after each row; rows already saved are skipped
    unless ``--force``), then render the KVPRESETS table from every model's file."""
    results = Results(args.results if args.results != RESULTS else presets_file(args.model), presets_file(args.model))
    todo = results.todo(args.presets or KV_PRESETS, args.force)
    if todo:
        bench = bench_for(args)
        results.check_setup(bench.setup())
        results.meta.update(run_meta(command_line(f"{COMMAND} --presets", args), bench))
        for preset in todo:
            row = bench.measure(preset)
            results.put(preset, {k: row[k] for k in ("ratio", "kl", "top1", "bits_kv", "eval_s", "recipe_config")})
            print(f"{preset}: {row['bits_kv']:.2f} bits ratio {row['ratio']:.4f} KL {row['kl']:.4f}", flush=True)
    write_presets_table(results.renders)


def write_presets_table(readme: bool = True) -> None:
    """The KVPRESETS block: every KV preset, bits and quality on each model that has a presets file."""
    files = {m: Results(presets_file(m)) for m in PRESET_MODELS if presets_file(m).is_file()}
    if not files:
        return
    lines = []
    for model, res in files.items():
        meta = res.meta
        lines.append(f"- `{model}`: {meta.get('windows')} windows × {meta.get('seq_len')} tokens of the default text, "
                     f"{meta.get('date')}, `{meta.get('command')}`")
    header = ["preset", "bits all-in"] + [f"{m}: {col}" for m in files for col in ("ratio", "KL")]
    rows = []
    for preset in KV_PRESETS:
        found = [res.rows.get(preset) for res in files.values()]
        if not any(found):
            continue
        bits = next(r["bits_kv"] for r in found if r)
        rows.append([preset, f"{bits:.2f}"] + [c for r in found for c in
                                               ((f"{r['ratio']:.4f}", f"{r['kl']:.4f}") if r else ("-", "-"))])
    write_block("KVPRESETS", [*lines, "", *markdown_table(header, rows)], readme)


PEERS = [("quanto", 2), ("quanto", 4), ("hqq", 2), ("hqq", 4)]  # transformers' QuantizedCache backends and bits
PEER_PRESETS = ("kv-kivi", "kv-kivi3", "kv-int3", "kv-qjl", "kv-turbo3")


@torch.no_grad()
def teacher_forced_log_probs(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Next-token log-probabilities ``[T-1, vocab]`` from feeding ``tokens`` ``[T]`` one at a time through ``cache``."""
    rows = [model(tokens[None, i:i + 1], past_key_values=cache, use_cache=True).logits[0, -1]
            for i in range(len(tokens) - 1)]
    return torch.log_softmax(torch.stack(rows).float(), dim=-1)


def _compare(lp_fp: torch.Tensor, lp: torch.Tensor, targets: torch.Tensor) -> dict:
    nll_fp, nll = (-x.gather(-1, targets[:, None]).mean() for x in (lp_fp, lp))
    kl = torch.nn.functional.kl_div(lp, lp_fp, log_target=True, reduction="batchmean")
    return {"ratio": float(torch.exp(nll - nll_fp)), "kl": float(kl),
            "top1": float((lp.argmax(-1) == lp_fp.argmax(-1)).float().mean())}


def peer_rows(bench: Bench, tokens: int, done: dict | None = None) -> dict:
    """transformers' QuantizedCache (real step-by-step decode) and lowbit's presets on the same first tokens.

    Peer rows already in ``done`` (same tokens) are kept; lowbit's rows are always measured again (presets change).
    """
    from transformers import QuantizedCache

    from lowbit.surgery.attention import decode_equivalent

    model = bench.model
    window = bench.windows[0, :tokens]
    targets = window[1:]
    with torch.no_grad():
        lp_fp = torch.log_softmax(model(window[None], use_cache=False).logits[0, :-1].float(), -1)
    rows = {k: v for k, v in (done or {}).items() if k.startswith("transformers")}  # step-by-step peers are slow
    for backend, bits in PEERS:
        if f"transformers {backend} int{bits}" in rows:
            continue
        cache = QuantizedCache(backend=backend, config=model.config, nbits=bits, q_group_size=64,
                               residual_length=128)
        start = time.perf_counter()
        rows[f"transformers {backend} int{bits}"] = {
            **_compare(lp_fp, teacher_forced_log_probs(model, window, cache), targets),
            "seconds": time.perf_counter() - start, "note": "QuantizedCache, group 64, 128 recent tokens exact"}
        print(f"{backend} int{bits}: {rows[f'transformers {backend} int{bits}']}", flush=True)
    for preset in PEER_PRESETS:
        spec = load_preset(preset).kv_cache.spec()
        with torch.no_grad(), decode_equivalent(model, spec):
            lp = torch.log_softmax(model(window[None], use_cache=False).logits[0, :-1].float(), -1)
        rows[f"lowbit {preset}"] = {**_compare(lp_fp, lp, targets), "bits": cache_bits(spec, 64, tokens),
                                    "note": "decode-equivalent one pass"}
    return rows


@torch.no_grad()
def generation_rows(bench: Bench, prompts: int = 4, prompt_len: int = 512, new_tokens: int = 48) -> dict:
    """Greedy continuations of a few evaluation-text prompts with each preset's packed cache against the FP cache.

    ``same``: share of generated positions where the token equals the full-precision one; ``prefix``: mean number
    of tokens generated before the first difference.
    """
    from lowbit.kv.cache import PackedCache

    starts = torch.linspace(0, bench.windows.numel() - prompt_len - 1, prompts).long()
    flat = bench.windows.flatten()
    batch = torch.stack([flat[s:s + prompt_len] for s in starts])
    kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    reference = bench.model.generate(batch, **kwargs)[:, prompt_len:]
    rows = {}
    for preset in PEER_PRESETS:
        model = lowbit.quantize(bench.model, preset)
        out = model.generate(batch, past_key_values=PackedCache.for_model(model), **kwargs)[:, prompt_len:]
        same = out == reference
        prefix = torch.where(same.all(1), new_tokens, (~same).float().argmax(1)).float().mean()
        rows[preset] = {"same": float(same.float().mean()), "prefix": float(prefix)}
        print(f"{preset}: {rows[preset]}", flush=True)
    return {"prompts": prompts, "prompt_len": prompt_len, "new_tokens": new_tokens, "rows": rows}


@lru_cache(maxsize=1)
def _bench(model: str, seq_len: int, windows: int) -> Bench:
    return Bench.load(model, DataConfig(seq_len=seq_len, windows=windows))


def bench_for(args: argparse.Namespace) -> Bench:
    """The model, text and full-precision reference, loaded once per run whatever parts of the benchmark run."""
    return _bench(args.model, args.seq_len, args.windows)


def check_legacy_setup(results: Results, bench: Bench) -> None:
    """Files written before results recorded their setup: refuse rows of another window size or count."""
    meta = results.meta
    if results.rows and "setup" not in meta and "seq_len" in meta:
        saved = {"seq_len": meta["seq_len"], "windows": meta.get("windows")}
        this = {"seq_len": int(bench.windows.shape[1]), "windows": len(bench.windows)}
        if saved != this:
            raise SystemExit(f"{results.path} holds rows measured with {saved}, this run is {this}: "
                             "pass --results OTHER.json to keep them apart")


def measure_configurations(parser: argparse.ArgumentParser, args: argparse.Namespace, results: Results) -> None:
    """Measure the configurations asked for (``--families``, ``--rows``) that are not saved yet, saving after each."""
    table = SMOKE if args.smoke else {k: v for k, v in CONFIGS.items() if not args.families or k in args.families}
    known = {label: (family, config) for family, label, config in configurations(table)}
    todo = results.todo(check_labels(parser, args.rows, list(known)), args.force)  # in the order asked
    if args.rows and len(todo) < len(args.rows) and not args.force:
        print("rows already saved are skipped: pass --force to re-measure them", flush=True)
    if not todo:
        return
    bench = bench_for(args)
    check_legacy_setup(results, bench)
    fresh = args.rows is None or "date" not in results.meta  # a partial re-run keeps the file's description
    results.check_setup(bench.setup())
    run = run_meta(COMMAND, bench)
    if fresh:
        results.meta.update(run)
    for label in todo:
        row = measure(bench, *known[label])
        if args.rows is not None:  # a partial re-run: the row says when it was measured
            row["measured"] = {**run, "command": f"{COMMAND} --rows '{label}' --force"}
        results.put(label, row)
        print(f"{label}: {row['bits']:.2f} bits ratio {row['ratio']:.4f} KL {row['kl']:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_flags(parser, RESULTS, rows=None)
    parser.set_defaults(seq_len=4096, windows=3)
    parser.add_argument("--smoke", action="store_true",
                        help="1 window of 512 tokens, a few configurations (results/kv-smoke.json unless --results)")
    parser.add_argument("--force", action="store_true", help="re-measure rows already saved")
    parser.add_argument("--peers", action="store_true",
                        help="also run transformers' QuantizedCache (pip install optimum-quanto hqq) step by step")
    parser.add_argument("--peer-tokens", type=int, default=2048)
    parser.add_argument("--generation", action="store_true", help="greedy continuations against the FP cache")
    parser.add_argument("--no-rows", action="store_true", help="skip the configuration rows (peers/generation only)")
    parser.add_argument("--families", nargs="*", default=None, help=f"only these families of {list(CONFIGS)}")
    parser.add_argument("--rows", nargs="*", default=None,
                        help="only these rows, by label (e.g. 'int4 w64 +sink'); marked in the table with their date")
    parser.add_argument("--presets", nargs="*", default=None,
                        help=f"measure these KV presets on --model instead (none named: {', '.join(KV_PRESETS)})")
    args = parser.parse_args()
    if args.presets is not None:
        unknown = sorted(set(args.presets) - set(KV_PRESETS))
        if unknown:
            parser.error(f"unknown KV preset(s) {', '.join(unknown)}: choose from {', '.join(KV_PRESETS)}")
        measure_presets(args)
        return
    if args.smoke:
        args.seq_len, args.windows = 512, 1
        if args.results == RESULTS:
            args.results = SMOKE_RESULTS
    results = Results(args.results, RESULTS)
    if not (args.tables_only or args.no_rows):
        measure_configurations(parser, args, results)
    extras_file = results.path.with_name(results.path.stem + "-peers.json")  # its own file: may run beside the rows
    extras = json.loads(extras_file.read_text()) if extras_file.exists() else {}
    if args.peers:
        done = extras.get("peers", {})
        done = done.get("rows") if done.get("tokens") == args.peer_tokens and not args.force else None
        extras["peers"] = {"tokens": args.peer_tokens, "rows": peer_rows(bench_for(args), args.peer_tokens, done)}
        write_json_atomic(extras_file, extras)
    if args.generation:
        extras["generation"] = generation_rows(bench_for(args))
        write_json_atomic(extras_file, extras)
    if not args.smoke:
        results = Results(args.results, RESULTS)  # rows another run may have added meanwhile
        write_table({"meta": results.meta, "rows": results.rows, **extras}, results.renders)
        if results.renders:
            plot(results.rows)


def write_table(saved: dict, readme: bool = True) -> None:
    """The KV block of benchmarks/README.md, sorted by bits within each family (printed only unless ``readme``)."""
    meta = saved["meta"]
    lines = [f"Default model (weights and activations in full precision), default text, {meta.get('windows')} "
             f"windows × {meta.get('seq_len')} tokens, decode-equivalent evaluation, {meta.get('date')}; "
             "`python benchmarks/kv.py`. Bits all-in at the window length (sink and window at 16 bits).", ""]
    rows = sorted(saved["rows"].items(), key=lambda kv: (kv[1]["family"], kv[1]["bits"]))
    lines += markdown_table(["cache", "bits all-in", "ratio", "KL", "top-1"],
                            [[f"{label}{' †' if 'measured' in r else ''}", f"{r['bits']:.2f}", f"{r['ratio']:.4f}",
                              f"{r['kl']:.4f}", f"{r['top1']:.4f}"] for label, r in rows])
    dates = sorted({r["measured"]["date"] for _, r in rows if "measured" in r})
    if dates:
        lines += ["", f"† re-measured alone ({', '.join(dates)}; `python benchmarks/kv.py --rows LABEL --force`), "
                      "same model, text and settings."]
    if "peers" in saved:
        peers = saved["peers"]
        lines += ["", f"Against transformers' `QuantizedCache` on the first {peers['tokens']} tokens of the first "
                      "window (the peers decode step by step; lowbit's presets run decode-equivalent; measured "
                      "2026-11-24, the lowbit rows with the presets as they were then: before key centres, the "
                      "query/key balance and kv-kivi's clipped keys, see the KV presets table for today's):", ""]
        lines += markdown_table(["cache", "ratio", "KL", "top-1", "note"],
                                [[label, f"{r['ratio']:.4f}", f"{r['kl']:.4f}", f"{r['top1']:.4f}", r["note"]]
                                 for label, r in peers["rows"].items()])
    if "generation" in saved:
        g = saved["generation"]
        lines += ["", f"Greedy continuations: {g['prompts']} prompts of {g['prompt_len']} evaluation-text tokens, "
                      f"{g['new_tokens']} new tokens, each preset's packed cache against the full-precision cache:", ""]
        lines += markdown_table(["cache", "same token", "tokens before the first difference"],
                                [[k, f"{r['same']:.3f}", f"{r['prefix']:.1f}"] for k, r in g["rows"].items()])
    write_block("KV", lines, readme)


def plot(rows: dict[str, dict]) -> None:
    """results/kv_pareto.png: KL against bits all-in, one series per family (skipped without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family in sorted({r["family"] for r in rows.values()}):
        for sink, marker in ((False, "o"), (True, "^")):
            pts = sorted((r["bits"], r["kl"]) for label, r in rows.items()
                         if r["family"] == family and label.endswith("+sink") == sink)
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=f"{family}{' +sink' if sink else ''}")
    ax.set(xlabel="bits per cached element, all-in", ylabel="KL(fp ‖ cache) per token", yscale="log",
           title="Packed KV caches on the default model")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "results" / "kv_pareto.png", dpi=120)


if __name__ == "__main__":
    main()
