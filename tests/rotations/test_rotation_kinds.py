"""Rotation kinds for R1/R2: each is what its name says, the orthogonal ones leave a model's logits unchanged, and the
plain Bernoulli matrix measurably does not."""

import pytest
import torch

import lowbit
from lowbit.analysis.flatness import linear_input_flatness, token_flatness
from lowbit.errors import RecipeError
from lowbit.models.arch import spec_for
from lowbit.recipe import Recipe
from lowbit.rotations.hadamard import hadamard_matrix
from lowbit.rotations.kinds import KINDS, bernoulli, offline_rotation, polar_factor
from lowbit.rotations.rotation import random_orthogonal
from tests.conftest import tiny_model

ORTHOGONAL = [k for k in KINDS if k != "bernoulli"]


def _orthogonality_error(q: torch.Tensor) -> float:
    return (q @ q.T - torch.eye(q.shape[0], dtype=q.dtype)).abs().max().item()


@pytest.mark.parametrize("kind", ORTHOGONAL)
@pytest.mark.parametrize("n", [64, 224, 576])
def test_orthogonal_kinds_are_orthogonal_and_seeded(kind, n):
    q = offline_rotation(kind, n, seed=5).dense()
    assert q.shape == (n, n) and q.dtype == torch.float64
    assert _orthogonality_error(q) < 1e-10
    assert torch.equal(q, offline_rotation(kind, n, seed=5).dense())
    if kind != "hadamard_unsigned":  # the only kind with nothing random in it
        assert not torch.equal(q, offline_rotation(kind, n, seed=6).dense())


def test_unsigned_hadamard_is_the_plain_hadamard_and_the_signed_one_flips_its_columns():
    h = hadamard_matrix(576).to(torch.float64) / 24
    plain, signed = offline_rotation("hadamard_unsigned", 576, 1).dense(), offline_rotation("hadamard", 576, 1).dense()
    assert torch.equal(plain, h)
    signs = (signed / plain)[0]
    assert set(signs.tolist()) == {-1.0, 1.0}
    assert torch.allclose(signed, plain * signs)


@pytest.mark.parametrize(("n", "block", "order"), [(576, 64, 64), (896, 64, 64), (576, None, 64), (224, 64, 56)])
def test_block_hadamard_has_blocks_of_the_largest_constructible_order_up_to_the_block(n, block, order):
    q = offline_rotation("block_hadamard", n, 2, block=block).dense()
    mask = torch.block_diag(*[torch.ones(order, order, dtype=torch.float64)] * (n // order))
    assert torch.equal(q * (1 - mask), torch.zeros_like(q))
    assert torch.allclose(q.abs() * mask, mask / order**0.5)


def test_bernoulli_is_plus_minus_one_over_root_n_and_not_orthogonal():
    b = bernoulli(576, 3)
    assert torch.equal(b.abs(), torch.full_like(b, 1 / 24))
    assert torch.allclose((b * b).sum(1), torch.ones(576, dtype=torch.float64))  # unit rows
    assert _orthogonality_error(b) > 0.1  # off-diagonal Gram entries about 1/sqrt(n) and more
    assert torch.equal(offline_rotation("bernoulli", 576, 3).dense(), b)


def test_polar_factor_is_the_nearest_orthogonal_matrix():
    b = bernoulli(128, 4)
    polar = polar_factor(b)
    assert _orthogonality_error(polar) < 1e-10
    for other in (torch.linalg.qr(b)[0], random_orthogonal(128, 0)[0]):
        assert torch.linalg.norm(polar - b) < torch.linalg.norm(other - b)


def _rotated(model, **step):
    return lowbit.quantize(model, Recipe.from_dict({"steps": [{"method": "quarot", **step}]}))


def _logit_diff(a, b, tokens) -> float:
    with torch.no_grad():
        return (a(tokens).logits - b(tokens).logits).abs().max().item()


@pytest.mark.parametrize("kind", ORTHOGONAL)
def test_every_orthogonal_kind_leaves_the_logits_unchanged(family, kind, tokens):
    model = tiny_model(family)
    rotated = _rotated(model, kind=kind)
    assert _logit_diff(model, rotated, tokens) < 1e-3
    embed, rotated_embed = model.model.embed_tokens.weight, rotated.model.embed_tokens.weight
    assert (embed - rotated_embed).abs().max() > 1e-3  # R1 really was applied to the residual stream


def test_bernoulli_changes_the_logits_and_its_polar_factor_does_not(tokens):
    model = tiny_model("llama")
    assert _logit_diff(model, _rotated(model, kind="bernoulli"), tokens) > 1e-2
    assert _logit_diff(model, _rotated(model, kind="bernoulli_orthogonalised"), tokens) < 1e-3


def test_kind_changes_r1_and_r2_only():
    """The online R3/R4 stay Hadamards: the same seed gives the same online transforms for every kind."""
    model = tiny_model("llama")
    a, b = _rotated(model, kind="hadamard", seed=3), _rotated(model, kind="orthogonal", seed=3)
    x = torch.randn(2, model.config.intermediate_size)
    down_a, down_b = a.model.layers[0].mlp.down_proj, b.model.layers[0].mlp.down_proj
    assert torch.equal(down_a.input_transform(x), down_b.input_transform(x))
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_block_size_belongs_to_block_hadamard():
    with pytest.raises(RecipeError, match="block_size is the block order of kind .block_hadamard."):
        Recipe.from_dict({"steps": [{"method": "quarot", "kind": "orthogonal", "block_size": 32}]})
    Recipe.from_dict({"steps": [{"method": "quarot", "kind": "block_hadamard", "block_size": 32}]})


def test_token_flatness_of_known_vectors():
    spike = torch.zeros(4, 64)
    spike[:, 3] = 5.0
    spike += 0.01
    flat = torch.ones(4, 64)
    flat[:, ::2] = -1
    gaussian = torch.randn(4000, 64, generator=torch.Generator().manual_seed(0))
    assert token_flatness(flat) == {"max_over_median": 1.0, "kurtosis": 1.0}
    assert token_flatness(spike)["max_over_median"] > 400 and token_flatness(spike)["kurtosis"] > 50
    assert abs(token_flatness(gaussian)["kurtosis"] - 3) < 0.1
    pure = torch.zeros(4, 64)
    pure[:, 3] = 5.0
    rotated = pure @ offline_rotation("hadamard", 64, 0).dense().float()  # a Hadamard spreads a spike evenly
    assert token_flatness(rotated)["max_over_median"] == pytest.approx(1.0)


def test_linear_input_flatness_sees_a_planted_outlier_channel_and_a_rotation_removes_it():
    model = tiny_model("llama")
    spec = spec_for(model)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[7] = 60.0
    tokens = torch.randint(0, 320, (1, 48), generator=torch.Generator().manual_seed(0))
    before = linear_input_flatness(model, spec, tokens)
    after = linear_input_flatness(_rotated(model, kind="hadamard"), spec, tokens)
    assert set(before) == {"q", "o", "down"}
    assert before["q"]["kurtosis"] > 20
    assert after["q"]["kurtosis"] < before["q"]["kurtosis"] / 4
