"""lowbit.runtime: real low-bit linears compute what the fake-quant QuantLinear computes, and their state_dict is the
on-disk contract.

At inference a fake-quant layer with int weights per channel or tensor and per-token or per-tensor int activations
computes the kernels' integer product itself (:mod:`lowbit.quant.integer`): the outputs are equal bit for bit.
Elsewhere, tolerances relative to ``B = |q(x)| @ |W|^T`` (the sum of the absolute products, per output): the integer
and fp8 paths form the same exact products as the fake-quant float32 matmul and differ only in float32 summation order
and where the scales multiply, so ``|diff| <= 1e-5 * B`` (float32 error of a K-term sum is at most ``K * 2^-24 * B``,
typically ``sqrt(K) * 2^-24 * B``; measured <= 2e-7). The bf16 weight-only kernels round ``x``, the scales and the
output to bf16 (2^-9 relative each), so ``|diff| <= 2^-7 * B`` (measured <= 3.1e-3).
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from lowbit.errors import NoKernelError
from lowbit.quant import integer, pack_int32
from lowbit.rotations import random_hadamard
from lowbit.runtime import (
    Fp8Linear,
    IntLinear,
    RuntimeLinear,
    WeightOnlyLinear,
    convert,
    kernel_class,
    kernels,
    to_runtime,
)
from lowbit.schemes import QuantScheme
from lowbit.surgery.linear import QuantLinear
from lowbit.surgery.quantizer import ActQuantizer
from lowbit.surgery.rotate import OnlineRotation

S = QuantScheme
SHAPES = [(40, 24), (96, 64), (576, 64)]
INT_CASES = [
    (S(format="int4"), S(format="int8", granularity="token")),
    (S(format="int4"), S(format="int8", granularity="tensor", dynamic=False)),
    (S(format="int8", symmetric=False), S(format="int8", symmetric=False, granularity="tensor", dynamic=False)),
    (S(format="int4", symmetric=False, granularity="tensor"), S(format="int8", symmetric=False, granularity="token")),
    (S(format="int4"), S(format="int4", symmetric=False, granularity="token", clip_ratio=0.9)),  # asymmetric A4
    (S(format="int3", granularity="group", group_size=32), S(format="int6", granularity="token", clip_ratio=0.9)),
    (S(format="int2", granularity="group", group_size=16), S(format="int4", granularity="tensor", observer="percentile")),
    (S(format="int4", int_range="full"), S(format="int4", int_range="full", granularity="token", clip_ratio=0.9)),
    (S(format="int4", int_range="full"), S(format="int4", int_range="full", granularity="tensor", dynamic=False)),
]
WEIGHT_ONLY = [S(format="int4", granularity="group", group_size=32, symmetric=False), S(format="int4"),
               S(format="int8"), S(format="int5", symmetric=False, granularity="tensor"), S(format="int2"),
               S(format="int3", symmetric=False, granularity="group", group_size=64),
               S(format="int8", granularity="group", group_size=32, scale_dtype="float16"),  # GGUF Q8_0
               S(format="int4", int_range="full", granularity="group", group_size=32, scale_dtype="float16")]  # Q4_0
FP8_CASES = [(S(format="fp8_e4m3"), S(format="fp8_e4m3", granularity="token")), (S(format="fp8_e4m3"), None),
             (S(format="fp8_e5m2", granularity="tensor"), S(format="fp8_e5m2", granularity="tensor", dynamic=False)),
             (S(format="fp8_e4m3", granularity="group", group_size=32), None)]


def fake(k: int, n: int, bias: bool, w: QuantScheme, a: QuantScheme | None = None, dtype=torch.float32,
         rotate: bool = False, seed: int = 0) -> QuantLinear:
    """A fake-quant layer: random weights rounded to ``w``, input quantizer ``a`` (static ones calibrated)."""
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen))
    layer = QuantLinear(lin.to(dtype))
    layer.quantize_weight_rtn(w)
    if rotate:
        layer.input_transform = OnlineRotation(random_hadamard(k, seed))
    if a is not None:
        layer.input_quant = ActQuantizer(a, "activation")
        if not a.dynamic:
            layer.input_quant.start_calibration()
            layer(torch.randn(32, k, generator=gen).to(dtype))
            layer.input_quant.finish_calibration()
    return layer


def inputs(k: int, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(2, 5, k, generator=torch.Generator().manual_seed(7)) * 2).to(dtype)


def assert_matches(layer: QuantLinear, module: nn.Module, x: torch.Tensor, rel: float) -> None:
    """``|module(x) - layer(x)| <= rel * (|q(x)| @ |W|^T)`` elementwise (see the module doc)."""
    with torch.no_grad():
        expected, got = layer(x).float(), module(x).float()
        xr = layer.input_transform(x) if layer.input_transform is not None else x
        xq = layer.input_quant(xr) if layer.input_quant is not None else xr
        bound = xq.float().abs() @ layer.weight.float().abs().t()
    assert got.shape == expected.shape
    assert ((got - expected).abs() <= rel * bound + 1e-30).all(), float(((got - expected).abs() / bound).max())


@pytest.fixture
def int_groups(monkeypatch):
    """Group-wise weights with int activations: off by default (measured not cheap), on for these tests."""
    monkeypatch.setattr(IntLinear, "GROUPS", True)


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("w,a", INT_CASES, ids=lambda s: s.describe() if s else "none")
@pytest.mark.parametrize("bias", [True, False])
def test_int_weights_int_activations(k, n, w, a, bias, int_groups):
    layer = fake(k, n, bias, w, a)
    module = to_runtime(layer)
    assert isinstance(module, IntLinear)
    for int8_copy in (True, False):
        assert_matches(layer, module.prepare(int8_copy=int8_copy, backend="int_mm"), inputs(k), 1e-5)
    for backend, macs in backend_variants(module):
        assert_matches(layer, module.prepare(backend=backend, onednn_min_macs=macs), inputs(k), 1e-5)


def backend_variants(module: IntLinear) -> list[tuple[str, int | None]]:
    """Every backend of the layer; u8s8 with each kernel alone (oneDNN from 0 multiply-adds, fbgemm to the end)."""
    found = []
    for backend in module.possible_backends():
        found += [(backend, 0), (backend, sys.maxsize)] if backend == "u8s8" else [(backend, None)]
    return found


EXACT_CASES = [(w, a) for w, a in INT_CASES if w.granularity != "group"] + [
    (S(format="int4"), S(format="int4", granularity="tensor", dynamic=False)),  # PrefixQuant's static W4A4
    (S(format="int4"), S(format="int4", granularity="token", clip_ratio=0.9)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("w,a", EXACT_CASES, ids=lambda s: s.describe())
def test_simulation_at_inference_is_the_kernels_integer_product(w, a, dtype):
    """A fake-quant layer with int weights per channel or tensor and per-token or per-tensor int activations
    computes, at inference, the integer product the kernels compute: every backend gives its bits exactly; with
    gradients it stays the differentiable fake-quant matmul (the same values up to float32 rounding)."""
    layer = fake(576, 64, True, w, a, dtype=dtype, rotate=True)
    assert layer.integer_product()
    module, x = to_runtime(layer), inputs(576, dtype)
    with torch.no_grad():
        expected = layer(x)
        for backend, macs in backend_variants(module):
            assert torch.equal(module.prepare(backend=backend, onednn_min_macs=macs)(x), expected), backend
    x.requires_grad_(True)
    differentiable = layer(x)
    differentiable.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if dtype == torch.float32:
        assert_matches(layer, module, x.detach(), 1e-5)
        assert not torch.equal(differentiable.detach(), expected)  # two roundings of one product: they do differ


# u8s8 layers: weight codes (zero point subtracted) up to 64, activations shifted into uint8 by one zero point
U8S8_CASES = [
    (S(format="int4"), S(format="int8", granularity="token")),
    (S(format="int4"), S(format="int4", granularity="token", clip_ratio=0.9)),
    (S(format="int4"), S(format="int4", symmetric=False, granularity="token", clip_ratio=0.9)),
    (S(format="int4"), S(format="int8", granularity="tensor", dynamic=False)),
    (S(format="int7"), S(format="int8", granularity="token")),  # |w| <= 63
    (S(format="int6", symmetric=False), S(format="int8", symmetric=False, granularity="tensor", dynamic=False)),
    (S(format="int4", symmetric=False, granularity="tensor"), S(format="int7", symmetric=False, granularity="token")),
    (S(format="int4", granularity="tensor"), S(format="int8", symmetric=False, granularity="tensor")),
]


@pytest.mark.parametrize("k,n", [(1, 1), (7, 3), (33, 17), (576, 64)])
@pytest.mark.parametrize("w,a", U8S8_CASES, ids=lambda s: s.describe())
def test_every_backend_gives_the_int_mm_result(k, n, w, a):
    """u8s8 (both kernels) and float compute the same integer sums as _int_mm and scale them the same way
    (``float(acc) * s_w * s_x``): equal outputs, any shape, M of 1 and 300."""
    layer = fake(k, n, True, w, a)
    module = to_runtime(layer)
    assert "u8s8" in module.possible_backends()
    for x in (inputs(k)[:1, :1], torch.randn(300, k, generator=torch.Generator().manual_seed(3)) * 3):
        expected = module.prepare(backend="int_mm")(x)
        for backend, macs in backend_variants(module):
            got = module.prepare(backend=backend, onednn_min_macs=macs)(x)
            assert torch.equal(got, expected), (backend, macs, float((got - expected).abs().max()))
        assert_matches(layer, module, x, 1e-5)


@pytest.mark.parametrize("kernel", kernels.u8s8_kernels())
def test_u8s8_kernels_are_exact_at_extreme_codes(kernel):
    """Codes at the ends of both ranges (u = v + 128 in {0, 255}, |w| = 64): every int16 pair sum at its largest."""
    k, n = 4096, 8
    gen = torch.Generator().manual_seed(0)
    w = torch.full((n, k), 64, dtype=torch.int8)
    w[1::2] = -64
    w[4:] = torch.where(torch.rand(4, k, generator=gen) < 0.5, 64, -64).to(torch.int8)
    w[3] = torch.randint(-64, 65, (k,), generator=gen).to(torch.int8)
    v = torch.full((5, k), 127.0)
    v[1] = -128
    v[2, ::2] = -128
    v[3] = torch.where(torch.rand(k, generator=gen) < 0.5, 127.0, -128.0)
    v[4] = torch.randint(-128, 128, (k,), generator=gen).float()
    exact = (v.to(torch.int64) @ w.to(torch.int64).t()).to(torch.float32)  # rounded once, as int32 -> float32
    one = torch.ones(n)
    got = kernels.fbgemm_mm(v, kernels.fbgemm_pack(w, one), 128) if kernel == "fbgemm" else \
        kernels.onednn_mm(v, kernels.onednn_pack(w), one, torch.zeros(n, dtype=torch.int32), 128)
    assert torch.equal(got, exact)


@pytest.mark.skipif(kernels.has_int8_dot(), reason="with int8 dot-product instructions nothing saturates")
@pytest.mark.parametrize("kernel", kernels.u8s8_kernels())
def test_u8s8_kernels_saturate_past_the_bound(kernel):
    """Why U8S8_MAX_W is 64: int8 weight codes (127) against u = 255 overflow the int16 pair sums."""
    k, n = 64, 4
    w, v, one = torch.full((n, k), 127, dtype=torch.int8), torch.full((2, k), 127.0), torch.ones(n)
    got = kernels.fbgemm_mm(v, kernels.fbgemm_pack(w, one), 128) if kernel == "fbgemm" else \
        kernels.onednn_mm(v, kernels.onednn_pack(w), one, torch.zeros(n, dtype=torch.int32), 128)
    assert not torch.equal(got, v @ w.float().t())


@pytest.mark.parametrize("k", [1, 7, 64, 577])
def test_nibble_layout_round_trips_every_code(k):
    codes = torch.randint(-8, 8, (5, k), dtype=torch.int8, generator=torch.Generator().manual_seed(k))
    packed = kernels.nibble_pack(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    assert torch.equal(kernels.nibble_unpack(packed, k), codes)


def test_float_backend_sums_in_exact_blocks():
    """W8A8 at K = 1100: 1100 * 127 * 127 > 2^24, so the float32 GEMM runs in two blocks, each sum an exact integer."""
    k, n = 1100, 6
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.where(torch.rand(n, k, generator=torch.Generator().manual_seed(0)) < 0.5, 1.0, -1.0))
        lin.weight[0] = 1.0  # one output at the largest sum, 1100 * 127 * 127
    layer = QuantLinear(lin)
    layer.quantize_weight_rtn(S(format="int8"))
    layer.input_quant = ActQuantizer(S(format="int8", granularity="token"), "activation")
    module = to_runtime(layer).prepare(backend="float")
    assert [(start, end) for start, end, _ in module._blocks] == [(0, 1040), (1040, 1100)]
    x = torch.ones(3, k)
    x[1, ::3] = -1
    expected = module.prepare(backend="int_mm")(x)
    assert torch.equal(module.prepare(backend="float")(x), expected)
    assert_matches(layer, module, x, 1e-5)


def test_backend_is_chosen_by_the_cpu_and_the_layer(monkeypatch):
    """int_mm with int8 dot-product instructions; without them u8s8 where the codes fit, else float; forced by
    prepare(backend=...) or IntLinear.BACKEND; u8s8 builds only the packings some row count uses."""
    w4a8 = to_runtime(fake(96, 64, False, S(format="int4"), S(format="int8", granularity="token")))
    w8a8 = to_runtime(fake(96, 64, False, S(format="int8"), S(format="int8", granularity="token")))
    monkeypatch.setattr(kernels, "has_int8_dot", lambda: True)
    assert w4a8.prepare().backend == "int_mm" and w8a8.prepare().backend == "int_mm"
    monkeypatch.setattr(kernels, "has_int8_dot", lambda: False)
    assert w4a8.possible_backends() == ["u8s8", "float", "int_mm"] and w8a8.possible_backends() == ["float", "int_mm"]
    assert w4a8.prepare().backend == "u8s8" and w8a8.prepare().backend == "float"
    with pytest.raises(ValueError, match="possible"):
        w8a8.prepare(backend="u8s8")
    monkeypatch.setattr(IntLinear, "BACKEND", "float")
    assert w4a8.prepare().backend == "float"
    monkeypatch.setattr(IntLinear, "BACKEND", "auto")
    if set(kernels.u8s8_kernels()) == {"fbgemm", "onednn"}:
        assert set(w4a8.prepare(onednn_min_macs=0)._packed) == {"onednn"}
        assert set(w4a8.prepare(onednn_min_macs=sys.maxsize)._packed) == {"fbgemm"}
        assert set(w4a8.prepare(onednn_min_macs=96 * 64)._packed) == {"onednn"}  # even M = 1 reaches it
        assert set(w4a8.prepare(onednn_min_macs=2**25)._packed) == {"fbgemm", "onednn"}
        assert set(w4a8.prepare()._packed) == {"fbgemm"}  # IntLinear.ONEDNN_MIN_MACS: fbgemm only
    assert w4a8.prepare(backend="float")._packed == {} and w4a8._wc is not None


def test_u8s8_module_deep_copies():
    module = to_runtime(fake(96, 64, True, *U8S8_CASES[0])).prepare(backend="u8s8")
    x = inputs(96)
    assert torch.equal(copy.deepcopy(module)(x), module(x))


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("w", WEIGHT_ONLY, ids=lambda s: s.describe())
def test_weight_only_every_possible_kernel(k, n, w):
    layer = fake(k, n, True, w)
    module = to_runtime(layer)
    assert isinstance(module, WeightOnlyLinear)
    for kernel in module.possible_kernels():
        for cast in (True, False):
            module.prepare(kernel=kernel, bf16_cast=cast)
            exact = kernel == "dequant" or not cast  # bf16_cast=False: float32 inputs dequantize instead
            assert_matches(layer, module, inputs(k), 1e-5 if exact else 2**-7)


def test_weight_only_kernels_are_chosen_by_their_constraints():
    assert to_runtime(fake(96, 64, False, S(format="int4", granularity="group", group_size=32))).kernel == "int4pack"
    assert to_runtime(fake(96, 24, False, S(format="int4"))).kernel == "int8pack"  # N % 16 != 0
    assert to_runtime(fake(96, 64, False, S(format="int3", symmetric=False))).kernel == "int4pack"  # int3 codes fit
    assert to_runtime(fake(40, 64, False, S(format="int8"))).kernel == "dequant"  # K % 16 != 0: int8pack breaks
    group48 = to_runtime(fake(96, 64, False, S(format="int4", granularity="group", group_size=48)))
    assert group48.kernel == "int8group"  # no int4pack group size divides 48; one int8 call per group does
    q8_0 = S(format="int8", granularity="group", group_size=32, scale_dtype="float16")
    assert to_runtime(fake(96, 64, False, q8_0)).kernel == "int8group"
    assert to_runtime(fake(96, 64, False, S(format="int8", granularity="group", group_size=24))).kernel == "dequant"
    assert to_runtime(fake(96, 64, False, q8_0.model_copy(update={"symmetric": False}))).kernel == "dequant"
    assert to_runtime(fake(512, 64, False, S(format="int4", granularity="group", group_size=512))).kernel_group == 256


def test_float32_inputs_cast_to_bf16_only_up_to_the_measured_row_count():
    module = to_runtime(fake(96, 64, False, S(format="int4")))
    assert module.kernel == "int4pack" and module.bf16_cast_max_m == WeightOnlyLinear.BF16_CAST_MAX_M["int4pack"]
    small, large = torch.randn(2, 96), torch.randn(module.bf16_cast_max_m + 1, 96)
    cast, dequant = to_runtime(fake(96, 64, False, S(format="int4"))), to_runtime(fake(96, 64, False, S(format="int4")))
    cast.prepare(bf16_cast=True)
    dequant.prepare(kernel="dequant")
    assert torch.equal(module(small), cast(small)) and torch.equal(module(large), dequant(large))


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("w,a", FP8_CASES, ids=lambda s: s.describe() if s else "none")
def test_fp8_every_mode(k, n, w, a):
    layer = fake(k, n, True, w, a)
    module = to_runtime(layer)
    assert isinstance(module, Fp8Linear)
    modes = ["cached", "per_call"] + (["scaled_mm"] if a is not None and w.granularity != "group" else [])
    for mode in modes:
        assert_matches(layer, module.prepare(mode=mode), inputs(k), 1e-5)


def test_bf16_model_int_path_and_online_rotation():
    """A bf16 model with an online rotation child: the fake-quant path rounds q(x) and the product to bf16."""
    for w, a in INT_CASES[:2] + [(S(format="int4", granularity="group", group_size=32), None)]:
        layer = fake(96, 64, True, w, a, dtype=torch.bfloat16, rotate=True)
        module = to_runtime(layer)
        assert module.input_transform is layer.input_transform
        assert_matches(layer, module, inputs(96, torch.bfloat16), 2**-7)
        assert module(inputs(96, torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("w,a", [INT_CASES[0], FP8_CASES[0]], ids=["int", "fp8"])
def test_online_rotation_child(w, a):
    layer = fake(96, 64, True, w, a, rotate=True)
    module = to_runtime(layer)
    assert_matches(layer, module, inputs(96), 1e-5)
    assert not any(key.startswith("input_transform") for key in module.state_dict())


def test_activation_codes_are_the_act_quantizers():
    x = inputs(96).reshape(-1, 96)
    for a in (S(format="int8", granularity="token"), S(format="int4", granularity="token", clip_ratio=0.8),
              S(format="int8", symmetric=False, granularity="token"), S(format="int6", granularity="tensor"),
              S(format="int8", granularity="token", observer="percentile", percentile=99.0),
              S(format="int4", int_range="full", granularity="token"),
              S(format="int4", int_range="full", granularity="tensor", clip_ratio=0.9)):
        fmt = a.number_format()
        s, z = integer.act_qparams(x, fmt, a.granularity == "token", a.observer, a.clip_ratio,
                                   {"percentile": a.percentile} if a.observer == "percentile" else {})
        codes = kernels.int_codes(x, s, z, fmt).float() + (0 if z is None else kernels.offset(fmt.bits))
        assert torch.equal((codes - (0 if z is None else z)) * s, ActQuantizer(a, "activation")(x))


def test_state_dict_is_the_on_disk_contract(int_groups):
    n, k = 24, 40
    layer = fake(k, n, True, S(format="int4"), S(format="int8", granularity="tensor", dynamic=False))
    sd = to_runtime(layer).state_dict()
    assert {key: (t.dtype, tuple(t.shape)) for key, t in sd.items()} == {
        "weight_packed": (torch.int32, (n, 5)), "weight_shape": (torch.int64, (2,)),
        "weight_scale": (torch.float32, (n, 1)), "bias": (torch.float32, (n,)), "input_scale": (torch.float32, (1,))}
    q = torch.round(layer.weight / layer.weight_scale).to(torch.int64)  # signed int4 codes of the on-grid weight
    assert torch.equal(sd["weight_packed"], pack_int32(q + 8, 4))
    assert sd["weight_shape"].tolist() == [n, k]
    assert torch.equal(sd["input_scale"], layer.input_quant.scale.reshape(1))

    asym = fake(96, n, False, S(format="int8", symmetric=False, granularity="group", group_size=32),
                S(format="int8", symmetric=False, granularity="tensor", dynamic=False))
    sd = to_runtime(asym).state_dict()
    assert {key: (t.dtype, tuple(t.shape)) for key, t in sd.items()} == {
        "weight": (torch.int8, (n, 96)), "weight_scale": (torch.float32, (n, 3)),
        "weight_zero_point": (torch.int32, (n, 3)), "input_scale": (torch.float32, (1,)),
        "input_zero_point": (torch.int32, (1,))}
    z = asym.weight_zero.reshape(n, 3)
    assert torch.equal(sd["weight_zero_point"], (z - 128).to(torch.int32))  # signed convention
    codes = torch.round(asym.weight.reshape(n, 3, 32) / asym.weight_scale) + asym.weight_zero
    assert torch.equal(sd["weight"], (codes.reshape(n, 96) - 128).to(torch.int8))
    assert sd["input_zero_point"].item() == asym.input_quant.zero_point.item() - 128

    int3 = to_runtime(fake(k, n, False, S(format="int3", granularity="tensor"))).state_dict()
    assert int3["weight_packed"].shape == (n, 4) and int3["weight_scale"].shape == (1,)  # ceil(40 * 3 / 32) words
    fp8 = to_runtime(fake(k, n, False, *FP8_CASES[0], dtype=torch.bfloat16)).state_dict()
    assert {key: (t.dtype, tuple(t.shape)) for key, t in fp8.items()} == {
        "weight": (torch.float8_e4m3fn, (n, k)), "weight_scale": (torch.float32, (n, 1))}


@pytest.mark.parametrize("w,a", [INT_CASES[2], INT_CASES[4], (WEIGHT_ONLY[0], None), FP8_CASES[2]],
                         ids=["int8-asym", "int3-group", "w-only", "fp8"])
def test_meta_module_loads_and_prepares_to_the_converted_one(w, a, int_groups):
    layer = fake(96, 64, True, w, a, dtype=torch.bfloat16)
    converted = to_runtime(layer)
    empty = RuntimeLinear.empty(96, 64, True, w, a, torch.bfloat16)
    assert type(empty) is type(converted) and all(t.is_meta for t in empty.state_dict().values())
    assert {k: (t.dtype, t.shape) for k, t in empty.state_dict().items()} == \
           {k: (t.dtype, t.shape) for k, t in converted.state_dict().items()}
    empty.load_state_dict(converted.state_dict(), assign=True)
    x = inputs(96, torch.bfloat16)
    assert torch.equal(empty.prepare()(x), converted(x))


def test_forward_before_prepare_is_an_error():
    module = RuntimeLinear.empty(32, 16, False, S(format="int8"), None)
    with pytest.raises(RuntimeError, match="prepare"):
        module(torch.zeros(1, 32))


@pytest.mark.parametrize("w,a,why", [
    (S(format="fp4_e2m1"), None, "format pair"),
    (S(format="int4"), S(format="fp8_e4m3", granularity="token"), "format pair"),
    (S(format="fp8_e4m3"), S(format="int8", granularity="token"), "format pair"),
    (S(format="int8"), S(format="int8", granularity="channel", dynamic=False), "channel activation scales"),
    (S(format="int8"), S(format="int8", granularity="group", group_size=32), "group activation scales"),
    (S(format="int4", granularity="group", group_size=32), S(format="int8", granularity="token"),
     "group-wise weights with integer activations"),
])
def test_schemes_without_a_kernel_name_the_fallback(w, a, why):
    with pytest.raises(NoKernelError, match=f"{why}.*simulate=True"):
        kernel_class(w, a)
    with pytest.raises(NoKernelError, match="simulate=True"):
        RuntimeLinear.empty(64, 32, False, w, a)


def test_convert_swaps_every_quant_linear_or_none():
    model = nn.Sequential(fake(96, 64, True, *INT_CASES[0]), nn.ReLU(), fake(64, 32, False, WEIGHT_ONLY[1]))
    x = inputs(96)
    with torch.no_grad():
        expected = model(x)
        convert(model)
        assert isinstance(model[0], IntLinear) and isinstance(model[2], WeightOnlyLinear)
        assert (model(x) - expected).norm() <= 1e-2 * expected.norm()  # layer 2 runs in bf16
    rotation_only = QuantLinear(nn.Linear(32, 32))
    assert convert(nn.Sequential(rotation_only))[0] is rotation_only  # float weights and inputs: nothing to run
    mixed = nn.Sequential(fake(32, 32, False, S(format="int4")), fake(32, 32, False, S(format="fp4_e2m1")))
    with pytest.raises(NoKernelError):
        convert(mixed)
    assert all(isinstance(m, QuantLinear) for m in mixed)
