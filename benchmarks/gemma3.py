"""Gemma 3 rotation invariance: which rotations leave the full-precision model's outputs unchanged.

Gemma 3 normalizes the attention and MLP outputs (post-norms) before they join the residual stream, so a rotation of
the residual stream (R1) cannot be folded in exactly and lowbit refuses it; R2, R3, R4 and the rotation of o_proj's
input across heads act inside a block, before the post-norms, and stay exact. This script measures both on a real
model: each exact rotation set through ``lowbit.quantize`` (a QuaRot step with ``r1: false``, norms folded with
their ``1 + w`` scales, which is exact too), and R1 forced in with the refusal bypassed (the post-norms hidden from
the architecture spec), to show what the refusal prevents.
Rows already in the results file are kept (the script resumes); ``--force`` measures every row again.

Every row compares the rotated full-precision model with the original on the first evaluation window of the default
text (2048 tokens: four times the 270M model's 512-token sliding window): largest |logit difference|, mean
KL(original ‖ rotated) per token and top-1 agreement.

    python benchmarks/gemma3.py           # writes results/gemma3-invariance.json and the table in README.md

The preset rows are ``lowbit quantize --model gemma3-270m`` runs (each report saved under ``results/gemma3-270m/``);
``python benchmarks/gemma3.py --presets-table`` renders them into README.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch
from harness import HERE, markdown_table, num, write_block

import lowbit
from lowbit.data import DataConfig
from lowbit.models.arch import get_module, spec_for
from lowbit.recipe import Recipe
from lowbit.rotations import random_hadamard
from lowbit.surgery.rotate import fold_norms, rotate_residual

RESULTS = HERE / "results" / "gemma3-invariance.json"
REPORTS = HERE / "results" / "gemma3-270m"
EXACT = {
    "R2": {"r2": True, "r3": False, "r4": False},
    "R3": {"r2": False, "r3": True, "r4": False},
    "R4": {"r2": False, "r3": False, "r4": True},
    "R2 R3 R4": {"r2": True, "r3": True, "r4": True},
    "R2 R3 R4 + o_proj input": {"r2": True, "r3": True, "r4": True, "o_rotation": True},
    "q/k/v and gate/up inputs (readers)": {"r2": False, "r3": False, "r4": False, "readers": True},
    "every exact one": {"r2": True, "r3": True, "r4": True, "o_rotation": True, "readers": True},
}
FORCED = "R1 (forced past the refusal)"
CHUNK = 256  # positions whose logits are formed at a time (a 262k vocabulary makes full logits large)


@torch.no_grad()
def compare(fp: torch.nn.Module, rotated: torch.nn.Module, window: torch.Tensor) -> dict:
    """Largest |logit difference|, mean KL(fp ‖ rotated) and top-1 agreement on one window ``[1, T]``."""
    spec = spec_for(fp)
    heads = get_module(fp, spec.lm_head), get_module(rotated, spec.lm_head)
    hidden = [m.model(window, use_cache=False).last_hidden_state[0] for m in (fp, rotated)]
    diff, kl, agree, scale = 0.0, 0.0, 0, 0.0
    for a, b in zip(*(h.split(CHUNK) for h in hidden), strict=True):
        la, lb = heads[0](a).double(), heads[1](b).double()
        diff, scale = max(diff, (la - lb).abs().max().item()), max(scale, la.abs().max().item())
        pa, pb = la.log_softmax(-1), lb.log_softmax(-1)
        kl += (pa.exp() * (pa - pb)).sum().item()
        agree += (la.argmax(-1) == lb.argmax(-1)).sum().item()
    n = window.shape[1]
    return {"max_abs_logit_diff": diff, "max_abs_logit": scale, "kl": kl / n, "top1": agree / n, "tokens": n}


def forced_r1(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy with norms folded and R1 applied as on a Llama-like family: the post-norms hidden from the spec."""
    rotated = copy.deepcopy(model)
    spec = spec_for(rotated)
    fold_norms(rotated, spec)
    hidden = dataclasses.replace(spec, attn_out_norm=None, mlp_out_norm=None)
    rotate_residual(rotated, hidden, random_hadamard(rotated.config.hidden_size, seed).dense())
    return rotated


def measure(model: str, seed: int, force: bool) -> None:
    """Measure the rows missing from the results file (every row with ``force``), saving after each."""
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() and not force else {"rows": {}}
    if saved.get("meta", {}).get("seed", seed) != seed or saved.get("meta", {}).get("model", model) != model:
        raise SystemExit(f"{RESULTS} holds another model or seed: pass --force to measure every row again")
    todo = [label for label in [*EXACT, FORCED] if label not in saved["rows"]]
    if not todo:
        return
    torch.set_num_threads(2)
    loaded = lowbit.load_model(model)
    window = lowbit.prepare_data(DataConfig(), loaded.tokenizer).eval_windows[:1]
    saved["meta"] = {"model": model, "seed": seed, "window_tokens": int(window.shape[1]),
                     "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    for label in todo:
        if label == FORCED:
            rotated = forced_r1(loaded.model, seed)
        else:
            steps = [{"method": "quarot", "r1": False, "fold_norms": True, "seed": seed, **EXACT[label]}]
            rotated = lowbit.quantize(loaded.model, Recipe.from_dict({"steps": steps}))
        saved["rows"][label] = compare(loaded.model, rotated, window)
        print(label, saved["rows"][label], flush=True)
        RESULTS.write_text(json.dumps(saved, indent=1) + "\n")
    order = [*EXACT, FORCED]
    saved["rows"] = {k: saved["rows"][k] for k in sorted(saved["rows"], key=order.index)}
    RESULTS.write_text(json.dumps(saved, indent=1) + "\n")


def presets_table() -> None:
    """The preset rows from the saved ``lowbit quantize`` reports in :data:`REPORTS`, each named by its file."""
    rows = []
    first = ["w8a8-rtn", "w4a16-gptq", "kv-kivi3", "w8a8-quarot-no-r1", "w8a8-quarot-no-r1-folded",
             "w8a8-quarot-readers"]
    order = lambda p: (first.index(p.stem) if p.stem in first else len(first), p.stem)  # noqa: E731
    for path in sorted(REPORTS.glob("*.json"), key=order):
        r = json.loads(path.read_text())
        q, bits, ev = r["quantized"], r["bits"], r["eval"]
        invariance = r.get("rotation", {}).get("max_abs_logit_diff_vs_fp")
        rows.append([f"`{path.stem}`", num(r["fp"]["ppl"]), num(q["ppl"]), num(q["ppl_ratio"]), f"{q['kl_vs_fp']:.4f}",
                     f"{q['top1_agreement']:.4f}", f"{bits['weight']:.2f} / {bits['activation']:.2f} / {bits['kv']:.2f}",
                     "-" if invariance is None else f"{invariance:.1e}",
                     f"{ev['windows']} × {ev['seq_len']}", f"{r['seconds']['quantize']:.0f}"])
    lines = markdown_table(["recipe", "FP ppl", "ppl", "ratio", "KL", "top-1", "bits W / A / KV",
                            "rotated-FP max logit diff", "windows × tokens", "quantize s"], rows)
    write_block("GEMMA3-PRESETS", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tables-only", action="store_true", help="re-render the table from the saved results")
    parser.add_argument("--force", action="store_true", help="measure rows already in the results file again")
    parser.add_argument("--presets-table", action="store_true",
                        help=f"only render the preset rows from the reports in {REPORTS.relative_to(HERE)}")
    args = parser.parse_args()
    if args.presets_table:
        return presets_table()
    if not args.tables_only:
        measure(args.model, args.seed, args.force)
    saved = json.loads(RESULTS.read_text())
    lines = [f"`python benchmarks/gemma3.py`: {saved['meta']['model']}, fp32, first window of the default text "
             f"({saved['meta']['window_tokens']} tokens), seed {saved['meta']['seed']}, {saved['meta'].get('date', '')}.", ""]
    lines += markdown_table(
        ["rotation", "exact?", "max abs logit diff", "max abs logit", "KL", "top-1"],
        [[label, "no (refused)" if label == FORCED else "yes", f"{r['max_abs_logit_diff']:.2e}",
          num(r["max_abs_logit"]), f"{r['kl']:.2e}", f"{r['top1']:.4f}"] for label, r in saved["rows"].items()])
    write_block("GEMMA3-INVARIANCE", lines)


if __name__ == "__main__":
    main()
