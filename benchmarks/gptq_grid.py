"""W4A16 GPTQ in groups of 64 with no rotation: which int4 grid, which group scales, which column order.

Run:  python benchmarks/gptq_grid.py              (about 3 minutes a row on 2 CPU cores; resumes)
      python benchmarks/gptq_grid.py --rows "full grid, static groups" --force
      python benchmarks/gptq_grid.py --tables-only

Every row is the peer job `w4a16-g64` (symmetric INT4 weights in groups of 64 by GPTQ on 64 x 512 calibration tokens,
activations in full precision; benchmarks/peers.py) with one thing changed from the preset `w4a16-gptq`:

* the grid: ``restricted`` is the mirror-symmetric [-7, 7] (15 codes, scale = max|w| / 7); ``full`` is [-8, 7] with
  a signed scale putting each group's largest-magnitude weight on -8 (16 codes, llama.cpp's Q4_0 grid);
* the group scales: ``static`` fitted up front on the original weights; ``first touch`` fitted on the error-updated
  weights when act-order's loop first reaches one of the group's columns; natural order fits each group when the
  loop reaches it (reference GPTQ);
* the scale search: MSE clip search (the preset's) or min/max;
* within a layer, Hessians recorded in one pass (the preset) or sequentially (GPTQ's "true sequential", as Brevitas).

The table goes between the GPTQGRID markers in benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Callable

from harness import HERE, Results, labelled_script, markdown_table, num, set_field, step_update, variant

from lowbit.recipe import Recipe

RESULTS = HERE / "results" / "gptq_grid.json"

RESTRICTED = set_field("weights.int_range", "restricted")
FIRST_TOUCH = step_update("gptq", static_groups=False)
NATURAL = step_update("gptq", act_order=False, static_groups=False)
MINMAX = set_field("weights.observer", "minmax")


def _recipe(*edits: Callable[[dict], None]) -> Callable[[], Recipe]:
    return lambda: variant("w4a16-gptq", *edits)


ROWS: list[tuple[str, str, Callable[[], Recipe]]] = [
    ("full grid, static groups", "the preset w4a16-gptq", _recipe()),
    ("full grid, first-touch groups", "act-order with groups fitted on the updated weights", _recipe(FIRST_TOUCH)),
    ("restricted grid, static groups", "the preset before 2026-12-05", _recipe(RESTRICTED)),
    ("restricted grid, first-touch groups", "", _recipe(RESTRICTED, FIRST_TOUCH)),
    ("restricted grid, static groups, min/max", "no clip search", _recipe(RESTRICTED, MINMAX)),
    ("restricted grid, first-touch groups, min/max", "", _recipe(RESTRICTED, FIRST_TOUCH, MINMAX)),
    ("restricted grid, natural order", "no act-order: reference GPTQ's dynamic groups", _recipe(RESTRICTED, NATURAL)),
    ("restricted grid, sequential", "each input group's Hessian after the groups before it are quantized",
     _recipe(RESTRICTED, step_update("gptq", sequential=True))),
]


def table(results: Results) -> list[str]:
    m = results.meta
    lines = [f"Default model and text, {m.get('windows')} windows × {m.get('seq_len')} tokens, calibration 64 × 512, "
             f"{m.get('threads')} CPU threads, {m.get('date')}; `{m.get('command')}`.", ""]
    header = ["grid / groups", "what", "ratio", "KL", "top-1", "quantize s"]
    rows = [[label, what, num(r["ratio"]), f"{r['kl']:.4f}", f"{r['top1']:.4f}", f"{r['quantize_s']:.0f}"]
            for label, what, _ in ROWS if (r := results.rows.get(label)) is not None]
    return lines + markdown_table(header, rows)


def main() -> None:
    labelled_script(__doc__, RESULTS, ROWS, "GPTQGRID", table)


if __name__ == "__main__":
    main()
