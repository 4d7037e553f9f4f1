"""The layer-streamed GPTQ step on tiny models: weights on the grid, better than RTN, works after rotations."""

import pytest
import torch

import lowbit
from lowbit.data import TokenData
from lowbit.methods.gptq import GPTQResult
from lowbit.recipe import Recipe
from lowbit.surgery.attach import quant_linears
from lowbit.surgery.sequential import stream_layers


@pytest.fixture
def calib():
    g = torch.Generator().manual_seed(7)
    return TokenData(eval_windows=torch.randint(0, 320, (2, 48), generator=g),
                     calib_tokens=torch.randint(0, 320, (4000,), generator=g), seed=0)


def _recipe(steps, weights=None):
    return Recipe.from_dict({"steps": steps, "weights": weights or {"format": "int4", "granularity": "channel"},
                             "calibration": {"samples": 8, "seq_len": 64}})


def _logit_mse(model, q, tokens) -> float:
    with torch.no_grad():
        return (model(tokens).logits - q(tokens).logits).pow(2).mean().item()


def test_gptq_puts_weights_on_the_grid_and_reports(model, calib):
    q, session = lowbit.quantize_with_session(model, _recipe([{"method": "gptq"}]), calib)
    for _, linear in quant_linears(q):
        rows = linear.weight.reshape(linear.out_features, -1)
        assert max(len(torch.unique(r)) for r in rows) <= 15
    result = session.get(GPTQResult)
    assert result.layers == model.config.num_hidden_layers and result.tokens == 8 * 64
    assert session.report()["gptq"]["loss"] == round(result.loss, 3) > 0


@pytest.mark.parametrize("weights", [{"format": "int4", "granularity": "channel"},
                                     {"format": "int4", "granularity": "group", "group_size": 32}])
def test_gptq_beats_rtn(model, calib, weights):
    tokens = calib.eval_windows
    rtn = lowbit.quantize(model, _recipe([{"method": "rtn"}], weights))
    gptq = lowbit.quantize(model, _recipe([{"method": "gptq"}], weights), calib)
    assert _logit_mse(model, gptq, tokens) < _logit_mse(model, rtn, tokens)


def test_gptq_after_quarot_sees_rotated_inputs(calib):
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    tokens = calib.eval_windows
    rtn = lowbit.quantize(model, _recipe([{"method": "quarot"}, {"method": "rtn"}]), calib)
    gptq = lowbit.quantize(model, _recipe([{"method": "quarot"}, {"method": "gptq"}]), calib)
    assert _logit_mse(model, gptq, tokens) < _logit_mse(model, rtn, tokens)


def test_streaming_reproduces_the_full_forward(model, calib):
    """With nothing quantized, the layer-by-layer outputs equal the model's own hidden states."""
    batches = calib.calibration(2, 32)
    seen = []
    stream_layers(model, lowbit.models.arch.spec_for(model), batches, lambda i, layer, run: seen.append(i))
    assert seen == list(range(model.config.num_hidden_layers))
    outputs = []
    last = model.model.layers[-1]
    handle = last.register_forward_hook(lambda m, a, out: outputs.append(out))
    stream_layers(model, lowbit.models.arch.spec_for(model), batches, lambda i, layer, run: None)
    handle.remove()
    with torch.no_grad():
        ref = model(batches, output_hidden_states=True).hidden_states[-1]  # after the final norm
        streamed = model.model.norm(torch.cat(outputs[-2:]))
    assert torch.allclose(streamed, ref, atol=1e-5)


@pytest.mark.parametrize("weights", [{"format": "int4", "granularity": "channel", "observer": "mse"},
                                     {"format": "int4", "granularity": "group", "group_size": 16, "symmetric": False}])
def test_group_solved_together_equals_each_linear_alone(weights):
    """q/k/v (or gate/up) stacked into one solve give each linear what its own solve with the shared Hessian gives."""
    from lowbit.gptq import GPTQConfig, gptq_quantize
    from lowbit.schemes import QuantScheme
    from lowbit.surgery.gptq import _solve_group
    from lowbit.surgery.linear import QuantLinear
    from lowbit.surgery.quantizer import granularity_for, observer_kwargs

    torch.manual_seed(0)
    scheme, config = QuantScheme(**weights), GPTQConfig(act_order=True, static_groups=True)
    fmt, gran = scheme.number_format(), granularity_for(scheme, "weight")
    x = torch.randn(512, 64) * torch.linspace(0.1, 3.0, 64)
    hessian = 2 * x.T @ x / len(x)
    group = [QuantLinear(torch.nn.Linear(64, out, bias=False)) for out in (64, 16, 16)]
    alone = [gptq_quantize(linear.weight.data.clone(), hessian, fmt, gran, observer=scheme.observer, config=config,
                           **observer_kwargs(scheme)) for linear in group]
    loss = _solve_group(group, hessian, scheme, fmt, gran, config)
    assert loss == pytest.approx(sum(r.loss for r in alone), rel=1e-4)
    for linear, ref in zip(group, alone):
        assert linear.weight_scale.shape == ref.scale.shape
        assert torch.allclose(linear.weight_scale, ref.scale, rtol=1e-5)
        assert torch.allclose(linear.weight.data, ref.weight, atol=1e-5)
        assert linear.weight_scale.untyped_storage().size() == ref.scale.untyped_storage().size()  # not a view


def test_run_until_stops_each_batch_at_the_module_after_its_pre_hooks(model, calib):
    """``run(until=m)``: every batch reaches m's pre-hooks (the inputs GPTQ records), m itself never runs."""
    batches = calib.calibration(4, 32)
    seen = {"pre": 0, "forward": 0}

    def on_layer(i, layer, run):
        down = layer.mlp.down_proj
        pre = down.register_forward_pre_hook(lambda m, a: seen.__setitem__("pre", seen["pre"] + 1))
        post = down.register_forward_hook(lambda m, a, o: seen.__setitem__("forward", seen["forward"] + 1))
        assert run(until=down) is None
        pre.remove(), post.remove()

    stream_layers(model, lowbit.models.arch.spec_for(model), batches, on_layer, batch_size=2)
    assert seen == {"pre": 2 * model.config.num_hidden_layers, "forward": 0}
