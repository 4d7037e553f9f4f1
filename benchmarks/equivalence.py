"""Behaviour-unchanged check for refactors: every preset's logits on tiny seeded models, saved to compare bit for bit.

Run it on the code before and after a change (e.g. the old code from a ``git worktree``), then compare::

    PYTHONPATH=/tmp/old/src python benchmarks/equivalence.py /tmp/old.safetensors
    python benchmarks/equivalence.py /tmp/new.safetensors
    python benchmarks/equivalence.py --compare /tmp/old.safetensors /tmp/new.safetensors

Training and calibration are shrunk so that all presets on tiny Llama and Qwen2 models take minutes; any change in
rounding, seeding, step order or hooks shows as a logit that is not ``torch.equal``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.conftest: the tiny seeded models

SHRINK = {"spinquant": {"steps": 3, "samples": 4, "seq_len": 32},
          "blockwise": {"samples": 4, "seq_len": 32, "grid_samples": 2},
          "prefix": {"samples": 4, "seq_len": 32, "eta": 3.0},
          "qat": {"steps": 3, "samples": 4, "seq_len": 32, "holdout": 2, "eval_every": 1}}


def small(recipe):
    """The preset with its learning and calibration cut to tiny-model size."""
    from lowbit.recipe import Recipe

    data = recipe.model_dump()
    for step in data["steps"]:
        step.update(SHRINK.get(step["method"], {}))
    data["calibration"] = {"samples": 4, "seq_len": 32}
    return Recipe.from_dict(data)


def logits(presets: list[str]) -> dict[str, torch.Tensor]:
    """``family.preset`` -> the quantized tiny model's logits on two fixed windows."""
    import lowbit
    from lowbit.data import TokenData
    from lowbit.recipe import load_preset
    from tests.conftest import tiny_model

    g = torch.Generator().manual_seed(3)
    data = TokenData(eval_windows=torch.randint(0, 320, (2, 48), generator=g),
                     calib_tokens=torch.randint(0, 320, (4000,), generator=g), seed=0)
    out = {}
    for family in ("llama", "qwen2"):
        for name in presets:
            torch.manual_seed(0)
            model = lowbit.quantize(tiny_model(family), small(load_preset(name)), data)
            with torch.no_grad():
                out[f"{family}.{name}"] = model(data.eval_windows).logits.contiguous()
            print(family, name, flush=True)
    return out


def compare(a: Path, b: Path) -> int:
    """Print the keys whose logits differ; exit status 1 when any does."""
    old, new = load_file(str(a)), load_file(str(b))
    shared = sorted(set(old) & set(new))
    differ = [k for k in shared if not torch.equal(old[k], new[k])]
    for key in differ:
        print(f"{key}: max |diff| {(old[key] - new[key]).abs().max().item():.3g}")
    print(f"{len(shared) - len(differ)} of {len(shared)} shared keys equal ({len(old)} in OLD, {len(new)} in NEW)")
    return 1 if differ else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="safetensors file to write the logits to")
    parser.add_argument("--presets", nargs="+", help="default: every preset")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    if not args.out:
        parser.error("give an output file, or --compare OLD NEW")
    import lowbit

    save_file(logits(args.presets or lowbit.preset_names()), args.out)


if __name__ == "__main__":
    main()
