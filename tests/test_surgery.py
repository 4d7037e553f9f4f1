"""Model surgery on tiny Llama / Qwen2 / Mistral models: each quantization step is proven real."""

import pytest
import torch

import lowbit
from lowbit.models.arch import head_dim
from lowbit.recipe import Recipe, load_preset
from lowbit.surgery.attach import act_quantizers, quant_linears
from lowbit.surgery.attention import KVQuantHook

INT4_SYM_LEVELS = 15  # restricted symmetric int4: -7..7


def _recipe(**kw) -> Recipe:
    return Recipe.from_dict(kw)


def _max_distinct_per_row(t: torch.Tensor) -> int:
    rows = t.reshape(-1, t.shape[-1])
    return max(len(torch.unique(r)) for r in rows)


def test_rtn_puts_every_targeted_weight_on_the_grid(model):
    q = lowbit.quantize(model, _recipe(steps=[{"method": "rtn"}], weights={"format": "int4", "granularity": "channel"}))
    linears = list(quant_linears(q))
    assert len(linears) == 7 * model.config.num_hidden_layers
    for _, linear in linears:
        assert _max_distinct_per_row(linear.weight) <= INT4_SYM_LEVELS
    # the original is untouched (quantize works on a copy) and still off the grid
    assert _max_distinct_per_row(model.model.layers[0].mlp.up_proj.weight) > INT4_SYM_LEVELS


def test_group_weights_have_a_scale_per_group(model):
    scheme = {"format": "int4", "granularity": "group", "group_size": 32}
    q = lowbit.quantize(model, _recipe(steps=[{"method": "rtn"}], weights=scheme))
    down = q.model.layers[0].mlp.down_proj  # in_features 160 = 5 groups of 32 (4864 = 152 in qwen2-real)
    n_groups = down.in_features // 32
    assert down.weight_scale.numel() == down.out_features * n_groups
    groups = down.weight.reshape(down.out_features, n_groups, 32)
    assert _max_distinct_per_row(groups) <= INT4_SYM_LEVELS


def test_lm_head_and_embeddings_stay_full_precision_by_default(model):
    q = lowbit.quantize(model, "w4a16-rtn")
    assert torch.equal(q.lm_head.weight, model.lm_head.weight)
    assert torch.equal(q.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_targeting_lm_head_unties_it_from_the_embeddings():
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    recipe = _recipe(steps=[{"method": "rtn"}], weights={"format": "int4"}, targets=["lm_head"])
    q = lowbit.quantize(model, recipe)
    assert _max_distinct_per_row(q.lm_head.weight) <= INT4_SYM_LEVELS
    assert torch.equal(q.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_qwen2_biases_survive_the_swap():
    from tests.conftest import tiny_model

    model = tiny_model("qwen2")
    q = lowbit.quantize(model, "w8a8-rtn")
    for a, b in zip(model.model.layers, q.model.layers):
        assert torch.equal(a.self_attn.q_proj.bias, b.self_attn.q_proj.bias)


def test_activation_quantization_is_real(model, tokens):
    seen = []
    q = lowbit.quantize(model, _recipe(activations={"format": "int4", "granularity": "token"}))
    quantizers = list(act_quantizers(q))
    assert len(quantizers) == 7 * model.config.num_hidden_layers
    handles = [m.register_forward_hook(lambda m, i, o: seen.append(o)) for m in quantizers]
    with torch.no_grad():
        q(tokens)
    for h in handles:
        h.remove()
    assert len(seen) == len(quantizers)
    assert all(_max_distinct_per_row(o) <= INT4_SYM_LEVELS for o in seen)
    with torch.no_grad():
        assert not torch.allclose(q(tokens).logits, model(tokens).logits)


def test_kv_quantization_is_real_and_after_rope(model, tokens):
    seen = []
    plain = load_preset("kv4")  # keys rounded as they are (the preset's key centre adds a per-channel offset back)
    q = lowbit.quantize(model, plain.updated(kv={**plain.kv.model_dump(), "key_centre": None}))
    hooks = [m for m in q.modules() if isinstance(m, KVQuantHook)]
    assert len(hooks) == model.config.num_hidden_layers
    assert q.config._attn_implementation == "lowbit"
    handles = [h.register_forward_hook(lambda m, i, o: seen.append((i, o))) for h in hooks]
    with torch.no_grad():
        out = q(tokens).logits
    for h in handles:
        h.remove()
    (query, key, value), (q_out, k_out, v_out) = seen[0]
    assert key.shape[1] == model.config.num_key_value_heads and key.shape[2] == tokens.shape[1]
    assert torch.equal(q_out, query)
    assert _max_distinct_per_row(k_out) <= 16 and _max_distinct_per_row(v_out) <= 16  # asym int4
    assert not torch.allclose(k_out, key)
    assert _max_distinct_per_row(key) > 16 or key.shape[-1] <= 16  # rows of 16 channels hold at most 16 values
    # post-RoPE: the key the hook sees equals rope(k_proj(x)) for the first layer's input
    layer = model.model.layers[0]
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    with torch.no_grad():
        h = layer.input_layernorm(model.model.embed_tokens(tokens))
        k = layer.self_attn.k_proj(h).view(*tokens.shape, -1, head_dim(model.config)).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(tokens.shape[1])[None])
        _, k_rope = apply_rotary_pos_emb(k, k, cos, sin)
        assert torch.allclose(k_rope, key, atol=1e-5)
        assert not torch.allclose(out, model(tokens).logits)


def test_fp_recipe_changes_nothing(model, tokens):
    q = lowbit.quantize(model, "fp")
    with torch.no_grad():
        assert torch.equal(q(tokens).logits, model(tokens).logits)


def test_static_scales_calibrate_and_never_look_at_the_input(model, tokens, monkeypatch):
    from lowbit import quant
    from lowbit.data import TokenData

    data = TokenData(eval_windows=tokens, calib_tokens=torch.randint(0, 320, (400,)), seed=0)
    recipe = _recipe(
        activations={"format": "int8", "granularity": "tensor", "dynamic": False},
        kv={"format": "int8", "granularity": "head", "dynamic": False, "symmetric": True},
        calibration={"samples": 4, "seq_len": 32},
    )
    q = lowbit.quantize(model, recipe, data)
    quantizers = list(act_quantizers(q))
    assert all(qz.scale is not None for qz in quantizers)
    kv_scale = next(qz for qz in quantizers if qz.kind == "kv").scale
    assert kv_scale.numel() == model.config.num_key_value_heads

    def no_observers(*a, **k):
        raise AssertionError("a static quantizer computed a range at run time")

    monkeypatch.setattr("lowbit.surgery.quantizer.observe_range", no_observers)
    monkeypatch.setattr(quant.qparams, "observe_range", no_observers, raising=False)
    with torch.no_grad():
        q(tokens)


def test_nan_in_calibration_is_a_clear_error(model):
    from lowbit.data import TokenData
    from lowbit.errors import CalibrationError

    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    data = TokenData(eval_windows=torch.zeros(1, 8, dtype=torch.long), calib_tokens=torch.arange(100), seed=0)
    recipe = _recipe(
        activations={"format": "int8", "granularity": "tensor", "dynamic": False},
        calibration={"samples": 2, "seq_len": 16},
    )
    with pytest.raises(CalibrationError, match="NaN or inf"):
        lowbit.quantize(model, recipe, data)


def test_w8a8_stays_close_and_w4a4_does_not(model, tokens):
    """SQNR floors on logits: 8-bit quantization is nearly lossless, 4-bit measurably worse."""

    def sqnr(recipe):
        with torch.no_grad():
            ref, out = model(tokens).logits, lowbit.quantize(model, recipe)(tokens).logits
        return 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()).item()

    assert sqnr("w8a8-rtn") > 30
    assert sqnr("w4a4-rtn") < sqnr("w8a8-rtn") - 10
