"""Packed caches in a real model: decode-equivalent one-pass attention equals step-by-step decoding, prefill is
exact, generate works with batches and padding, and the bytes held are the packed ones."""

import pytest
import torch

from lowbit.kv.cache import PackedCache
from lowbit.kv.codecs import IntCodec, QJLKeyCodec, TurboCodec
from lowbit.kv.spec import CacheSpec
from lowbit.surgery.attention import decode_equivalent
from tests.conftest import tiny_config, tiny_data

SPECS = {
    "int4": CacheSpec(IntCodec(4), IntCodec(4), window=4, sink=1),
    "kivi2": CacheSpec(IntCodec(2, axis="channel", group=8), IntCodec(2, group=16), window=4, sink=0),
    "qjl": CacheSpec(QJLKeyCodec(m=64, outliers=4, group=8), IntCodec(2, group=16), window=3, sink=1),
    "turbo3": CacheSpec(TurboCodec(3), TurboCodec(3), window=0, sink=1),
    "turbo2+qjl": CacheSpec(TurboCodec(2, residual_qjl=True), TurboCodec(3), window=2, sink=0),
}


def _model(heads=4, kv_heads=2, hidden=128):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_attention_heads, config.num_key_value_heads, config.hidden_size = heads, kv_heads, hidden
    config.head_dim = hidden // heads
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _stepwise_logits(model, tokens, spec):
    cache = PackedCache(model, spec)
    with torch.no_grad():
        steps = [model(tokens[:, i:i + 1], past_key_values=cache, use_cache=True).logits for i in range(tokens.shape[1])]
    return torch.cat(steps, dim=1), cache


@pytest.mark.parametrize("name", list(SPECS))
def test_one_pass_equals_step_by_step_decoding(name):
    model, spec = _model(), SPECS[name]
    tokens = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    stepwise, cache = _stepwise_logits(model, tokens, spec)
    with torch.no_grad(), decode_equivalent(model, spec):
        one_pass = model(tokens).logits
    with torch.no_grad():
        fp = model(tokens).logits
    assert torch.allclose(one_pass, stepwise, atol=2e-4), float((one_pass - stepwise).abs().max())
    assert not torch.allclose(one_pass, fp, atol=1e-3)  # the cache really quantized something
    assert cache.layers[0].packed_tokens > 0


@pytest.mark.parametrize("name", list(SPECS))
def test_one_pass_in_query_blocks_equals_step_by_step(name, monkeypatch):
    """Decode-equivalent attention a few queries at a time (causal keys only) still equals step-by-step decoding."""
    from lowbit.kv import attend

    model, spec = _model(), SPECS[name]
    tokens = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(4))
    stepwise, _ = _stepwise_logits(model, tokens, spec)
    monkeypatch.setattr(attend, "QUERY_CHUNK", 7)
    with torch.no_grad(), decode_equivalent(model, spec):
        assert torch.allclose(model(tokens).logits, stepwise, atol=2e-4)


def test_gqa_group_of_three_and_head_dim_48():
    model, spec = _model(heads=6, kv_heads=2, hidden=288), SPECS["qjl"]
    tokens = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(2))
    stepwise, _ = _stepwise_logits(model, tokens, spec)
    with torch.no_grad(), decode_equivalent(model, spec):
        assert torch.allclose(model(tokens).logits, stepwise, atol=2e-4)


def test_prefill_attention_is_exact():
    """A prompt processed at once attends over exact keys, so its logits are the full-precision ones."""
    model = _model()
    tokens = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fp = model(tokens).logits
        cache = PackedCache(model, SPECS["kivi2"])
        got = model(tokens, past_key_values=cache, use_cache=True).logits
    assert torch.allclose(got, fp, atol=1e-5)
    assert cache.layers[0].packed_tokens == 24  # 30 tokens, window 4, key groups of 8: three groups packed


def test_generate_with_padding_batches_and_bytes():
    model = _model()
    prompts = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompts)
    mask[0, :5] = 0  # left padding in the first row
    prompts[0, :5] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = model.generate(prompts, **kwargs)
        wide = model.generate(prompts, past_key_values=PackedCache(model, CacheSpec(IntCodec(4), IntCodec(4),
                                                                                      window=64)), **kwargs)
        cache = PackedCache(model, SPECS["int4"])
        packed = model.generate(prompts, past_key_values=cache, **kwargs)
    assert torch.equal(wide, reference)  # a window covering everything is exact
    assert packed.shape == reference.shape
    layer = cache.layers[0]
    tokens = layer.get_seq_length()
    assert tokens == 31  # 12 prompt + 20 generated - 1 (the last token is never fed back)
    # 2 rows x 2 KV heads: 1 sink + 4..4 window tokens in fp32, the rest 4-bit codes + fp16 scale and min per token
    exact = 2 * 2 * (1 + layer.recent_keys.shape[2]) * 32 * 4 * 2
    packed_bytes = 2 * 2 * layer.packed_tokens * (32 * 4 // 8 + 4) * 2
    spare = layer._runs[0].nbytes + layer._runs[1].nbytes - packed_bytes  # room a growing run keeps ahead
    assert layer.nbytes == exact + packed_bytes + spare and 0 <= spare


def test_recipe_kv_cache_quantizes_evaluates_and_generates():
    """A kv_cache recipe (combined with a weight preset) gives a model whose one-pass forward is decode-equivalent
    and that decodes with PackedCache.for_model (which plain generate picks); a transformers cache given is refused
    with the fix in the message."""
    import lowbit
    from lowbit.recipe import load_recipe

    recipe = load_recipe("w8a8-rtn+kv-kivi")
    assert recipe.kv_cache is not None and recipe.weights is not None and recipe.name == "w8a8-rtn+kv-kivi"
    small = recipe.updated(kv_cache={**recipe.kv_cache.model_dump(), "window": 4})
    model = _model()
    q = lowbit.quantize(model, small, tiny_data())  # kv-kivi keys around their mean key: calibration text
    tokens = torch.randint(0, 320, (1, 70), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        one_pass = q(tokens, use_cache=False).logits
        cache = PackedCache.for_model(q)
        stepwise = torch.cat([q(tokens[:, i:i + 1], past_key_values=cache).logits for i in range(70)], dim=1)
    assert torch.allclose(one_pass, stepwise, atol=2e-4)
    from transformers import DynamicCache

    with pytest.raises(RuntimeError, match="PackedCache.for_model"):
        q.generate(tokens[:, :8], max_new_tokens=2, do_sample=False, past_key_values=DynamicCache())
    out = q.generate(tokens[:, :8], max_new_tokens=3, do_sample=False, past_key_values=PackedCache.for_model(q))
    plain = q.generate(tokens[:, :8], max_new_tokens=3, do_sample=False)  # given no cache: it picks its packed one
    assert out.shape == (1, 11) and torch.equal(out, plain)


def test_cache_bits_count_everything():
    """KIVI 2-bit at 4096 tokens: 2 bits + fp16 scale/min per 32 elements (1 bit) for the whole 32-token groups after
    the exact first token, fp16 for that token, the 128-token window and the 31 tokens short of a group."""
    from lowbit.kv.cache import cache_bits
    from lowbit.recipe import load_recipe

    spec = load_recipe("kv-kivi").kv_cache.spec()
    packed = (4096 - 1 - 128) // 32 * 32
    assert packed == 3936
    assert cache_bits(spec, 64, 4096) == pytest.approx((3 * packed + 16 * (4096 - packed)) / 4096)
    assert cache_bits(spec, 64, 8192) < cache_bits(spec, 64, 4096)


def test_kv_and_kv_cache_are_exclusive():
    from lowbit.errors import RecipeError
    from lowbit.recipe import load_recipe

    with pytest.raises(RecipeError, match="either kv"):
        load_recipe("kv4+kv-kivi")


def test_chunked_scoring_changes_nothing(monkeypatch):
    """Scoring and dequantizing the packed run in small chunks gives the same logits as in one piece."""
    from lowbit.kv import attend

    model, spec = _model(), SPECS["qjl"]
    tokens = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(8))
    whole, _ = _stepwise_logits(model, tokens, spec)
    monkeypatch.setattr(attend, "CHUNK_TOKENS", 8)
    chunked, cache = _stepwise_logits(model, tokens, spec)
    assert cache.layers[0].packed_tokens > 8
    assert torch.allclose(chunked, whole, atol=1e-5)


def test_static_cache_is_calibrated_per_layer_and_decode_equivalent():
    import lowbit
    from lowbit.data import TokenData
    from lowbit.kv.cache import cache_bits
    from lowbit.kv.static import StaticIntCodec
    from lowbit.recipe import Recipe

    recipe = Recipe.from_dict({"kv_cache": {"keys": {"codec": "int", "bits": 4, "axis": "channel", "static": True},
                                            "values": {"codec": "int", "bits": 4, "static": True},
                                            "window": 4, "sink": 1},
                               "calibration": {"samples": 4, "seq_len": 32}})
    assert recipe.needs_calibration
    gen = torch.Generator().manual_seed(7)
    data = TokenData(eval_windows=torch.randint(0, 320, (1, 40), generator=gen),
                     calib_tokens=torch.randint(0, 320, (2000,), generator=gen), seed=0)
    model = _model()
    q = lowbit.quantize(model, recipe, data)
    spec = q.lowbit.cache_spec  # the model's QuantState holds the packed cache's spec
    assert len(spec.layers) == 2 and isinstance(spec.for_layer(1).keys, StaticIntCodec)
    assert spec.for_layer(0).keys.scale.shape == (2, 32)  # per KV head, per channel (keys)
    assert spec.for_layer(0).values.scale.shape == (2, 1)  # per KV head (values)
    assert not torch.equal(spec.for_layer(0).keys.scale, spec.for_layer(1).keys.scale)
    tokens = data.eval_windows
    with torch.no_grad():
        one_pass = q(tokens, use_cache=False).logits
        cache = PackedCache.for_model(q)
        stepwise = torch.cat([q(tokens[:, i:i + 1], past_key_values=cache).logits for i in range(40)], dim=1)
    assert torch.allclose(one_pass, stepwise, atol=2e-4)
    assert cache_bits(spec, 32, 4096) < 4.1  # codes only, plus the sink and window amortised
    with pytest.raises(lowbit.errors.CalibrationError, match="calibration data"):
        lowbit.quantize(model, recipe)


def test_packed_run_grows_in_place_and_matches_one_shot_packing():
    """Token-by-token flushes append into spare room (a few reallocations, not one per token), same packed data."""
    from lowbit.kv.cache import PackedLayer

    spec = CacheSpec(IntCodec(3), IntCodec(3), window=0, sink=0)
    kv = torch.randn(2, 1, 2, 300, 16, generator=torch.Generator().manual_seed(0))
    one_shot, stepped = PackedLayer(spec), PackedLayer(spec)
    one_shot.store(kv[0], kv[1])
    buffers = set()
    for i in range(300):
        stepped.store(kv[0][:, :, i:i + 1], kv[1][:, :, i:i + 1])
        buffers.add(stepped._runs[0]._buffers["codes"].data_ptr())
    for a, b in ((one_shot.packed_keys, stepped.packed_keys), (one_shot.packed_values, stepped.packed_values)):
        assert a.tokens == b.tokens == 300
        assert all(torch.equal(a.fields[k], b.fields[k]) for k in a.fields)
    assert len(buffers) <= 6  # capacity grows by a quarter (at least 64 slots): 1, 65, 145, 245, 370
    assert one_shot.nbytes <= stepped.nbytes <= 1.25 * one_shot.nbytes + 2 * 64 * 2 * 2 * 4


def test_hooked_layer_writes_in_place_and_follows_reordering_and_cropping():
    """HookedLayer keeps its keys/values in buffers allocated ahead; what it returns is always every stored token in
    order, also after transformers reorders (beam search) or crops the layer between steps."""
    from lowbit.kv.hooked import HookedLayer

    g = torch.Generator().manual_seed(0)
    layer, want = HookedLayer(), None
    layer.AHEAD = 2
    for step, n in enumerate((5, 1, 1, 1, 3, 1)):
        k = torch.randn(2, 3, n, 4, generator=g)
        layer.update(k, 2 * k)
        keys, values = layer.store(k, 2 * k)
        want = k if want is None else torch.cat([want, k], dim=-2)
        assert torch.equal(keys, want) and torch.equal(values, 2 * want) and layer.get_seq_length() == want.shape[-2]
        if step == 1:  # room left in the buffer: the next token must not land in the old order
            layer.reorder_cache(torch.tensor([1, 0]))
            want = want.flip(0)
        if step == 4:
            layer.crop(-2)
            want = want[..., :-2, :]
    ptr = layer.keys.untyped_storage().data_ptr()
    layer.store(torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4))
    assert layer.keys.untyped_storage().data_ptr() == ptr  # the next token lands in the buffer: no copy of the cache
