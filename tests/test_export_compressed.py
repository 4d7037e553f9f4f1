"""compressed-tensors export: the folder loads in plain transformers + compressed-tensors in a process that never
imports lowbit, decodes to exactly lowbit's quantized weights and gives lowbit's logits; what the format cannot
describe is refused with one line and nothing written.

transformers' CPU path runs compressed weights in two ways: the default load (path A) decompresses on the first
forward and keeps the activation fake-quant of the scheme (compressed-tensors' convention: int8 scales absmax/127.5,
lowbit and vLLM use absmax/127, so logits differ slightly); ``CompressedTensorsConfig(dequantize=True)`` (path B)
decompresses at load and drops activation quantization. Path A fails on asymmetric pack-quantized checkpoints in
transformers 5.24 + compressed-tensors 0.20.1 (it expects an unpacked zero point); path B loads them. transformers
ignores ``transform_config``: an online R4 export is checked by applying the stored matrix as vLLM does
(``x @ (W / sqrt(n))`` before ``down_proj``), still without lowbit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("compressed_tensors")

import lowbit  # noqa: E402
from lowbit.artifact import load, save  # noqa: E402
from lowbit.data import TokenData  # noqa: E402
from lowbit.errors import ArtifactError  # noqa: E402
from lowbit.export.compressed import check_recipe, write_compressed_tensors  # noqa: E402
from lowbit.recipe import Recipe  # noqa: E402
from lowbit.surgery.linear import QuantLinear  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

RTN = [{"method": "rtn"}]
INT8_TOKEN = {"format": "int8", "symmetric": True, "granularity": "token", "dynamic": True}


def _w(fmt: str, sym: bool = True, group: int | None = None) -> dict:
    gran = {"granularity": "group", "group_size": group} if group else {"granularity": "channel"}
    return {"format": fmt, "symmetric": sym, **gran}


# name: (family, recipe fields, expected format, activation quantization kept by path A)
CASES = {
    "w4a16-g32-sym": ("llama", {"weights": _w("int4", True, 32)}, "pack-quantized"),
    "w4a16-g32-sym-mistral": ("mistral", {"weights": _w("int4", True, 32)}, "pack-quantized"),
    "w4a16-g32-sym-gemma3": ("gemma3", {"weights": _w("int4", True, 32)}, "pack-quantized"),
    "w4a16-g32-asym": ("qwen2", {"weights": _w("int4", False, 32)}, "pack-quantized"),
    "w4a16-channel-sym": ("qwen2", {"weights": _w("int4")}, "pack-quantized"),
    "w4a16-channel-asym": ("llama", {"weights": _w("int4", False)}, "pack-quantized"),
    "w8a16-channel": ("qwen2", {"weights": _w("int8")}, "pack-quantized"),
    "w8a16-g32-asym": ("llama", {"weights": _w("int8", False, 32)}, "pack-quantized"),
    "w4a16-g32-full-range": ("llama", {"weights": {**_w("int4", True, 32), "int_range": "full",
                                                   "scale_dtype": "float16"}}, "pack-quantized"),
    "w3a16-g32": ("qwen2", {"weights": _w("int3", True, 32)}, "pack-quantized"),
    "w8a8-int": ("qwen2", {"weights": _w("int8"), "activations": INT8_TOKEN}, "int-quantized"),
    "w8a8-static-asym": ("llama", {"weights": _w("int8"), "activations": {"format": "int8", "symmetric": False,
                                                                          "granularity": "tensor", "dynamic": False}},
                         "int-quantized"),
    "fp8-static": ("qwen2", {"weights": {"format": "fp8_e4m3", "granularity": "channel"},
                             "activations": {"format": "fp8_e4m3", "granularity": "tensor", "dynamic": False}},
                   "float-quantized"),
    "w4a8-int": ("llama", {"weights": _w("int4"), "activations": INT8_TOKEN}, "int-quantized"),
    "w4a4-int": ("qwen2", {"weights": _w("int4", True, 32),
                           "activations": {**INT8_TOKEN, "format": "int4"}}, "pack-quantized"),
    "fp8-dynamic": ("llama", {"weights": {"format": "fp8_e4m3", "granularity": "channel"},
                              "activations": {"format": "fp8_e4m3", "granularity": "token", "dynamic": True}},
                    "float-quantized"),
    "fp8-weights": ("qwen2", {"weights": {"format": "fp8_e4m3", "granularity": "channel"}}, "float-quantized"),
    "quarot-r4-o-w8a8": ("qwen2", {"steps": [{"method": "quarot", "r3": False, "o_rotation": True}, {"method": "rtn"}],
                                   "weights": _w("int8"), "activations": INT8_TOKEN}, "int-quantized"),
    "quarot-r4-w4a16": ("llama", {"steps": [{"method": "quarot", "r3": False}, {"method": "rtn"}],
                                  "weights": _w("int4", True, 32)}, "pack-quantized"),
}
ONLINE = {"quarot-r4-w4a16", "quarot-r4-o-w8a8"}  # online rotations: transformers ignores transform_config
ASYM_PACKED = {"w4a16-g32-asym", "w4a16-channel-asym", "w8a16-g32-asym"}


def _data() -> TokenData:
    g = torch.Generator().manual_seed(3)
    return TokenData(eval_windows=torch.randint(0, 320, (2, 40), generator=g),
                     calib_tokens=torch.randint(0, 320, (4000,), generator=g), seed=0)


def _recipe(fields: dict) -> Recipe:
    return Recipe.from_dict({"name": "export-test", "steps": RTN, **fields,
                             "calibration": {"samples": 4, "seq_len": 32}})


def _quantized(family: str, fields: dict):
    torch.manual_seed(0)
    return lowbit.quantize(tiny_model(family), _recipe(fields), _data())


def _activation_quant(model, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.input_quant is not None:
            m.input_quant.enabled = on


# Runs in a fresh interpreter that refuses to import lowbit: plain transformers + compressed-tensors only.
LOADER = r'''
import importlib.abc, json, math, sys
class NoLowbit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "lowbit" or name.startswith("lowbit."):
            raise ImportError("lowbit must not be imported by the loader")
sys.meta_path.insert(0, NoLowbit())
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

def vllm_transforms(model, folder):
    """Apply transform_config's online input transforms as vLLM does: x @ (W / sqrt(n)), W stored once."""
    config = json.load(open(f"{folder}/config.json"))["quantization_config"]["transform_config"]
    modules = dict(model.named_modules())
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        for name, scheme in config.get("config_groups", {}).items():
            for args in scheme["apply"]:
                w = f.get_tensor(f"{args['targets'][0]}.{name}_input.weight")
                q = w / math.sqrt(w.shape[0])
                for t in args["targets"]:
                    modules[t].register_forward_pre_hook(lambda m, a, q=q: (a[0] @ q.to(a[0].dtype),))

jobs, out = json.loads(sys.argv[1]), {}
for name, job in jobs.items():
    windows, res = torch.load(job["windows"]), {}
    for path in ("A", "B"):
        kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if path == "B" else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(job["dir"], **kw).eval()
        except Exception as exc:
            res[path] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        with torch.no_grad():
            res[path] = model(windows).logits
            if path == "B":
                res["weights"] = {n: m.weight.detach().clone() for n, m in model.named_modules()
                                  if isinstance(m, torch.nn.Linear)}
                vllm_transforms(model, job["dir"])
                res["vllm_transforms"] = model(windows).logits
    out[name] = res
out["lowbit_imported"] = "lowbit" in sys.modules
torch.save(out, sys.argv[2])
'''


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case quantized and exported; lowbit's references; the lowbit-free loader's results, in one process."""
    root = tmp_path_factory.mktemp("ct")
    windows = _data().eval_windows
    torch.save(windows, root / "windows.pt")
    refs, jobs = {}, {}
    for name, (family, fields, _) in CASES.items():
        model = _quantized(family, fields)
        write_compressed_tensors(model, root / name)
        with torch.no_grad():
            logits = model(windows).logits
            _activation_quant(model, False)
            no_act = model(windows).logits
        weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
                   if isinstance(m, QuantLinear) and m.weight_scheme is not None}
        refs[name] = {"logits": logits, "no_act": no_act, "weights": weights, "model": model}
        jobs[name] = {"dir": str(root / name), "windows": str(root / "windows.pt")}
    result = root / "loaded.pt"
    subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs), str(result)], check=True, cwd=root,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    return root, refs, torch.load(result)


def test_the_loader_never_imports_lowbit(exported):
    assert exported[2]["lowbit_imported"] is False


@pytest.mark.parametrize("name", list(CASES))
def test_config_is_compressed_tensors_with_the_expected_format(exported, name):
    config = json.loads((exported[0] / name / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert {g["format"] for g in qc["config_groups"].values()} == {CASES[name][2]}
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert sorted(targets) == sorted(exported[1][name]["weights"])


@pytest.mark.parametrize("name", list(CASES))
def test_weights_decompress_to_exactly_lowbits_quantized_weights(exported, name):
    _, refs, loaded = exported
    got = loaded[name]["weights"]
    for path, weight in refs[name]["weights"].items():
        assert torch.equal(got[path], weight), path


@pytest.mark.parametrize("name", [n for n in CASES if n not in ONLINE])
def test_dequantized_load_gives_lowbits_logits_without_activation_quantization(exported, name):
    _, refs, loaded = exported
    torch.testing.assert_close(loaded[name]["B"], refs[name]["no_act"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in CASES if "a16" in n and n not in ASYM_PACKED | ONLINE])
def test_default_load_of_weight_only_exports_is_bit_exact(exported, name):
    _, refs, loaded = exported
    assert torch.equal(loaded[name]["A"], refs[name]["logits"])


@pytest.mark.parametrize("name", ["w8a8-int", "w8a8-static-asym", "w4a8-int", "w4a4-int", "fp8-dynamic", "fp8-static"])
def test_default_load_keeps_activation_quantization(exported, name):
    """Path A fake-quantizes activations (its logits differ from path B's, which drops that): static scales (stored)
    and dynamic fp8 as lowbit (same logits); dynamic int with absmax/(qmax + 0.5) instead of lowbit's absmax/qmax, a
    difference of the order of the activation quantization error itself (measured 1.2-1.4x path B's)."""
    _, refs, loaded = exported
    want, a, b = refs[name]["logits"], loaded[name]["A"], loaded[name]["B"]
    assert (a - b).abs().max() > 1e-3
    if name.startswith("fp8") or name == "w8a8-static-asym":
        torch.testing.assert_close(a, want, rtol=0, atol=1e-5)
    else:
        assert (a - want).abs().max() < 2 * (b - want).abs().max()


def test_online_rotations_run_as_vllm_applies_transform_config(exported):
    """transformers ignores transform_config (logits off); the stored matrices applied as vLLM does give lowbit's
    logits (activation quantization off: transformers' dequantized load drops it)."""
    root, refs, loaded = exported
    for name, want_key, groups in (("quarot-r4-w4a16", "logits", {"R4": "mlp.down_proj"}),
                                   ("quarot-r4-o-w8a8", "no_act", {"R4": "mlp.down_proj",
                                                                   "online_o_proj": "self_attn.o_proj"})):
        res, want = loaded[name], refs[name][want_key]
        assert (res["B"] - want).abs().max() > 1e-2
        torch.testing.assert_close(res["vllm_transforms"], want, rtol=0, atol=1e-4)
        config = json.loads((root / name / "config.json").read_text())["quantization_config"]["transform_config"]
        assert set(config["config_groups"]) == set(groups)
        for group, leaf in groups.items():
            scheme = config["config_groups"][group]
            assert scheme["type"] == "random-hadamard" and scheme["apply"][0]["location"] == "input"
            assert scheme["apply"][0]["targets"] == [f"model.layers.{i}.{leaf}" for i in range(2)]


def test_tied_lm_head_is_written_once_and_an_untied_one_on_its_own(exported):
    from safetensors import safe_open

    root, refs, _ = exported
    for name, tied in (("w4a16-g32-sym", True), ("quarot-r4-w4a16", False)):
        config = json.loads((root / name / "config.json").read_text())
        with safe_open(root / name / "model.safetensors", "pt") as f:
            keys = set(f.keys())
            assert config["tie_word_embeddings"] is tied
            assert ("lm_head.weight" in keys) is not tied
            if not tied:
                assert torch.equal(f.get_tensor("lm_head.weight"), refs[name]["model"].lm_head.weight.detach())


@pytest.mark.parametrize("simulate", [True, False])
def test_a_saved_and_reloaded_model_exports_the_same_tensors(exported, tmp_path, simulate):
    """lowbit.load (fake-quant or real kernels) exports the same checkpoint as the in-memory quantized model."""
    from safetensors.torch import load_file

    root, refs, _ = exported
    for name in ("w4a16-g32-asym", "w8a8-int"):
        save(refs[name]["model"], tmp_path / f"{name}-{simulate}")
        reloaded = load(tmp_path / f"{name}-{simulate}", simulate=simulate)
        out = write_compressed_tensors(reloaded, tmp_path / f"{name}-{simulate}-ct")
        want, got = load_file(root / name / "model.safetensors"), load_file(out / "model.safetensors")
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), name


# --- refusals: one line naming the fix, nothing written ---------------------------------------------------------------

REFUSED = {
    "r3": ({"steps": [{"method": "quarot"}, {"method": "rtn"}], "weights": _w("int4", True, 32)}, "r3: false"),
    "kv": ({"weights": _w("int4", True, 32), "kv": {"format": "int4", "symmetric": False, "granularity": "head"}},
           "drop kv"),
    "packed-cache": ({"weights": _w("int4", True, 32), "kv_cache": {"keys": {"codec": "int", "bits": 3},
                                                                     "values": {"codec": "int", "bits": 3}}},
                     "drop kv_cache"),
    "embeddings": ({"weights": _w("int4", True, 32), "embeddings": _w("int8")}, "drop embeddings"),
    "lm_head": ({"weights": _w("int4", True, 32), "lm_head": _w("int8")}, "drop lm_head"),
    "group-not-dividing": ({"weights": _w("int4", True, 64)}, "group size that divides"),
    "tensor-weights": ({"weights": {"format": "int4", "granularity": "tensor"}}, "per channel or in groups"),
    "clipped-activations": ({"weights": _w("int4"), "activations": {**INT8_TOKEN, "format": "int4",
                                                                     "clip_ratio": 0.9}}, "clip_ratio 1.0"),
    "asym-a4": ({"weights": _w("int4"), "activations": {**INT8_TOKEN, "format": "int4", "symmetric": False}},
                "symmetric dynamic per-token"),
    "fp8-e5m2": ({"weights": {"format": "fp8_e5m2", "granularity": "channel"}}, "fp8_e4m3"),
}


def _assert_refused(model, target: Path, match: str) -> None:
    with pytest.raises(ArtifactError, match=match) as info:
        write_compressed_tensors(model, target)
    assert "\n" not in str(info.value)
    assert not target.exists() and list(target.parent.iterdir()) == []


@pytest.mark.parametrize("case", list(REFUSED))
def test_unexpressible_recipes_are_refused_and_nothing_is_written(tmp_path, case):
    fields, match = REFUSED[case]
    _assert_refused(_quantized("qwen2", fields), tmp_path / "out", match)


PREFIX = {"steps": [{"method": "prefix", "tokens": [1, 2], "samples": 2, "seq_len": 16}, {"method": "rtn"}],
          "weights": _w("int4", True, 32), "activations": {"format": "int8", "granularity": "tensor", "dynamic": False}}


def test_a_prefixquant_prefix_is_refused(tmp_path):
    _assert_refused(_quantized("llama", PREFIX), tmp_path / "out", "prefix")


@pytest.mark.parametrize("case", [c for c in REFUSED if c != "group-not-dividing"] + ["prefix"])
def test_a_recipe_is_refused_before_anything_is_quantized(case):
    fields, match = REFUSED[case] if case != "prefix" else (PREFIX, "prefix")
    with pytest.raises(ArtifactError, match=match):
        check_recipe(_recipe(fields))


@pytest.mark.parametrize("name", list(CASES))
def test_recipes_that_export_pass_the_recipe_check(name):
    check_recipe(_recipe(CASES[name][1]))


def test_a_model_lowbit_did_not_quantize_is_refused(tmp_path):
    _assert_refused(tiny_model("llama"), tmp_path / "out", "not quantized by lowbit")


def test_an_existing_target_folder_is_refused_and_left_untouched(exported, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="already exists"):
        write_compressed_tensors(exported[1]["w4a16-g32-sym"]["model"], target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
