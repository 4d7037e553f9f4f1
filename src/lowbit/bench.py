"""``lowbit bench``: prefill and decode speed, memory and file size of a saved quantized model, against the same
model in float32 and bfloat16, measured side by side in one run.

- prefill: tokens/s of one forward over ``prefill`` tokens (batch 1), online rotations and activation quantization
  included; median of ``repeats`` runs after one warm-up;
- decode: tokens/s of ``new_tokens`` greedy steps after a ``prompt``-token prompt, per batch size (the time of
  generating one token — the prompt's prefill — is subtracted);
- memory: the saved files, the resident bytes per part (quantized linears with their kernel layouts, embeddings,
  lm_head, norms, PrefixQuant prefix, the KV cache after decoding), and the peak resident memory of a fresh process
  while it loads the model (measured in a child process, so nothing else of this run is counted);
- profile: the operators that dominate one decode step (``torch.profiler``).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .artifact import load, read_manifest
from .models.loading import load_model
from .state import STATE_NAME
from .surgery.kvcache import decode_cache
from .surgery.prefix import cache_argument

PARTS = ("quantized linears", "other linears", "embeddings", "lm_head", "norms", "prefix", "other")


def _part(name: str, module: nn.Module, model: nn.Module) -> str:
    head = model.get_output_embeddings()
    if module is head:
        return "lm_head"
    if name.startswith(STATE_NAME) or ".lowbit_hooks." in f".{name}.":
        return "prefix" if name.startswith(STATE_NAME) else "other"
    if module is model.get_input_embeddings():  # a quantized table is not an nn.Embedding
        return "embeddings"
    if "norm" in type(module).__name__.lower():
        return "norms"
    if getattr(module, "weight_scheme", None) is not None:
        return "quantized linears"
    return "other linears" if isinstance(module, nn.Linear) else "other"


def resident_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of every tensor the model holds (parameters and buffers, persistent or not; each storage once) and of
    the kernel layouts held outside tensors, by part."""
    out, seen, runs = dict.fromkeys(PARTS, 0), set(), set()
    for name, module in model.named_modules():
        shared = getattr(module, "shared", None)  # a fused linear: the combined module's tensors and layouts
        held = shared.tensors() if shared is not None else []
        for tensor in list(module._parameters.values()) + list(module._buffers.values()) + held:
            if tensor is None or tensor.device.type == "meta" or tensor.untyped_storage().data_ptr() in seen:
                continue
            seen.add(tensor.untyped_storage().data_ptr())
            out[_part(name, module, model)] += tensor.untyped_storage().nbytes()
        if hasattr(module, "opaque_bytes"):  # kernel layouts held outside tensors (fbgemm's packed weights)
            out[_part(name, module, model)] += module.opaque_bytes()
        if shared is not None and id(shared) not in runs:
            runs.add(id(shared))
            out[_part(name, module, model)] += shared.opaque_bytes()
    return out


def cache_bytes(cache) -> int:
    """Bytes of every tensor a transformers or packed cache holds (space allocated ahead included; each storage
    once)."""
    seen, storages, total = set(), set(), 0
    stack = [cache]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in storages:  # views of one buffer count once
                storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
            stack.extend(vars(obj).values())
    return total


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def prefill_seconds(model: nn.Module, tokens: int, repeats: int, seed: int = 0) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    return _median_seconds(lambda: model(ids, use_cache=False), repeats)


@torch.no_grad()
def decode(model: nn.Module, prompt: int, new_tokens: int, batch: int, repeats: int, seed: int = 0) -> dict:
    """Decode tokens/s at ``batch`` (prefill of the prompt excluded) and the cache's bytes after the run."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    name = cache_argument(type(model).forward)
    caches = []

    def run(n: int):
        cache = decode_cache(model)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, return_dict_in_generate=True, **{name: cache})
        caches.append(out.past_key_values)

    full = _median_seconds(lambda: run(new_tokens), repeats)
    first = _median_seconds(lambda: run(1), repeats)
    seconds = max(full - first, 1e-9)
    return {"tokens_per_s": batch * (new_tokens - 1) / seconds, "cache_bytes": cache_bytes(caches[-1])}


@torch.no_grad()
def decode_profile(model: nn.Module, prompt: int = 64, top: int = 6) -> list[dict]:
    """The operators taking the most CPU time in one decode step (self time), as ``{"op", "ms", "share"}``."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    name = cache_argument(type(model).forward)
    cache = decode_cache(model)
    out = model(ids, use_cache=True, **{name: cache})
    step = out.logits[:, -1:].argmax(-1)
    kwargs = {name: out.past_key_values}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(step, use_cache=True, **kwargs)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total}
            for e in events[:top]]


def load_memory(folder: Path, simulate: bool = False, lean: bool = True, packed: bool = False) -> dict:
    """Peak and final resident memory of a fresh process loading the model (MiB), over its footprint after
    importing lowbit: the child does nothing else. ``lean``, ``packed``: as :func:`lowbit.load`."""
    code = ("import pathlib, sys, lowbit.artifact as a\n"
            "from accelerate import init_empty_weights\n"
            "from transformers import AutoModelForCausalLM\n"
            "def rss(key='VmRSS'):\n"
            "    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])\n"
            "with init_empty_weights():\n"  # import the model's code first: only the model is measured
            "    AutoModelForCausalLM.from_config(a.read_config(pathlib.Path(sys.argv[1])))\n"
            "base = rss()\n"
            f"m = a.load(sys.argv[1], simulate={simulate!r}, lean={lean!r}, packed={packed!r})\n"
            "peak = rss('VmHWM')\n"  # not ru_maxrss: Linux carries the parent's peak across fork and exec
            "print(base, rss(), peak)\n")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    base, after, peak = map(int, out.stdout.split()[-3:])
    return {"import_mib": base / 1024, "after_load_mib": (after - base) / 1024, "peak_load_mib": (peak - base) / 1024}


def bench(folder: str | Path, reference: str | None = "saved", prefill: int = 2048, prompt: int = 512,
          new_tokens: int = 128, batches: tuple[int, ...] = (1, 8), repeats: int = 3, profile: bool = True,
          progress=None, packed: bool = False) -> dict:
    """Speed, memory and size of the saved model (loaded lean; ``packed`` as :func:`lowbit.load`) and of its
    full-precision source in float32 and bfloat16."""
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    source = manifest.get("source") if reference == "saved" else reference
    models: dict[str, nn.Module] = {"quantized": load(folder, lean=True, packed=packed)}
    if source:
        fp32 = load_model(source).model
        models["fp32"], models["bf16"] = fp32, load_model(source, dtype=torch.bfloat16).model
    steps = len(models) * (2 + len(batches))
    tick = progress("benchmarking", steps) if progress else (lambda: None)
    rows = {}
    for name, model in models.items():
        row = {"prefill_tokens_per_s": prefill / prefill_seconds(model, prefill, repeats)}
        tick()
        for b in batches:
            d = decode(model, prompt, new_tokens, b, repeats)
            row[f"decode_b{b}_tokens_per_s"], row[f"cache_b{b}_bytes"] = d["tokens_per_s"], d["cache_bytes"]
            tick()
        row["resident_bytes"] = resident_bytes(model)
        row["profile"] = decode_profile(model) if profile else []
        tick()
        rows[name] = row
    files = {name: info["bytes"] for name, info in manifest["files"].items()}
    return {"model": str(folder), "recipe": (manifest["recipe"] or {}).get("name"), "reference": source,
            "threads": torch.get_num_threads(), "prefill_tokens": prefill, "prompt_tokens": prompt,
            "new_tokens": new_tokens, "batches": list(batches), "repeats": repeats,
            "packed": packed, "file_bytes": sum(files.values()), "load_memory": load_memory(folder, packed=packed),
            "rows": rows}


def render(result: dict, console=None) -> None:
    """Print a bench result as a table (speed-up over fp32 and bf16 in brackets)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    rows = result["rows"]
    table = Table(title=f"lowbit bench · {result['recipe']} · {result['threads']} threads", title_justify="left")
    keys = ["prefill_tokens_per_s"] + [f"decode_b{b}_tokens_per_s" for b in result["batches"]]
    for col in ("", *(k.replace("_tokens_per_s", " tok/s") for k in keys), "resident MiB"):
        table.add_column(col)
    for name, row in rows.items():
        cells = []
        for k in keys:
            v = row[k]
            ratio = "".join(f" ({v / rows[r][k]:.2f}x {r})" for r in ("fp32", "bf16") if r in rows and r != name
                            and name == "quantized")
            cells.append(f"{v:.1f}{ratio}")
        table.add_row(name, *cells, f"{sum(row['resident_bytes'].values()) / 2**20:.1f}")
    console.print(table)
    mem = result["load_memory"]
    console.print(f"files {result['file_bytes'] / 2**20:.1f} MiB · loading: peak {mem['peak_load_mib']:.0f} MiB, "
                  f"resident after {mem['after_load_mib']:.0f} MiB (over {mem['import_mib']:.0f} MiB of imports)")
    console.print("quantized model, per part (MiB): " + ", ".join(
        f"{k} {v / 2**20:.1f}" for k, v in rows["quantized"]["resident_bytes"].items() if v))
    if rows["quantized"]["profile"]:
        console.print("one decode step, top ops by self CPU time: " + ", ".join(
            f"{p['op']} {p['share']:.0%}" for p in rows["quantized"]["profile"]))


def write(result: dict, path: str | Path) -> None:
    from .report import write_json_atomic

    write_json_atomic(path, json.loads(json.dumps(result, default=str)))
