"""Key centres (lowbit.surgery.key_centre): keys rounded around their RoPE-turned pre-RoPE centre, exactly."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.data import TokenData
from lowbit.errors import RecipeError
from lowbit.recipe import Recipe
from lowbit.surgery.attention import KVQuantHook
from lowbit.surgery.key_centre import measure_centres, rope_offsets, rotate_half
from tests.conftest import tiny_model


def _data() -> TokenData:
    g = torch.Generator().manual_seed(5)
    return TokenData(eval_windows=torch.randint(0, 320, (2, 40), generator=g),
                     calib_tokens=torch.randint(0, 320, (4000,), generator=g), seed=0)


def _recipe(centre: str | None, quarot: bool = False, bits: int = 2) -> Recipe:
    kv = {"format": f"int{bits}", "symmetric": False, "granularity": "head", "dynamic": True}
    if centre:
        kv["key_centre"] = centre
    steps = [{"method": "quarot", "r1": False, "r2": False, "r4": False, "r3": True}] if quarot else []
    return Recipe.from_dict({"name": "t", "steps": steps, "kv": kv, "calibration": {"samples": 4, "seq_len": 32}})


def _hooked_keys(model, tokens) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key in, key out) at every KV quantizer of one forward."""
    seen = []
    hooks = [m for m in model.modules() if isinstance(m, KVQuantHook)]
    handles = [h.register_forward_hook(lambda m, i, o: seen.append((i[1], o[1]))) for h in hooks]
    with torch.no_grad():
        model(tokens)
    for h in handles:
        h.remove()
    return seen


def test_rope_offsets_turn_each_channel_pair_by_its_position():
    """Channel i and i + d/2 turn together by the position's angle: a norm-preserving rotation per pair, the identity
    at position 0."""
    centre = torch.randn(2, 8)
    theta = torch.tensor([0.0, 0.3, 1.1])[:, None] * torch.tensor([1.0, 0.1, 0.01, 0.001]).repeat(2)[None]
    out = rope_offsets(centre, theta.cos(), theta.sin())[0]  # [H, T, d]
    assert torch.allclose(out[:, 0], centre)
    pairs = out[..., :4] ** 2 + out[..., 4:] ** 2
    assert torch.allclose(pairs, (centre[:, None, :4] ** 2 + centre[:, None, 4:] ** 2).expand_as(pairs), atol=1e-5)
    assert torch.equal(rotate_half(rotate_half(centre)), -centre)


@pytest.mark.parametrize("quarot", [False, True])
@pytest.mark.parametrize("family", ["qwen2", "qwen2-real"])
def test_keys_that_are_only_the_bias_round_exactly_around_the_bias(family, quarot):
    """With k_proj's weight zeroed every key is RoPE_t(bias) (then R3): centred on the bias, 2-bit keys come out
    exactly as they went in, which checks the positions, the RoPE pairing and R3's turn of the offsets; without the
    centre the same keys are rounded coarsely."""
    model = tiny_model(family)
    for layer in model.model.layers:
        layer.self_attn.k_proj.weight.data.zero_()
    tokens = _data().eval_windows
    for centre in ("bias", None):
        q = lowbit.quantize(model, _recipe(centre, quarot), _data())
        for key, out in _hooked_keys(q, tokens):
            err = float((out - key).abs().max() / key.abs().max())
            assert (err < 1e-5) if centre else (err > 1e-2)


def test_the_mean_centre_is_the_mean_pre_rope_key():
    model = tiny_model("qwen2-real")
    batches = _data().calib_tokens[:64].view(2, 32)
    centres = measure_centres(model, lowbit.models.arch.spec_for(model), batches)
    layer = model.model.layers[0]
    with torch.no_grad():
        h = layer.input_layernorm(model.model.embed_tokens(batches))
        want = layer.self_attn.k_proj(h).reshape(-1, model.config.num_key_value_heads, 16).mean(0)
    assert torch.allclose(centres[0], want, atol=1e-4)


@pytest.mark.parametrize("centre", ["bias", "mean"])
def test_centred_keys_cost_less_on_a_biased_model_and_nothing_on_an_unbiased_one(centre):
    """On the tiny Qwen2 with a real model's large k bias, int4 keys around the centre are much closer to the exact
    keys than plain per-token int4; on Llama (no bias) ``bias`` changes nothing at all."""
    tokens = _data().eval_windows
    model = tiny_model("qwen2-real")
    errors = {}
    for c in (centre, None):
        seen = _hooked_keys(lowbit.quantize(model, _recipe(c, bits=4), _data()), tokens)
        errors[c] = sum(float((o - k).square().mean()) for k, o in seen)
    assert errors[centre] < 0.05 * errors[None]
    llama = tiny_model("llama")
    outs = [lowbit.quantize(llama, _recipe(c, bits=4), _data())(tokens).logits for c in ("bias", None)]
    assert torch.equal(*outs)


def test_decoding_token_by_token_gives_the_full_forward_scores():
    """The decode cache hands the quantizer one new token at a time (its cache position ``start``): the offsets
    follow the positions, so step-by-step decoding scores each token as the full forward does."""
    model = lowbit.quantize(tiny_model("qwen2-real"), _recipe("mean", quarot=True, bits=4), _data())
    prompt = _data().eval_windows[:1, :10]
    with torch.no_grad():
        run = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
        full = model(run.sequences[:, :-1]).logits[0, prompt.shape[1] - 1:]
    assert torch.allclose(torch.cat(run.logits), full, rtol=0, atol=1e-3)


def test_key_centre_is_refused_outside_dynamic_kv():
    with pytest.raises(RecipeError, match="key_centre needs dynamic"):
        Recipe.from_dict({"name": "t", "kv": {"format": "int4", "granularity": "head", "dynamic": False,
                                             "key_centre": "bias"}})
    with pytest.raises(RecipeError, match="key_centre is for the kv scheme"):
        Recipe.from_dict({"name": "t", "steps": [{"method": "rtn"}],
                          "weights": {"format": "int4", "key_centre": "bias"}})


def _cache_recipe(centre: str | None, quarot: bool = False) -> Recipe:
    cache = {"keys": {"codec": "qjl", "m": 64, "outliers": 2, "group": 8}, "values": {"codec": "int", "bits": 8},
             "window": 4, "sink": 1}
    if centre:
        cache["key_centre"] = centre
    steps = [{"method": "quarot", "r1": False, "r2": False, "r4": False, "r3": True}] if quarot else []
    return Recipe.from_dict({"name": "t", "steps": steps, "kv_cache": cache,
                             "calibration": {"samples": 4, "seq_len": 32}})


@pytest.mark.parametrize("quarot", [False, True])
def test_a_packed_cache_around_the_bias_scores_bias_only_keys_exactly(quarot):
    """k_proj's weight zeroed, so every key is RoPE_t(bias) (then R3): around the bias, a 64-bit QJL sketch stores
    zeros and the scores come out exact (the 8-bit values are all that differs from full precision); without the
    centre the sketch of the large keys costs far more."""
    model = tiny_model("qwen2-real")
    for layer in model.model.layers:
        layer.self_attn.k_proj.weight.data.zero_()
    tokens = _data().eval_windows
    with torch.no_grad():
        fp = model(tokens).logits
        errors = {c: float((lowbit.quantize(model, _cache_recipe(c, quarot), _data())(tokens).logits - fp).abs().max())
                  for c in ("bias", None)}
    assert errors["bias"] < 0.02 * errors[None], errors


@pytest.mark.parametrize("quarot", [False, True])
def test_a_centred_packed_cache_decodes_as_its_one_pass_evaluation(quarot):
    """Step-by-step decoding with the packed cache (keys stored around the offsets of their positions, scores given
    ``q . offsets`` back) equals the decode-equivalent one-pass forward, with and without R3."""
    from lowbit.kv.cache import PackedCache

    q = lowbit.quantize(tiny_model("qwen2-real"), _cache_recipe("mean", quarot), _data())
    tokens = _data().eval_windows[:1, :30]
    with torch.no_grad():
        one_pass = q(tokens, use_cache=False).logits
        cache = PackedCache.for_model(q)
        stepwise = torch.cat([q(tokens[:, i:i + 1], past_key_values=cache).logits for i in range(30)], dim=1)
    assert cache.layers[0].packed_tokens > 0
    assert torch.allclose(one_pass, stepwise, atol=2e-4), float((one_pass - stepwise).abs().max())


@pytest.mark.parametrize("kind", ["kv", "kv_cache"])
def test_key_centres_save_and_load(tmp_path, kind):
    from lowbit.artifact import load, save

    recipe = _recipe("mean", quarot=True, bits=4) if kind == "kv" else _cache_recipe("mean", quarot=True)
    q = lowbit.quantize(tiny_model("qwen2-real"), recipe, _data())
    save(q, tmp_path / "m")
    loaded = load(tmp_path / "m", simulate=True)
    tokens = _data().eval_windows
    with torch.no_grad():
        assert torch.equal(q(tokens).logits, loaded(tokens).logits)


def test_an_exact_prefix_stays_exact_and_the_rest_rounds_around_its_own_positions():
    """With a PrefixQuant prefix of 3 positions the hook keeps them exact and rounds position t >= 3 around the offset
    of position t (not of t - 3)."""
    q = lowbit.quantize(tiny_model("qwen2-real"), _recipe("mean", bits=4), _data())
    hook = next(m for m in q.modules() if isinstance(m, KVQuantHook))
    hook.exact_prefix = 3
    key = torch.randn(1, q.config.num_key_value_heads, 10, 16) * 4
    out = hook.quantize_key(key)
    o = hook.centre.offsets(torch.arange(10))
    assert torch.equal(out[:, :, :3], key[:, :, :3])
    assert torch.allclose(out[:, :, 3:], hook.k_quant(key[:, :, 3:] - o[:, :, 3:]) + o[:, :, 3:], atol=1e-6)
