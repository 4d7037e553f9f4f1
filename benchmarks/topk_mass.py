"""How much of the full-precision model's next-token probability its top k tokens hold: what a top-k QAT teacher sees.

Run:  python benchmarks/topk_mass.py            (a minute on 2 CPU cores)

On ``--samples`` calibration sequences of ``--seq-len`` tokens (the default text, the sequences QAT trains on are
drawn the same way), the mean and the 10th percentile over positions of the probability the k most likely next tokens
hold, and the mean entropy. Writes results/topk_mass.json and prints a table (quoted in benchmarks/README.md, QAT).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from harness import HERE, markdown_table, run_meta

import lowbit
from lowbit.report import write_json_atomic

RESULTS = HERE / "results" / "topk_mass.json"
KS = (16, 64, 256, 1024, 4096)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    loaded = lowbit.load_model("default")
    data = lowbit.prepare_data(lowbit.DataConfig(), loaded.tokenizer)
    rows, entropy = {}, 0.0
    with torch.no_grad():
        for tokens in data.calibration(args.samples, args.seq_len).split(1):
            log_p = F.log_softmax(loaded.model(tokens, use_cache=False).logits.float(), dim=-1)[0]
            entropy += float(-(log_p.exp() * log_p).sum(-1).mean()) / args.samples
            mass = log_p.exp().sort(-1, descending=True).values.cumsum(-1)
            for k in KS:
                rows.setdefault(k, []).append(mass[:, k - 1])
    table = {str(k): {"mean": float(torch.cat(v).mean()), "p10": float(torch.cat(v).quantile(0.1))}
             for k, v in rows.items()}
    meta = run_meta(f"python benchmarks/topk_mass.py --samples {args.samples} --seq-len {args.seq_len}")
    write_json_atomic(RESULTS, {"meta": meta, "entropy_nats": entropy, "rows": table})
    print("\n".join(markdown_table(["k", "mean top-k probability", "10th percentile"],
                                   [[k, f"{r['mean']:.3f}", f"{r['p10']:.3f}"] for k, r in table.items()])))
    print(f"mean entropy {entropy:.2f} nats")


if __name__ == "__main__":
    main()
