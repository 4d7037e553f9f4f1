"""QuaRot surgery: the rotated full-precision model reproduces the original logits, for every family."""

import pytest
import torch

import lowbit
from lowbit.models.arch import spec_for
from lowbit.recipe import Recipe
from lowbit.surgery.rotate import fold_norms
from tests.conftest import tiny_model

ALL = {"r1": True, "r2": True, "r3": True, "r4": True}


def _rotated(model, **flags):
    return lowbit.quantize(model, Recipe.from_dict({"steps": [{"method": "quarot", **flags}]}))


def _max_logit_diff(a, b, tokens) -> float:
    with torch.no_grad():
        return (a(tokens).logits - b(tokens).logits).abs().max().item()


@pytest.mark.parametrize(
    "flags",
    [ALL, {"r1": True, "r2": False, "r3": False, "r4": False}, {"r1": False, "r2": True, "r3": False, "r4": False},
     {"r1": False, "r2": False, "r3": True, "r4": False}, {"r1": False, "r2": False, "r3": False, "r4": True},
     {**ALL, "o_rotation": True}, {"r1": False, "r2": False, "r3": False, "r4": False, "o_rotation": True},
     {**ALL, "readers": True}],
    ids=["all", "r1", "r2", "r3", "r4", "all+o", "o", "all+readers"],
)
def test_rotations_leave_logits_unchanged(model, tokens, flags):
    rotated = _rotated(model, **flags)
    assert _max_logit_diff(model, rotated, tokens) < 1e-3


def test_norm_folding_alone_is_exact(model, tokens):
    import copy

    folded = copy.deepcopy(model)
    fold_norms(folded, spec_for(folded))
    assert _max_logit_diff(model, folded, tokens) < 1e-4


def test_rotations_really_change_the_weights(model):
    rotated = _rotated(model, **ALL)
    a, b = model.model.layers[0].mlp.up_proj.weight, rotated.model.layers[0].mlp.up_proj.weight
    assert (a - b).abs().max() > 1e-2
    down = rotated.model.layers[0].mlp.down_proj
    assert down.input_transform is not None  # R4 runs online


def test_o_rotation_runs_online_and_leaves_the_other_rotations_as_they_were(model):
    """The rotation across heads is folded into o_proj and applied to its input at run time; its seed is its own, so
    every other rotated weight is the same with or without it."""
    plain, with_o = _rotated(model, seed=1, **ALL), _rotated(model, seed=1, o_rotation=True, **ALL)
    o = with_o.model.layers[0].self_attn.o_proj
    assert o.input_transform is not None
    assert getattr(plain.model.layers[0].self_attn.o_proj, "input_transform", None) is None
    assert not torch.equal(o.weight, plain.model.layers[0].self_attn.o_proj.weight)
    for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"):
        assert torch.equal(plain.get_submodule(f"model.layers.1.{name}").weight,
                           with_o.get_submodule(f"model.layers.1.{name}").weight), name


def test_rotations_are_seeded(model, tokens):
    a, b = _rotated(model, seed=1, **ALL), _rotated(model, seed=1, **ALL)
    c = _rotated(model, seed=2, **ALL)
    assert torch.equal(a.model.layers[1].self_attn.q_proj.weight, b.model.layers[1].self_attn.q_proj.weight)
    assert not torch.equal(a.model.layers[1].self_attn.q_proj.weight, c.model.layers[1].self_attn.q_proj.weight)


def test_rotation_reduces_w4a4_error(tokens):
    """On a model with outlier channels, rotating first makes W4A4 RTN much closer to full precision."""
    model = tiny_model("llama")
    with torch.no_grad():  # plant a few massive residual channels, as real LLMs have
        model.model.embed_tokens.weight[:, :3] *= 40
    plain = {"steps": [{"method": "rtn"}], "weights": {"format": "int4"},
             "activations": {"format": "int4", "granularity": "token"}}
    rotated = {**plain, "steps": [{"method": "quarot"}, {"method": "rtn"}]}
    with torch.no_grad():
        ref = model(tokens).logits
        err = {k: (lowbit.quantize(model, Recipe.from_dict(r))(tokens).logits - ref).pow(2).mean().item()
               for k, r in (("plain", plain), ("rotated", rotated))}
    assert err["rotated"] < 0.5 * err["plain"]


def test_rotation_must_come_before_weight_steps():
    with pytest.raises(lowbit.LowbitError, match=r"step .quarot. \(rotation\) must come before step .rtn. \(weights\)"):
        Recipe.from_dict({"steps": [{"method": "rtn"}, {"method": "quarot"}], "weights": {"format": "int4"}})


def test_size_without_hadamard_is_a_clear_error_unless_a_fallback_is_named(tokens):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=320, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()  # head_dim 12 and hidden 24 exist; intermediate 40 exists; use 6-wide heads
    cfg6 = LlamaConfig(**{**cfg.to_dict(), "hidden_size": 12, "num_attention_heads": 2, "head_dim": 6})
    model6 = LlamaForCausalLM(cfg6).eval()
    with pytest.raises(lowbit.LowbitError, match="6"):
        _rotated(model6, **ALL)
    rotated = _rotated(model6, fallback="random_orthogonal", **ALL)
    assert _max_logit_diff(model6, rotated, tokens % 320) < 1e-3
    assert _max_logit_diff(model, _rotated(model, **ALL), tokens) < 1e-3
