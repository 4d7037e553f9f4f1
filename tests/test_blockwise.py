"""PrefixQuant's static quantization: prefix-aware layer streaming, clip-factor search, block fine-tuning, resume."""

from unittest import mock

import pytest
import torch

import lowbit
from lowbit.data import TokenData
from lowbit.methods.blockwise import BlockwiseResult
from lowbit.methods.prefix import PrefixResult
from lowbit.models.arch import decoder_layers, spec_for
from lowbit.recipe import Recipe
from lowbit.surgery.block_finetune import FinetuneConfig, finetune_layer, output_error
from lowbit.surgery.clip_search import COARSE, FINE, search_factor
from lowbit.surgery.linear import QuantLinear
from lowbit.surgery.prefix import prefix_cache
from lowbit.surgery.quantizer import ActQuantizer
from lowbit.surgery.sequential import stream_layers
from tests.conftest import recording_progress, tiny_model

PREFIX = [5, 9, 1]
STATIC = {
    "weights": {"format": "int4", "granularity": "channel"},
    "activations": {"format": "int4", "granularity": "tensor", "dynamic": False},
    "kv": {"format": "int4", "symmetric": False, "granularity": "head", "dynamic": False},
}


def _data() -> TokenData:
    g = torch.Generator().manual_seed(7)
    return TokenData(eval_windows=torch.randint(0, 320, (2, 48), generator=g),
                     calib_tokens=torch.randint(0, 320, (6000,), generator=g), seed=0)


def _recipe(prefix: bool = True, **blockwise) -> Recipe:
    step = {"method": "blockwise", "samples": 8, "seq_len": 32, "grid_samples": 4, "epochs": 0, **blockwise}
    steps = [{"method": "quarot"}, *([{"method": "prefix", "tokens": PREFIX}] if prefix else []), step]
    return Recipe.from_dict({"name": "static", "steps": steps, **STATIC})


def test_layer_streaming_after_a_prefix_matches_the_full_forward(family):
    model = tiny_model(family)
    samples = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(3))
    outputs = {}

    def on_layer(i, layer, run):
        outputs[i] = torch.cat(run())

    stream_layers(model, spec_for(model), samples, on_layer, prefix=prefix_cache(model, PREFIX), batch_size=1)
    seen = {}
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
               for i, layer in enumerate(decoder_layers(model, spec_for(model)))]
    with torch.no_grad():
        model(torch.cat([torch.tensor([PREFIX] * 2), samples], 1))
    for h in handles:
        h.remove()
    assert outputs.keys() == seen.keys()
    for i in seen:  # layer i's inputs in the stream are the outputs of layer i-1, so compare the outputs
        out = seen[i][0] if isinstance(seen[i], tuple) else seen[i]
        assert torch.allclose(outputs[i], out[:, len(PREFIX):], atol=1e-5)


def test_search_factor_finds_the_minimum_of_a_smooth_loss():
    calls = []

    def loss(c):
        calls.append(c)
        return (c - 0.62) ** 2

    factor, value = search_factor(loss)
    assert abs(factor - 0.62) <= 0.0125 and value == min((c - 0.62) ** 2 for c in calls)
    assert len(calls) == len(set(calls)) <= len(COARSE) + len(FINE)
    assert search_factor(lambda c: -c)[0] == 1.0  # never above 1 (no scale growth), never below 0


def test_blockwise_static_model_has_no_runtime_scale_computation():
    model, session = lowbit.quantize_with_session(tiny_model("llama"), _recipe(), _data())
    quants = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    assert quants and all(q.static and q.calibrated for q in quants)
    tokens = torch.randint(0, 320, (1, 24))
    with torch.no_grad():
        expected = model(tokens).logits
        with mock.patch("lowbit.quant.observers.observe_range", side_effect=AssertionError("runtime range")), \
                mock.patch("lowbit.quant.qparams.compute_qparams", side_effect=AssertionError("runtime scale")), \
                mock.patch("lowbit.quant.observers.minmax_range", side_effect=AssertionError("runtime range")):
            got = model(tokens).logits
    assert torch.equal(got, expected)
    rows = session.get(BlockwiseResult).layers
    assert len(rows) == 2 and all(set(r["clip"]) >= {"keys", "values", "q+k+v input", "down input"} for r in rows)
    assert all(r["mse_grid"] <= r["mse_init"] * (1 + 1e-6) for r in rows)


def test_fine_tuning_lowers_the_block_error_and_leaves_weights_on_the_grid():
    progress, seen = recording_progress()
    model, session = lowbit.quantize_with_session(tiny_model("llama"), _recipe(epochs=5, batch=2),
                            _data(), progress=progress)
    statuses = [s for d, s in seen if d == "block-wise quantization"]
    assert statuses[0].startswith("layer 0 MSE ") and len(statuses) == len(session.get(BlockwiseResult).layers)
    rows = session.get(BlockwiseResult).layers
    assert all(r["epoch_losses"][-1] < r["epoch_losses"][0] for r in rows)
    assert any(r["mse_finetuned"] < r["mse_grid"] and not r.get("reverted") for r in rows)
    assert all(r["finetune_s"] > 0 for r in rows)
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.weight_scheme is not None:
            assert not module.learning
            w = module.weight
            assert torch.allclose(w / module.weight_scale, torch.round(w / module.weight_scale), atol=1e-4)
        if isinstance(module, ActQuantizer):
            assert not isinstance(module.scale, torch.nn.Parameter) and (module.scale > 0).all()


@pytest.mark.parametrize("int_range", ["restricted", "full"])
def test_finetune_layer_trains_a_linear_towards_its_target(int_range):
    """On the full grid too, whose negative scales must stay negative (a positive clamp would zero them)."""
    torch.manual_seed(0)
    linear = QuantLinear(torch.nn.Linear(32, 16))
    from lowbit.recipe import QuantScheme

    linear.quantize_weight_rtn(QuantScheme(format="int3", granularity="channel", int_range=int_range))
    negative = linear.weight_scale < 0
    assert negative.any() == (int_range == "full")
    x = torch.randn(64, 8, 32)
    target = x @ torch.randn(16, 32).T * 0.1
    before = float((linear(x) - target).square().mean())
    losses = finetune_layer(linear, linear, x, target, FinetuneConfig(epochs=20, batch=8, lr_weight=0.5,
                                                                        lr_scale=0.01))
    assert losses[-1] < losses[0] and float((linear(x) - target).square().mean()) < before
    assert torch.equal(linear.weight_scale < 0, negative)


def test_relative_error_weighs_every_token_alike():
    """A token a thousand times larger than the others rules the plain MSE but not the relative error."""
    target = torch.ones(1, 4, 8)
    target[0, 0] *= 1000.0
    out = target * 1.1  # every token 10% off
    out[0, 1] = target[0, 1] * 2.0  # one small token 100% off
    assert output_error(out, target, relative=True) == pytest.approx((0.01 * 3 + 1.0) / 4)
    assert output_error(out, target) == pytest.approx(float((out - target).square().mean()))
    assert output_error(out, target) > 1000 * output_error(out, target, relative=True)


def test_fine_tuning_on_the_relative_error_lowers_it():
    _, session = lowbit.quantize_with_session(tiny_model("llama"), _recipe(epochs=5, loss="relative"), _data())
    rows = session.get(BlockwiseResult).layers
    assert all(r["epoch_losses"][-1] < r["epoch_losses"][0] for r in rows)
    assert any(not r.get("reverted") for r in rows)


def test_checkpoint_resumes_finished_layers(tmp_path):
    folder = tmp_path / "blocks"
    recipe = _recipe(epochs=1, checkpoint=str(folder))
    tokens = torch.randint(0, 320, (1, 20))
    first, first_info = lowbit.quantize_with_session(tiny_model("llama"), recipe, _data())
    assert sorted(p.name for p in folder.iterdir()) == ["layer_0.safetensors", "layer_1.safetensors"]
    again, again_info = lowbit.quantize_with_session(tiny_model("llama"), recipe, _data())
    (folder / "layer_1.safetensors").unlink()
    partial, partial_info = lowbit.quantize_with_session(tiny_model("llama"), recipe, _data())
    other = lowbit.quantize(tiny_model("llama"), _recipe(epochs=2, checkpoint=str(folder)), _data())
    with torch.no_grad():
        logits = [m(tokens).logits for m in (first, again, partial, other)]
    assert first_info.get(BlockwiseResult).restored == 0 and again_info.get(BlockwiseResult).restored == 2
    assert partial_info.get(BlockwiseResult).restored == 1
    assert torch.allclose(logits[0], logits[1], atol=1e-6) and torch.allclose(logits[0], logits[2], atol=1e-5)
    assert not torch.allclose(logits[0], logits[3])  # other settings: the old layers were not reused


def _logit_mse(model, reference: torch.Tensor, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(tokens).logits - reference).square().mean())


@pytest.mark.parametrize("init", ["rtn", "gptq"])
def test_blockwise_without_prefix_and_with_gptq_beats_plain_rtn(init):
    """Without a prefix, from either start, block-wise search ends closer to full precision than the same static
    schemes quantized by plain RTN with calibrated ranges."""
    tokens = _data().eval_windows
    with torch.no_grad():
        reference = tiny_model("qwen2")(tokens).logits
    rtn = Recipe.from_dict({"name": "static", "steps": [{"method": "quarot"}, {"method": "rtn"}], **STATIC})
    plain = _logit_mse(lowbit.quantize(tiny_model("qwen2"), rtn, _data()), reference, tokens)
    model = lowbit.quantize(tiny_model("qwen2"), _recipe(prefix=False, init=init), _data())
    assert _logit_mse(model, reference, tokens) < plain


def test_a_layer_that_fine_tuning_makes_worse_is_restored_exactly():
    """With a learning rate far too high every layer gets worse: each is put back to its grid-searched state."""
    tokens = torch.randint(0, 320, (1, 20))
    ruined, session = lowbit.quantize_with_session(tiny_model("llama"), _recipe(epochs=1, lr_weight=50.0, lr_scale=5.0), _data())
    plain = lowbit.quantize(tiny_model("llama"), _recipe(), _data())
    assert all(r.get("reverted") for r in session.get(BlockwiseResult).layers)
    with torch.no_grad():
        assert torch.allclose(ruined(tokens).logits, plain(tokens).logits, atol=1e-5)


def test_learning_rate_warms_up_then_decays_to_zero():
    from lowbit.surgery.block_finetune import warmup_cosine

    factors = [warmup_cosine(i, 50) for i in range(50)]
    peak = factors.index(max(factors))
    assert factors[0] < 0.5 and max(factors) == 1.0 and 0 < peak <= 5
    assert all(a >= b for a, b in zip(factors[peak:], factors[peak + 1:])) and factors[-1] < 0.01


@pytest.mark.parametrize("preset", ["w4a4-spin-prefix-qjl", "w4a4-spin-prefix-turbo3"])
def test_composed_spin_prefix_preset_runs_end_to_end(preset):
    """SpinQuant rotations, a detected prefix, static W4A4 by blocks and a packed KV cache (QJL keys with 2-bit
    values, or turbo3 keys and values), on a tiny model."""
    from lowbit.evaluate import evaluate
    from lowbit.recipe import load_preset
    from lowbit.surgery.prefix import prefix_tokens

    data = load_preset(preset).model_dump()
    data["steps"][0].update(steps=2, samples=2, seq_len=32)
    data["steps"][1].update(samples=4, seq_len=32)
    data["steps"][2].update(samples=4, seq_len=32, epochs=1)
    data["kv_cache"].update(window=8)
    if data["kv_cache"]["keys"]["codec"] == "qjl":
        data["kv_cache"]["keys"].update(m=32, group=8)
        data["kv_cache"]["values"].update(group=8)
    model, session = lowbit.quantize_with_session(tiny_model("llama"), Recipe.from_dict(data), _data())
    assert prefix_tokens(model) == session.get(PrefixResult).tokens != []
    assert len(session.get(BlockwiseResult).layers) == 2
    with torch.no_grad():
        out = model.generate(torch.randint(0, 320, (1, 12)), max_new_tokens=5, do_sample=False, pad_token_id=0)
    result = evaluate(tiny_model("llama"), model, _data().eval_windows)
    assert out.shape == (1, 17)
    # close to full precision (a misplaced prefix or a broken packed cache moves these by orders of magnitude)
    assert 0 < result.kl_vs_fp < 0.05 and result.top1_agreement > 0.8
