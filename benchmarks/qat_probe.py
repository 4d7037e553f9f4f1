"""Short QAT probes on one quantized model: which trained group helps or hurts, seen on the held-out KL.

Run:  python benchmarks/qat_probe.py w4a16-quarot "all=" "scales=train:scales" "scales fixed=lr_scale:0"
      (about 2.5 minutes to quantize, then about 6.5 minutes a 60-step probe on 2 CPU cores)

The preset quantizes the default model once (64 x 512 calibration tokens after the default windows); each probe
then trains a copy of it with :func:`lowbit.surgery.qat.distill` for 60 steps (``steps:N`` to change) on 64
sequences of 512 tokens, the QATConfig defaults changed by ``key:value`` pairs, and prints every step's training KL
and the KL on 8 held-out sequences before training and every 20 steps. Nothing is written: the numbers go to the
issue notes and benchmarks/README.md (QAT) with this command.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import fields

import torch

import lowbit
from lowbit.surgery.qat import QATConfig, distill
from lowbit.surgery.teacher import LiveTeacher


def probe_config(spec: str) -> QATConfig:
    """``"steps:60,train:scales,lr_scale:0"`` -> a QATConfig (60 steps and eval every 20 unless given)."""
    kinds = {f.name: f.type for f in fields(QATConfig)}
    values: dict = {"steps": 60, "eval_every": 20}
    for pair in filter(None, spec.split(",")):
        key, value = pair.split(":")
        kind = kinds[key]
        values[key] = (int(value) if kind == "int" else float(value) if kind == "float"
                       else value == "true" if kind == "bool" else value)
    return QATConfig(**values)


def main() -> None:
    preset, probes = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
    torch.manual_seed(0)
    loaded = lowbit.load_model("default")
    data = lowbit.prepare_data(lowbit.DataConfig(seq_len=2048, windows=6), loaded.tokenizer)
    start = time.perf_counter()
    quantized = lowbit.quantize(loaded.model, preset, data)
    print(f"{preset}: quantized in {time.perf_counter() - start:.0f} s", flush=True)
    batches, held = data.calibration(64, 512, reserve=8 * 512), data.held_out(8, 512)
    teacher = LiveTeacher(batches, held, copy.deepcopy(loaded.model).eval().requires_grad_(False))
    for name, spec in probes:
        config = probe_config(spec)
        start = time.perf_counter()
        done = distill(copy.deepcopy(quantized), teacher, config)
        print(f"{name} ({spec or 'defaults'}): {time.perf_counter() - start:.0f} s", flush=True)
        print("  training KL", [round(x, 3) for x in done.losses], flush=True)
        print("  held-out KL", {k: round(v, 4) for k, v in done.held_out.items()}, "kept", done.kept_step, flush=True)


if __name__ == "__main__":
    main()
