"""Asymmetric calibration (Qronos / GPTAQ): the least-squares target and the split of the error it rests on, the
solver's gain on a layer whose inputs are perturbed, and the gptq step's `asymmetric` option on tiny models."""

import pytest
import torch

import lowbit
from lowbit.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from lowbit.input_mismatch import CrossAccumulator, least_squares_target
from lowbit.quant import IntFormat, PerRow
from lowbit.recipe import Recipe
from lowbit.surgery.teacher import kl_from_teacher
from tests.conftest import tiny_data, tiny_model


def _pair(n=2000, d=48, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5  # correlated inputs
    return x, x + noise * torch.randn(n, d, generator=g), torch.randn(24, d, generator=g)


def _stats(x_quant, x_full):
    h, c = HessianAccumulator(x_full.shape[1]), CrossAccumulator(x_full.shape[1])
    for a, b in zip(x_quant.split(300), x_full.split(300), strict=True):
        h.add(a)
        c.add(a, b)
    return h.hessian, c.cross


def test_cross_product_is_the_scaled_mean_over_any_split():
    x, x_quant, _ = _pair()
    _, c = _stats(x_quant, x)
    assert torch.allclose(c, 2 / len(x) * x_quant.T @ x, atol=1e-5)


def test_target_is_the_weight_when_the_inputs_agree():
    x, _, w = _pair()
    h, c = _stats(x, x)
    assert torch.allclose(least_squares_target(w, h, c), w, atol=1e-5)


def test_target_is_the_least_squares_fit_and_splits_the_error():
    x, x_quant, w = _pair()
    h, c = _stats(x_quant, x)
    target = least_squares_target(w, h, c, damp=1e-9)
    exact = torch.linalg.lstsq(x_quant.double(), (x @ w.T).double()).solution.T.float()
    assert torch.allclose(target, exact, atol=1e-3)
    q = target + 0.1 * torch.randn_like(target)
    total = (x @ w.T - x_quant @ q.T).square().sum()
    parts = (x @ w.T - x_quant @ target.T).square().sum() + (x_quant @ (target - q).T).square().sum()
    assert torch.allclose(total, parts, rtol=1e-3)


def test_gptq_on_the_target_fits_the_full_precision_outputs_better():
    x, x_quant, w = _pair(noise=0.4)
    h, c = _stats(x_quant, x)
    fmt, config = IntFormat(4, True), GPTQConfig()
    plain = gptq_quantize(w, h, fmt, PerRow(), config=config).weight
    asym = gptq_quantize(least_squares_target(w, h, c), h, fmt, PerRow(), config=config).weight

    def error(q):
        return (x @ w.T - x_quant @ q.T).square().mean().item()

    assert error(asym) < 0.8 * error(plain)


W4A4 = {"weights": {"format": "int4", "granularity": "channel"},
        "activations": {"format": "int4", "granularity": "token", "dynamic": True},
        "calibration": {"samples": 64, "seq_len": 32}}  # 2k tokens: the fit needs more than GPTQ


@pytest.mark.parametrize("family", ["llama", "qwen2-real"])
def test_asymmetric_gptq_step_runs_and_fits_full_precision_better(family):
    model, data = tiny_model(family), tiny_data()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3)  # sharper outputs, so the quantization error shows
    recipes = {flag: Recipe.from_dict({"steps": [{"method": "gptq", "asymmetric": flag}], **W4A4})
               for flag in (False, True)}
    models = {flag: lowbit.quantize_with_session(model, recipe, data) for flag, recipe in recipes.items()}
    assert models[True][1].report()["gptq"]["layers"] == 2
    batches = data.calibration(8, 32)
    with torch.no_grad():
        kl = {flag: kl_from_teacher(m(batches).logits, model(batches).logits).item() for flag, (m, _) in models.items()}
    assert kl[True] < kl[False]


def test_asymmetric_path_with_the_target_forced_to_the_weight_is_sequential_gptq(monkeypatch):
    """Weight-only, the asymmetric path differs from sequential GPTQ by its target alone: forced to ``W``, every
    weight comes out the same (the two streams, captures and solves are otherwise GPTQ's)."""
    import lowbit.surgery.gptq as surgery_gptq

    monkeypatch.setattr(surgery_gptq, "least_squares_target", lambda weight, *_: weight.clone())
    model, data = tiny_model("llama"), tiny_data()
    weights = {"format": "int4", "granularity": "group", "group_size": 16, "observer": "mse"}
    quantized = [lowbit.quantize(model, Recipe.from_dict({
        "steps": [{"method": "gptq", **flags}], "weights": weights, "calibration": {"samples": 16, "seq_len": 32}}),
        data) for flags in ({"sequential": True}, {"asymmetric": True})]
    plain, asymmetric = (dict(m.named_parameters()) for m in quantized)
    for name, p in plain.items():
        assert torch.equal(p, asymmetric[name]), name


def test_sequential_gptq_sees_the_quantized_groups_before():
    """With ``sequential``, o_proj's Hessian comes from the quantized q/k/v: its weights change, q/k/v's do not."""
    model, data = tiny_model("llama"), tiny_data()
    recipes = [Recipe.from_dict({"steps": [{"method": "gptq", "sequential": flag}], **W4A4}) for flag in (False, True)]
    quantized = [dict(lowbit.quantize(model, recipe, data).named_parameters()) for recipe in recipes]
    first = "model.layers.0.self_attn"
    assert torch.equal(quantized[0][f"{first}.q_proj.weight"], quantized[1][f"{first}.q_proj.weight"])
    assert not torch.equal(quantized[0][f"{first}.o_proj.weight"], quantized[1][f"{first}.o_proj.weight"])
