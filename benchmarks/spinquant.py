"""SpinQuant against QuaRot on the default model: same calibration text, same windows, one run.

Run:  python benchmarks/spinquant.py          (about 30 minutes on 2 CPU cores: 2 quantizations, 2 evaluations)
      python benchmarks/spinquant.py --recipes w4a4kv4-spinquant my-variant.yaml   (only these rows, same setup)
      python benchmarks/spinquant.py --tables-only
      python benchmarks/spinquant.py --eval-data other.txt   (the same quantization, evaluated on another text)
      python benchmarks/spinquant.py --text other.txt        (calibrate, learn and evaluate on another text)
Writes results/spinquant.json, results/spinquant_loss.png (the training loss curve) and the table between the
SPINQUANT markers in benchmarks/README.md. Every finished row is saved at once and rows already saved are skipped
unless ``--force``; learned rotations are checkpointed to results/<row>-rotations.safetensors so an interrupted run
resumes its training.

Rows: ``w4a4kv4-quarot`` (random Hadamards) and ``w4a4kv4-spinquant`` (R1/R2 learned with Cayley SGD and one clip
ratio per quantizer with Adam, for the same A4/KV4 quantizers, then the same GPTQ). Reported: ratio, KL, top-1, the share of QuaRot's gap to full
precision that SpinQuant closes, training wall time, the rotations' orthogonality and the rotated full-precision
model's largest logit difference from the original.

``--eval-data`` re-measures on windows of another text: calibration and learning are unchanged (a complete rotations
checkpoint from an earlier run is reused, not learned again), only the evaluation windows differ. Those rows go to
results/spinquant@<text>.json and are printed, not written to the README. ``--text`` replaces the default text
everywhere (evaluation windows first, calibration from the tokens after them); its rows go to
results/spinquant@<text>-calibrated.json and its learned rotations to results/<row>@<text>-rotations.safetensors.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from harness import (
    HERE,
    Bench,
    Results,
    add_flags,
    data_config,
    measure_rows,
    run_meta,
    write_block,
)

from lowbit.analysis.plotting import pyplot
from lowbit.recipe import Recipe, load_recipe

RESULTS = HERE / "results" / "spinquant.json"
MAIN_ROWS = ("w4a4kv4-quarot", "w4a4kv4-spinquant")


def row_name(name_or_path: str) -> str:
    """A preset's name, or a recipe file's stem."""
    return Path(name_or_path).stem if name_or_path.endswith((".yaml", ".yml")) else name_or_path


def checkpointed(name_or_path: str, tag: str) -> Recipe:
    """The recipe, its SpinQuant steps checkpointing to results/<row><tag>-rotations.safetensors (so an interrupted
    run resumes its training, and ``--eval-data`` reuses a finished one)."""
    recipe = load_recipe(name_or_path)
    path = HERE / "results" / f"{row_name(name_or_path)}{tag}-rotations.safetensors"
    steps = [s.model_copy(update={"checkpoint": str(path)}) if s.method == "spinquant" else s for s in recipe.steps]
    return recipe.model_copy(update={"steps": steps})


def results_file(eval_data: str | None, tag: str) -> Path:
    """Where rows go: the main table's file, or one per other evaluation text (``--eval-data``) or text (``--text``)."""
    if eval_data:
        return RESULTS.with_name(f"spinquant@{Path(eval_data).stem}.json")
    return RESULTS.with_name(f"spinquant{tag}-calibrated.json") if tag else RESULTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_flags(parser, None, rows="--recipes", text=True, eval_data=True)
    parser.add_argument("--results", type=Path, help="results file (default: chosen by --text / --eval-data)")
    args = parser.parse_args()
    tag = f"@{Path(args.text).stem}" if args.text else ""
    results = Results(args.results or results_file(args.eval_data, tag), RESULTS)
    recipes = {row_name(r): r for r in args.recipes or MAIN_ROWS}
    todo = results.todo(recipes, args.force)
    if todo and not args.tables_only:
        bench = Bench.load(args.model, data_config(args), args.eval_data)
        results.check_setup(bench.setup())
        results.meta.update(run_meta("python benchmarks/spinquant.py", bench), eval=args.eval_data or args.text,
                            calib=args.text)

        def measure(name: str) -> dict:
            row = bench.measure(checkpointed(recipes[name], tag), invariance=True)
            return {**row, "date": time.strftime("%Y-%m-%d")}

        measure_rows(results, todo, measure)
    write_block("SPINQUANT", table_lines({"meta": results.meta, "rows": results.rows}), results.renders)
    if results.renders:
        plot(results.rows)


def reference_row(name: str) -> str:
    """The QuaRot row a row is compared with: the one with the same quantizers (its name's first part)."""
    return f"{name.split('-')[0]}-quarot"


def table_lines(saved: dict) -> list[str]:
    """The markdown table of every saved row, with the must-show gap and the rows' descriptions."""
    rows, meta = saved["rows"], saved.get("meta", {})
    header = ("| recipe | ratio | KL | top-1 | gap left | quantize s | learning s | max abs(RᵀR − I) "
              "| rotated FP max logit diff |")
    text = f"evaluated on `{meta['eval']}`" if meta.get("eval") else "default text"
    if meta.get("calib"):
        text = f"calibrated and evaluated on `{meta['calib']}` (disjoint parts)"
    setup = (f"Default model, {text}, {meta.get('windows', 6)} windows × {meta.get('seq_len', 2048)} tokens, {meta.get('threads')} CPU threads, {meta.get('date')}; "
             "`python benchmarks/spinquant.py`.")
    lines = [setup, "", header, "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        rot = r["rotation"]
        quarot = rows.get(reference_row(name), {}).get("ratio")
        gap = f"{(r['ratio'] - 1) / (quarot - 1):.0%}" if quarot else "-"
        lines.append(f"| {name} | {r['ratio']:.4f} | {r['kl']:.4f} | {r['top1']:.4f} | {gap} | {r['quantize_s']:.0f} | "
                     f"{rot.get('seconds', 0):.0f} | {rot.get('max_orthogonality_error', 0):.1e} | "
                     f"{rot['max_abs_logit_diff_vs_fp']:.1e} |")
    if set(MAIN_ROWS) <= rows.keys():
        gap = (rows["w4a4kv4-spinquant"]["ratio"] - 1) / (rows["w4a4kv4-quarot"]["ratio"] - 1)
        lines += ["", f"`w4a4kv4-spinquant` leaves {gap:.0%} of `w4a4kv4-quarot`'s gap to full precision (target: at most 70%).",
                  ("\"gap left\": the row's ratio − 1 over that of the QuaRot row with the same quantizers "
                   "(`<prefix>-quarot`). Rows beyond the first two are presets or `benchmarks/recipes/<row>.yaml`, measured in "
                   "the same setup with `--recipes`:"), ""]
        lines += [f"- `{name}`: {r['description']}" for name, r in rows.items()
                  if name not in MAIN_ROWS and r.get("description")]
    return lines


LOSS_ROWS = {"w4a4kv4-spinquant": "rotations + clips (preset)", "w4a4kv4-spinquant-paper": "rotations only (paper)"}


def plot(rows: dict) -> None:
    """Training loss per step and its running mean for the preset and the paper's rotations-only variant."""
    curves = {label: rows[name]["rotation"].get("losses") for name, label in LOSS_ROWS.items() if name in rows}
    curves = {label: losses for label, losses in curves.items() if losses}
    plt = pyplot()
    if not curves or plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    window = 10
    for (label, losses), color in zip(curves.items(), ("tab:blue", "tab:orange")):
        ax.plot(range(1, len(losses) + 1), losses, lw=1, alpha=0.3, color=color)
        if len(losses) >= window:
            smooth = [sum(losses[i - window:i]) / window for i in range(window, len(losses) + 1)]
            ax.plot(range(window, len(losses) + 1), smooth, lw=2, color=color, label=f"{label}, mean of {window}")
    ax.set(xlabel="training step", ylabel="cross-entropy (A4 KV4 fake-quant)", title="SpinQuant on the default model")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "results" / "spinquant_loss.png", dpi=120)


if __name__ == "__main__":
    main()
