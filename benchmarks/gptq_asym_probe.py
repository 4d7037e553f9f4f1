"""What asymmetric GPTQ does to each layer: how far the two streams' inputs differ and how far the target moves.

Run:  python benchmarks/gptq_asym_probe.py [PRESET] [--damp D] [--alpha A | --flip] [--sequential] [--plain]
      [--samples N] [--eval-data TEXT]
      (about 6 minutes on 2 CPU cores)

Quantizes the default model with PRESET (default `w4a16-quarot`) and its GPTQ step's ``asymmetric`` option on,
calibration after one evaluation window, and prints for every solved input group (q/k/v, o, gate/up, down of each
layer in turn) ``|C - H| / |H|`` (how much the full-precision and quantized-path inputs differ), ``|W* - W| / |W|``
(how far the least-squares target moves the weights) and ``max / median`` of the Hessian diagonal, then the
perplexity ratio on that window. ``--damp`` sets ``target_damp``; ``--flip`` quantizes ``2W - W*`` instead (a sign
check); ``--alpha A`` quantizes ``W + A (W* - W)`` (0: plain GPTQ's target, the path check; GPTAQ scales its
correction by 0.25); ``--plain`` leaves ``asymmetric`` off (plain GPTQ, nothing printed per group), ``--sequential``
makes that plain GPTQ sequential (asymmetric GPTQ always is); ``--samples N`` sets the calibration samples;
``--eval-data TEXT`` also scores one window of another text (out of domain: calibration stays on the default text).
Numbers go to benchmarks/README.md (QuaRot section) with the command.
"""

from __future__ import annotations

import argparse

import lowbit
import lowbit.surgery.gptq as surgery_gptq
from lowbit.recipe import Recipe, load_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", default="w4a16-quarot")
    parser.add_argument("--damp", type=float, default=None)
    parser.add_argument("--flip", action="store_true", help="same as --alpha -1")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (default: the preset's)")
    parser.add_argument("--eval-data", help="also evaluate one window of this text (calibration stays on the default)")
    args = parser.parse_args()
    solve, count = surgery_gptq.least_squares_target, [0]

    def reported(weight, hessian, cross, damp):
        target = solve(weight, hessian, cross, damp)
        d = hessian.diagonal()
        mismatch = float((cross - hessian).norm() / hessian.norm())
        moved = float((target - weight).norm() / weight.norm())
        print(f"group {count[0]:3d} in={hessian.shape[0]:5d} |C-H|/|H|={mismatch:.4f} |W*-W|/|W|={moved:.4f} "
              f"diag H max/median={float(d.max() / d.median()):.1f}", flush=True)
        count[0] += 1
        alpha = -1.0 if args.flip else args.alpha
        return weight + alpha * (target - weight)

    surgery_gptq.least_squares_target = reported  # the solver looks the name up in its module at every call
    data_recipe = load_preset(args.preset).model_dump()
    step = next(s for s in data_recipe["steps"] if s["method"] == "gptq")
    step["asymmetric"], step["sequential"] = not args.plain, args.sequential
    if args.damp is not None:
        step["target_damp"] = args.damp
    if args.samples is not None:
        data_recipe["calibration"]["samples"] = args.samples
    loaded = lowbit.load_model("default")
    data = lowbit.prepare_data(lowbit.DataConfig(seq_len=2048, windows=1), loaded.tokenizer)
    quantized = lowbit.quantize(loaded.model, Recipe.from_dict(data_recipe), data)
    result = lowbit.evaluate(loaded.model, quantized, data.eval_windows)
    print(f"ratio {result.ppl / result.fp_ppl:.4f} KL {result.kl_vs_fp:.4f}")
    if args.eval_data:
        other = lowbit.prepare_data(lowbit.DataConfig(eval=args.eval_data, seq_len=2048, windows=1), loaded.tokenizer)
        result = lowbit.evaluate(loaded.model, quantized, other.eval_windows)
        print(f"{args.eval_data}: ratio {result.ppl / result.fp_ppl:.4f} KL {result.kl_vs_fp:.4f}")


if __name__ == "__main__":
    main()
