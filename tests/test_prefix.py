"""PrefixQuant's prefixed cache: logits for the real tokens, generation after the prefix, exact prefix K/V."""

import torch

import lowbit
from lowbit.methods.gptq import GPTQResult
from lowbit.methods.prefix import PrefixResult
from lowbit.models.arch import decoder_layers, spec_for
from lowbit.surgery.attention import attention_hooks
from lowbit.surgery.prefix import attach_prefix, fill_prefix, keep_prefix_exact, prefix_cache, prefix_tokens
from tests.conftest import tiny_data, tiny_model

PREFIX = [5, 9, 1]


def _prefixed(model):
    """``model`` with PREFIX attached (in place) and returned."""
    attach_prefix(model, spec_for(model), PREFIX, prefix_cache(model, PREFIX))
    return model


def same_model_type(quantized, original) -> bool:
    """The quantized model is the original's transformers type, no wrapper: its class is the original's or the
    same-named subclass whose ``generate`` picks lowbit's cache (lowbit.surgery.kvcache.use_decode_cache)."""
    from lowbit.surgery.kvcache import DecodesWithLowbitCache

    cls = type(quantized)
    return cls is type(original) or cls.__mro__[:3] == (cls, DecodesWithLowbitCache, type(original)) and \
        cls.__name__ == type(original).__name__


def test_forward_equals_the_model_on_prefix_plus_tokens(family):
    model = tiny_model(family)
    tokens = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(torch.cat([torch.tensor([PREFIX] * 2), tokens], 1)).logits[:, len(PREFIX):]
        prefixed = _prefixed(model)
        got = prefixed(tokens, use_cache=False).logits
        again = prefixed(tokens).logits  # the stored prefix is not consumed by a call
        mask = prefixed(tokens, attention_mask=torch.ones_like(tokens)).logits  # a 2D mask covers the caller's tokens
    assert same_model_type(prefixed, tiny_model(family)) and prefix_tokens(prefixed) == PREFIX
    assert got.shape == (2, 20, model.config.vocab_size)
    assert torch.allclose(got, full, atol=1e-5) and torch.equal(got, again) and torch.equal(got, mask)


def test_generate_continues_after_the_prefix():
    model = tiny_model("llama")
    prompts = torch.randint(1, 320, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompts)
    mask[1, :2], prompts[1, :2] = 0, 0  # left padding in the second row
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        full = torch.cat([torch.tensor([PREFIX] * 2), prompts], 1)
        full_mask = torch.cat([torch.ones(2, len(PREFIX), dtype=mask.dtype), mask], 1)
        reference = model.generate(full, attention_mask=full_mask, **kw)[:, len(PREFIX):]
        out = _prefixed(model).generate(prompts, attention_mask=mask, **kw)
    assert torch.equal(out, reference) and torch.equal(out[:, :6], prompts)


def test_kv_quantizers_leave_the_prefix_exact():
    model = tiny_model("llama")
    cache = prefix_cache(model, PREFIX)
    quantized = lowbit.quantize(model, "kv4", tiny_data())
    spec = spec_for(quantized)
    keep_prefix_exact(quantized, spec, len(PREFIX))
    seen = []
    hook = attention_hooks(decoder_layers(quantized, spec)[0].self_attn)[0]
    handle = hook.register_forward_hook(lambda m, args, out: seen.append((args[1], out[1])))
    attach_prefix(quantized, spec, PREFIX, cache)
    with torch.no_grad():
        quantized(torch.randint(0, 320, (1, 8)))
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
    assert same_model_type(q, tiny_model("llama")) and prefix_tokens(q) == [5, 1]
    assert session.get(PrefixResult).tokens == [5, 1]
    assert session.get(GPTQResult).tokens == 4 * 32  # the prefix positions are not counted as calibration tokens
    hooks = attention_hooks(decoder_layers(q, spec_for(q))[1].self_attn)
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
        cache = fill_prefix(q, PackedCache.for_model(q), 1)
        stepwise = torch.cat([q(tokens[:, i:i + 1], past_key_values=cache).logits for i in range(20)], 1)
        out = q.generate(tokens[:, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert cache.layers[0].sink_keys.shape[2] == 2 and cache.layers[0].packed_tokens > 0
    assert torch.allclose(one_pass, stepwise, atol=2e-4)
    assert out.shape == (1, 10)


def test_the_prefix_is_model_state_that_copies_and_enumerates():
    """The prefix lives in the model's QuantState (buffers in state_dict), survives a deepcopy with its hook, and
    quantization_parts lists every module lowbit attached."""
    import copy

    from lowbit.state import QuantState
    from lowbit.surgery.attach import quantization_parts

    q = lowbit.quantize(tiny_model("llama"), "w4a4kv4-rtn", tiny_data())
    attach_prefix(q, spec_for(q), PREFIX, prefix_cache(q, PREFIX))
    state = q.state_dict()
    assert state["lowbit.prefix_tokens"].tolist() == PREFIX
    assert state["lowbit.prefix_keys"].shape[:4] == (2, 1, 2, len(PREFIX))  # [layers, 1, kv_heads, prefix, ...]
    assert q.lowbit.describe()["recipe"]["name"] == "w4a4kv4-rtn"
    kinds = {type(m).__name__ for _, m in quantization_parts(q)}
    assert {"QuantLinear", "ActQuantizer", "KVQuantHook", "QuantState"} <= kinds
    assert isinstance(dict(quantization_parts(q))["lowbit"], QuantState)
    tokens = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(q)(tokens).logits, q(tokens).logits)
        assert not torch.equal(tiny_model("llama")(tokens).logits, q(tokens).logits)
