"""Models offloaded by accelerate quantize part by part, to exactly the result of the in-memory model."""

import pytest
import torch
from accelerate import cpu_offload, disk_offload

import lowbit
from lowbit.data import TokenData
from lowbit.errors import ModelError
from lowbit.models.arch import decoder_layers
from lowbit.recipe import Recipe
from lowbit.surgery import sequential
from tests.conftest import tiny_model


@pytest.fixture
def calib():
    g = torch.Generator().manual_seed(7)
    return TokenData(eval_windows=torch.randint(0, 320, (2, 48), generator=g),
                     calib_tokens=torch.randint(0, 320, (4000,), generator=g), seed=0)


def _recipe(steps) -> Recipe:
    return Recipe.from_dict({"steps": steps, "weights": {"format": "int4", "granularity": "channel"},
                             "activations": {"format": "int8", "granularity": "token", "dynamic": True},
                             "calibration": {"samples": 8, "seq_len": 64}})


def _offload(model, how: str, folder):
    if how == "cpu":
        return cpu_offload(model, execution_device="cpu")
    return disk_offload(model, str(folder), execution_device="cpu")


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


CASES = [("llama", "cpu", "quarot-gptq"), ("llama", "disk", "quarot-rtn"), ("qwen2", "disk", "quarot-gptq"),
         ("mistral", "cpu", "gptq")]
STEPS = {"gptq": [{"method": "gptq"}], "quarot-gptq": [{"method": "quarot"}, {"method": "gptq"}],
         "quarot-rtn": [{"method": "quarot"}, {"method": "rtn"}]}


@pytest.mark.parametrize(("family", "how", "steps"), CASES)
def test_offloaded_model_quantizes_like_the_in_memory_one(family, how, steps, calib, tmp_path):
    recipe, tokens = _recipe(STEPS[steps]), calib.eval_windows
    expected = _logits(lowbit.quantize(tiny_model(family), recipe, calib), tokens)
    model = _offload(tiny_model(family), how, tmp_path)
    quantized = lowbit.quantize(model, recipe, calib, inplace=True)
    assert quantized.model.layers[0].mlp.down_proj.weight.device == torch.device("meta")  # still offloaded
    got = _logits(quantized, tokens)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, _logits(tiny_model(family), tokens), atol=1e-3)  # and really quantized


def test_one_decoder_layer_in_memory_at_a_time(calib, tmp_path, monkeypatch):
    """During layer-streamed GPTQ on a disk-offloaded model only the layer being quantized holds real weights."""
    model = _offload(tiny_model("llama"), "disk", tmp_path)
    seen = []
    original = sequential.on_device

    def watching(layer, device):
        materialized = [i for i, lay in enumerate(decoder_layers(model, lowbit.models.arch.spec_for(model)))
                        if any(p.device.type != "meta" for p in lay.parameters())]
        seen.append(materialized)
        return original(layer, device)

    monkeypatch.setattr(sequential, "on_device", watching)
    lowbit.quantize(model, _recipe([{"method": "gptq"}]), calib, inplace=True)
    assert seen == [[], []]  # before each layer is brought in, no layer is in memory


def test_from_pretrained_with_an_offload_folder(calib, tmp_path):
    """transformers' device_map offloading to disk: the user's checkpoint is never written, results match."""
    from transformers import AutoModelForCausalLM

    source = tmp_path / "model"
    tiny_model("qwen2").save_pretrained(source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(source, device_map=device_map, offload_folder=tmp_path / "offload")
    recipe = _recipe([{"method": "quarot"}, {"method": "gptq"}])
    expected = _logits(lowbit.quantize(AutoModelForCausalLM.from_pretrained(source), recipe, calib), calib.eval_windows)
    got = _logits(lowbit.quantize(model, recipe, calib, inplace=True), calib.eval_windows)
    assert torch.allclose(got, expected, atol=1e-5)
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def test_offloaded_model_must_be_quantized_in_place(calib):
    model = cpu_offload(tiny_model("llama"), execution_device="cpu")
    with pytest.raises(ModelError, match="inplace=True"):
        lowbit.quantize(model, _recipe([{"method": "rtn"}]), calib)


STATIC_A8 = {"format": "int8", "granularity": "tensor", "dynamic": False}
PREFIX = [{"method": "prefix", "tokens": [1, 5]}]
QAT_CASES = [("llama", "disk", {}, None), ("qwen2", "cpu", {"train": "scales_norms", "clips": True}, None),
             ("llama", "cpu", {}, STATIC_A8), ("mistral", "disk", {"data": "self"}, None),
             ("qwen2", "disk", {"first": PREFIX}, STATIC_A8)]


def _qat_recipe(qat: dict, activations: dict | None) -> Recipe:
    qat = dict(qat)
    first = qat.pop("first", [])
    step = {"method": "qat", "steps": 4, "samples": 4, "seq_len": 24, "holdout": 2, "eval_every": 2, "top_k": 64,
            **qat}  # 64 of the tiny vocabulary's 320 tokens: the rest bucket matters
    recipe = _recipe([{"method": "quarot"}, *first, {"method": "rtn"}, step]).model_dump()
    if activations is not None:
        recipe["activations"] = activations
    return Recipe.from_dict(recipe)


@pytest.mark.parametrize(("family", "how", "qat", "activations"), QAT_CASES)
def test_qat_on_an_offloaded_model_trains_like_the_in_memory_one(family, how, qat, activations, calib, tmp_path):
    """Streamed QAT (weight matrices loaded per forward, each decoder layer recomputed in the backward pass) learns
    the same scales, norms and clips as the in-memory model with the same cached top-k teacher, and writes them
    back: the offloaded result computes what the in-memory one does."""
    recipe = _qat_recipe(qat, activations)
    in_memory = recipe.model_copy(update={"steps": [*recipe.steps[:-1],
                                                    recipe.steps[-1].model_copy(update={"teacher": "topk"})]})
    expected_model, expected = lowbit.quantize_with_session(tiny_model(family), in_memory, calib)
    model = _offload(tiny_model(family), how, tmp_path)
    quantized, session = lowbit.quantize_with_session(model, recipe, calib, inplace=True)
    assert quantized.model.layers[0].mlp.down_proj.weight.device == torch.device("meta")  # still offloaded
    assert quantized.model.layers[0].input_layernorm.weight.device == torch.device("meta")
    got, want = session.report()["qat"], expected.report()["qat"]
    assert got["teacher"] == want["teacher"] == "top-64"
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-4)
    assert got["held_out_kl"] == pytest.approx(want["held_out_kl"], rel=1e-4)
    assert torch.allclose(_logits(quantized, calib.eval_windows), _logits(expected_model, calib.eval_windows),
                          atol=1e-4)
    untrained = lowbit.quantize(tiny_model(family), Recipe.from_dict({**recipe.model_dump(),
                                                                      "steps": recipe.model_dump()["steps"][:-1]}),
                                calib)
    assert not torch.allclose(_logits(quantized, calib.eval_windows), _logits(untrained, calib.eval_windows),
                              atol=1e-4)  # and it really trained


def test_streamed_qat_holds_one_weight_matrix_and_recomputes_each_layer(calib, tmp_path, monkeypatch):
    """While an offloaded model trains, no other weight matrix is in memory when one comes in, and each decoder
    linear is loaded twice a training step (its forward, then again in the backward pass: checkpointed)."""
    import lowbit.surgery.offload as offload

    model = _offload(tiny_model("llama"), "disk", tmp_path)
    recipe = _recipe([{"method": "rtn"}, {"method": "qat", "steps": 3, "samples": 3, "seq_len": 16, "holdout": 0}])
    seen, calls, original = [], {}, offload._load

    def watching(module, names, hook, device=None):
        if torch.is_grad_enabled() and "weight" in names:  # a training forward or its recompute
            seen.append(sum(m.weight.device.type != "meta" for m in model.modules()
                            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2))
            calls[module] = calls.get(module, 0) + 1
        return original(module, names, hook, device)

    monkeypatch.setattr(offload, "_load", watching)
    lowbit.quantize(model, recipe, calib, inplace=True)
    assert seen and max(seen) == 0
    assert calls[model.model.layers[0].mlp.down_proj] == 2 * 3  # 3 steps, each a forward and a recompute


@pytest.mark.parametrize(("qat", "first", "message"), [
    ({"teacher": "model"}, [{"method": "rtn"}], "use teacher: topk"),
    ({"train": "weights"}, [{"method": "rtn"}], "train scales or scales_norms")])
def test_qat_an_offloaded_model_cannot_stream_is_refused_before_anything_changes(qat, first, message, calib,
                                                                                 tmp_path):
    """What streamed training cannot do is refused with one line, and the model is left as it was."""
    model = _offload(tiny_model("llama"), "disk", tmp_path)
    before = _logits(model, calib.eval_windows)
    recipe = _recipe([*first, {"method": "qat", "steps": 1, "samples": 2, "seq_len": 16, "holdout": 0, **qat}])
    with pytest.raises(ModelError, match=message):
        lowbit.quantize(model, recipe, calib, inplace=True)
    assert torch.equal(_logits(model, calib.eval_windows), before)
