"""4-bit formats side by side: INT4, FP4 E2M1, MXFP4 and NVFP4 for weights and activations, with and without rotation.

Run:  python benchmarks/formats.py              (about 4 minutes a row on 2 CPU cores; resumes)
      python benchmarks/formats.py --rows "MXFP4 / QuaRot" --force
      python benchmarks/formats.py --tables-only

Every row is `w4a4-quarot` (GPTQ with the MSE clip search on the weights, activations per token with clip 0.9, KV
in 16 bits) with the weight and activation format swapped, or the same without the QuaRot step. GPTQ fits each
format's own grid: its scales are chosen per channel or per block, rounded to the format's scale type (float16 for
INT4 groups, E8M0 powers of two for MXFP4, E4M3 under a per-tensor scale for NVFP4) before the codes are chosen.
Bits count every block scale. Two more rows change one thing of "NVFP4 / no rotation": activations at each block's
absmax (no clip), and asymmetric GPTQ. The table goes between the FORMATS markers in benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Callable

from harness import HERE, Results, labelled_script, markdown_table, num, set_field, step_update, variant

from lowbit.recipe import Recipe

RESULTS = HERE / "results" / "formats.json"

# name -> (weight scheme fields, activation scheme fields), on top of w4a4-quarot's schemes
FORMATS: dict[str, tuple[dict, dict]] = {
    "INT4": ({}, {}),
    "INT4, A4 asymmetric": ({}, {"symmetric": False}),
    "FP4 E2M1": ({"format": "fp4_e2m1"}, {"format": "fp4_e2m1"}),
    "INT4 g32": ({"granularity": "group", "group_size": 32, "scale_dtype": "float16"},
                 {"granularity": "group", "group_size": 32, "scale_dtype": "float16"}),
    "MXFP4": ({"format": "fp4_e2m1", "granularity": "group", "group_size": 32, "scale_dtype": "e8m0"},
              {"format": "fp4_e2m1", "granularity": "group", "group_size": 32, "scale_dtype": "e8m0"}),
    "INT4 g16": ({"granularity": "group", "group_size": 16, "scale_dtype": "float16"},
                 {"granularity": "group", "group_size": 16, "scale_dtype": "float16"}),
    "NVFP4": ({"format": "fp4_e2m1", "granularity": "group", "group_size": 16, "scale_dtype": "float8_e4m3"},
              {"format": "fp4_e2m1", "granularity": "group", "group_size": 16, "scale_dtype": "float8_e4m3"}),
}


def format_edit(fmt: str, rotated: bool) -> Callable[[dict], None]:
    """An edit of a recipe's plain-dict form: weights and activations in ``fmt``; without ``rotated`` no QuaRot step."""
    weights, acts = FORMATS[fmt]

    def edit(data: dict) -> None:
        data["weights"].update(int_range="restricted", **weights)  # INT4 rows on [-7, 7], as measured; FP4 has no range
        data["activations"].update(acts)
        if not rotated:
            data["steps"] = [s for s in data["steps"] if s["method"] != "quarot"]

    return edit


def _recipe(fmt: str, rotated: bool, *more: Callable[[dict], None]) -> Callable[[], Recipe]:
    return lambda: variant("w4a4-quarot", format_edit(fmt, rotated), *more)


ROWS: list[tuple[str, str, Callable[[], Recipe]]] = [
    *[(f"{fmt} / {'QuaRot' if rotated else 'no rotation'}", fmt, _recipe(fmt, rotated))
      for rotated in (True, False) for fmt in FORMATS],
    ("NVFP4 / no rotation, A4 no clip", "activations at their block's absmax (NVFP4's own setting), not 0.9 of it",
     _recipe("NVFP4", False, set_field("activations.clip_ratio", 1.0))),
    ("NVFP4 / no rotation, asymmetric GPTQ", "GPTQ fitted to the full-precision outputs (Qronos/GPTAQ)",
     _recipe("NVFP4", False, step_update("gptq", asymmetric=True))),
]


def table(results: Results) -> list[str]:
    m = results.meta
    lines = [f"Default model and text, `w4a4-quarot` with each format (KV 16 bits), {m.get('windows')} windows × "
             f"{m.get('seq_len')} tokens, {m.get('threads')} CPU threads, {m.get('date')}; `{m.get('command')}`.", ""]
    header = ["format / rotation", "bits W / A", "ratio", "KL", "top-1", "quantize s"]
    rows = [[label, f"{r['bits_w']:.2f} / {r['bits_a']:.2f}", num(r["ratio"]), f"{r['kl']:.4f}", f"{r['top1']:.4f}",
             f"{r['quantize_s']:.0f}"] for label, _, _ in ROWS if (r := results.rows.get(label)) is not None]
    return lines + markdown_table(header, rows)


def main() -> None:
    labelled_script(__doc__, RESULTS, ROWS, "FORMATS", table)


if __name__ == "__main__":
    main()
