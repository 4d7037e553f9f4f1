"""QAT on a model accelerate offloads to disk, beside the same QAT in memory: what it learns, what memory and time cost.

Run:  python benchmarks/offloaded_qat.py                 (about 40 minutes on 2 CPU cores)
      python benchmarks/offloaded_qat.py --tables-only
      python benchmarks/offloaded_qat.py --steps 3 --results /tmp/offloaded_qat.json   (a quick check: the table is
                                                         printed, not written to the README)

The recipe is the QAT table's ``w4a4kv4-spinquant-asym-o + qat scales lr x4, clips`` row (the INT4 QAT preset's,
rotations loaded from their saved file) with ``--steps`` QAT steps (default 50, held-out KL every 25). Three modes,
each in a process of its own so that none inherits another's memory:

* ``memory, live teacher``: the model in memory, a full-precision copy beside it (``teacher: model``, what ``auto``
  picks in memory);
* ``memory, top-k teacher``: the model in memory, the teacher's top-1024 next tokens cached (``teacher: topk``);
* ``disk-offloaded``: the model given to ``accelerate.disk_offload`` before quantizing (``teacher: auto``, so top-1024;
  GPTQ layer-streamed, QAT streamed with each decoder layer checkpointed).

Per mode: the process's resident memory (RSS, sampled every 10 ms) before ``quantize``, its peak during it (GPTQ,
the teacher and training) and its peak during the QAT step alone; the QAT wall time per step (held-out checks
included); the QAT losses and held-out KL; ratio and KL
against full precision on the usual 6 x 2048 windows. The full-precision reference for evaluation (2.4 GB) is
computed first and parked on disk, so that it is not in memory while quantizing.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from harness import HERE, Bench, markdown_table, num, run_meta, write_block
from qat import ROWS

import lowbit
from lowbit.evaluate import evaluate
from lowbit.recipe import Recipe
from lowbit.report import write_json_atomic

RESULTS = HERE / "results" / "offloaded_qat.json"
ROW = "w4a4kv4-spinquant-asym-o + qat scales lr x4, clips"
MODES = {"memory, live teacher": ("memory", "model"), "memory, top-k teacher": ("memory", "topk"),
         "disk-offloaded": ("disk", "auto")}


def _recipe(steps: int, teacher: str) -> Recipe:
    data = next(factory for label, _, factory in ROWS if label == ROW)().model_dump()
    qat = data["steps"][-1]
    qat.update(steps=steps, teacher=teacher, eval_every=min(25, steps))
    return Recipe.from_dict(data, origin=f"{ROW}, {steps} steps, teacher {teacher}")


def _rss() -> int:
    """This process's resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class _RSSTrace:
    """(time, RSS) sampled every 10 ms while the context is open."""

    def __enter__(self) -> _RSSTrace:
        self.samples, self._stop = [(time.perf_counter(), _rss())], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.samples.append((time.perf_counter(), _rss()))

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter(), _rss()))

    def peak(self, since: float = 0.0) -> int:
        """The largest RSS sampled at or after ``since`` (a perf_counter time)."""
        return max(rss for t, rss in self.samples if t >= since)


def child(mode: str, steps: int, out: Path) -> None:
    """One mode, measured in this process; the row goes to ``out`` (JSON)."""
    where, teacher = MODES[mode]
    bench = Bench.load()
    recipe = _recipe(steps, teacher)
    with tempfile.TemporaryDirectory() as folder:
        parked = Path(folder) / "reference.pt"
        torch.save(bench.reference, parked)
        del bench.__dict__["reference"]
        model = bench.model
        if where == "disk":
            from accelerate import disk_offload

            model = disk_offload(model, str(Path(folder) / "offload"), execution_device="cpu")
        gc.collect()
        before = _rss()
        with _RSSTrace() as trace:
            start = time.perf_counter()
            model, session = lowbit.quantize_with_session(model, recipe, bench.data, inplace=True)
            end = time.perf_counter()
        reference = torch.load(parked)
        result = evaluate(None, model, bench.windows, reference=reference)  # the reference stands for the FP model
    qat = session.report()["qat"]
    row = {"ratio": result.ppl / result.fp_ppl, "kl": result.kl_vs_fp, "top1": result.top1_agreement,
           "rss_before_gb": before / 2**30, "rss_peak_gb": trace.peak() / 2**30,
           "rss_peak_qat_gb": trace.peak(end - qat["seconds"]) / 2**30, "quantize_s": end - start,
           "qat_s": qat["seconds"], "qat_s_per_step": qat["seconds"] / max(1, qat["steps"]),
           "losses": qat["losses"], "held_out_kl": qat["held_out_kl"], "kept_step": qat["kept_step"],
           "offloaded": where == "disk", "teacher": teacher, "threads": torch.get_num_threads()}
    out.write_text(json.dumps(row))


def table(saved: dict) -> list[str]:
    rows = saved.get("rows", {})
    base = rows.get("memory, top-k teacher")
    lines = markdown_table(
        ["mode", "ratio", "KL", "top-1", "RSS before / peak / peak in QAT (GB)", "QAT s/step", "quantize s",
         "held-out KL (kept)", "largest loss difference from top-k in memory"],
        [[mode, num(r["ratio"]), num(r["kl"]), num(r["top1"]),
          f"{r['rss_before_gb']:.2f} / {r['rss_peak_gb']:.2f} / {r['rss_peak_qat_gb']:.2f}",
          f"{r['qat_s_per_step']:.2f}", f"{r['quantize_s']:.0f}",
          f"{min(r['held_out_kl'].values()):.4f} ({r['kept_step']})",
          "-" if base is None or r["teacher"] == "model" else
          f"{max(abs(a - b) for a, b in zip(r['losses'], base['losses'], strict=True)):.1e}"]
         for mode, r in rows.items()])
    meta = saved.get("meta", {})
    return [*lines, "", f"`{meta.get('command', '')}`, {meta.get('threads', '?')} threads, {meta.get('date', '')}."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--tables-only", action="store_true")
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.out)
        return
    saved = json.loads(args.results.read_text()) if args.results.exists() else {"rows": {}}
    if not args.tables_only:
        for mode in args.modes:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(args.steps),
                                "--out", out.name], check=True)
                saved["rows"][mode] = json.loads(Path(out.name).read_text())
            command = "python benchmarks/offloaded_qat.py" + (f" --steps {args.steps}" if args.steps != 50 else "")
            saved["meta"] = {**run_meta(command), "threads": saved["rows"][mode]["threads"]}
            write_json_atomic(args.results, saved)
            print(f"{mode}: {json.dumps({k: v for k, v in saved['rows'][mode].items() if k != 'losses'})}",
                  flush=True)
    lines = table(saved)
    if args.results == RESULTS:
        write_block("OFFLOADEDQAT", lines)
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
