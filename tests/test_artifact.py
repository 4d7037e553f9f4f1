"""Saved quantized models: save -> load gives the same model (logits bit for bit when simulating), save -> load ->
save gives the same bytes, and every bad folder ends in one clear error without leaving files behind."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.artifact import load, save
from lowbit.data import TokenData
from lowbit.errors import ArtifactError
from lowbit.recipe import load_preset
from lowbit.state import quant_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from equivalence import small  # noqa: E402  (the presets cut to tiny-model size)

from tests.conftest import tiny_model  # noqa: E402

PRESETS = ("w8a8-rtn", "w8a8-fp8", "w4a16-rtn-g64", "w4a4kv4-quarot", "w4a4kv4-spinquant", "w4a4kv4-prefix",
           "kv-turbo3", "kv-kivi", "w4a4-spin-prefix-qjl", "w4a4kv4-spinquant-qat", "w4a4-spinquant-turbo3",
           "w4a4-nvfp4-turbo3", "w4a4-nvfp4-turbo3-qat")


def _data() -> TokenData:
    g = torch.Generator().manual_seed(3)
    return TokenData(eval_windows=torch.randint(0, 320, (2, 40), generator=g),
                     calib_tokens=torch.randint(0, 320, (4000,), generator=g), seed=0)


def _quantized(family: str, preset: str):
    torch.manual_seed(0)
    return lowbit.quantize(tiny_model(family), small(load_preset(preset)), _data())


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_save_load_simulated_is_the_same_model_and_resaves_identically(tmp_path, family, preset):
    model = _quantized(family, preset)
    save(model, tmp_path / "a")
    loaded = load(tmp_path / "a", simulate=True)
    windows = _data().eval_windows
    with torch.no_grad():
        assert torch.equal(model(windows).logits, loaded(windows).logits)
    save(loaded, tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert quant_state(loaded).prefix_length == quant_state(model).prefix_length


REAL = ("w8a8-rtn", "w8a8-fp8", "w4a16-rtn", "w4a16-rtn-g64", "w4a16-gptq", "w4a16-quarot-asym", "w4a4kv4-quarot",
        "w4a4kv4-spinquant", "w4a4kv4-prefix", "w4a4-spin-prefix-qjl", "w4a4kv4-spinquant-qat")
INTEGER = ("w8a8-rtn", "w4a4kv4-quarot", "w4a4kv4-spinquant", "w4a4kv4-prefix", "w4a4-spin-prefix-qjl",
           "w4a4kv4-spinquant-qat")


@pytest.mark.parametrize("preset", REAL)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_real_kernels_match_the_fake_quant_model(tmp_path, family, preset):
    """The loaded real-kernel model computes the fake-quant model's function. Integer presets compute the same bits
    (the simulation runs the kernels' integer product at inference: lowbit.quant.integer). fp8 kernels differ from
    the simulation only in float summation order (an activation code can flip at an exact rounding tie, and KV
    quantizers downstream amplify that); weight-only kernels run in bf16 (2^-9 relative rounding of x, scales and
    output). Tolerance there: 0.1 on logits of magnitude ~0.1-3, and the arg-max token agrees at 95% of positions
    (random tiny models have near-ties that bf16 rounding can flip)."""
    model = _quantized(family, preset)
    save(model, tmp_path / "a")
    loaded = load(tmp_path / "a")
    kinds = {type(m).__name__ for m in loaded.modules()}
    assert kinds & {"IntLinear", "WeightOnlyLinear", "Fp8Linear"} and "QuantLinear" not in kinds
    windows = _data().eval_windows
    with torch.no_grad():
        want, got = model(windows).logits, loaded(windows).logits
    if preset in INTEGER:
        assert torch.equal(want, got)
    assert (want - got).abs().max() < 0.1
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.95
    save(loaded, tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_a_packed_load_holds_int4_codes_two_per_byte_and_computes_the_same(tmp_path, monkeypatch):
    """``packed=True``: int4 x int4 linears keep their codes in nibbles (half the int8 copy's bytes) and unpack them
    per call; the logits do not change (int_mm forced: CPUs without VNNI default to fbgemm's int8 layout)."""
    from lowbit.bench import resident_bytes
    from lowbit.runtime import IntLinear

    monkeypatch.setattr(IntLinear, "BACKEND", "int_mm")
    save(_quantized("qwen2", "w4a4kv4-quarot"), tmp_path / "a")
    fast, small = load(tmp_path / "a", lean=True), load(tmp_path / "a", lean=True, packed=True)
    windows = _data().eval_windows
    with torch.no_grad():
        assert torch.equal(fast(windows).logits, small(windows).logits)
    owners = [m.shared.combined if m.shared is not None else m for m in small.modules() if isinstance(m, IntLinear)]
    layers = list({id(m): m for m in owners}.values())  # fused siblings run their combined module
    assert len(layers) < len(owners) and all(m._w8 is None and m._nibbles is not None for m in layers)
    codes = sum(m.out_features * m.in_features for m in layers)
    held = resident_bytes(fast)["quantized linears"] - resident_bytes(small)["quantized linears"]
    assert held == codes - sum(m._nibbles.numel() for m in layers)  # int8 copy -> nibbles: half the code bytes


@pytest.mark.parametrize("preset", ["w4a4kv4-quarot", "w8a8-fp8", "w4a16-rtn-g64"])
def test_a_lean_load_frees_the_stored_codes_computes_the_same_and_refuses_to_save(tmp_path, preset, monkeypatch):
    """Weight-only layers read their codes for inputs above ``BF16_CAST_MAX_M`` rows: they are freed only when the
    kernel takes every size."""
    from lowbit.bench import resident_bytes
    from lowbit.errors import ModelError
    from lowbit.runtime import WeightOnlyLinear

    monkeypatch.setattr(WeightOnlyLinear, "BF16_CAST_MAX_M", {"int4pack": sys.maxsize, "int8pack": sys.maxsize})
    save(_quantized("llama", preset), tmp_path / "a")
    full, lean = load(tmp_path / "a"), load(tmp_path / "a", lean=True)
    windows = _data().eval_windows
    with torch.no_grad():
        assert torch.equal(full(windows).logits, lean(windows).logits)
    assert resident_bytes(lean)["quantized linears"] < resident_bytes(full)["quantized linears"]
    with pytest.raises(ModelError, match="lean"):
        save(lean, tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("preset", ["w4a4kv4-quarot", "w8a8-rtn", "w4a16-rtn-g64", "w8a8-fp8"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_siblings_fused_at_load_compute_the_same_in_the_same_memory(tmp_path, family, preset):
    """q/k/v and gate/up run as one module each (lowbit.runtime.fused): the same logits and generated tokens (int
    kernels: bit for bit, rows are independent; float GEMMs: summation order may change with the width), the same
    resident bytes, and a lean load still frees the codes."""
    from lowbit.bench import resident_bytes

    save(_quantized(family, preset), tmp_path / "a")
    plain, fused, lean = load(tmp_path / "a", fuse=False), load(tmp_path / "a"), load(tmp_path / "a", lean=True)
    runs = {id(m.shared) for m in fused.modules() if getattr(m, "shared", None) is not None}
    assert len(runs) == 2 * fused.config.num_hidden_layers
    windows, prompt = _data().eval_windows, _data().eval_windows[:1, :8]
    with torch.no_grad():
        want, got, got_lean = plain(windows).logits, fused(windows).logits, lean(windows).logits
        tokens = [m.generate(prompt, max_new_tokens=4, do_sample=False) for m in (plain, fused)]
    exact = preset in ("w4a4kv4-quarot", "w8a8-rtn")
    assert torch.equal(want, got) if exact else torch.allclose(want, got, rtol=0, atol=1e-4)
    assert torch.equal(got, got_lean) and torch.equal(*tokens)
    plain_bytes, fused_bytes = (resident_bytes(m)["quantized linears"] for m in (plain, fused))
    assert 0 <= fused_bytes - plain_bytes <= 16 * len(runs)  # each combined module's weight_shape (int64 [2])
    assert resident_bytes(lean)["quantized linears"] <= fused_bytes


@pytest.mark.parametrize("family, preset, hooked", [("llama", "w4a4kv4-quarot", True), ("qwen2", "w4a4kv4-quarot", True),
                                                     ("llama", "w4a4kv4-prefix", True), ("qwen2", "w4a4kv4-prefix", True),
                                                     ("llama", "w8a8-rtn", False)])
def test_decoding_hooks_each_token_once_with_the_same_result(family, preset, hooked):
    """decode_cache gives a HookedCache when every attention hook works token by token (R3, per-token or static KV
    scales, an exact prefix): it decodes the same tokens with the same scores (within float32 summation order) as
    transformers' cache, which hands the hooks the whole cache at every step (the prefix model: its prefix rotated
    once and kept exact, the new tokens quantized)."""
    from transformers import DynamicCache

    from lowbit.kv.hooked import HookedCache
    from lowbit.surgery.kvcache import decode_cache


    model = _quantized(family, preset)
    assert isinstance(decode_cache(model), HookedCache) == hooked
    if not hooked:
        return
    prompt = _data().eval_windows[:, :12]
    with torch.no_grad():
        runs = [model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                               pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kwargs)
                for kwargs in ({"past_key_values": decode_cache(model)}, {"past_key_values": DynamicCache()}, {})]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for ours, theirs in zip(runs[0].scores, runs[1].scores, strict=True):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-4)
    # plain generate, given no cache, decodes with lowbit's (the same scores bit for bit); a given cache is kept
    assert isinstance(runs[2].past_key_values, HookedCache) and type(runs[1].past_key_values) is DynamicCache
    assert all(torch.equal(a, b) for a, b in zip(runs[0].scores, runs[2].scores, strict=True))


def test_plain_generate_decodes_with_the_packed_cache(tmp_path):
    """A packed-KV model's (and its loaded copy's) plain ``generate`` decodes with its packed cache, as ``lowbit
    generate`` does (it raised before: a transformers cache would hold the KV in full precision); the model keeps its
    class name and type."""
    from transformers import DynamicCache, LlamaForCausalLM

    from lowbit.kv.cache import PackedCache

    model = _quantized("llama", "kv-turbo3")
    save(model, tmp_path / "m")
    prompt = _data().eval_windows[:1, :10]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        for m in (model, load(tmp_path / "m")):
            assert isinstance(m, LlamaForCausalLM) and type(m).__name__ == "LlamaForCausalLM"
            plain, packed = (m.generate(prompt, **kw, **extra) for extra in
                             ({}, {"past_key_values": PackedCache.for_model(m)}))
            assert isinstance(plain.past_key_values, PackedCache)
            assert all(torch.equal(a, b) for a, b in zip(plain.scores, packed.scores, strict=True))
            with pytest.raises(RuntimeError, match="packed cache"):  # a full-precision cache given: refused
                m.generate(prompt, **kw, past_key_values=DynamicCache())


def test_loaded_prefix_model_generates_as_the_original(tmp_path):
    model = _quantized("llama", "w4a4kv4-prefix")
    assert quant_state(model).prefix_length > 0
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m", simulate=True)
    prompt = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kw), loaded.generate(prompt, **kw))


def test_packed_weights_are_small_and_sharding_keeps_the_model(tmp_path):
    model = _quantized("qwen2", "w4a16-rtn-g64")
    save(model, tmp_path / "one")
    save(model, tmp_path / "sharded", shard_bytes=100_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    windows = _data().eval_windows
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "one", simulate=True)(windows).logits,
                           load(tmp_path / "sharded", simulate=True)(windows).logits)
    from safetensors import safe_open

    with safe_open(tmp_path / "one" / "model.safetensors", "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.up_proj.weight_packed")
        assert packed.dtype == torch.int32 and packed.shape == (160, 128 * 4 // 32)
        assert "model.layers.0.mlp.up_proj.weight" not in f.keys()


def test_bad_folders_are_one_clear_error(tmp_path):
    model = _quantized("llama", "w8a8-rtn")
    with pytest.raises(ArtifactError, match="not a lowbit model"):
        load(tmp_path)
    with pytest.raises(ArtifactError, match="not a folder"):
        load(tmp_path / "missing")
    save(model, tmp_path / "m")
    with pytest.raises(ArtifactError, match="already exists"):
        save(model, tmp_path / "m")
    manifest = tmp_path / "m" / "lowbit.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(ArtifactError, match="version 99"):
        load(tmp_path / "m")
    manifest.write_text(json.dumps(data))
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="damaged"):
        load(tmp_path / "m")
    with pytest.raises(ArtifactError, match="not quantized"):
        save(tiny_model("llama"), tmp_path / "fp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing half-written left behind


@pytest.mark.parametrize("how", ["cpu", "disk"])
def test_an_offloaded_model_saves_part_by_part_to_the_same_files(tmp_path, how):
    """Quantized in place while offloaded by accelerate, the model saves one part in memory at a time, to the bytes
    the in-memory model writes."""
    from accelerate import cpu_offload, disk_offload

    recipe = small(load_preset("w4a4kv4-quarot"))
    torch.manual_seed(0)
    in_memory = lowbit.quantize(tiny_model("qwen2"), recipe, _data())
    model = tiny_model("qwen2")
    model = (cpu_offload(model, execution_device="cpu") if how == "cpu"
             else disk_offload(model, str(tmp_path / "store"), execution_device="cpu"))
    torch.manual_seed(0)
    lowbit.quantize(model, recipe, _data(), inplace=True)
    assert model.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    save(in_memory, tmp_path / "a")
    save(model, tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_a_scheme_without_a_kernel_loads_only_simulated(tmp_path):
    """Static per-channel activation scales do not factor out of a matmul: the real load names the fallback, the
    simulated load is the quantized model."""
    from lowbit.errors import NoKernelError
    from lowbit.recipe import Recipe

    recipe = Recipe.from_dict({"name": "channel-a8", "steps": [{"method": "rtn"}],
                               "weights": {"format": "int4", "granularity": "channel"},
                               "activations": {"format": "int8", "granularity": "channel", "dynamic": False,
                                               "symmetric": False},
                               "calibration": {"samples": 4, "seq_len": 32}})
    model = lowbit.quantize(tiny_model("qwen2"), recipe, _data())
    save(model, tmp_path / "m")
    with pytest.raises(NoKernelError, match="simulate"):
        load(tmp_path / "m")
    windows = _data().eval_windows
    with torch.no_grad():
        assert torch.equal(model(windows).logits, load(tmp_path / "m", simulate=True)(windows).logits)
