"""Time of one decode step (ms) of the default model in bf16/fp32 or of a saved lowbit model, alone, with an optional
cProfile of the steps: what dominates a step.

Run:  python benchmarks/decode_step.py bf16 --steps 64
      python benchmarks/decode_step.py ~/.cache/lowbit/speed/w4a4kv4-dynamic --steps 64 [--packed] [--cprofile cumtime]

The model prefills a ``--prompt``-token random prompt at ``--batch`` with lowbit's decode cache (as ``lowbit bench``
decodes), then runs ``--steps`` greedy steps, twice; the second run's median and minimum step are printed. On a
machine whose timings swing between runs, run it more than once and read the minimum.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

from lowbit.artifact import load
from lowbit.models.loading import load_model
from lowbit.surgery.kvcache import decode_cache
from lowbit.surgery.prefix import cache_argument


def steps(model: torch.nn.Module, ids: torch.Tensor, count: int) -> list[float]:
    """Seconds of each of ``count`` greedy decode steps after prefilling ``ids``."""
    name = cache_argument(type(model).forward)
    with torch.no_grad():
        out = model(ids, use_cache=True, **{name: decode_cache(model)})
        times = []
        for _ in range(count):
            token, cache = out.logits[:, -1:].argmax(-1), out.past_key_values
            start = time.perf_counter()
            out = model(token, use_cache=True, **{name: cache})
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="bf16, fp32 (the default model) or a folder saved by lowbit")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--packed", action="store_true", help="load with packed=True")
    parser.add_argument("--cprofile", nargs="?", const="tottime", default=None, help="profile a third run, sorted")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model in ("bf16", "fp32"):
        model = load_model("default", dtype=torch.bfloat16 if args.model == "bf16" else torch.float32).model
    else:
        model = load(args.model, lean=True, packed=args.packed)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt),
                        generator=torch.Generator().manual_seed(0))
    steps(model, ids, args.steps)  # warm-up
    times = steps(model, ids, args.steps)
    print(f"{args.model}{' packed' if args.packed else ''} batch {args.batch}, prompt {args.prompt}: step median "
          f"{1e3 * statistics.median(times):.1f} ms, min {1e3 * min(times):.1f} ms")
    if args.cprofile:
        profiler = cProfile.Profile()
        profiler.enable()
        steps(model, ids, args.steps)
        profiler.disable()
        pstats.Stats(profiler).sort_stats(args.cprofile).print_stats(40)


if __name__ == "__main__":
    main()
