"""Bit accounting counts scales and zero-points, by hand-checkable formulas."""

import pytest

import lowbit
from lowbit.bits import activation_bits, kv_bits, runtime_bits_per_element, weight_bits
from lowbit.models.arch import spec_for
from lowbit.recipe import QuantScheme
from tests.conftest import tiny_model


def test_fp_model_is_16_bits():
    model = tiny_model("llama")
    spec = spec_for(model)
    assert weight_bits(model, spec) == {"weight": 16.0, "weight_all": 16.0}
    assert activation_bits(model, spec) == 16.0
    assert kv_bits(None, 32) == 16.0


def test_weight_bits_count_scales_and_zero_points():
    model = tiny_model("mistral")  # untied: lm_head is its own parameter
    spec = spec_for(model)
    q = lowbit.quantize(model, lowbit.Recipe.from_dict(
        {"steps": [{"method": "rtn"}], "weights": {"format": "int4", "symmetric": False, "granularity": "group",
                                                   "group_size": 32}}))
    # every decoder linear: 4 bits + (16-bit scale + 4-bit zero) per 32 weights; in_features 128 and 160 are multiples
    assert weight_bits(q, spec)["weight"] == pytest.approx(4 + 20 / 32)
    per_channel = lowbit.quantize(model, "w4a16-rtn")
    n_weights = sum(p.numel() for p in q.parameters())
    linear_numel = sum(m.weight.numel() for _, m in lowbit.surgery.attach.quant_linears(per_channel))
    n_rows = sum(m.out_features for _, m in lowbit.surgery.attach.quant_linears(per_channel))
    expected_all = (16 * (n_weights - linear_numel) + 4 * linear_numel + 16 * n_rows) / n_weights
    assert weight_bits(per_channel, spec)["weight_all"] == pytest.approx(expected_all)


def test_runtime_bits():
    token = QuantScheme(format="int4", symmetric=True, granularity="token")
    assert runtime_bits_per_element(token, 64) == pytest.approx(4 + 16 / 64)
    kv = QuantScheme(format="int4", symmetric=False, granularity="head")
    assert kv_bits(kv, 64) == pytest.approx(4 + 20 / 64)
    static = QuantScheme(format="int8", granularity="tensor", dynamic=False)
    assert runtime_bits_per_element(static, 64) == 8
    fp8 = QuantScheme(format="fp8_e4m3", granularity="token")
    assert runtime_bits_per_element(fp8, 576) == pytest.approx(8 + 16 / 576)
    group = QuantScheme(format="int4", granularity="group", group_size=48)
    assert runtime_bits_per_element(group, 100) == pytest.approx(4 + 3 * 16 / 100)  # 48 + 48 + partial 4


def test_activation_bits_average_over_linear_inputs():
    model = tiny_model("llama")
    q = lowbit.quantize(model, "w8a8-rtn")
    # inputs: q,k,v,gate,up read 128 wide, o reads 128, down reads 160; one 16-bit scale per token each
    widths = [128] * 6 + [160]
    expected = sum(8 * w + 16 for w in widths) / sum(widths)
    assert activation_bits(q, spec_for(q)) == pytest.approx(expected)
