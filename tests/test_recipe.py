"""Recipes: presets load, validation errors name the field, YAML round-trips."""

import pytest
import yaml

from lowbit.errors import RecipeError
from lowbit.recipe import Recipe, load_preset, load_recipe, preset_names

REQUIRED_PRESETS = ("fp", "w8a8-rtn", "w8a8-fp8", "w4a16-rtn", "w4a16-rtn-g64", "w4a8-rtn", "w4a4-rtn",
                    "w4a4kv4-rtn", "kv4")


def test_required_presets_exist_and_validate():
    names = preset_names()
    for name in REQUIRED_PRESETS:
        assert name in names
        recipe = load_preset(name)
        assert recipe.name == name and recipe.description


def test_yaml_round_trip(tmp_path):
    recipe = load_preset("w4a4kv4-rtn")
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe


def test_python_and_yaml_build_the_same_object():
    built = Recipe(
        name="w4a16-rtn-g64",
        description=load_preset("w4a16-rtn-g64").description,
        steps=[{"method": "rtn"}],
        weights={"format": "int4", "symmetric": True, "granularity": "group", "group_size": 64},
    )
    assert built == load_preset("w4a16-rtn-g64")


@pytest.mark.parametrize(
    "data, field",
    [
        ({"steps": [{"method": "rtn"}], "weights": {"format": "int9"}}, "weights.format"),
        ({"steps": [{"method": "rtn"}], "weights": {"format": "int1"}}, "weights.format"),
        ({"steps": [{"method": "rtn"}], "weights": {"granularity": "group"}}, "weights"),
        ({"steps": [{"method": "rtn"}], "weights": {"granularity": "group", "group_size": 0}}, "weights"),
        ({"activations": {"clip_ratio": 1.5}}, "activations.clip_ratio"),
        ({"kv": {"bits": 4}}, "kv.bits"),
        ({"steps": [{"method": "magic"}]}, "steps.0"),
        ({"targets": ["q", "attn"]}, "targets"),
    ],
)
def test_invalid_fields_are_named(data, field):
    with pytest.raises(RecipeError) as err:
        Recipe.from_dict(data)
    assert f"'{field}" in str(err.value)


def test_weights_without_weight_step_is_an_error():
    with pytest.raises(RecipeError, match="weight step"):
        Recipe.from_dict({"weights": {"format": "int4"}})


def test_static_token_scales_are_rejected():
    with pytest.raises(RecipeError, match="static"):
        Recipe.from_dict({"activations": {"format": "int8", "granularity": "token", "dynamic": False}})


def test_unknown_preset_and_missing_file():
    with pytest.raises(RecipeError, match="unknown recipe 'w3a3'.*w8a8-rtn"):
        load_recipe("w3a3")
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("no/such/recipe.yaml")


def test_bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
    path.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("methods", "match"),
    [
        (["rtn", "quarot"], r"step 'quarot' \(rotation\) must come before step 'rtn' \(weights\)"),
        (["gptq", "prefix"], r"step 'prefix' \(prefix\) must come before step 'gptq' \(weights\)"),
        (["quarot", "spinquant"], r"at most one rotation step per recipe, got \['quarot', 'spinquant'\]"),
        (["rtn", "gptq"], r"at most one weights step per recipe"),
    ],
)
def test_step_order_comes_from_the_methods_phases(methods, match):
    weights = {"format": "int4"} if {"rtn", "gptq"} & set(methods) else None
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict({"steps": [{"method": m} for m in methods], "weights": weights})


def test_every_registered_method_is_a_recipe_step_with_a_phase():
    from lowbit.methods import PHASES, registered

    names = {m.name for m in registered()}
    assert names == {"rtn", "gptq", "quarot", "spinquant", "qk_balance", "prefix", "blockwise", "qat"}
    for method in registered():
        assert method.config.phase in PHASES
        quantizes = method.config.phase in ("weights", "train")
        steps = [{"method": "rtn"}] * (method.config.phase == "train") + [{"method": method.name}]
        step = Recipe.from_dict({"steps": steps, "weights": {"format": "int4"} if quantizes else None}).steps[-1]
        assert type(step) is method.config
    with pytest.raises(RecipeError, match="steps.0"):
        Recipe.from_dict({"steps": [{"method": "awq"}]})
