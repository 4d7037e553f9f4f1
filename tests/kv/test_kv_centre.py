"""Centred KV codecs: exact accounting of the stored means, decode equivalence, and robustness to biased keys.

The biased model is a tiny seeded Qwen2 whose k_proj (and q_proj) biases are scaled up until the mean key is far
larger than the per-token variation, as in Qwen2.5's layers where it is 30-110 times larger."""

import pytest
import torch

from lowbit.kv.attend import decode_equivalent_attention
from lowbit.kv.cache import PackedCache, cache_bits
from lowbit.kv.centre import CentredCodec
from lowbit.kv.codecs import IntCodec, QJLKeyCodec, TurboCodec
from lowbit.kv.config import KVCacheConfig
from lowbit.kv.spec import CacheSpec
from lowbit.models.arch import decoder_layers, get_module, spec_for
from lowbit.surgery.attention import add_attention_hook, decode_equivalent, remove_attention_hooks
from tests.conftest import tiny_config, tiny_model


def _offset_keys(t=64, d=64, offset=30.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, t, d, generator=g) + offset * torch.randn(1, 2, 1, d, generator=g)


@pytest.mark.parametrize("codec", [CentredCodec(TurboCodec(3), 16), CentredCodec(TurboCodec(3), 16, scale=True),
                                   CentredCodec(IntCodec(4), 32, scale=True), CentredCodec(IntCodec(8), 16)])
def test_scores_and_sums_account_for_the_centre_exactly(codec):
    x = _offset_keys()
    q = torch.randn(1, 2, 5, 64, generator=torch.Generator().manual_seed(1))
    w = torch.softmax(torch.randn(1, 2, 5, 64, generator=torch.Generator().manual_seed(2)), -1)
    packed = codec.encode(x)
    decoded = codec.decode(packed, 64)
    assert torch.allclose(codec.scores(q, packed, 64), q @ decoded.transpose(-1, -2), atol=2e-3)
    assert torch.allclose(codec.weighted_sum(w, packed, 64), w @ decoded, atol=1e-4)
    per_group = 2 if codec.scale else 1  # float16 mean (and root-mean-square) per channel and group
    assert packed.nbytes == codec.inner.encode(x).nbytes + per_group * 2 * 2 * (64 // codec.group) * 64
    head, tail = packed.split(codec.group)
    assert torch.allclose(codec.decode(head, 64), decoded[:, :, :codec.group])
    assert torch.allclose(codec.decode(tail, 64), decoded[:, :, codec.group:])


def test_centring_removes_the_offset_from_the_error():
    x = _offset_keys()
    spread = (x - x.mean(2, keepdim=True)).norm()
    plain, centred = TurboCodec(3), CentredCodec(TurboCodec(3), 16)
    err = lambda c: float((c.decode(c.encode(x), 64) - x).norm() / spread)
    assert err(centred) < 0.25 * err(plain)
    q = torch.randn(1, 2, 8, 64, generator=torch.Generator().manual_seed(3))
    exact = q @ x.transpose(-1, -2)
    sketch = lambda c: float((c.scores(q, c.encode(x), 64) - exact).norm() / (q @ (x - x.mean(2, True)).mT).norm())
    assert sketch(CentredCodec(QJLKeyCodec(128, 4, 16), 16)) < 0.25 * sketch(QJLKeyCodec(128, 4, 16))


def test_bad_centre_settings_are_named():
    with pytest.raises(ValueError, match="scale: true needs a centre"):
        KVCacheConfig(keys={"codec": "turbo", "scale": True}, values={"codec": "int"})
    with pytest.raises(ValueError, match="must divide one another"):
        KVCacheConfig(keys={"codec": "qjl", "group": 32, "centre": 48}, values={"codec": "int"})
    with pytest.raises(ValueError, match="static int KV codec cannot take a centre"):
        KVCacheConfig(keys={"codec": "int", "static": True, "centre": 32}, values={"codec": "int"})


def test_layers_get_their_own_seed_and_bits_count_the_means():
    config = KVCacheConfig(keys={"codec": "turbo", "bits": 3, "centre": 64, "scale": True},
                           values={"codec": "turbo", "bits": 3}, window=0, sink=1)
    spec = config.spec()
    assert spec.for_layer(1).keys.inner.seed != spec.for_layer(0).keys.inner.seed
    plain = KVCacheConfig(keys={"codec": "turbo", "bits": 3}, values={"codec": "turbo", "bits": 3}, window=0, sink=1)
    extra = cache_bits(spec, 64, 1025) - cache_bits(plain.spec(), 64, 1025)
    assert extra == pytest.approx(2 * 16 / 64 / 2, abs=1e-3)  # mean and scale per 64 keys; values unchanged


def biased_qwen2(seed=0, bias=30.0):
    """A tiny Qwen2 (RoPE base 1e6, as Qwen2.5) whose q/k biases are large on the slowly rotating channels, where
    RoPE keeps them a shared offset: the mean key is tens of times the per-token variation."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen2")
    config.rope_parameters = {"rope_type": "default", "rope_theta": 1e6}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    d = config.hidden_size // config.num_attention_heads
    slow = (torch.arange(d) % (d // 2)) >= d // 4  # the second half of the RoPE frequencies: nearly still
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            heads = proj.bias.numel() // d
            proj.bias.data = (bias * torch.randn(heads, d, generator=gen) * slow).flatten()
    return model


class _Record(torch.nn.Module):
    def forward(self, q, k, v):
        self.q, self.k, self.v = q.detach(), k.detach(), v.detach()
        return q, k, v


def _qkv(model, tokens):
    """Post-RoPE queries, keys and values of every layer for ``tokens``."""
    arch = spec_for(model)
    attns = [get_module(layer, arch.attn) for layer in decoder_layers(model, arch)]
    recs = [_Record() for _ in attns]
    for attn, rec in zip(attns, recs, strict=True):
        add_attention_hook(model, attn, rec)
    with torch.no_grad():
        model(tokens, use_cache=False)
    for attn, rec in zip(attns, recs, strict=True):
        remove_attention_hooks(attn, lambda h, ours=rec: h is ours)
    return [(r.q, r.k, r.v) for r in recs], attns[0].scaling


def _attention_error(model, keys, tokens) -> float:
    """Mean over layers of the relative error of the attention output with ``keys`` (values exact, int8)."""
    layers, scaling = _qkv(model, tokens)
    exact = CacheSpec(IntCodec(8), IntCodec(8), window=tokens.shape[1], sink=0)
    errs = []
    for i, (q, k, v) in enumerate(layers):
        spec = CacheSpec(keys, IntCodec(8), window=0, sink=1).for_layer(i)
        ref = decode_equivalent_attention(q, k, v, exact, None, scaling)
        errs.append(float((decode_equivalent_attention(q, k, v, spec, None, scaling) - ref).norm() / ref.norm()))
    return sum(errs) / len(errs)


def test_the_biased_model_has_the_offset_it_claims():
    tokens = torch.randint(0, 320, (1, 65), generator=torch.Generator().manual_seed(1))
    (_, k, _), *_ = _qkv(biased_qwen2(), tokens)[0]
    mean = k.mean(2, keepdim=True)
    assert float(mean.norm(dim=-1).mean() / (k - mean).norm(dim=-1).mean()) > 10


@pytest.mark.parametrize("plain,robust,factor", [
    (TurboCodec(3), CentredCodec(TurboCodec(3), 16, scale=True), 0.3),
    (IntCodec(3), CentredCodec(IntCodec(3), 16, scale=True), 0.3),
    (QJLKeyCodec(128, 2, 16), CentredCodec(QJLKeyCodec(128, 2, 16), 16, scale=True), 0.4),  # measured 0.36x
])
def test_centred_keys_survive_a_large_k_bias_and_cost_nothing_without_one(plain, robust, factor):
    """Attention output error on the biased model drops by ``factor`` or more (QJL's sketch keeps a variance that
    grows with the large biased queries); on a model without offset it is unchanged or better (10% slack)."""
    tokens = torch.randint(0, 320, (1, 65), generator=torch.Generator().manual_seed(1))
    biased = biased_qwen2()
    assert _attention_error(biased, robust, tokens) < factor * _attention_error(biased, plain, tokens)
    unbiased = tiny_model("llama")
    assert _attention_error(unbiased, robust, tokens) <= 1.1 * _attention_error(unbiased, plain, tokens)


def test_centred_cache_one_pass_equals_step_by_step_decoding():
    model = biased_qwen2()
    spec = CacheSpec(CentredCodec(TurboCodec(3), 8, scale=True), CentredCodec(IntCodec(3), 8), window=3, sink=1)
    tokens = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    cache = PackedCache(model, spec)
    with torch.no_grad():
        steps = [model(tokens[:, i:i + 1], past_key_values=cache, use_cache=True).logits for i in range(40)]
        with decode_equivalent(model, spec):
            one_pass = model(tokens).logits
    stepwise = torch.cat(steps, dim=1)
    assert cache.layers[0].packed_tokens > 0
    assert torch.allclose(one_pass, stepwise, atol=5e-4), float((one_pass - stepwise).abs().max())
