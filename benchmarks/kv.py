"""Packed KV caches on the default model: quality against bits all-in, with and without an exact sink token.

Run:  python benchmarks/kv.py                 (about 40 minutes on 2 CPU cores; resumes where it stopped)
      python benchmarks/kv.py --smoke         (1 window of 512 tokens, a few configurations; separate results file)
      python benchmarks/kv.py --tables-only

Every configuration is a ``kv_cache`` recipe section; the model's weights and activations stay in full precision,
so the rows measure the cache alone. Evaluation: the default text at 4096-token windows, one decode-equivalent
forward per window (each query sees its exact recent window and the packed older tokens, exactly as step-by-step
decoding would), against full-precision log-probabilities computed once. Bits are counted from the tensors a cache
holds at 4096 tokens (exact sink and window at 16 bits). Writes results/kv.json, the table between the KV markers
in benchmarks/README.md and results/kv_pareto.png (KL against bits) when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import lowbit
from lowbit.evaluate import evaluate, reference_log_probs
from lowbit.kv.cache import cache_bits
from lowbit.kv.config import KVCacheConfig
from lowbit.models.arch import head_dim
from lowbit.recipe import Recipe

from presets import replace_block

HERE = Path(__file__).parent
BEGIN, END = "<!-- KV:BEGIN -->", "<!-- KV:END -->"

INT = lambda bits, **kw: {"codec": "int", "bits": bits, **kw}  # noqa: E731
KIVI_K = lambda bits, group=32: {"codec": "int", "bits": bits, "axis": "channel", "group": group}  # noqa: E731
QJL = lambda m, outliers=4, group=32: {"codec": "qjl", "m": m, "outliers": outliers, "group": group}  # noqa: E731
TURBO = lambda bits, residual=False: {"codec": "turbo", "bits": bits, "residual_qjl": residual}  # noqa: E731

# family -> [(label, keys, values, window)]; each runs with sink 0 and sink 1.
CONFIGS: dict[str, list[tuple[str, dict, dict, int]]] = {
    "int": [("int2", INT(2), INT(2), 64), ("int3", INT(3), INT(3), 64), ("int4", INT(4), INT(4), 64)],
    "kivi": [("kivi2 g64", KIVI_K(2, 64), INT(2, group=64), 64), ("kivi2", KIVI_K(2), INT(2, group=32), 128),
             ("kivi3", KIVI_K(3), INT(3, group=32), 128), ("kivi4", KIVI_K(4), INT(4, group=32), 64)],
    "qjl": [("qjl m64", QJL(64), INT(2, group=32), 64), ("qjl m128", QJL(128), INT(2, group=32), 64),
            ("qjl m192", QJL(192), INT(2, group=32), 64), ("qjl m128 v3", QJL(128), INT(3, group=32), 64)],
    "turbo": [("turbo2", TURBO(2), TURBO(2), 64), ("turbo3", TURBO(3), TURBO(3), 64), ("turbo4", TURBO(4), TURBO(4), 64),
              ("turbo2+qjl k / turbo3 v", TURBO(2, True), TURBO(3), 64)],
}
SMOKE = {"int": CONFIGS["int"][1:2], "qjl": CONFIGS["qjl"][1:2], "turbo": CONFIGS["turbo"][1:2]}


def configurations(table: dict) -> list[tuple[str, str, KVCacheConfig]]:
    """Every (family, label, cache config), each with and without an exact first token."""
    out = []
    for family, rows in table.items():
        for label, keys, values, window in rows:
            for sink in (0, 1):
                config = KVCacheConfig(keys=keys, values=values, window=window, sink=sink)
                out.append((family, f"{label} w{window}" + (" +sink" if sink else ""), config))
    return out


def measure(config: KVCacheConfig, loaded, data, reference, context: int) -> dict:
    """Quantize (attach the cache) and evaluate one configuration."""
    model = lowbit.quantize(loaded.model, Recipe(name="kv", kv_cache=config))
    start = time.perf_counter()
    result = evaluate(loaded.model, model, data.eval_windows, reference=reference)
    return {"config": config.model_dump(mode="json"), "ratio": result.ppl / result.fp_ppl, "kl": result.kl_vs_fp,
            "top1": result.top1_agreement, "bits": cache_bits(config.spec(), head_dim(model.config), context),
            "eval_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--force", action="store_true", help="re-measure rows already saved")
    parser.add_argument("--tables-only", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.seq_len, args.windows = 512, 1
    results = HERE / "results" / ("kv-smoke.json" if args.smoke else "kv.json")
    saved = json.loads(results.read_text()) if results.exists() else {"meta": {}, "rows": {}}
    if not args.tables_only:
        todo = [c for c in configurations(SMOKE if args.smoke else CONFIGS) if args.force or c[1] not in saved["rows"]]
        if todo:
            loaded = lowbit.load_model("default")
            data = lowbit.prepare_data(lowbit.DataConfig(seq_len=args.seq_len, windows=args.windows), loaded.tokenizer)
            reference = reference_log_probs(loaded.model, data.eval_windows)
            saved["meta"] = {"command": "python benchmarks/kv.py", "seq_len": args.seq_len, "windows": args.windows,
                             "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
            for family, label, config in todo:
                saved["rows"][label] = {"family": family, **measure(config, loaded, data, reference, args.seq_len)}
                results.parent.mkdir(exist_ok=True)
                results.write_text(json.dumps(saved, indent=2) + "\n")
                row = saved["rows"][label]
                print(f"{label}: {row['bits']:.2f} bits ratio {row['ratio']:.4f} KL {row['kl']:.4f}", flush=True)
    if not args.smoke:
        write_table(saved)
        plot(saved)


def write_table(saved: dict) -> None:
    """The KV table in benchmarks/README.md, sorted by bits within each family."""
    meta = saved["meta"]
    lines = [f"Default model (weights and activations in full precision), default text, {meta.get('windows')} "
             f"windows × {meta.get('seq_len')} tokens, decode-equivalent evaluation, {meta.get('date')}; "
             "`python benchmarks/kv.py`. Bits all-in at the window length (sink and window at 16 bits).", "",
             "| cache | bits all-in | ratio | KL | top-1 |", "|---|---|---|---|---|"]
    rows = sorted(saved["rows"].items(), key=lambda kv: (kv[1]["family"], kv[1]["bits"]))
    lines += [f"| {label} | {r['bits']:.2f} | {r['ratio']:.4f} | {r['kl']:.4f} | {r['top1']:.4f} |"
              for label, r in rows]
    replace_block(HERE / "README.md", BEGIN, END, lines)
    print("\n".join(lines))


def plot(saved: dict) -> None:
    """results/kv_pareto.png: KL against bits all-in, one series per family (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'lowbit[plot]'): no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family in sorted({r["family"] for r in saved["rows"].values()}):
        for sink, marker in ((False, "o"), (True, "^")):
            pts = sorted((r["bits"], r["kl"]) for label, r in saved["rows"].items()
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
