"""The GEMMs of one batch-1 decode step, weights streamed from memory: 30 layers' worth of the default model's four
fused shapes (q/k/v 960 x 576, o 576 x 576, gate/up 3072 x 576, down 576 x 1536) through each kernel PyTorch offers on
CPU, so that the caches hold no weight between calls (unlike benchmarks/kernel_bench.py, which times one layer hot).

Run:  python benchmarks/decode_gemms.py [M]      (M rows per call, default 1; ~1 minute; prints ms per 30 layers)

Random int8 codes in [-7, 7] (int4-range, so every kernel is exact); median of 7 passes after a warm-up.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from lowbit.runtime import kernels

LAYERS = 30
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def ms_per_step(calls: list) -> float:
    for call in calls:
        call()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        for call in calls:
            call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    m = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randint(-7, 8, (n, k), dtype=torch.int8, generator=g) for _ in range(LAYERS) for n, k in SHAPES]
    x8 = {k: torch.randint(-7, 8, (m, k), dtype=torch.int8, generator=g) for _, k in SHAPES}
    xf = {k: v.float() for k, v in x8.items()}
    ones = {n: torch.ones(n) for n, _ in SHAPES}
    zeros = {n: torch.zeros(n, dtype=torch.int32) for n, _ in SHAPES}
    rows = {"torch._int_mm": [lambda w=w: torch._int_mm(x8[w.shape[1]], w.t()) for w in weights]}
    if "fbgemm" in kernels.u8s8_kernels():
        packed = [(kernels.fbgemm_pack(w, ones[w.shape[0]]), w.shape[1]) for w in weights]
        rows["fbgemm u8 x s8"] = [lambda p=p, k=k: kernels.fbgemm_mm(xf[k], p, 128) for p, k in packed]
    if "onednn" in kernels.u8s8_kernels():
        packed = [(kernels.onednn_pack(w), w.shape) for w in weights]
        rows["oneDNN u8 x s8"] = [lambda p=p, s=s: kernels.onednn_mm(xf[s[1]], p, ones[s[0]], zeros[s[0]], 128)
                                  for p, s in packed]
    for dtype in (torch.bfloat16, torch.float32):
        xd = {k: v.to(dtype) for k, v in xf.items()}
        rows[f"F.linear {str(dtype).removeprefix('torch.')}"] = [
            lambda w=w.to(dtype), xd=xd: torch.nn.functional.linear(xd[w.shape[1]], w) for w in weights]
    xb = {k: v.to(torch.bfloat16) for k, v in xf.items()}
    int4 = []
    for w in weights:
        group = kernels.int4pack_group(w.shape[1], w.shape[1])
        sz = torch.ones(w.shape[1] // group, w.shape[0], 2, dtype=torch.bfloat16)
        int4.append((kernels.int4pack_weight(w), group, sz, w.shape[1]))
    rows["int4 weight-only (bf16 x)"] = [lambda p=p, g=gr, s=s, k=k: kernels.int4pack_mm(xb[k], p, g, s)
                                         for p, gr, s, k in int4]
    for name, calls in rows.items():
        print(f"M={m} {name:26s} {ms_per_step(calls):7.2f} ms per {LAYERS} layers", flush=True)


if __name__ == "__main__":
    main()
