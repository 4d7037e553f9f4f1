"""How far keys spread around each kind of centre, layer by layer: the measurement behind lowbit's key centres.

Run:  python benchmarks/key_offsets.py [--model qwen2.5-coder-0.5b] [--tokens 1024] [--start 5000]

One window of the default text (``--tokens`` tokens from token ``--start``) through the full-precision model; per
layer, the root-mean-square distance of the post-RoPE keys (summed over head_dim, averaged over tokens and KV heads)
from: nothing (the keys' size), their mean over the window after RoPE, their mean per 128 tokens after RoPE, the
k_proj bias turned by RoPE (``key_centre: bias``) and the mean pre-RoPE key turned by RoPE (``key_centre: mean``,
here measured on the same window). Prints a table; writes nothing. Families with Llama-style attention (Llama,
Qwen2, Mistral).
"""

from __future__ import annotations

import torch
from harness import probe_window
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lowbit.models.arch import head_dim


def spread(x: torch.Tensor) -> float:
    return x.pow(2).sum(-1).mean().sqrt().item()


@torch.no_grad()
def main() -> None:
    loaded, ids = probe_window(__doc__.splitlines()[0])
    model, config = loaded.model, loaded.model.config
    d, heads, pre = head_dim(config), config.num_key_value_heads, {}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, out, i=i: pre.__setitem__(i, out))
    model(ids)
    cos, sin = model.model.rotary_emb(pre[0], torch.arange(ids.shape[1])[None])
    rope = lambda x: apply_rotary_pos_emb(x, x, cos, sin)[0]  # noqa: E731
    print("| layer | keys | post-RoPE mean | post-RoPE mean per 128 | RoPE(bias) | RoPE(pre-RoPE mean) |")
    print("|---|---|---|---|---|---|")
    for i, k in sorted(pre.items()):
        k = k.view(1, -1, heads, d).transpose(1, 2)  # [1, H, T, d] pre-RoPE
        post = rope(k)
        bias = model.model.layers[i].self_attn.k_proj.bias
        bias = torch.zeros_like(k) if bias is None else bias.view(1, heads, 1, d).expand_as(k)
        groups = post[:, :, : post.shape[2] // 128 * 128].reshape(1, heads, -1, 128, d)
        cells = [spread(post), spread(post - post.mean(2, keepdim=True)),
                 spread(groups - groups.mean(3, keepdim=True)), spread(post - rope(bias)),
                 spread(post - rope(k.mean(2, keepdim=True).expand_as(k)))]
        print(f"| {i} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
