"""PrefixQuant's prefixed cache: logits for the real tokens, generation after the prefix, exact prefix K/V."""

import torch

import lowbit
from lowbit.methods.gptq import GPTQResult
from lowbit.methods.prefix import PrefixResult
from lowbit.models.arch import decoder_layers, spec_for
from lowbit.surgery.attention import attention_hooks
from lowbit.surgery.prefix import PrefixedModel, keep_prefix_exact, prefix_cache
from tests.conftest import tiny_model

PREFIX = [5, 9, 1]


def test_forward_equals_the_model_on_prefix_plus_tokens(family):
    model = tiny_model(family)
    tokens = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(0))
    wrapped = PrefixedModel(model, PREFIX, prefix_cache(model, PREFIX))
    with torch.no_grad():
        got = wrapped(tokens, use_cache=False).logits
        full = model(torch.cat([torch.tensor([PREFIX] * 2), tokens], 1)).logits[:, len(PREFIX):]
        again = wrapped(tokens).logits  # the stored cache is not consumed by a call
    assert got.shape == (2, 20, model.config.vocab_size)
    assert torch.allclose(got, full, atol=1e-5) and torch.equal(got, again)


def test_generate_continues_after_the_prefix():
    model = tiny_model("llama")
    prompt = torch.randint(0, 320, (1, 6), generator=torch.Generator().manual_seed(1))
    wrapped = PrefixedModel(model, PREFIX, prefix_cache(model, PREFIX))
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        out = wrapped.generate(prompt, **kw)
        reference = model.generate(torch.cat([torch.tensor([PREFIX]), prompt], 1), **kw)[:, len(PREFIX):]
    assert torch.equal(out, reference) and torch.equal(out[:, :6], prompt)


def test_kv_quantizers_leave_the_prefix_exact():
    model = tiny_model("llama")
    cache = prefix_cache(model, PREFIX)
    quantized = lowbit.quantize(model, "kv4")
    spec = spec_for(quantized)
    keep_prefix_exact(quantized, spec, len(PREFIX))
    seen = []
    hook = attention_hooks(decoder_layers(quantized, spec)[0].self_attn)[0]
    handle = hook.register_forward_hook(lambda m, args, out: seen.append((args[1], out[1])))
    with torch.no_grad():
        PrefixedModel(quantized, PREFIX, cache)(torch.randint(0, 320, (1, 8)))
    handle.remove()
    key_in, key_out = seen[0]
    assert torch.equal(key_out[:, :, :3], key_in[:, :, :3])  # prefix positions untouched
    assert not torch.equal(key_out[:, :, 3:], key_in[:, :, 3:])  # the real tokens are quantized


def _calib():
    from lowbit.data import TokenData

    g = torch.Generator().manual_seed(7)
    return TokenData(eval_windows=torch.randint(0, 320, (2, 48), generator=g),
                     calib_tokens=torch.randint(0, 320, (4000,), generator=g), seed=0)


def test_prefix_step_in_a_recipe_wraps_the_quantized_model():
    from lowbit.recipe import Recipe

    recipe = Recipe.from_dict({
        "steps": [{"method": "quarot"}, {"method": "prefix", "tokens": [5, 1]}, {"method": "gptq"}],
        "weights": {"format": "int4", "granularity": "channel"},
        "activations": {"format": "int8", "granularity": "tensor", "dynamic": False},
        "kv": {"format": "int4", "symmetric": False, "granularity": "head", "dynamic": False},
        "calibration": {"samples": 4, "seq_len": 32}})
    q, session = lowbit.quantize_with_session(tiny_model("llama"), recipe, _calib())
    assert isinstance(q, PrefixedModel) and q.prefix == [5, 1] and session.get(PrefixResult).tokens == [5, 1]
    assert session.get(GPTQResult).tokens == 4 * 32  # the prefix positions are not counted as calibration tokens
    hooks = attention_hooks(decoder_layers(q.model, spec_for(q.model))[1].self_attn)
    assert [h.exact_prefix for h in hooks if getattr(h, "quantizes_kv", False)] == [2]
    result = lowbit.evaluate(tiny_model("llama"), q, _calib().eval_windows)
    assert result.tokens == 2 * 47 and result.kl_vs_fp > 0


def test_prefix_detection_and_bad_order():
    import pytest

    from lowbit.errors import RecipeError
    from lowbit.recipe import Recipe

    recipe = Recipe.from_dict({"steps": [{"method": "quarot"}, {"method": "prefix", "eta": 3.0, "samples": 4,
                                                                 "seq_len": 32}]})
    _, session = lowbit.quantize_with_session(tiny_model("llama"), recipe, _calib())
    assert session.get(PrefixResult).tokens[-1] == tiny_model("llama").config.bos_token_id
    assert session.get(PrefixResult).largest_ratio_with_prefix > 0
    with pytest.raises(RecipeError, match=r"step 'quarot' \(rotation\) must come before step 'prefix' \(prefix\)"):
        Recipe.from_dict({"steps": [{"method": "prefix"}, {"method": "quarot"}]})


def test_prefix_with_a_packed_cache_is_decode_equivalent_and_generates():
    """A prefixed model with a packed KV cache: the one-pass forward equals decoding token by token from a packed
    cache whose exact sink holds the prefix, and generate runs from that cache."""
    from lowbit.kv.cache import PackedCache
    from lowbit.recipe import Recipe

    recipe = Recipe.from_dict({"steps": [{"method": "prefix", "tokens": [5, 1]}],
                               "kv_cache": {"keys": {"codec": "int", "bits": 2}, "values": {"codec": "int", "bits": 2},
                                            "window": 3}})
    q = lowbit.quantize(tiny_model("llama"), recipe, _calib())
    tokens = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        one_pass = q(tokens).logits
        cache = PackedCache.with_prefix(q.model, q._cache_for(1))
        stepwise = torch.cat([q.model(tokens[:, i:i + 1], past_key_values=cache).logits for i in range(20)], 1)
        out = q.generate(tokens[:, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert cache.layers[0].sink_keys.shape[2] == 2 and cache.layers[0].packed_tokens > 0
    assert torch.allclose(one_pass, stepwise, atol=2e-4)
    assert out.shape == (1, 10)
