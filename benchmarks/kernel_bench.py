"""Real low-bit linears (lowbit.runtime) against fp32/bf16 F.linear and the fake-quant QuantLinear: time per call and
bytes held, at SmolLM2-135M MLP shapes, to choose each runtime module's default path by measurement.

Run:  nice python benchmarks/kernel_bench.py                 (~15 minutes on 2 shared cores; writes results/kernels.json
                                                        and the tables between the KERNELS markers in benchmarks/README.md)
      nice python benchmarks/kernel_bench.py --part int     (only the int x int table: exact int matmuls of this CPU)
      python benchmarks/kernel_bench.py --tables-only
      python benchmarks/kernel_bench.py --m 1 --threads 1 --rounds 3 --results /tmp/kernels.json   (a quick check)

Layers 576->1536 and 1536->576 with random weights, decode (M=1) and prefill (M=2048) rows, 1 and 2 threads. Timing
(as /work/shared/reference/runtime.md section 4.1): every row is timed in interleaved rounds, each round a batch of
calls lasting >= 5 ms, and the minimum per-call time kept; with 1 thread the clock is the thread's CPU time (immune to
other jobs on the shared cores), with 2 threads wall time (OpenMP barriers stall under load: read those as upper
bounds). A row whose first call takes over 1 s is timed once. Ratios are fp32 F.linear's time over the row's (>1:
faster).

The int part (--part int) times every exact way this PyTorch build has to compute ``sum_k xq[m,k] * wq[n,k]`` with
per-token int8 activation codes (made as IntLinear makes them) and per-channel weight scales, at four SmolLM2-135M
shapes and M = 1, 8, 128, 2048, against fp32 and bf16 F.linear and the IntLinear backends built on them. Memory
columns count every tensor a module holds plus the opaque packed weights of fbgemm and oneDNN (growth of the
process's resident memory over four built modules).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import time
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from harness import HERE, add_flags, markdown_table, run_meta, write_block
from torch import nn

from lowbit.quant import integer
from lowbit.report import write_json_atomic
from lowbit.runtime import IntLinear, kernels, to_runtime
from lowbit.schemes import QuantScheme
from lowbit.surgery.linear import QuantLinear
from lowbit.surgery.quantizer import ActQuantizer

RESULTS = HERE / "results" / "kernels.json"
SHAPES = ((576, 1536), (1536, 576))
W4, W4G, W8 = QuantScheme(format="int4"), QuantScheme(format="int4", granularity="group", group_size=64), \
    QuantScheme(format="int8")
A8 = QuantScheme(format="int8", granularity="token")
A8S = QuantScheme(format="int8", granularity="tensor", dynamic=False)
A4 = QuantScheme(format="int4", granularity="token", clip_ratio=0.9)  # the W4A4 presets' activations
FP8, FP8A = QuantScheme(format="fp8_e4m3"), QuantScheme(format="fp8_e4m3", granularity="token")


def quant_linear(k: int, n: int, w: QuantScheme, a: QuantScheme | None, dtype: torch.dtype) -> QuantLinear:
    """A fake-quant layer with random weights (static activation scales calibrated on one random batch)."""
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
    layer = QuantLinear(lin.to(dtype))
    layer.quantize_weight_rtn(w)
    if a is not None:
        layer.input_quant = ActQuantizer(a, "activation")
        if not a.dynamic:
            layer.input_quant.start_calibration()
            layer(torch.randn(64, k, generator=gen).to(dtype))
            layer.input_quant.finish_calibration()
    return layer


def runtime(k, n, w, a, dtype, **prepare):
    groups = IntLinear.GROUPS
    IntLinear.GROUPS = True  # the group-wise rows measure what the default refuses
    try:
        module = to_runtime(quant_linear(k, n, w, a, dtype))
    finally:
        IntLinear.GROUPS = groups
    return module.prepare(**prepare) if prepare else module


def nbytes(module: nn.Module) -> int:
    """Bytes of every tensor the module holds (persistent and kernel layouts; parameters too)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def resident() -> int:
    """The process's resident bytes, after returning freed heap memory to the system."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def held_bytes(build, copies: int = 4) -> int:
    """Bytes one module from ``build()`` holds, opaque packed weights (fbgemm's object, oneDNN's mkldnn tensor)
    included: resident-memory growth over ``copies`` modules kept alive, after one warm-up build."""
    build()
    before = resident()
    kept = [build() for _ in range(copies)]
    grown = resident() - before
    return max(grown // copies, nbytes(kept[0]))


def module_bytes(module: nn.Module) -> int:
    """:func:`nbytes`, or for an IntLinear with opaque packed weights :func:`held_bytes` of copies prepared alike."""
    if not getattr(module, "_packed", None):
        return nbytes(module)
    return held_bytes(lambda: copy.deepcopy(module).prepare(backend=module.backend,
                                                             onednn_min_macs=module._onednn_min_macs))


def rows_for(k: int, n: int) -> list[tuple[str, str, object]]:
    """(label, what it decides, module or callable taking x) for one shape; the input is bf16 where the label starts
    with "bf16" or has "bf16 x" / "bf16 dequant" (a bf16 model), else fp32."""
    gen = torch.Generator().manual_seed(1)
    w32 = torch.randn(n, k, generator=gen) / k**0.5
    bf = torch.bfloat16
    return [
        ("fp32 F.linear", "reference", partial(F.linear, weight=w32)),
        ("bf16 F.linear", "reference", partial(F.linear, weight=w32.to(bf))),
        ("fake-quant w4a8 (QuantLinear today)", "reference", quant_linear(k, n, W4, A8, torch.float32)),
        ("IntLinear w4a8 (default here: u8s8, fbgemm)", "int x int backend", runtime(k, n, W4, A8, torch.float32)),
        ("IntLinear w4a8 _int_mm, int8 copy", "int4 codes: int8 copy",
         runtime(k, n, W4, A8, torch.float32, backend="int_mm", int8_copy=True)),
        ("IntLinear w4a8 _int_mm, unpack per call", "int4 codes: unpack",
         runtime(k, n, W4, A8, torch.float32, backend="int_mm", int8_copy=False)),
        ("IntLinear w4a8 static per-tensor (u8s8)", "static scales", runtime(k, n, W4, A8S, torch.float32)),
        ("IntLinear w8a8 (default here: float)", "int8 weights", runtime(k, n, W8, A8, torch.float32)),
        ("IntLinear w8a8 _int_mm", "int8 weights", runtime(k, n, W8, A8, torch.float32, backend="int_mm")),
        ("IntLinear w4g64a8 (_int_mm group partial products)", "groups with int acts",
         runtime(k, n, W4G, A8, torch.float32, backend="int_mm")),
        ("IntLinear w4g64a8 (float)", "groups with int acts", runtime(k, n, W4G, A8, torch.float32)),
        ("fake-quant w4g64a8", "groups: the fallback", quant_linear(k, n, W4G, A8, torch.float32)),
        ("W-only int4 g64, fp32 x cast to bf16", "fp32 model: cast",
         runtime(k, n, W4G, None, torch.float32, bf16_cast=True)),
        ("W-only int4 g64, fp32 dequant per call", "fp32 model: dequant",
         runtime(k, n, W4G, None, torch.float32, kernel="dequant")),
        ("W-only int4 g64, bf16 x int4pack", "bf16 model", runtime(k, n, W4G, None, bf)),
        ("W-only int4 g64, bf16 dequant per call", "bf16 model", runtime(k, n, W4G, None, bf, kernel="dequant")),
        ("W-only int8, fp32 x cast to bf16", "fp32 model: cast", runtime(k, n, W8, None, torch.float32, bf16_cast=True)),
        ("W-only int8, fp32 dequant per call", "fp32 model: dequant",
         runtime(k, n, W8, None, torch.float32, kernel="dequant")),
        ("fp8 w+a cached upcast", "fp8 path", runtime(k, n, FP8, FP8A, torch.float32, mode="cached")),
        ("fp8 w+a upcast per call", "fp8 path", runtime(k, n, FP8, FP8A, torch.float32, mode="per_call")),
        ("fp8 w+a torch._scaled_mm", "fp8 path", runtime(k, n, FP8, FP8A, torch.float32, mode="scaled_mm")),
        ("fp8 w-only cached upcast", "fp8 path", runtime(k, n, FP8, None, torch.float32, mode="cached")),
        ("fp8 w-only upcast per call", "fp8 path", runtime(k, n, FP8, None, torch.float32, mode="per_call")),
    ]


def bf16_input(label: str) -> bool:
    return label.startswith("bf16") or "bf16 x" in label or "bf16 dequant" in label


def time_rows(fns: dict[str, object], rounds: int, cpu_clock: bool) -> dict[str, float]:
    """Minimum seconds per call of each function over interleaved rounds of >= 5 ms batches."""
    clock = time.thread_time if cpu_clock else time.perf_counter
    best, batch = {}, {}
    for label, fn in fns.items():
        start = clock()
        fn()
        first = clock() - start
        best[label], batch[label] = first, max(1, int(0.005 / max(first, 1e-7)))
    for _ in range(rounds):
        for label, fn in fns.items():
            if best[label] > 1.0:
                continue  # too slow to repeat: timed once
            start = clock()
            for _ in range(batch[label]):
                fn()
            best[label] = min(best[label], (clock() - start) / batch[label])
    return best


def measure(ms: list[int], threads: list[int], rounds: int) -> list[dict]:
    rows = []
    for k, n in SHAPES:
        built = rows_for(k, n)
        held = {label: module_bytes(m) for label, _, m in built if isinstance(m, nn.Module)}
        for t in threads:
            torch.set_num_threads(t)
            for m in ms:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
                xb = x.to(torch.bfloat16)
                fns = {label: partial(f, xb if bf16_input(label) else x) for label, _, f in built}
                with torch.inference_mode():
                    seconds = time_rows(fns, rounds, cpu_clock=t == 1)
                ref = seconds["fp32 F.linear"]
                for label, decides, _ in built:
                    rows.append({"shape": f"{k}->{n}", "m": m, "threads": t, "row": label, "decides": decides,
                                 "us": seconds[label] * 1e6, "speedup": ref / seconds[label],
                                 "bytes": held.get(label, k * n * 4 if label.startswith("fp32") else k * n * 2)})
                print(f"{k}->{n} M={m} threads={t}: " + ", ".join(f"{r['row']} {r['speedup']:.2f}x"
                                                                  for r in rows[-len(built):]), flush=True)
    return rows


INT_SHAPES = ((576, 1536), (1536, 576), (576, 576), (576, 192))
INT_M = (1, 8, 128, 2048)


def int_rows(k: int, n: int) -> list[tuple[str, object, int]]:
    """(label, callable taking fp32 x or module, largest M timed) for one shape. Candidates: per-token int8 codes of
    x exactly as IntLinear makes them (``act_qparams``, ``int_values``), one exact matmul of the codes with random
    int4 (|w| <= 7) or int8 weight codes, ``* s_w * s_x``; checked against an int64 reference before timing."""
    gen = torch.Generator().manual_seed(1)
    w32 = torch.randn(n, k, generator=gen) / k**0.5
    wb = w32.to(torch.bfloat16)
    w4 = torch.randint(-7, 8, (n, k), generator=gen, dtype=torch.int8)
    w8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    ws = torch.rand(n, generator=gen) * 0.01 + 1e-3
    fmt, zeros = A8.number_format(), torch.zeros(n, dtype=torch.int32)

    def codes(x):
        s, _ = integer.act_qparams(x, fmt, True, "minmax", 1.0, {})
        return integer.int_values(x, s, None, fmt, clamp=False), s

    def int_mm(w, x):
        v, s = codes(x)
        return torch._int_mm(v.to(torch.int8), w.t()).to(torch.float32).mul_(ws).mul_(s)

    colsum4 = w4.to(torch.int32).sum(1)

    def int_mm_u8(x):
        v, s = codes(x)
        acc = torch._int_mm((v + 128).to(torch.uint8), w4.t()) - 128 * colsum4
        return acc.to(torch.float32).mul_(ws).mul_(s)

    onednn4 = kernels.onednn_pack(w4)

    def onednn(x):
        v, s = codes(x)
        return kernels.onednn_mm(v, onednn4, ws, zeros, 128).mul_(s)

    def onednn_s8(x):
        v, s = codes(x)
        return torch.ops.onednn.qlinear_pointwise(v.to(torch.int8), 1.0, 0, onednn4, ws, zeros, None, 1.0, 0,
                                                  torch.float32, "none", [], "").mul_(s)

    fbgemm4 = kernels.fbgemm_pack(w4, ws)

    def fbgemm(x):
        v, s = codes(x)
        return kernels.fbgemm_mm(v, fbgemm4, 128).mul_(s)

    half = torch.div(w8, 2, rounding_mode="floor")  # w = 2h + l, |h| <= 64, l in {0, 1}: two exact u8 x s8 products
    fbgemm_hl = kernels.fbgemm_pack(torch.cat([half, w8 - 2 * half]).to(torch.int8), torch.cat([2 * ws, ws]))

    def fbgemm_split(x):
        v, s = codes(x)
        y = kernels.fbgemm_mm(v, fbgemm_hl, 128)
        return torch.add(y[:, :n], y[:, n:]).mul_(s)

    wf8 = w8.float()

    def float_codes(w, x):
        v, s = codes(x)
        return F.linear(v, w).mul_(ws).mul_(s)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine, torch.backends.quantized.engine = torch.backends.quantized.engine, "fbgemm"
        fp16 = torch.ops.quantized.linear_prepack_fp16(wf8, None)
        torch.backends.quantized.engine = engine

    def fp16_codes(x):
        v, s = codes(x)
        return torch.ops.quantized.linear_dynamic_fp16(v, fp16).mul_(ws).mul_(s)

    candidates = [
        ("w4 codes: _int_mm s8 x s8 (IntLinear int_mm)", partial(int_mm, w4), 128, w4),
        ("w4 codes: _int_mm u8 x s8 (+ zero-point fix)", int_mm_u8, 8, w4),
        ("w4 codes: oneDNN qlinear s8 x s8", onednn_s8, 1, w4),
        ("w4 codes: oneDNN qlinear u8 x s8", onednn, INT_M[-1], w4),
        ("w4 codes: fbgemm u8 x s8", fbgemm, INT_M[-1], w4),
        ("w8 codes: fbgemm u8 x s8, w = 2h + l (2N outputs)", fbgemm_split, INT_M[-1], w8),
        ("w8 codes: fp32 F.linear on codes", partial(float_codes, wf8), INT_M[-1], w8),
        ("w8 codes: fbgemm fp16-weight on codes", fp16_codes, INT_M[-1], w8),
    ]
    x = torch.randn(5, k, generator=gen)
    for label, fn, _, w in candidates:  # exact: the int64 sum, scaled as IntLinear scales
        v, s = codes(x)
        exact = (v.to(torch.int64) @ w.to(torch.int64).t()).to(torch.float32).mul_(ws).mul_(s)
        err = float(((fn(x) - exact).abs() / exact.abs().clamp_min(1e-30)).max())
        assert err < 1e-5 or "fp16" in label, (label, err)
    modules = [
        ("fake-quant w4a8 (QuantLinear)", quant_linear(k, n, W4, A8, torch.float32), INT_M[-1]),
        ("IntLinear w4a8 (default here: u8s8, fbgemm)", runtime(k, n, W4, A8, torch.float32), INT_M[-1]),
        ("IntLinear w4a8 u8s8, fbgemm < 2^25 MACs <= oneDNN", runtime(k, n, W4, A8, torch.float32,
                                                                       onednn_min_macs=2**25), INT_M[-1]),
        ("IntLinear w4a8 u8s8, oneDNN only", runtime(k, n, W4, A8, torch.float32, onednn_min_macs=0), INT_M[-1]),
        ("IntLinear w4a8 float", runtime(k, n, W4, A8, torch.float32, backend="float"), INT_M[-1]),
        ("IntLinear w4a4 (default here: u8s8)", runtime(k, n, W4, A4, torch.float32), INT_M[-1]),
        ("IntLinear w8a8 (default here: float)", runtime(k, n, W8, A8, torch.float32), INT_M[-1]),
    ]
    return [("fp32 F.linear", partial(F.linear, weight=w32), INT_M[-1]),
            ("bf16 F.linear (bf16 x)", partial(F.linear, weight=wb), INT_M[-1]),
            *[(label, fn, top) for label, fn, top, _ in candidates], *modules]


def int_grid(ms: list[int], threads: list[int], rounds: int) -> list[dict]:
    rows = []
    for k, n in INT_SHAPES:
        built = int_rows(k, n)
        held = {label: module_bytes(m) for label, m, _ in built if isinstance(m, nn.Module)}
        for t in threads:
            torch.set_num_threads(t)
            for m in ms:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
                xb = x.to(torch.bfloat16)
                fns = {label: partial(f, xb if label.startswith("bf16") else x) for label, f, top in built if m <= top}
                with torch.inference_mode():
                    seconds = time_rows(fns, rounds, cpu_clock=t == 1)
                ref = seconds["fp32 F.linear"]
                for label, sec in seconds.items():
                    rows.append({"shape": f"{k}->{n}", "m": m, "threads": t, "row": label, "us": sec * 1e6,
                                 "speedup": ref / sec, "bytes": held.get(label)})
                print(f"{k}->{n} M={m} threads={t}: " + ", ".join(f"{label} {ref / sec:.2f}x"
                                                                  for label, sec in seconds.items()), flush=True)
    return rows


def int_table(saved: dict) -> list[str]:
    rows, meta = saved["int"], saved["int_meta"]
    order = [f"{k}->{n}" for k, n in INT_SHAPES]
    labels = list(dict.fromkeys(r["row"] for r in rows))
    cell = {(r["row"], r["shape"], r["m"], r["threads"]): r for r in rows}
    lines = [(f"torch {meta['torch']}, {meta['date']}, `{meta['command']} --part int`; exact int x int matmuls "
              "(per-token int8 activation codes, per-channel weight scales): speed-up over fp32 F.linear, fp32's "
              "time in its row; MiB: what an IntLinear holds for 576->1536 (tensors and packed weights).")]
    for t in sorted({r["threads"] for r in rows}):
        cols = sorted({(r["shape"], r["m"]) for r in rows if r["threads"] == t},
                      key=lambda c: (order.index(c[0]), c[1]))
        header = ["row", "MiB"] + [f"{s} M={m}" for s, m in cols]
        body = []
        for label in labels:
            mem = next((r["bytes"] for r in rows if r["row"] == label and r["shape"] == order[0] and r["bytes"]),
                       None)
            cells = []
            for col in cols:
                c = cell.get((label, *col, t))
                cells.append("–" if c is None else f"{c['us']:.0f} µs" if label == "fp32 F.linear" else
                             f"{c['speedup']:.2f}")
            body.append([label, "–" if mem is None else f"{mem / 2**20:.2f}", *cells])
        clock = "thread CPU time" if t == 1 else "wall time (upper bounds on this shared machine)"
        lines += ["", f"{t} thread{'s' if t > 1 else ''}, {clock}:", "", *markdown_table(header, body)]
    return lines


CROSSOVER_M = (1, 4, 16, 64, 256, 1024)


def crossover(rounds: int) -> list[dict]:
    """fp32 model, weight-only: x cast to bf16 around the kernel vs the weight dequantized per call, by rows M
    (1 thread, CPU time): where the default switches (WeightOnlyLinear.BF16_CAST_MAX_M)."""
    torch.set_num_threads(1)
    rows = []
    for k, n in SHAPES:
        for name, w in (("int4 g64", W4G), ("int8", W8)):
            cast = runtime(k, n, w, None, torch.float32, bf16_cast=True)
            dequant = runtime(k, n, w, None, torch.float32, kernel="dequant")
            for m in CROSSOVER_M:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
                with torch.inference_mode():
                    sec = time_rows({"cast": partial(cast, x), "dequant": partial(dequant, x)}, rounds, cpu_clock=True)
                rows.append({"shape": f"{k}->{n}", "weights": name, "m": m, "cast_us": sec["cast"] * 1e6,
                             "dequant_us": sec["dequant"] * 1e6})
                print(f"{k}->{n} {name} M={m}: cast {sec['cast'] * 1e6:.0f} us, dequant {sec['dequant'] * 1e6:.0f} us",
                      flush=True)
    return rows


def crossover_table(rows: list[dict]) -> list[str]:
    header = ["shape", "weights"] + [f"M={m}" for m in CROSSOVER_M]
    body = {}
    for r in rows:
        body.setdefault((r["shape"], r["weights"]), {})[r["m"]] = f"{r['dequant_us'] / r['cast_us']:.2f}"
    lines = [("fp32 model, weight-only: time of dequantize-per-call over time of cast-to-bf16 + kernel (>1: the cast "
              "is faster), 1 thread, thread CPU time."), ""]
    return lines + markdown_table(header, [[s, w, *(c.get(m, "–") for m in CROSSOVER_M)] for (s, w), c in body.items()])


def table(saved: dict) -> list[str]:
    rows = saved["rows"]
    order = [f"{k}->{n}" for k, n in SHAPES]
    cols = sorted({(r["shape"], r["m"], r["threads"]) for r in rows}, key=lambda c: (c[2], c[1], order.index(c[0])))
    labels = list(dict.fromkeys(r["row"] for r in rows))
    cell = {(r["row"], r["shape"], r["m"], r["threads"]): r for r in rows}
    header = ["row", "MiB (576->1536)"] + [f"{s} M={m} {t}T" for s, m, t in cols]
    body = []
    for label in labels:
        mem = next(r["bytes"] for r in rows if r["row"] == label and r["shape"] == "576->1536")
        cells = [f"{c['speedup']:.2f} ({c['us']:.0f} µs)" if (c := cell.get((label, *col))) else "–" for col in cols]
        body.append([label, f"{mem / 2**20:.2f}", *cells])
    meta = saved["meta"]
    head = [(f"torch {meta['torch']}, {meta['date']}, `{meta['command']}`; speed-up over fp32 F.linear (time per "
             "call); 1T rows: thread CPU time, 2T rows: wall time (upper bounds on this shared machine).")]
    return head + [""] + markdown_table(header, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_flags(parser, RESULTS, rows=None, data=False)
    parser.add_argument("--m", type=int, nargs="*", default=[1, 2048])
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--part", choices=("all", "grid", "crossover", "int"), default="all",
                        help="measure only the main grid, the cast/dequant crossover or the int x int table (the "
                             "other parts are kept)")
    args = parser.parse_args()
    readme = args.results.resolve() == RESULTS.resolve()
    saved = json.loads(args.results.read_text()) if args.results.is_file() else {}
    if not args.tables_only:
        if args.part in ("all", "grid"):
            saved.update(meta=run_meta("python benchmarks/kernel_bench.py"), rows=measure(args.m, args.threads, args.rounds))
        if args.part in ("all", "crossover"):
            saved.update(crossover=crossover(args.rounds), crossover_meta=run_meta("python benchmarks/kernel_bench.py"))
        if args.part in ("all", "int"):
            ms = INT_M if args.m == [1, 2048] else args.m
            saved.update(int=int_grid(ms, args.threads, args.rounds), int_meta=run_meta("python benchmarks/kernel_bench.py"))
        write_json_atomic(args.results, saved)
    lines = table(saved) if "rows" in saved else []
    if "crossover" in saved:
        lines += ["", *crossover_table(saved["crossover"])]
    if "int" in saved:
        lines += ["", *int_table(saved)]
    write_block("KERNELS", lines, write=readme)


if __name__ == "__main__":
    main()
