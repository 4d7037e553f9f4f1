"""Perplexity of a compressed-tensors folder in vLLM, on a GPU machine (not run yet: no GPU machine had vLLM so far).

Run:  python benchmarks/vllm_check.py FOLDER WINDOWS.pt [--transformers]
FOLDER and WINDOWS.pt come from ``python benchmarks/export.py --keep DIR`` (``DIR/<row>/`` and ``DIR/windows.pt``):
the export and the evaluation windows lowbit and transformers scored. Prints vLLM's perplexity from each prompt
token's log-probability (``prompt_logprobs=0``) and, with ``--transformers``, the same from transformers on the same
machine, so the two runtimes can be compared on one file. Needs only vllm (and torch, transformers); not lowbit.
"""

from __future__ import annotations

import argparse
import math

import torch


def vllm_nll(folder: str, windows: torch.Tensor) -> torch.Tensor:
    """Next-token NLLs ``[windows, seq - 1]`` from vLLM's prompt log-probabilities."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, max_model_len=int(windows.shape[1]) + 1, enforce_eager=True)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": w.tolist()} for w in windows], params)
    return torch.tensor([[-lp[int(t)].logprob for lp, t in zip(o.prompt_logprobs[1:], w[1:])]
                         for o, w in zip(outs, windows)])


def transformers_nll(folder: str, windows: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda").eval()
    with torch.no_grad():
        rows = [torch.log_softmax(model(w[None].cuda()).logits[0, :-1].float(), -1).gather(-1, w[1:, None].cuda())
                for w in windows]
    return -torch.stack([r[:, 0].cpu() for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("windows")
    parser.add_argument("--transformers", action="store_true", help="also score with transformers on this machine")
    args = parser.parse_args()
    windows = torch.load(args.windows)
    v = vllm_nll(args.folder, windows)
    print(f"vLLM ppl {math.exp(v.mean().item()):.4f} over {v.numel()} tokens")
    if args.transformers:
        t = transformers_nll(args.folder, windows)
        print(f"transformers ppl {math.exp(t.mean().item()):.4f}; max |NLL difference| {(t - v).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
