"""Online Hadamard transforms: factored vs dense, and their share of the quantized model's prefill time.

Run:  python benchmarks/hadamard.py          (about 3 minutes on 2 CPU cores)
Writes results/hadamard.json and the table between the HADAMARD markers in benchmarks/README.md.

Part 1 applies ``x @ Q`` for a randomized Hadamard Q of each size two ways, side by side in one run: lowbit's
``RotationMatrix.apply`` (the factored transform, :func:`lowbit.rotations.hadamard_transform`, with Kronecker
factors and Walsh–Hadamard butterflies; sizes up to 256 use one cached dense product, which is faster there) and one
dense float32 matmul with the materialized Q (the matrix build is not timed). Part 2 runs a 2048-token
prefill of the default model quantized with ``w4a4kv4-quarot-rtn`` (the online R3 on Q/K and R4 on the down_proj
input, as in every QuaRot recipe) and measures the time spent inside the online rotations, timed per call, and the
prefill with the rotations replaced by identity (which changes the outputs, so only its time is meaningful).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch
from harness import (
    HERE,
    Bench,
    Results,
    add_flags,
    median_seconds,
    run_meta,
    seconds,
    write_block,
)

import lowbit
from lowbit.rotations import random_hadamard
from lowbit.surgery.rotate import OnlineRotation

RESULTS = HERE / "results" / "hadamard.json"
SIZES = (64, 576, 1536, 2048, 4864, 5632, 8192, 11008, 14336)


def transform_row(n: int, rows: int, repeats: int) -> dict:
    """Time the factored and the dense transform of ``rows`` random rows of size ``n``; check they agree."""
    rotation = random_hadamard(n, seed=0)
    dense = rotation.dense().to(torch.float32)
    x = torch.randn(rows, n)
    factored_s = median_seconds(lambda: rotation.apply(x), repeats)
    dense_s = median_seconds(lambda: x @ dense, repeats)
    diff = float((rotation.apply(x) - x @ dense).abs().max())
    return {"n": n, "construction": rotation.plan.describe(), "rows": rows, "factored_ms": factored_s * 1e3,
            "dense_ms": dense_s * 1e3, "speedup": dense_s / factored_s, "max_abs_diff": diff}


@contextmanager
def timed_online_rotations(totals: dict) -> None:
    """Accumulate the wall time and the number of calls of every :class:`OnlineRotation` forward."""
    original = OnlineRotation.forward

    def forward(self, x):
        start = time.perf_counter()
        out = original(self, x)
        totals["seconds"] += time.perf_counter() - start
        totals["calls"] += 1
        return out

    OnlineRotation.forward = forward
    try:
        yield
    finally:
        OnlineRotation.forward = original


@contextmanager
def identity_online_rotations() -> None:
    """Replace every online rotation by identity (wrong outputs; for timing the model without them)."""
    original = OnlineRotation.forward
    OnlineRotation.forward = lambda self, x: x
    try:
        yield
    finally:
        OnlineRotation.forward = original


def prefill_share(seq_len: int, repeats: int) -> dict:
    """Share of online-rotation time in a ``seq_len`` prefill of the default model under w4a4kv4-quarot-rtn."""
    bench = Bench.load("default", lowbit.DataConfig(seq_len=seq_len, windows=1))
    model = lowbit.quantize(bench.model, "w4a4kv4-quarot-rtn", bench.data)
    window = bench.windows[:1]

    def prefill() -> None:
        with torch.no_grad():
            model(window, use_cache=False)

    def prefill_identity() -> None:
        with identity_online_rotations():
            prefill()

    prefill()  # warm-up
    with_times, without_times = [], []
    for _ in range(repeats):  # alternated, so drift on the machine affects both alike
        with_times.append(seconds(prefill))
        without_times.append(seconds(prefill_identity))
    with_rot, without_rot = statistics.median(with_times), statistics.median(without_times)
    inside = []
    for _ in range(repeats):
        totals = {"seconds": 0.0, "calls": 0}
        with timed_online_rotations(totals):
            prefill()
        inside.append(totals["seconds"])
    rotation_s = statistics.median(inside)
    return {"recipe": "w4a4kv4-quarot-rtn", "seq_len": seq_len, "prefill_s": with_rot,
            "prefill_without_rotations_s": without_rot, "rotation_s": rotation_s, "calls": totals["calls"],
            "share_timed": rotation_s / with_rot, "share_by_difference": (with_rot - without_rot) / with_rot}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_flags(parser, RESULTS, rows=None, data=False)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--prefill-only", action="store_true", help="re-measure only the prefill share")
    args = parser.parse_args()
    results = Results(args.results, RESULTS)
    if args.prefill_only:
        results.saved["prefill"] = prefill_share(args.seq_len, repeats=args.repeats)
        results.save()
    elif not args.tables_only:
        results.saved["meta"] = run_meta("python benchmarks/hadamard.py")
        results.saved["transforms"] = []
        for n in SIZES:
            results.saved["transforms"].append(transform_row(n, rows=2048 if n <= 4096 else 256, repeats=args.repeats))
            results.save()
            print(f"n={n}: {results.saved['transforms'][-1]['speedup']:.1f}x", flush=True)
        results.saved["prefill"] = prefill_share(args.seq_len, repeats=args.repeats)
        results.save()
    write_table(results.saved, results.renders)


def write_table(saved: dict, readme: bool = True) -> None:
    """The HADAMARD block of benchmarks/README.md (printed only unless ``readme``)."""
    meta, p = saved["meta"], saved["prefill"]
    lines = [
        f"{meta['threads']} CPU threads, float32, median of repeated runs, {meta['date']}; "
        "`python benchmarks/hadamard.py`.",
        "",
        "| n | construction | rows | lowbit ms | dense ms | dense / lowbit | max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in saved["transforms"]:
        lines.append(f"| {r['n']} | {r['construction']} | {r['rows']} | {r['factored_ms']:.2f} | "
                     f"{r['dense_ms']:.2f} | {r['speedup']:.1f}× | {r['max_abs_diff']:.1e} |")
    lines += [
        "",
        f"Online rotations in a {p['seq_len']}-token prefill of the default model under `{p['recipe']}` "
        f"({p['calls']} online transforms: R3 on Q and K, R4 on the down_proj input, per layer): prefill "
        f"{p['prefill_s']:.2f} s, of which {p['rotation_s'] * 1e3:.0f} ms inside the rotations "
        f"(**{p['share_timed']:.1%}**); the same prefill with the rotations replaced by identity takes "
        f"{p['prefill_without_rotations_s']:.2f} s ({p['share_by_difference']:.1%} less).",
    ]
    write_block("HADAMARD", lines, readme)


if __name__ == "__main__":
    main()
