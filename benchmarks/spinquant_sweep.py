"""SpinQuant training settings on the default model: held-out loss of the fake-quantized model as rotations learn.

Run:  python benchmarks/spinquant_sweep.py                      (every setting in SETTINGS, a few minutes each)
      python benchmarks/spinquant_sweep.py --norms              (the first step's direction: 1-norm, Frobenius)
      python benchmarks/spinquant_sweep.py --flatness [--rotations results/w4a4kv4-spinquant-paper-rotations.safetensors]
      python benchmarks/spinquant_sweep.py --settings "scale-grad one lr0.05 b1" --steps 40 --every 20

Each setting learns R1/R2 from the same seeded Hadamards for ``w4a4kv4-spinquant-paper``'s training quantizers (A4 per
token, KV4 per head, weights in full precision) on calibration text, and the cross-entropy of a held-out batch of
calibration text (never trained on, disjoint from the evaluation windows) is measured every ``--every`` steps. A
per-batch training loss cannot tell descent from batch-to-batch variation; this can. Results: results/spinquant_sweep.json,
results/spinquant_sweep.png and the table between the SPINSWEEP markers of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from harness import HERE, Bench, add_flags, write_block

from lowbit.data import TokenData
from lowbit.methods.spinquant import initial_rotations, prepare_training
from lowbit.models.arch import head_dim
from lowbit.recipe import load_preset
from lowbit.report import write_json_atomic
from lowbit.rotations.cayley import skew_direction
from lowbit.surgery.clips import initial_clips
from lowbit.surgery.rotate import o_rotation_matrix, rotation_seeds
from lowbit.surgery.spinquant import (
    TrainConfig,
    frozen_originals,
    rotation_loss,
    train_rotations,
)

RESULTS = HERE / "results" / "spinquant_sweep.json"
HELDOUT = (4, 512)  # held-out sequences × tokens, cut from the end of the calibration stream

# label -> TrainConfig fields (plus "o_rotation", the step's rotation across heads at o_proj's input); "detached": the
# reference's straight-through gradient (no gradient through scales); "clips": one clip ratio per quantizer learns too
SETTINGS = {
    "detached fro lr1.5 b1": {"norm": "fro", "lr": 1.5, "scale_grad": False},
    "detached one lr1.5 b1": {"norm": "one", "lr": 1.5, "scale_grad": False},
    "scale-grad one lr1.5 b1": {"norm": "one", "lr": 1.5},
    "scale-grad fro lr1.5 b1": {"norm": "fro", "lr": 1.5},
    "scale-grad one lr0.05 b1": {"norm": "one", "lr": 0.05},
    "scale-grad one lr1.5 b1 momentum0.9": {"norm": "one", "lr": 1.5, "momentum": 0.9},
    "scale-grad one lr0.05 b1 bf16": {"norm": "one", "lr": 0.05, "autocast": "bf16"},
    "scale-grad one lr0.05 b2 bf16": {"norm": "one", "lr": 0.05, "batch": 2, "autocast": "bf16"},
    "scale-grad one lr0.05 b1 o-rotation": {"norm": "one", "lr": 0.05, "o_rotation": True},
    "scale-grad one lr0.05 b1 kl": {"norm": "one", "lr": 0.05, "loss": "kl"},
    "clips lr0.02": {"learn": ("clips",), "clip_lr": 0.02},
    **{f"scale-grad one lr0.05 b1 clips lr{clip_lr}": {"norm": "one", "lr": 0.05, "learn": ("rotations", "clips"),
                                                       "clip_lr": clip_lr} for clip_lr in (0.02, 0.05, 0.1, 0.2)},
    "clips lr0.1": {"learn": ("clips",), "clip_lr": 0.1},
}


def split(data: TokenData) -> tuple[TokenData, torch.Tensor]:
    """Training material and a held-out batch from the calibration stream's end (no token in both)."""
    n = HELDOUT[0] * HELDOUT[1]
    heldout = data.calib_tokens[-n:].view(*HELDOUT)
    train = TokenData(eval_windows=data.eval_windows, calib_tokens=data.calib_tokens[:-n], seed=data.seed)
    return train, heldout


def training_setup(loaded, data, o_rotation: bool = False):
    """A copy of the model prepared for ``w4a4kv4-spinquant-paper``'s training (R3/R4, fake-quantizers), its initial
    Hadamards, the frozen originals, head_dim and the preset's spinquant step (``o_rotation``: with the rotation
    across heads at o_proj's input)."""
    recipe = load_preset("w4a4kv4-spinquant-paper")
    step = recipe.steps[0]
    model = copy.deepcopy(loaded.model).requires_grad_(False)
    prepare_training(model, loaded.spec, recipe, data.seed, step.r3, step.r4, o_rotation)
    rot = initial_rotations(model, loaded.spec, data.seed)
    if o_rotation:
        rot.o = o_rotation_matrix(loaded.model, rotation_seeds(loaded.model, loaded.spec, data.seed)).dense().float()
    return model, rot, frozen_originals(model, loaded.spec), head_dim(model.config), step


def run_setting(loaded, data, settings: dict, steps: int, every: int) -> dict:
    fields = {k: v for k, v in settings.items() if k != "o_rotation"}
    model, rot, originals, d, step = training_setup(loaded, data, settings.get("o_rotation", False))
    spec = loaded.spec
    train, heldout = split(data)
    batches = train.calibration(step.samples, step.seq_len)
    config = TrainConfig(steps=steps, **fields)
    if "clips" in config.learn:
        rot.clips = initial_clips(model)
        rot.clips.bind(model)  # the held-out loss reads the learned clips too

    def held() -> float:
        with torch.no_grad():
            return float(rotation_loss(model, spec, rot, originals, heldout, d))

    curve, train_losses, start = [(0, held())], [], time.perf_counter()
    print(f"  step 0: held-out {curve[-1][1]:.4f}", flush=True)
    for first in range(0, steps, every):
        stop = min(first + every, steps)
        train_losses += train_rotations(model, spec, rot, batches, config, start_step=first, stop_step=stop)
        curve.append((stop, held()))
        print(f"  step {stop}: held-out {curve[-1][1]:.4f}, train mean {sum(train_losses[-every:]) / every:.4f}",
              flush=True)
    return {**settings, "steps": steps, "heldout": curve, "train": train_losses,
            "seconds": time.perf_counter() - start, "orthogonality": rot.max_orthogonality_error()}


def direction_norms(loaded, data) -> dict:
    """Norms of the first Cayley direction ``W`` of R1 and the first R2s at the Hadamard start (one 512-token
    calibration sample), and the columns of ``|W|`` with the largest sums: where the gradient concentrates."""
    model, rot, originals, d, _ = training_setup(loaded, data)
    with torch.enable_grad():
        rotation_loss(model, loaded.spec, rot, originals, split(data)[0].calibration(1, 512), d).backward()
    out = {}
    for name, p in [("R1", rot.r1), *((f"R2.{i}", r) for i, r in enumerate(rot.r2[:3]))]:
        w = skew_direction(p.detach().double(), p.grad.double())
        columns = w.abs().sum(0)
        top = torch.topk(columns, 3)
        out[name] = {"one": float(torch.linalg.matrix_norm(w, ord=1)), "fro": float(torch.linalg.matrix_norm(w)),
                     "spectral": float(torch.linalg.matrix_norm(w, ord=2)), "top_columns": top.indices.tolist(),
                     "top_column_sums": top.values.tolist(), "median_column_sum": float(columns.median())}
        print(name, out[name], flush=True)
    return out


def _kind(name: str, quantizer) -> str:
    """``q_proj`` … ``down_proj`` for a linear's input quantizer, ``k_quant`` / ``v_quant`` for the KV ones."""
    return name.split(".")[-2 if quantizer.kind == "activation" else -1]


def _ratios(model, run) -> dict[str, tuple[torch.Tensor, int]]:
    """``max |x| / rms(x)`` per token (position 0 left out) at each kind of quantizer input during ``run()``."""
    from lowbit.surgery.quantizer import ActQuantizer

    seen: dict[str, list] = {}

    def record(kind: str):
        def hook(_, args):
            x = args[0].detach().float()
            seen.setdefault(kind, [x.shape[-1]]).append((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt())[..., 1:].flatten())
        return hook

    handles = [q.register_forward_pre_hook(record(_kind(n, q))) for n, q in model.named_modules()
               if isinstance(q, ActQuantizer)]
    run()
    for h in handles:
        h.remove()
    return {kind: (torch.cat(v[1:]), v[0]) for kind, v in seen.items()}


def _loss_alone(model, run) -> dict[str, float]:
    """The held-out loss with no quantizer, with each kind of quantizer alone, and with all of them."""
    from lowbit.surgery.quantizer import ActQuantizer

    quantizers = [(_kind(n, q), q) for n, q in model.named_modules() if isinstance(q, ActQuantizer)]
    out = {}
    for only in [None, *dict.fromkeys(k for k, _ in quantizers), "all"]:
        for kind, q in quantizers:
            q.enabled = only == "all" or kind == only
        out["none" if only is None else only] = run()
    return out


def flatness(loaded, data, learned: Path | None = None) -> dict:
    """Where the fake-quantized model's held-out loss comes from, and how flat each quantizer's input is.

    For the Hadamard start (and the rotations in the file ``learned``, if given): the median and 90th percentile
    over held-out tokens of ``max |x| / rms(x)`` at every kind of quantizer input, beside a Gaussian vector of the same
    width (the per-token int4 error grows with this ratio squared, and no rotation flattens every token at once
    much below the Gaussian value), and the held-out loss with each kind of quantizer alone.
    """
    from lowbit.methods.spinquant import load_rotations

    model, rot, originals, d, _ = training_setup(loaded, data)
    heldout, gen = split(data)[1], torch.Generator().manual_seed(0)
    candidates = {"hadamard": rot} | ({"learned": load_rotations(learned)[0]} if learned is not None else {})
    out: dict = {}
    for label, rotations in candidates.items():
        def run(rotations=rotations) -> float:
            with torch.no_grad():
                return float(rotation_loss(model, loaded.spec, rotations, originals, heldout, d))

        for kind, (ratio, width) in _ratios(model, run).items():
            g = torch.randn(20000, width, generator=gen)
            gauss = g.abs().amax(-1) / g.pow(2).mean(-1).sqrt()
            row = out.setdefault("ratio", {}).setdefault(kind, {})
            row[label] = [round(float(ratio.median()), 3), round(float(ratio.quantile(0.9)), 3)]
            row["gaussian"] = [round(float(gauss.median()), 3), round(float(gauss.quantile(0.9)), 3)]
        out.setdefault("loss_alone", {})[label] = _loss_alone(model, run)
    print(json.dumps(out, indent=1), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--norms", action="store_true", help="only the first step's direction norms")
    parser.add_argument("--flatness", action="store_true", help="only max|x|/rms at the quantizers' inputs")
    parser.add_argument("--rotations", type=Path, help="with --flatness: also for these learned rotations")
    add_flags(parser, RESULTS, rows=None, data=False)
    args = parser.parse_args()
    saved = json.loads(args.results.read_text()) if args.results.exists() else {}
    if not args.tables_only:
        bench = Bench.load()
        loaded, data = bench.loaded, bench.data
        if args.norms:
            saved["direction_norms"] = direction_norms(loaded, data)
        if args.flatness:
            saved["flatness"] = flatness(loaded, data, args.rotations)
        for label in [] if args.norms or args.flatness else args.settings:
            print(label, flush=True)
            run = run_setting(loaded, data, SETTINGS[label], args.steps, args.every)
            saved[f"{label}, {args.steps} steps"] = {**run, "date": time.strftime("%Y-%m-%d")}
            write_json_atomic(args.results, saved)
        write_json_atomic(args.results, saved)
    write_table(saved, readme=args.results.resolve() == RESULTS.resolve())


def write_table(saved: dict, readme: bool = True) -> None:
    """The held-out curves as a table between the SPINSWEEP markers of benchmarks/README.md, and the plot (both
    printed only unless ``readme``: a check's results file must not replace the committed ones)."""
    lines = ["| setting | steps | held-out cross-entropy at step 0 → … | best | s / step |", "|---|---|---|---|---|"]
    for key, run in saved.items():
        if key in ("direction_norms", "flatness"):
            continue
        curve = " → ".join(f"{loss:.3f}" + (f" ({step})" if step else "") for step, loss in run["heldout"])
        lines.append(f"| {key.rsplit(',', 1)[0]} | {run['steps']} | {curve} | {min(x for _, x in run['heldout']):.3f} | "
                     f"{run['seconds'] / run['steps']:.1f} |")
    if "flatness" in saved:
        lines += ["", *flatness_table(saved["flatness"])]
    write_block("SPINSWEEP", lines, readme)
    if readme:
        plot(saved)


def flatness_table(flat: dict) -> list[str]:
    """Per kind of quantizer input: median (90th percentile) max|x|/rms, and the held-out loss with it alone."""
    alone = flat["loss_alone"]
    lines = ["| quantizer input | max/rms: Gaussian | Hadamard | learned | loss, alone: Hadamard | learned |",
             "|---|---|---|---|---|---|"]
    for kind, row in flat["ratio"].items():
        cells = [f"{row[k][0]:.2f} ({row[k][1]:.2f})" if k in row else "" for k in ("gaussian", "hadamard", "learned")]
        losses = [f"{alone[k][kind]:.3f}" if k in alone else "" for k in ("hadamard", "learned")]
        lines.append(f"| {kind} | {' | '.join(cells)} | {' | '.join(losses)} |")
    for key, name in (("none", "none (full precision)"), ("all", "all together")):
        losses = [f"{alone[k][key]:.3f}" if k in alone else "" for k in ("hadamard", "learned")]
        lines.append(f"| {name} | | | | {' | '.join(losses)} |")
    return lines


def plot(saved: dict) -> None:
    """results/spinquant_sweep.png: every run's held-out curve, with the full-precision loss for reference."""
    from lowbit.analysis.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(10, 4))
    for key, run in saved.items():
        if key not in ("direction_norms", "flatness"):
            steps, losses = zip(*run["heldout"], strict=True)
            ax.plot(steps, losses, marker="o", lw=1.5, label=key)
    if "flatness" in saved:
        ax.axhline(saved["flatness"]["loss_alone"]["hadamard"]["none"], color="k", ls=":", label="full precision")
    ax.set(xlabel="Cayley SGD step", ylabel="held-out cross-entropy (A4 KV4)", ylim=(3.4, 4.6),
           title="SpinQuant training settings on the default model")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "results" / "spinquant_sweep.png", dpi=120)


if __name__ == "__main__":
    main()
