"""Rotation kinds compared in one table: invariance, activation flatness and the W4A4KV4 result of each R1/R2 kind.

Run:  python benchmarks/rotation_kinds.py            (about 40 minutes on 2 CPU cores; resumes where it stopped)
      python benchmarks/rotation_kinds.py --rows orthogonal bernoulli --force
      python benchmarks/rotation_kinds.py --tables-only

Each row gives R1 and R2 of the `w4a4kv4-quarot` recipe one kind (:mod:`lowbit.rotations.kinds`; the online R3 and
R4 stay randomized Hadamards in every row), plus two references: no rotation at all, and SpinQuant's learned R1/R2
(the rotations `w4a4kv4-spinquant-paper` learned, loaded from benchmarks/results, under the same recipe otherwise).
Per row:

* invariance: the rotated full-precision model (no quantizer) against the original on the first evaluation window:
  largest |logit difference| and KL (zero for an orthogonal rotation, up to float rounding);
* flatness (:mod:`lowbit.analysis.flatness`) of the inputs the q_proj, o_proj and down_proj weights see in that
  rotated full-precision model, first 1024 tokens of the first window, averaged over layers;
* W4A4KV4: the full recipe (GPTQ) on every evaluation window, against full precision.

The table goes between the ROTATIONKINDS markers in benchmarks/README.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from harness import HERE, Bench, Results, labelled_script, markdown_table, num, recipe_step, variant

import lowbit
from lowbit.analysis.flatness import linear_input_flatness
from lowbit.evaluate import evaluate
from lowbit.recipe import Recipe
from lowbit.rotations.kinds import KINDS

RESULTS = HERE / "results" / "rotation_kinds.json"
LEARNED = HERE / "results" / "w4a4kv4-spinquant-paper-rotations.safetensors"
FLATNESS_TOKENS = 1024
ROLES = ("q", "o", "down")


def _kind(kind: str) -> Callable[[], Recipe]:
    def edit(data: dict) -> None:
        recipe_step(data, "quarot")["kind"] = kind

    return lambda: variant("w4a4kv4-quarot", edit)


def _none() -> Recipe:
    return variant("w4a4kv4-quarot", lambda d: d.update(steps=[s for s in d["steps"] if s["method"] != "quarot"]))


def _learned() -> Recipe:
    """w4a4kv4-spinquant-paper with its saved rotations and the key centre of w4a4kv4-quarot: the same recipe as
    the other rows but for R1/R2."""
    def edit(data: dict) -> None:
        recipe_step(data, "spinquant")["rotations"] = str(LEARNED)
        data["kv"]["key_centre"] = "mean"

    return variant("w4a4kv4-spinquant-paper", edit)


WHAT = {
    "hadamard": "randomized Hadamard H diag(±1)/sqrt(n) (QuaRot; the preset)",
    "hadamard_unsigned": "the same Hadamard without random signs",
    "block_hadamard": "randomized Hadamards of order 64 on the diagonal",
    "orthogonal": "Haar-random orthogonal (QR of a Gaussian)",
    "bernoulli": "random ±1/sqrt(n) matrix as it is (not orthogonal)",
    "bernoulli_orthogonalised": "its polar factor (nearest orthogonal matrix)",
}
ROWS: list[tuple[str, str, Callable[[], Recipe]]] = [
    ("none", "no rotation (norms not folded)", _none),
    *[(kind, WHAT[kind], _kind(kind)) for kind in KINDS],
    ("learned", "SpinQuant's learned R1/R2 (w4a4kv4-spinquant-paper's rotations)", _learned),
]


@torch.no_grad()
def _rotated_fp(bench: Bench, recipe: Recipe) -> dict:
    """Invariance and flatness of the rotated full-precision model (module doc)."""
    rotations = recipe.rotations_only()
    model = lowbit.quantize(bench.model, rotations, seed=bench.data.seed) if rotations.steps else bench.model
    window = bench.windows[:1]
    head = window[:, :512]
    diff = (model(head, use_cache=False).logits - bench.model(head, use_cache=False).logits).abs().max().item()
    result = evaluate(bench.model, model, window, reference=bench.reference[:1])
    flat = linear_input_flatness(model, bench.loaded.spec, window[:, :FLATNESS_TOKENS], ROLES)
    return {"max_abs_logit_diff": diff, "fp_kl": result.kl_vs_fp, "fp_ratio": result.ppl / result.fp_ppl,
            "flatness": flat}


def measure(bench: Bench, label: str, recipe: Recipe) -> dict:
    start = time.perf_counter()
    row = {"what": dict((label_, what) for label_, what, _ in ROWS)[label], **_rotated_fp(bench, recipe)}
    row["fp_s"] = time.perf_counter() - start
    row.update(bench.measure(recipe))
    return row


def table(results: Results) -> list[str]:
    m = results.meta
    lines = [f"Default model and text, `w4a4kv4-quarot` with R1/R2 of each kind (R3/R4: randomized Hadamards), "
             f"{m.get('windows')} windows × {m.get('seq_len')} tokens, {m.get('threads')} CPU threads, "
             f"{m.get('date')}; `{m.get('command')}`. Flatness: mean over tokens and layers of the inputs each "
             f"weight sees (max/median |x| per token; kurtosis over channels, 3 for a Gaussian). Invariance KL: "
             f"float32 sums, a negative rounding residue shown as 0.", ""]
    header = ["R1/R2", "what", "invariance: max logit diff", "invariance: KL", "q_proj in max/med", "q_proj in kurt",
              "o_proj in max/med", "o_proj in kurt", "down_proj in kurt", "W4A4KV4 ratio", "KL", "top-1"]
    rows = []
    for label, _, _ in ROWS:
        r = results.rows.get(label)
        if r is None:
            continue
        f = r["flatness"]
        rows.append([label, r["what"], f"{r['max_abs_logit_diff']:.1e}", f"{max(r['fp_kl'], 0.0):.1e}",
                     num(f["q"]["max_over_median"]), num(f["q"]["kurtosis"]), num(f["o"]["max_over_median"]),
                     num(f["o"]["kurtosis"]), num(f["down"]["kurtosis"]), num(r["ratio"]), f"{r['kl']:.4f}",
                     f"{r['top1']:.4f}"])
    return lines + markdown_table(header, rows)


def main() -> None:
    labelled_script(__doc__, RESULTS, ROWS, "ROTATIONKINDS", table, measure)


if __name__ == "__main__":
    main()
