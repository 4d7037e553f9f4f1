"""QJL's effect on each layer's attention alone, with and without the query/key balance: the probe behind qk_balance.

Run:  python benchmarks/qjl_attention.py [--model qwen2.5-coder-0.5b] [--tokens 1024] [--start 5000]

One window of the default text (``--tokens`` tokens from token ``--start``) through the full-precision model. Per
layer, post-RoPE queries and keys (keys minus their window mean before RoPE, turned by RoPE: the key centre), keys
sketched by QJL (m=128, 4 exact outlier channels per 32 tokens, as ``kv-qjl``), every query scored against every
earlier key. Prints the mean KL of the attention rows (queries from position 64 on) from the exact ones, without and
with the balance ``a = (E[q^2] / E[k^2]) ** 1/4`` per KV head and channel (measured on the same window), the
predicted variance factor ``E|q/a|^2 E|a k|^2 / (E|q|^2 E|k|^2)`` and the RMS norms of queries and keys. Writes
nothing. Families with Llama-style attention (Llama, Qwen2, Mistral).
"""

from __future__ import annotations

import math

import torch
from harness import probe_window
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lowbit.kv.codecs import QJLKeyCodec
from lowbit.models.arch import head_dim
from lowbit.surgery.qk_balance import balance_scales, predicted_gain


def attention_kl(q: torch.Tensor, k: torch.Tensor, estimate: torch.Tensor, skip: int = 64) -> float:
    """Mean KL(exact || estimated) of causal attention rows; ``q`` ``[kv, g, T, d]``, ``k`` ``[kv, T, d]``."""
    t, d = k.shape[1], k.shape[2]
    mask = torch.ones(t, t).tril().bool()
    exact = (q @ k[:, None].transpose(-1, -2)).div(math.sqrt(d)).masked_fill(~mask, -1e9).log_softmax(-1)
    approx = estimate.div(math.sqrt(d)).masked_fill(~mask, -1e9).log_softmax(-1)
    return (exact.exp() * (exact - approx)).sum(-1)[..., skip:].mean().item()


def sketched_scores(codec: QJLKeyCodec, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    kv, g, t, d = q.shape
    return codec.scores(q.reshape(1, kv, g * t, d), codec.encode(k[None]), d).view(kv, g, t, t)


@torch.no_grad()
def main() -> None:
    loaded, ids = probe_window(__doc__.splitlines()[0])
    model, config = loaded.model, loaded.model.config
    t, d, kv, heads = ids.shape[1], head_dim(config), config.num_key_value_heads, config.num_attention_heads
    keys, queries = {}, {}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, out, i=i: keys.__setitem__(i, out))
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, out, i=i: queries.__setitem__(i, out))
    model(ids)
    cos, sin = model.model.rotary_emb(keys[0], torch.arange(t)[None])
    rope = lambda x: apply_rotary_pos_emb(x, x, cos, sin)[0]  # noqa: E731
    codec = QJLKeyCodec(128, 4, 32, 0)
    print("| layer | attention KL | balanced | predicted variance factor | query RMS norm | centred key RMS norm |")
    print("|---|---|---|---|---|---|")
    for i in sorted(keys):
        pre = keys[i].view(1, t, kv, d).transpose(1, 2)
        k = rope(pre - pre.mean(2, keepdim=True))[0]  # [kv, T, d], RoPE is linear: centred pre-RoPE, turned
        q = rope(queries[i].view(1, t, heads, d).transpose(1, 2))[0].view(kv, heads // kv, t, d)
        eq, ek = q.pow(2).mean(2).reshape(heads, d), k.pow(2).mean(1)
        a = balance_scales(eq, ek)
        cells = [attention_kl(q, k, sketched_scores(codec, q, k)),
                 attention_kl(q, k, sketched_scores(codec, q / a[:, None, None], k * a[:, None])),
                 predicted_gain(eq, ek, a)]
        norms = [eq.sum(-1).sqrt().mean().item(), ek.sum(-1).sqrt().mean().item()]
        print(f"| {i} | " + " | ".join(f"{c:.4f}" for c in cells) + " | " + " | ".join(f"{n:.1f}" for n in norms)
              + " |")


if __name__ == "__main__":
    main()
