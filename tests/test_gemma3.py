"""Gemma 3 (a tiny seeded gemma3_text: post-norms, q/k norms, (1 + w) norm scales, GeGLU, scaled embeddings, a
sliding-window layer): which rotations are exact, what is refused, and the weight, activation and KV presets."""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.artifact import load, save
from lowbit.cli import main
from lowbit.data import TokenData
from lowbit.errors import ModelError
from lowbit.models.arch import get_module, spec_for
from lowbit.recipe import Recipe, load_preset
from lowbit.rotations import random_hadamard
from lowbit.surgery.rotate import fold_norms, rotate_residual
from lowbit.surgery.sequential import LayerStream

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from equivalence import small  # noqa: E402  (the presets cut to tiny-model size)
from gemma3 import EXACT  # noqa: E402  (the QuaRot options exact on a post-norm family, as benchmarked)

from tests.conftest import tiny_model  # noqa: E402


@pytest.fixture
def gemma():
    return tiny_model("gemma3")


@pytest.fixture
def tokens() -> torch.Tensor:
    """48 tokens: six times the tiny model's sliding window, so the sliding layer's mask matters."""
    return torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(1))


def test_every_gemma3_spec_path_exists(gemma):
    spec = spec_for(gemma)
    assert spec.family == "gemma3" and spec.writer_norms == ("post_attention_layernorm", "post_feedforward_layernorm")
    for path in (spec.embed, spec.layers, spec.final_norm, spec.lm_head, spec.rotary):
        get_module(gemma, path)
    layer = get_module(gemma, spec.layers)[0]
    for path in (spec.attn, spec.mlp, spec.input_norm, spec.post_attn_norm, *spec.writer_norms, *spec.qk_norms,
                 *spec.linear_roles.values()):
        get_module(layer, path)


def _logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def _rotated(model, **flags):
    return lowbit.quantize(model, Recipe.from_dict({"steps": [{"method": "quarot", "r1": False, **flags}]}))


@pytest.mark.parametrize("flags", EXACT.values(), ids=EXACT.keys())
def test_rotations_the_post_norms_do_not_see_are_exact(gemma, tokens, flags):
    rotated = _rotated(gemma, **flags)
    ref = _logits(gemma, tokens)
    assert (_logits(rotated, tokens) - ref).abs().max() < 1e-4 * ref.abs().max()
    weights = dict(gemma.named_parameters())
    changed = [n for n, p in rotated.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    online = [n for n, m in rotated.named_modules() if getattr(m, "input_transform", None) or hasattr(m, "lowbit_hooks")]
    assert changed or online  # the rotations really were applied


def test_reader_rotations_run_online_and_cut_w4a4_error_from_outlier_channels(gemma, tokens):
    """R1's job (spreading a few massive residual channels before activations are quantized) done where R1 is not
    exact: the q/k/v and gate/up inputs are rotated online, so W4A4 RTN gets much closer to full precision."""
    with torch.no_grad():  # plant a few massive residual channels, as real LLMs have
        gemma.model.embed_tokens.weight[:, :3] *= 40
    w4a4 = {"weights": {"format": "int4"}, "activations": {"format": "int4", "granularity": "token"}}
    ref = _logits(gemma, tokens)
    errors = {}
    for name, steps in (("plain", []), ("readers", [{"method": "quarot", "r1": False, "readers": True}])):
        quantized = lowbit.quantize(gemma, Recipe.from_dict({**w4a4, "steps": [*steps, {"method": "rtn"}]}))
        errors[name] = (_logits(quantized, tokens) - ref).pow(2).mean().item()
    assert errors["readers"] < 0.6 * errors["plain"]
    rotated = _rotated(gemma, r2=False, r3=False, r4=False, readers=True)
    layer = rotated.model.layers[0]
    assert {type(get_module(layer, p).input_transform).__name__ for p in ("self_attn.q_proj", "self_attn.v_proj",
                                                                           "mlp.up_proj")} == {"OnlineRotation"}


def test_norm_folding_with_the_one_plus_w_scale_is_exact(gemma, tokens):
    """Folding uses the family's norm offset: a norm scales by 1 + w, and is left scaling by 1 (w = 0)."""
    folded = copy.deepcopy(gemma)
    fold_norms(folded, spec_for(folded))
    assert torch.count_nonzero(folded.model.layers[1].input_layernorm.weight) == 0
    assert (_logits(folded, tokens) - _logits(gemma, tokens)).abs().max() < 1e-5
    plain = copy.deepcopy(gemma)  # the Llama rule (scale = w) is wrong here: the check can fail
    fold_norms(plain, dataclasses.replace(spec_for(plain), norm_offset=0.0))
    assert (_logits(plain, tokens) - _logits(gemma, tokens)).abs().max() > 1e-2


def test_r1_is_refused_in_one_line_naming_the_post_norms(gemma):
    for recipe in ({"steps": [{"method": "quarot"}]}, {"steps": [{"method": "quarot", "r2": False}]}):
        with pytest.raises(ModelError, match=r"^R1 \(the residual-stream rotation\) is not exact on gemma3: its "
                                             r"post-norms \(post_attention_layernorm, post_feedforward_layernorm\).*"
                                             r"set r1: false"):
            lowbit.quantize(gemma, Recipe.from_dict(recipe))


def _r1_forced(model):
    """R1 applied with the refusal bypassed (the post-norms hidden from the spec): what the refusal prevents."""
    spec = spec_for(model)
    forced = dataclasses.replace(spec, attn_out_norm=None, mlp_out_norm=None)
    fold_norms(model, spec)
    rotate_residual(model, forced, random_hadamard(model.config.hidden_size, 0).dense())
    return model


def test_r1_really_breaks_gemma3_and_only_through_the_post_norms(gemma, tokens):
    """R1 is refused for a reason: through non-uniform post-norms it changes the logits; with uniform post-norm
    scales (w = 0, scale 1) the same surgery is exact, so the post-norms are the only obstacle."""
    ref = _logits(gemma, tokens)
    broken = _logits(_r1_forced(copy.deepcopy(gemma)), tokens)
    assert (broken - ref).abs().max() > 0.1 * ref.abs().max()
    uniform = copy.deepcopy(gemma)
    for layer in uniform.model.layers:
        layer.post_attention_layernorm.weight.data.zero_()
        layer.post_feedforward_layernorm.weight.data.zero_()
    ref = _logits(uniform, tokens)
    assert (_logits(_r1_forced(copy.deepcopy(uniform)), tokens) - ref).abs().max() < 1e-4 * ref.abs().max()


def test_the_cli_refuses_r1_on_gemma3_with_exit_code_2(tmp_path, tiny_tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tiny_model("gemma3", vocab_size=len(tok)).save_pretrained(tmp_path / "g")
    tok.save_pretrained(tmp_path / "g")
    code = main(["quantize", "--model", str(tmp_path / "g"), "--recipe", "w8a8-quarot", "--seq-len", "64",
                 "--windows", "1", "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("lowbit: error: R1 (the residual-stream rotation) is not exact on gemma3")
    assert "Traceback" not in "".join(err)


def test_spinquant_is_refused_on_gemma3(gemma):
    with pytest.raises(ModelError, match=r"^SpinQuant's learned R1 \(the residual-stream rotation\) is not exact"):
        lowbit.quantize(gemma, small(load_preset("w4a4kv4-spinquant")), _data())


def test_layer_streaming_runs_the_sliding_window_and_full_layers_as_the_model_does(gemma, tokens):
    """GPTQ's calibration walks the decoder layer by layer: each layer gets its own rotary table and mask (the
    sliding window on the sliding layer), so the streamed outputs are the model's own hidden states."""
    with torch.no_grad():
        want = gemma(tokens, output_hidden_states=True).hidden_states
    outputs = []
    stream = LayerStream(gemma, spec_for(gemma), tokens)
    with torch.no_grad():
        stream.walk(lambda current: outputs.append(current.run(current.inputs[0])) or [outputs[-1]])
    for i, got in enumerate(outputs[:-1]):
        assert (got - want[i + 1]).abs().max() < 1e-4, f"layer {i}"


def _data() -> TokenData:
    g = torch.Generator().manual_seed(3)
    return TokenData(eval_windows=torch.randint(0, 320, (2, 48), generator=g),
                     calib_tokens=torch.randint(0, 320, (4000,), generator=g), seed=0)


def _error(model, quantized, windows) -> float:
    """Mean squared logit error relative to the logits' mean square."""
    ref = _logits(model, windows)
    return ((_logits(quantized, windows) - ref).pow(2).mean() / ref.pow(2).mean()).item()


@pytest.mark.parametrize(("preset", "bound"), [("w8a8-rtn", 0.01), ("w4a16-gptq", 0.5), ("kv-kivi3", 0.2)])
def test_weight_activation_and_kv_presets_quantize_gemma3(gemma, preset, bound):
    data = _data()
    quantized = lowbit.quantize(gemma, small(load_preset(preset)), data)
    error = _error(gemma, quantized, data.eval_windows)
    assert 0 < error < bound


def test_gptq_on_gemma3_beats_rtn_on_held_out_windows(gemma):
    """GPTQ's layer-streamed calibration (48-token samples through the sliding and the full layer) does what it
    should: with the same int4 grid its output error on held-out windows is below round-to-nearest's."""
    data = _data()
    gptq = load_preset("w4a16-gptq").model_dump()
    gptq["calibration"] = {"samples": 32, "seq_len": 48}
    errors = {step: _error(gemma, lowbit.quantize(gemma, Recipe.from_dict({**gptq, "steps": [{"method": step}]}),
                                                  data), data.eval_windows)
              for step in ("gptq", "rtn")}
    assert errors["gptq"] < 0.85 * errors["rtn"]


@pytest.mark.parametrize("preset", ["w8a8-rtn", "w4a16-rtn-g64", "kv-kivi3"])
def test_save_load_gives_the_same_gemma3(tmp_path, gemma, preset):
    data = _data()
    quantized = lowbit.quantize(gemma, small(load_preset(preset)), data)
    save(quantized, tmp_path / "a")
    loaded = load(tmp_path / "a", simulate=True)
    assert torch.equal(_logits(quantized, data.eval_windows), _logits(loaded, data.eval_windows))


def test_packed_kv_decoding_matches_the_one_pass_evaluation_across_the_sliding_window(gemma):
    """kv-kivi3 (window cut to 4 so most tokens are packed): decoding 30 tokens after a 30-token prompt with the
    packed cache gives the scores the one-pass decode-equivalent forward gives, on a model whose sliding layer sees
    only 8 tokens; the packed keys/values really change the outputs."""
    data = _data()
    recipe = load_preset("kv-kivi3").model_dump()
    recipe["kv_cache"]["window"] = 4
    quantized = lowbit.quantize(gemma, Recipe.from_dict(recipe), data)
    prompt = data.eval_windows[:1, :30].clamp_min(3)  # no padding id (0) in the prompt
    with torch.no_grad():
        out = quantized.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                                 pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        one_pass = quantized(out.sequences).logits[0, 29:-1]
        fp = gemma(out.sequences).logits[0, 29:-1]
    assert type(out.past_key_values).__name__ == "PackedCache"
    assert (torch.stack([s[0] for s in out.scores]) - one_pass).abs().max() < 1e-4
    assert (fp - one_pass).abs().max() > 1e-2


def test_real_int8_kernels_compute_the_fake_quant_gemma3(tmp_path, gemma):
    data = _data()
    quantized = lowbit.quantize(gemma, small(load_preset("w8a8-rtn")), data)
    save(quantized, tmp_path / "a")
    loaded = load(tmp_path / "a")
    assert "IntLinear" in {type(m).__name__ for m in loaded.modules()}
    assert torch.equal(_logits(quantized, data.eval_windows), _logits(loaded, data.eval_windows))


def test_without_r1_gemma3_norms_keep_their_scales_unless_asked(gemma, tokens):
    """Folding serves R1 only: on Gemma 3 with r1: false the norms keep their (1 + w) scales and the lm_head stays
    tied; fold_norms: true folds them (still exact); r1 without folded norms is refused."""
    kept = _rotated(gemma)
    assert torch.equal(kept.model.layers[0].input_layernorm.weight, gemma.model.layers[0].input_layernorm.weight)
    assert kept.lm_head.weight is kept.model.embed_tokens.weight
    folded = _rotated(gemma, fold_norms=True)
    assert torch.count_nonzero(folded.model.layers[0].input_layernorm.weight) == 0
    ref = _logits(gemma, tokens)
    for model in (kept, folded):
        assert (_logits(model, tokens) - ref).abs().max() < 1e-4 * ref.abs().max()
    with pytest.raises(lowbit.LowbitError, match="r1 needs the norm scales folded"):
        Recipe.from_dict({"steps": [{"method": "quarot", "fold_norms": False}]})


def test_llama_still_folds_its_norms_without_r1():
    llama = tiny_model("llama")
    rotated = lowbit.quantize(llama, Recipe.from_dict({"steps": [{"method": "quarot", "r1": False}]}))
    assert torch.all(rotated.model.layers[0].input_layernorm.weight == 1)
