"""MX and NVFP4 scale types: power-of-two (E8M0) scales, and FP8 E4M3 scales under one float32 scale per tensor.

Each stored scale is the smallest value of its type at or above the wanted one; GPTQ and the MSE search, which round
a tensor's scales in pieces, share the whole tensor's unit; bits count 8 per block scale."""

import pytest
import torch

import lowbit
from lowbit.bits import activation_bits, weight_bits
from lowbit.errors import RecipeError
from lowbit.gptq import gptq_quantize
from lowbit.models.arch import spec_for
from lowbit.quant import FP4_E2M1, PerGroup, RelativeScale, bind_scale_unit, round_scale
from lowbit.recipe import Recipe
from tests.conftest import tiny_model

E8M0, E4M3 = torch.float8_e8m0fnu, torch.float8_e4m3fn


def _on(values: torch.Tensor, dtype: torch.dtype) -> bool:
    return torch.equal(values.to(dtype).to(torch.float32), values)


def _wanted() -> torch.Tensor:
    return torch.rand(4000, generator=torch.Generator().manual_seed(0)).mul(8).sub(6).exp2()  # 2^-6 .. 2^2


def test_e8m0_scales_are_the_smallest_power_of_two_at_or_above():
    wanted = _wanted()
    stored = round_scale(wanted, E8M0)
    assert torch.equal(stored, torch.exp2(torch.ceil(torch.log2(wanted))))


def test_e4m3_scales_are_the_smallest_e4m3_multiple_of_the_tensor_unit_at_or_above():
    wanted = _wanted()
    stored = round_scale(wanted, E4M3)
    unit = wanted.max() / 448
    ratio = stored / unit
    assert torch.allclose(ratio, ratio.to(E4M3).float(), rtol=1e-6)  # on the E4M3 grid (float32 products)
    assert (stored >= wanted * (1 - 1e-6)).all()
    below = (ratio.to(E4M3).float() - torch.where(ratio > 2**-6, torch.exp2(torch.floor(torch.log2(ratio)) - 3), 2**-9))
    assert (below * unit < wanted).all()  # the E4M3 value below is too small: the smallest one was taken
    assert ratio.max() == pytest.approx(448.0)


def test_scale_gradient_passes_straight_through():
    for dtype in (E8M0, E4M3):
        s = _wanted()[:10].requires_grad_()
        round_scale(s, dtype).sum().backward()
        assert torch.equal(s.grad, torch.ones(10))


def test_bound_unit_is_the_whole_tensors():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    bound = bind_scale_unit(E4M3, w, FP4_E2M1)
    assert isinstance(bound, RelativeScale)
    assert bound.unit.item() == pytest.approx(w.abs().max().item() / 6 / 448)
    assert bind_scale_unit(E8M0, w, FP4_E2M1) is E8M0 and bind_scale_unit(None, w, FP4_E2M1) is None


@pytest.mark.parametrize("dtype", [E8M0, E4M3])
def test_gptq_scales_lie_on_the_scale_grid_with_one_unit(dtype):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 64, generator=g)
    w[3, 5] = 9.0  # one large weight: its block sets the tensor's unit
    x = torch.randn(256, 64, generator=g)
    result = gptq_quantize(w, x.T @ x, FP4_E2M1, PerGroup(16), scale_dtype=dtype)
    scale = result.scale.reshape(-1)
    if dtype is E8M0:
        assert _on(scale, E8M0)
    else:
        unit = w.abs().max() / 6 / 448  # from the whole weight, though GPTQ fits 16 columns at a time
        assert torch.allclose(scale / unit, (scale / unit).to(E4M3).float(), rtol=1e-6)
        assert (scale / unit).max() == pytest.approx(448.0, rel=1e-6)
    codes = result.weight.reshape(24, 4, 16) / result.scale.reshape(24, 4, 1)
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    assert torch.isclose(codes.abs().unsqueeze(-1), grid, atol=1e-5).any(-1).all()


def _fp4_recipe(group: int, scale_dtype: str) -> Recipe:
    scheme = {"format": "fp4_e2m1", "granularity": "group", "group_size": group, "scale_dtype": scale_dtype}
    return Recipe.from_dict({"steps": [{"method": "rtn"}], "weights": scheme,
                             "activations": {**scheme, "dynamic": True}})


@pytest.mark.parametrize(("group", "scale_dtype", "bits"), [(32, "e8m0", 4.25), (16, "float8_e4m3", 4.5)])
def test_mxfp4_and_nvfp4_models_run_and_count_their_block_scales(tokens, group, scale_dtype, bits):
    model = tiny_model("llama")
    qmodel = lowbit.quantize(model, _fp4_recipe(group, scale_dtype))
    with torch.no_grad():
        assert torch.isfinite(qmodel(tokens).logits).all()
    spec = spec_for(qmodel)
    linears = [m for m in qmodel.model.layers.modules() if hasattr(m, "weight_scheme")]
    tensor_scales = 32 * len(linears) if scale_dtype == "float8_e4m3" else 0
    numel = sum(m.weight.numel() for m in linears)
    assert weight_bits(qmodel, spec)["weight"] == pytest.approx(bits + tensor_scales / numel)
    assert activation_bits(qmodel, spec) == pytest.approx(bits)


def test_block_scale_types_are_for_symmetric_formats():
    with pytest.raises(RecipeError, match="scale_dtype 'e8m0' is for symmetric formats"):
        Recipe.from_dict({"weights": {"format": "int4", "symmetric": False, "scale_dtype": "e8m0"}})


@pytest.mark.parametrize(("group", "scale_dtype", "scale_type"), [(32, "e8m0", torch.uint8), (16, "float8_e4m3", E4M3)])
def test_fp4_models_save_packed_and_load_as_the_same_model(tmp_path, tokens, group, scale_dtype, scale_type):
    """MXFP4 / NVFP4 weights are saved as two E2M1 codes a byte with their block scales in the type they were rounded
    to (NVFP4: E4M3 times one float32 unit per tensor), so the file holds 4.25 / 4.5 bits a weight; the simulated
    load is the same model bit for bit, and the real-kernel load names the simulation."""
    from safetensors import safe_open

    from lowbit.errors import NoKernelError

    qmodel = lowbit.quantize(tiny_model("llama"), _fp4_recipe(group, scale_dtype))
    lowbit.save(qmodel, tmp_path / "m")
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        scales = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
        unit = "model.layers.0.mlp.down_proj.weight_scale_unit" in f.keys()
    down = qmodel.model.layers[0].mlp.down_proj
    assert packed.dtype == torch.uint8 and packed.shape == (down.out_features, down.in_features // 2)
    assert scales.dtype == scale_type and scales.shape == (down.out_features, down.in_features // group)
    assert unit == (scale_dtype == "float8_e4m3")
    loaded = lowbit.load(tmp_path / "m", simulate=True)
    with torch.no_grad():
        assert torch.equal(qmodel(tokens).logits, loaded(tokens).logits)
    with pytest.raises(NoKernelError, match="simulate=True"):
        lowbit.load(tmp_path / "m")


def test_fp4_codes_pack_two_a_byte_low_nibble_first():
    from lowbit.runtime.kernels import pack_fp4, unpack_fp4

    values = torch.tensor([[0.5, -6.0, 0.0, 3.0, -0.5]])
    packed = pack_fp4(values)
    assert packed.tolist() == [[1 | (15 << 4), 0 | (5 << 4), 9]]
    assert torch.equal(unpack_fp4(packed, 5), values)
    with pytest.raises(ValueError, match="E2M1 grid"):
        pack_fp4(torch.tensor([[2.5]]))


def test_relative_scales_split_into_their_unit_exactly():
    from lowbit.quant import split_relative_scale

    wanted = _wanted()
    stored = round_scale(wanted, E4M3)
    values, unit = split_relative_scale(stored, E4M3)
    assert values.dtype == E4M3 and torch.equal(values.to(torch.float32) * unit, stored)
    with pytest.raises(ValueError, match="not one per-tensor unit"):
        split_relative_scale(wanted, E4M3)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_nvfp4_preset_runs_unrotated_with_asymmetric_gptq_and_a_packed_cache(family):
    """`w4a4-nvfp4-turbo3` (cut to tiny size) quantizes every decoder linear onto NVFP4's grid (4.5 bits with the
    E4M3 block scales) with no rotation, and its model runs with the turbo3 cache."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from equivalence import small

    from lowbit.recipe import load_preset
    from tests.conftest import tiny_data

    recipe = small(load_preset("w4a4-nvfp4-turbo3"))
    assert [s.method for s in recipe.steps] == ["gptq"] and recipe.steps[0].asymmetric
    qmodel = lowbit.quantize(tiny_model(family), recipe, tiny_data())
    spec = spec_for(qmodel)
    assert weight_bits(qmodel, spec)["weight"] == pytest.approx(4.5, abs=0.01)
    assert activation_bits(qmodel, spec) == pytest.approx(4.5)
    with torch.no_grad():
        assert torch.isfinite(qmodel(torch.arange(40).view(1, 40)).logits).all()


def test_int_weights_with_block_scale_types_keep_float32_scales_for_the_kernels(tmp_path, tokens):
    """Only FP4 weights store their scales compactly: INT4 groups with e8m0 scales keep float32 ``weight_scale`` (what
    the weight-only kernels and the compressed-tensors export read), and the kernel load computes the saved model."""
    from safetensors import safe_open

    recipe = Recipe.from_dict({"steps": [{"method": "rtn"}], "weights": {
        "format": "int4", "granularity": "group", "group_size": 32, "scale_dtype": "e8m0"}})
    qmodel = lowbit.quantize(tiny_model("llama"), recipe)
    lowbit.save(qmodel, tmp_path / "m")
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_scale").dtype == torch.float32
    with torch.no_grad():
        expected, got = qmodel(tokens).logits, lowbit.load(tmp_path / "m")(tokens).logits
    assert (got - expected).norm() <= 1e-2 * expected.norm()  # bf16 weight-only kernels
