"""Gemma 3 rotation invariance: which rotations leave the full-precision model's outputs unchanged.

Gemma 3 normalizes the attention and MLP outputs (post-norms) before they join the residual stream, so a rotation of
the residual stream (R1) cannot be folded in exactly and lowbit refuses it; R2, R3, R4 and the rotation of o_proj's
input across heads act inside a block, before the post-norms, and stay exact. This script measures both on a real
model: each exact rotation set through ``lowbit.quantize`` (a QuaRot step with ``r1: false``), and R1 forced in
with the refusal bypassed (the post-norms hidden from the architecture spec), to show what the refusal prevents.

Every row compares the rotated full-precision model with the original on the first evaluation window of the default
text (2048 tokens: four times the 270M model's 512-token sliding window): largest |logit difference|, mean
KL(original ‖ rotated) per token and top-1 agreement.

    python benchmarks/gemma3.py           # writes results/gemma3-invariance.json and the table in README.md
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json

import torch
from harness import HERE, markdown_table, num, write_block

import lowbit
from lowbit.data import DataConfig
from lowbit.models.arch import get_module, spec_for
from lowbit.recipe import Recipe
from lowbit.rotations import random_hadamard
from lowbit.surgery.rotate import fold_norms, rotate_residual

RESULTS = HERE / "results" / "gemma3-invariance.json"
EXACT = {
    "R2": {"r2": True, "r3": False, "r4": False},
    "R3": {"r2": False, "r3": True, "r4": False},
    "R4": {"r2": False, "r3": False, "r4": True},
    "R2 R3 R4": {"r2": True, "r3": True, "r4": True},
    "R2 R3 R4 + o_proj input": {"r2": True, "r3": True, "r4": True, "o_rotation": True},
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tables-only", action="store_true", help="re-render the table from the saved results")
    args = parser.parse_args()
    if not args.tables_only:
        torch.set_num_threads(2)
        loaded = lowbit.load_model(args.model)
        window = lowbit.prepare_data(DataConfig(), loaded.tokenizer).eval_windows[:1]
        rows = {}
        for label, flags in EXACT.items():
            recipe = Recipe.from_dict({"steps": [{"method": "quarot", "r1": False, "seed": args.seed, **flags}]})
            rows[label] = compare(loaded.model, lowbit.quantize(loaded.model, recipe), window)
            print(label, rows[label], flush=True)
        rows[FORCED] = compare(loaded.model, forced_r1(loaded.model, args.seed), window)
        meta = {"model": args.model, "seed": args.seed, "window_tokens": int(window.shape[1]),
                "torch_threads": torch.get_num_threads()}
        RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    saved = json.loads(RESULTS.read_text())
    lines = [f"`python benchmarks/gemma3.py`: {saved['meta']['model']}, fp32, first window of the default text "
             f"({saved['meta']['window_tokens']} tokens), seed {saved['meta']['seed']}.", ""]
    lines += markdown_table(
        ["rotation", "exact?", "max abs logit diff", "max abs logit", "KL", "top-1"],
        [[label, "no (refused)" if label == FORCED else "yes", f"{r['max_abs_logit_diff']:.2e}",
          num(r["max_abs_logit"]), f"{r['kl']:.2e}", f"{r['top1']:.4f}"] for label, r in saved["rows"].items()])
    write_block("GEMMA3-INVARIANCE", lines)


if __name__ == "__main__":
    main()
