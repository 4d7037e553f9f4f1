"""Quantized embedding tables and lm_head with their own schemes: the recipe fields, the fake-quant table, the runtime
table (row lookups equal to the fake-quant table's), honest bits, and save -> load (simulated logits bit for bit, real
kernels within tolerance, resaved bytes identical, smaller files)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.artifact import load, read_manifest, save
from lowbit.bits import weight_bits
from lowbit.data import TokenData
from lowbit.errors import RecipeError
from lowbit.models.arch import spec_for
from lowbit.recipe import Recipe, combine, load_preset, load_recipe
from lowbit.runtime import RuntimeEmbedding, to_quant_embedding, to_runtime_embedding
from lowbit.surgery.embedding import QuantEmbedding

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from equivalence import small  # noqa: E402  (the presets cut to tiny-model size)

from tests.conftest import tiny_model  # noqa: E402

INT8 = {"format": "int8", "granularity": "channel"}
G32 = {"format": "int4", "granularity": "group", "group_size": 32}
SCHEMES = [INT8, G32, {"format": "int4", "symmetric": False, "granularity": "group", "group_size": 48},
           {"format": "int3", "granularity": "tensor"}, {"format": "int2", "symmetric": False, "granularity": "channel"},
           {"format": "fp8_e4m3", "granularity": "channel"}]


def _data() -> TokenData:
    g = torch.Generator().manual_seed(3)
    return TokenData(eval_windows=torch.randint(0, 320, (2, 40), generator=g),
                     calib_tokens=torch.randint(0, 320, (4000,), generator=g), seed=0)


def _recipe(preset: str, embeddings: dict | None = None, lm_head: dict | None = None) -> Recipe:
    data = small(load_preset(preset)).model_dump()
    return Recipe.from_dict({**data, "embeddings": embeddings, "lm_head": lm_head})


def _quantized(family: str, recipe: Recipe):
    torch.manual_seed(0)
    return lowbit.quantize(tiny_model(family), recipe, _data())


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def test_recipe_fields_are_validated_and_combine():
    recipe = _recipe("w4a16-rtn-g64", G32, INT8)
    assert recipe.embeddings.group_size == 32 and recipe.lm_head.format == "int8"
    assert Recipe.from_dict(recipe.model_dump()) == recipe
    with pytest.raises(RecipeError, match="embeddings granularity must be tensor, channel or group"):
        Recipe.from_dict({"embeddings": {"format": "int8", "granularity": "token"}})
    with pytest.raises(RecipeError, match="lm_head is both a target"):
        Recipe.from_dict({"lm_head": INT8, "targets": ["q", "lm_head"]})
    tables = Recipe.from_dict({"name": "tables", "embeddings": INT8, "lm_head": INT8})
    both = combine(load_preset("w4a16-rtn-g64"), tables)
    assert both.embeddings == tables.embeddings and both.lm_head == tables.lm_head and both.weights is not None
    preset = load_recipe("w4a16-rtn-g64+emb-int8")  # the shipped tables preset, combined
    assert preset.embeddings == preset.lm_head == Recipe.from_dict({"weights": INT8, "steps": [{"method": "rtn"}]}).weights
    assert preset.weights == load_preset("w4a16-rtn-g64").weights


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s['format']}-{s['granularity']}")
def test_runtime_table_looks_up_the_fake_quant_rows_exactly(scheme):
    model = lowbit.quantize(tiny_model("qwen2"), Recipe.from_dict({"embeddings": scheme}))
    table = model.model.embed_tokens
    assert isinstance(table, QuantEmbedding) and table.weight_scheme.format == scheme["format"]
    assert (table.weight - tiny_model("qwen2").model.embed_tokens.weight).abs().max() > 0  # it was rounded
    ids = torch.randint(0, 320, (3, 17), generator=torch.Generator().manual_seed(2))
    runtime = to_runtime_embedding(table)
    with torch.no_grad():
        assert torch.equal(runtime(ids), table(ids))
        assert torch.equal(to_quant_embedding(runtime).weight, table.weight)
    stored = dict(runtime.state_dict())
    assert ("weight_packed" in stored) == (scheme["format"] in ("int4", "int3", "int2"))
    assert stored["weight_scale"].shape[0] == (1 if scheme["granularity"] == "tensor" else 320)
    assert ("weight_zero_point" in stored) == (scheme.get("symmetric") is False)


def test_a_tied_lm_head_is_untied_and_the_bits_count_the_table():
    model = tiny_model("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    q = lowbit.quantize(model, Recipe.from_dict({"embeddings": G32}))
    assert q.lm_head.weight is not q.model.embed_tokens.weight and not q.config.tie_word_embeddings
    assert torch.equal(q.lm_head.weight, model.lm_head.weight)  # the head keeps its full-precision copy
    n_all = sum(p.numel() for p in model.parameters())  # tied: the table counted once
    table = 320 * 128
    # the table: 4 bits + one 16-bit scale per 32; everything else (the untied head included) 16 bits
    expected = (16 * n_all + 4 * table + 16 * table / 32) / (n_all + table)
    assert weight_bits(q, spec_for(q))["weight_all"] == pytest.approx(expected)
    both = lowbit.quantize(model, Recipe.from_dict({"embeddings": G32, "lm_head": INT8}))
    assert weight_bits(both, spec_for(both))["weight_all"] == pytest.approx(
        (16 * (n_all - table) + 4 * table + 16 * table / 32 + 8 * table + 16 * 320) / (n_all + table))
    with torch.no_grad():  # the runtime table counts the same
        lowbit.runtime.convert_embeddings(both)
    assert isinstance(both.model.embed_tokens, RuntimeEmbedding)
    assert weight_bits(both, spec_for(both))["weight_all"] == pytest.approx(
        (16 * (n_all - table) + 4 * table + 16 * table / 32 + 8 * table + 16 * 320) / (n_all + table))


def test_tables_are_rounded_after_the_steps_rotations_included():
    """QuaRot folds R1 into the embedding table and lm_head; the tables are rounded afterwards, so the quantized
    table is the rotated one on its grid, and GPTQ leaves the own-scheme lm_head to the RTN that follows."""
    q = _quantized("llama", _recipe("w4a16-quarot", G32, INT8))
    table, head = q.model.embed_tokens, q.lm_head
    assert table.weight_scheme.group_size == 32 and head.weight_scheme.format == "int8"
    rotated = lowbit.quantize(tiny_model("llama"), load_preset("w4a16-quarot").rotations_only(), seed=0)
    codes = table.weight / table.weight_scale.repeat_interleave(32, 1).reshape(320, 128)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert (table.weight - rotated.model.embed_tokens.weight).abs().max() < table.weight_scale.max()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("preset,embeddings,lm_head", [
    ("w4a16-rtn-g64", INT8, None),
    ("w4a16-rtn-g64", G32, INT8),
    ("w4a4kv4-quarot", {"format": "int4", "symmetric": False, "granularity": "group", "group_size": 48}, G32),
])
def test_save_load_round_trip(tmp_path, family, preset, embeddings, lm_head):
    model = _quantized(family, _recipe(preset, embeddings, lm_head))
    assert lm_head is None or model.lm_head.input_quant is None  # its own scheme: weight only, never a target
    save(model, tmp_path / "a")
    manifest = read_manifest(tmp_path / "a")
    assert manifest["embeddings"]["model.embed_tokens"]["weight"]["format"] == embeddings["format"]
    windows = _data().eval_windows
    simulated, real = load(tmp_path / "a", simulate=True), load(tmp_path / "a")
    assert isinstance(simulated.model.embed_tokens, QuantEmbedding)
    assert isinstance(real.model.embed_tokens, RuntimeEmbedding)
    with torch.no_grad():
        want = model(windows).logits
        assert torch.equal(want, simulated(windows).logits)
        got = real(windows).logits
    assert (want - got).abs().max() < 0.1 and (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.95
    save(simulated, tmp_path / "b")
    save(real, tmp_path / "c")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") == _digest(tmp_path / "c")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_quantized_tables_make_the_file_smaller(tmp_path, family):
    """llama's head is tied: quantizing only the table unties it and the file grows (the head's full-precision
    copy); both tables quantized, it shrinks. qwen2's are untied: each one shrinks the file."""
    base = _quantized(family, _recipe("w4a16-rtn-g64"))
    save(base, tmp_path / "base")
    save(_quantized(family, _recipe("w4a16-rtn-g64", INT8)), tmp_path / "table")
    save(_quantized(family, _recipe("w4a16-rtn-g64", INT8, INT8)), tmp_path / "both")
    table_fp32, table_int8 = 320 * 128 * 4, 320 * 128 + 320 * 4
    base, table, both = (_size(tmp_path / name) for name in ("base", "table", "both"))
    if family == "llama":  # one fp32 table in base; the table alone adds the untied head's fp32 copy
        assert table - base == pytest.approx(table_int8, abs=2048)
        assert base - both == pytest.approx(table_fp32 - 2 * table_int8, abs=2048)
    else:
        assert base - table == pytest.approx(table_fp32 - table_int8, abs=2048)
        assert base - both == pytest.approx(2 * (table_fp32 - table_int8), abs=2048)


def test_loaded_tables_generate(tmp_path):
    model = _quantized("llama", _recipe("w4a16-rtn-g64", G32, INT8))
    save(model, tmp_path / "m")
    prompt = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.generate(prompt, **kw)
    assert torch.equal(load(tmp_path / "m", simulate=True).generate(prompt, **kw), want)
    assert load(tmp_path / "m").generate(prompt, **kw).shape == want.shape
