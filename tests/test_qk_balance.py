"""Query/key balancing (lowbit.surgery.qk_balance, step ``qk_balance``): exact, balanced, and what it buys QJL."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit.errors import RecipeError
from lowbit.models.arch import spec_for
from lowbit.recipe import Recipe
from lowbit.surgery.qk_balance import balance_scales, measure_energies, pair_sum, predicted_gain
from tests.conftest import tiny_data, tiny_model

FAMILIES = ["llama", "qwen2", "qwen2-real", "gemma3"]


def _balance_recipe(**kv_cache) -> Recipe:
    cache = {"keys": {"codec": "qjl", "m": 64, "outliers": 0, "group": 8},
             "values": {"codec": "int", "bits": 8}, "window": 0, **kv_cache}
    return Recipe.from_dict({"name": "t", "steps": [{"method": "qk_balance", "samples": 4, "seq_len": 32}],
                             "kv_cache": cache, "calibration": {"samples": 4, "seq_len": 32}})


def _balanced(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    model = tiny_model(family)
    recipe = Recipe.from_dict({"name": "t", "steps": [{"method": "qk_balance", "samples": 4, "seq_len": 32}]})
    out = lowbit.quantize(copy.deepcopy(model), recipe, tiny_data())
    return model, out


@pytest.mark.parametrize("family", FAMILIES)
def test_balancing_leaves_the_model_unchanged(family):
    """Keys times a and queries over a, constant per RoPE pair: every score, so every logit, as before (float32
    rounding), while the q/k weights did change."""
    model, out = _balanced(family)
    tokens = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(tokens).logits, out(tokens).logits
    assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    changed = [n for n, p in out.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])]
    assert changed and all(any(part in n for part in ("q_proj", "k_proj", "q_norm", "k_norm")) for n in changed)


@pytest.mark.parametrize("family", ["qwen2-real", "gemma3"])
def test_after_balancing_queries_and_keys_carry_the_same_energy_per_pair(family):
    """Measured again on the same calibration text, the query energy (summed over a KV head's query heads, or over
    every head where q/k norms are shared) equals the key energy in every RoPE pair, up to one constant per head."""
    _, out = _balanced(family)
    spec = spec_for(out)
    batches = tiny_data().calibration(4, 32, seed=0)
    for query, key in measure_energies(out, spec, batches, centred=False):
        kv = key.shape[0]
        eq = query.reshape(kv, -1, key.shape[-1]).sum(1)
        if spec.qk_norms:
            eq, key = eq.sum(0, keepdim=True), key.sum(0, keepdim=True)
        ratio = pair_sum(eq) / pair_sum(key)
        spread = ratio / ratio.mean(-1, keepdim=True)
        assert torch.allclose(spread, torch.ones_like(spread), rtol=0.05), spread


def test_scales_minimise_the_qjl_variance_product():
    """The balance is Cauchy-Schwarz's optimum of E|q/a|^2 E|a k|^2: the factor equals (sum sqrt(eq ek))^2 /
    (sum eq sum ek), and any other pair-constant scale does worse; alpha 0 is the identity."""
    g = torch.Generator().manual_seed(0)
    eq = torch.rand(2, 16, generator=g).pow(4) * 100  # 4 query heads over 2 KV heads
    ek = torch.rand(2, 16, generator=g).pow(4)
    eq4 = eq.repeat_interleave(2, 0) / 2
    a = balance_scales(eq4, ek)
    best = predicted_gain(eq4, ek, a)
    epq, epk = pair_sum(eq), pair_sum(ek)
    closed = ((epq * epk).sqrt().sum(-1).pow(2) / (epq.sum(-1) * epk.sum(-1))).mean().item()
    assert best == pytest.approx(closed, rel=1e-5) and best < 0.9
    for _ in range(5):
        other = a * torch.rand(2, 8, generator=g).add(0.5).repeat(1, 2)
        assert predicted_gain(eq4, ek, other) > best
    assert torch.allclose(balance_scales(eq4, ek, alpha=0.0), torch.ones(2, 16))


def test_balancing_cuts_the_qjl_score_error_where_query_and_key_energies_differ():
    """Keys large where queries are small (and the reverse): QJL's predicted score error falls by the predicted
    factor after balancing (the measured error of the sketch, not only the formula)."""
    from lowbit.kv.codecs import QJLKeyCodec

    g = torch.Generator().manual_seed(1)
    d = 16
    profile = torch.logspace(-1, 1, d // 2).repeat(2)
    q = torch.randn(1, 1, 256, d, generator=g) * profile
    k = torch.randn(1, 1, 512, d, generator=g) / profile
    a = balance_scales(q[0].pow(2).mean(1), k[0].pow(2).mean(1))  # [1, d]
    codec = QJLKeyCodec(64, outliers=0, group=8)
    exact = q @ k.transpose(-1, -2)

    def error(qq, kk):
        return (codec.scores(qq, codec.encode(kk), d) - exact).pow(2).mean().item()

    before, after = error(q, k), error(q / a, k * a)
    gain = predicted_gain(q[0].pow(2).mean(1), k[0].pow(2).mean(1), a)
    assert after < 0.5 * before
    assert after / before == pytest.approx(gain, rel=0.3)


def test_a_balanced_qjl_cache_runs_and_the_step_is_reported():
    """kv_cache with qk_balance: quantizes, evaluates, reports each layer's variance factor (< 1 on qwen2-real's
    biased keys)."""
    model = tiny_model("qwen2-real")
    out, session = lowbit.quantize_with_session(model, _balance_recipe(key_centre="mean"), tiny_data())
    factors = session.report()["qk_balance"]["variance_factor"]
    assert len(factors) == 2 and all(0 < f <= 1.0 + 1e-6 for f in factors)
    with torch.no_grad():
        assert torch.isfinite(out(torch.randint(0, 320, (1, 40))).logits).all()


def test_balance_runs_after_rotations_and_before_weights():
    with pytest.raises(RecipeError, match="must come before"):
        Recipe.from_dict({"name": "t", "steps": [{"method": "qk_balance"}, {"method": "quarot"}]})
    Recipe.from_dict({"name": "t", "steps": [{"method": "quarot"}, {"method": "qk_balance"}, {"method": "rtn"}],
                      "weights": {"format": "int4", "granularity": "channel"}})


def test_a_balanced_model_saves_and_loads_as_it_runs(tmp_path):
    """The balance lives in the q/k weights (nothing to rebuild at load): the loaded packed-cache model gives the same
    logits."""
    from lowbit.artifact import load, save

    q = lowbit.quantize(tiny_model("qwen2-real"), _balance_recipe(key_centre="mean"), tiny_data())
    save(q, tmp_path / "m")
    loaded = load(tmp_path / "m", simulate=True)
    tokens = tiny_data().eval_windows
    with torch.no_grad():
        assert torch.equal(q(tokens).logits, loaded(tokens).logits)
