"""GGUF export: the Q4_0 / Q8_0 grids in the quantizer core, GGML block packing, and files that other programs read
back as exactly lowbit's model (gguf-py's reader block by block, transformers' GGUF loader logit by logit); one
clear line, and no file, for every input that cannot be exported."""

from __future__ import annotations

import os
import stat

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_model

from lowbit.apply import quantize
from lowbit.cli import main
from lowbit.data import calibration_data
from lowbit.errors import LowbitError, ModelError, RecipeError
from lowbit.export.gguf import write_gguf
from lowbit.export.gguf_tensors import rope_rows
from lowbit.gptq import gptq_quantize
from lowbit.models.arch import decoder_layers, spec_for
from lowbit.quant import PerGroup, compute_qparams, dequantize, parse_format
from lowbit.quant import quantize as quantize_codes
from lowbit.quant.ggml import LAYOUTS, pack_blocks, unpack_blocks
from lowbit.recipe import load_recipe
from lowbit.schemes import QuantScheme
from lowbit.surgery.linear import round_to_nearest

Q4_0 = QuantScheme(format="int4", int_range="full", granularity="group", group_size=32, scale_dtype="float16")
FAST = {"calibration": {"samples": 4, "seq_len": 64}}
LOGIT_ATOL = 1e-5  # transformers dequantizes the same float32 products; only summation order may differ


# --- the grids -------------------------------------------------------------------------------------------------------

def test_full_range_grid_maps_each_blocks_extreme_to_minus_8_with_a_float16_scale():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    w_hat, qp = round_to_nearest(w, Q4_0)
    groups, scale = w.reshape(16, 2, 32), qp.scale.reshape(16, 2, 1)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))
    codes = w_hat.reshape(16, 2, 32) / scale
    assert torch.equal(scale, scale.half().float())  # stored exactly as a float16
    assert torch.equal(codes, codes.round()) and codes.min() == -8 and codes.max() <= 7
    assert torch.equal(codes.gather(-1, groups.abs().argmax(-1, keepdim=True)), torch.full_like(extreme, -8.0))
    assert torch.equal(torch.sign(scale), -torch.sign(extreme))  # signed scale, as llama.cpp's d = v / -8


def test_existing_schemes_keep_their_restricted_grid_and_float32_scales():
    scheme = QuantScheme(format="int4", granularity="group", group_size=32)
    fmt = scheme.number_format()
    assert (fmt.qmin, fmt.qmax) == (-7.0, 7.0) and scheme.scale_torch_dtype is None
    assert scheme.describe() == "int4 sym g32 dyn"
    lo, hi = torch.tensor([-3.0, -1.0]), torch.tensor([2.0, 5.0])
    assert torch.equal(compute_qparams(lo, hi, fmt).scale, torch.tensor([3.0, 5.0]) / 7)
    with pytest.raises(ValueError, match="int_range 'full'"):
        QuantScheme(format="int4", symmetric=False, int_range="full")


def test_gptq_lands_on_the_float16_full_range_grid():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(8, 64, generator=g), torch.randn(256, 64, generator=g)
    fmt = parse_format("int4", full_range=True)
    result = gptq_quantize(w, 2 * x.T @ x / 256, fmt, PerGroup(32), observer="mse", scale_dtype=torch.float16)
    assert torch.equal(result.scale, result.scale.half().float())
    codes = quantize_codes(result.weight, result.qparams, fmt, PerGroup(32))
    assert codes.min() >= -8 and codes.max() <= 7
    assert torch.equal(dequantize(codes, result.qparams, fmt, PerGroup(32)), result.weight)


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_packed_blocks_dequantize_in_gguf_py_to_scale_times_code(kind):
    layout, g = LAYOUTS[kind], torch.Generator().manual_seed(2)
    codes = torch.randint(layout.qmin, layout.qmax + 1, (5, 96), generator=g)
    scale = torch.randn(5, 3, generator=g).half().float()
    minimum = torch.randn(5, 3, generator=g).half().float() if layout.has_min else None
    data = pack_blocks(kind, codes, scale, minimum)
    assert data.shape == (5, 3 * layout.nbytes)
    expect = codes.reshape(5, 3, 32) * scale[..., None] + (0 if minimum is None else minimum[..., None])
    got = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[kind])
    assert np.array_equal(got, expect.reshape(5, 96).numpy())
    back = unpack_blocks(kind, data, 96)
    assert torch.equal(back[0], codes) and torch.equal(back[1], scale)


# --- files read back by gguf-py and transformers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _quantized(family, tokenizer, text_file, preset="gguf-q4_0", **changes):
    recipe = load_recipe(preset).updated(**{**FAST, **changes})
    data = calibration_data(str(text_file), tokenizer)
    model = tiny_model(family, vocab_size=len(tokenizer))
    with torch.no_grad():  # a trained final norm (not ones): folding it into a rotated head unties the head
        model.model.norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(7))
    return quantize(model, recipe, data)


def _gguf_weights(path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a GGUF file, dequantized by gguf-py, as ``[rows, row_length]`` float32."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type.name, np.asarray(values, dtype=np.float32).reshape(*reversed(t.shape.tolist())))
    return out


def _expected(model) -> dict[str, torch.Tensor]:
    """lowbit's tensors under their GGUF names, q/k rows in llama.cpp's order for the llama architecture."""
    spec, cfg = spec_for(model), model.config
    heads = {"q": cfg.num_attention_heads, "k": cfg.num_key_value_heads} if spec.family != "qwen2" else {}
    names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
             "down": "ffn_down"}
    out = {"token_embd.weight": model.model.embed_tokens.weight, "output.weight": model.lm_head.weight,
           "output_norm.weight": model.model.norm.weight}
    for i, layer in enumerate(decoder_layers(model, spec)):
        out[f"blk.{i}.attn_norm.weight"] = layer.input_layernorm.weight
        out[f"blk.{i}.ffn_norm.weight"] = layer.post_attention_layernorm.weight
        for role, path in spec.linear_roles.items():
            linear = layer.get_submodule(path)
            for kind in ("weight", "bias"):
                t = getattr(linear, kind)
                if t is not None:
                    out[f"blk.{i}.{names[role]}.{kind}"] = rope_rows(t, heads[role]) if role in heads else t
    return {k: v.detach().float() for k, v in out.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_every_block_dequantizes_to_lowbits_weight_and_transformers_gives_its_logits(
        family, tokenizer, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _quantized(family, tokenizer, text_file)  # QuaRot R1/R2 + GPTQ onto Q4_0, table and head on Q8_0
    path = write_gguf(model, tmp_path / "m.gguf", "Q4_0", tokenizer=tokenizer)
    stored, expected = _gguf_weights(path), _expected(model)
    assert set(stored) == set(expected)  # rotations untied the head: output.weight is written
    for name, (kind, values) in stored.items():
        want = {"token_embd.weight": "Q8_0", "output.weight": "Q8_0"}.get(name, "Q4_0" if values.ndim == 2 else "F32")
        assert kind == want, name
        assert np.array_equal(values, expected[name].numpy()), name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, len(tokenizer), (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(ids).logits, loaded(ids).logits
    assert (ours - theirs).abs().max().item() <= LOGIT_ATOL


def test_q8_0_export_and_the_tokenizer_built_from_hugging_face(tokenizer, text_file, tmp_path):
    from transformers import AutoTokenizer

    model = _quantized("llama", tokenizer, text_file, "gguf-q8_0", steps=[{"method": "rtn"}], embeddings=None,
                       lm_head=None)
    path = write_gguf(model, tmp_path / "m.gguf", "Q8_0", tokenizer=tokenizer, float_type="F32")
    stored, expected = _gguf_weights(path), _expected(model)
    assert "output.weight" not in stored  # still tied: llama.cpp reuses token_embd
    assert stored["blk.0.ffn_down.weight"][0] == "Q8_0" and stored["token_embd.weight"][0] == "F32"
    for name, (_, values) in stored.items():
        assert np.array_equal(values, expected[name].numpy()), name
    text = "The committee met on Tuesday to discuss the budget."
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert from_gguf(text)["input_ids"][-8:] == tokenizer(text)["input_ids"][-8:]


def test_a_tied_head_quantized_like_its_table_is_written_once(tokenizer, text_file, tmp_path):
    """No rotation: table and head quantized apart onto Q8_0 hold equal values, so the file keeps one matrix (as
    llama.cpp's own quantizer does) and transformers still computes lowbit's logits from it."""
    from transformers import AutoModelForCausalLM

    model = _quantized("llama", tokenizer, text_file, steps=[{"method": "rtn"}])
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    path = write_gguf(model, tmp_path / "m.gguf", "Q4_0", tokenizer=tokenizer)
    stored = _gguf_weights(path)
    assert "output.weight" not in stored and stored["token_embd.weight"][0] == "Q8_0"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, len(tokenizer), (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (model(ids).logits - loaded(ids).logits).abs().max().item() <= LOGIT_ATOL


@pytest.mark.parametrize(("family", "kind"), [("llama", "F32"), ("qwen2", "F16")])
def test_full_precision_export_holds_the_model_as_it_computes(family, kind, tokenizer, tmp_path):
    """``F32`` / ``F16``: every matrix as floats (llama.cpp's reference and its quantizer's input), no recipe."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, vocab_size=len(tokenizer))
    path = write_gguf(model, tmp_path / "m.gguf", kind, tokenizer=tokenizer)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not the temporary file's private 600
    stored, expected = _gguf_weights(path), _expected(model)
    tied = model.lm_head.weight is model.model.embed_tokens.weight  # then llama.cpp reuses token_embd
    assert set(stored) == set(expected) - ({"output.weight"} if tied else set())
    for name, (got, values) in stored.items():
        assert got == (kind if values.ndim == 2 else "F32"), name
        want = expected[name].numpy()
        assert np.array_equal(values, want if got == "F32" else want.astype(np.float16).astype(np.float32)), name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, len(tokenizer), (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, theirs = model(ids).logits, loaded(ids).logits
    assert (ours - theirs).abs().max().item() <= (LOGIT_ATOL if kind == "F32" else 0.05)


def test_a_q4_0_model_saved_by_lowbit_runs_in_its_real_kernels(tokenizer, text_file, tmp_path):
    """Signed scales and code -8 survive lowbit's own save / load with real kernels (bf16 weight-only matmuls)."""
    from lowbit import load, save

    model = _quantized("llama", tokenizer, text_file)
    save(model, tmp_path / "q")
    loaded = load(tmp_path / "q")
    ids = torch.randint(0, len(tokenizer), (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    assert (want - got).abs().max() < 0.1 and (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.95


# --- bad input: one clear line, nothing written ----------------------------------------------------------------------

def _export(model_dir, out, *extra):
    return ["export", "--model", str(model_dir), "--format", "gguf", "--out", str(out), *extra]


@pytest.mark.parametrize(("extra", "message"), [
    (["--type", "Q3_X"], "unknown GGUF --type"),
    (["--type", "Q4_K_M"], "multiple of 256"),
    (["--type", "Q4_1"], "use --type Q4_0"),
    (["--recipe", "w4a8-rtn"], "quantizes activations"),
    (["--recipe", "w4a16-quarot"], "rotates online"),
    (["--recipe", "w4a16-rtn-g64"], "not on the Q4_0 grid"),
    (["--recipe", "w4a4kv4-prefix"], "quantizes activations"),
    (["--type", "Q4_0", "--recipe", "gguf-q8_0"], "not on the Q4_0 grid"),
    (["--type", "F32", "--recipe", "w4a8-rtn"], "quantizes activations"),
    (["--type", "F16", "--recipe", "w4a16-quarot"], "rotates online"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "m.gguf"
    assert main(_export(tiny_model_dir, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_out_is_never_overwritten(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    assert main(_export(tiny_model_dir, out)) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"mine"


def test_models_with_online_parts_or_off_grid_weights_are_refused_in_python(tokenizer, text_file, tmp_path):
    online = _quantized("llama", tokenizer, text_file, steps=[{"method": "quarot", "r3": False}, {"method": "rtn"}])
    with pytest.raises(RecipeError, match="rotates a linear's input online"):
        write_gguf(online, tmp_path / "a.gguf", tokenizer=tokenizer)
    model = _quantized("llama", tokenizer, text_file, steps=[{"method": "rtn"}])
    model.model.layers[0].mlp.up_proj.weight.data += 1e-3  # off the grid, as a weight trained after rounding
    with pytest.raises(LowbitError, match="not exactly on the Q4_0 grid"):
        write_gguf(model, tmp_path / "b.gguf", tokenizer=tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_a_family_gguf_cannot_describe_is_refused(tokenizer, tmp_path):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", vocab_size=len(tokenizer))
    config.mlp_bias = True
    model = quantize(AutoModelForCausalLM.from_config(config).eval(), load_recipe("gguf-q4_0").updated(
        steps=[{"method": "rtn"}], embeddings=None, lm_head=None))
    with pytest.raises(ModelError, match="GGUF cannot describe this llama model: its linears have biases"):
        write_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    assert list(tmp_path.iterdir()) == []


# --- the command ------------------------------------------------------------------------------------------------------

def test_export_command_with_the_default_recipe_and_from_a_saved_folder(tiny_model_dir, text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m.gguf"
    assert main(_export(tiny_model_dir, out, "--calib-data", str(text_file))) == 0
    assert "gguf-q4_0" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert loaded.config.num_hidden_layers == 2
    saved = tmp_path / "saved"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(load_recipe("gguf-q8_0").updated(steps=[{"method": "rtn"}]).to_yaml())
    report = tmp_path / "q.json"
    assert main(["quantize", "--model", str(tiny_model_dir), "--recipe", str(recipe), "--eval-data", str(text_file),
                 "--calib-data", str(text_file), "--seq-len", "64", "--windows", "1", "--report", str(report),
                 "--save", str(saved)]) == 0
    assert main(_export(saved, tmp_path / "s.gguf", "--type", "Q8_0")) == 0
    assert main(_export(saved, tmp_path / "f.gguf", "--type", "F32")) == 0  # a quantized model's values as floats
    assert main(_export(tiny_model_dir, tmp_path / "fp.gguf", "--type", "f16")) == 0
    assert "recipe none (full precision)" in " ".join(capsys.readouterr().out.split())
    assert main(_export(saved, tmp_path / "t.gguf", "--type", "Q4_0")) == 2
    assert "not on the Q4_0 grid" in capsys.readouterr().err and not (tmp_path / "t.gguf").exists()


# --- the real default model --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_default_model_exports_with_its_own_tokenizer_and_loads_in_transformers(tmp_path):
    """RTN onto Q4_0 (no calibration, to stay quick): the source GGUF's tokenizer is copied key for key, and
    transformers' GGUF loader computes lowbit's logits on the default text."""
    from transformers import AutoModelForCausalLM

    from lowbit.data import load_text, tokenize
    from lowbit.models.loading import default_gguf_path, load_model

    loaded = load_model("default")
    model = quantize(loaded.model, load_recipe("gguf-q4_0").updated(steps=[{"method": "rtn"}]))
    path = write_gguf(model, tmp_path / "m.gguf", "Q4_0", vocab_gguf=default_gguf_path())
    ours, source = gguf.GGUFReader(path), gguf.GGUFReader(default_gguf_path())
    for name, field in source.fields.items():
        if name.startswith("tokenizer."):
            assert ours.fields[name].contents() == field.contents(), name
    kinds = {t.name: t.tensor_type.name for t in ours.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q4_0" and kinds["token_embd.weight"] == "Q8_0"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = tokenize(load_text("default"), loaded.tokenizer)[:64].unsqueeze(0)
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-3
