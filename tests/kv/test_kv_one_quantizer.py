"""One integer quantizer: the packed KV codecs compute exactly what the quantizer core's fake quantization does.

A recipe's ``kv: int4`` fake-quantizes with :func:`lowbit.quant.fake_quantize`; ``kv_cache: {codec: int, bits: 4}``
stores codes with float16 metadata. With the metadata rounded to float16 (``scale_dtype``) and the same asymmetric
``offset`` convention (the packed caches' default "float": exact range, float minimum; the recipe quantizers'
"int": range widened to include 0, integer zero point) the two agree bit for bit, for both conventions; with
float32 scales they differ by that rounding alone. Static KV calibration reports NaN as a CalibrationError.
"""

import pytest
import torch

import lowbit
from lowbit.errors import CalibrationError
from lowbit.kv.codecs import IntCodec
from lowbit.kv.static import KVRangeHook, static_codec
from lowbit.quant import IntFormat, PerAxis, PerGroup, PerRow, QParams, compute_qparams, fake_quantize

F16 = torch.float16


def _kv(t=64, d=64, seed=0):
    """Keys-like data: per-channel scales, a few all-positive channels (ranges that do not straddle 0)."""
    x = torch.randn(2, 3, t, d, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.5, 3, d)
    x[..., :4] += 6.0
    return x


def _fake(x, codec: IntCodec, scale_dtype=F16):
    """``fake_quantize`` on the granules the codec uses: per token (whole head or channel groups), or per channel
    over token groups (transposed so each channel's run of tokens is a row), with the codec's offset convention."""
    fmt = IntFormat(codec.bits, codec.symmetric)
    kw = {"clip_ratio": codec.clip_ratio, "scale_dtype": scale_dtype, "offset": codec.offset}
    if codec.axis == "token":
        gran = PerRow() if codec.group is None else PerGroup(codec.group)
        return fake_quantize(x, fmt, gran, **kw)
    b, h, t, d = x.shape
    rows = x.reshape(b, h, t // codec.group, codec.group, d).transpose(3, 4)
    return fake_quantize(rows, fmt, PerRow(), **kw).transpose(3, 4).reshape(x.shape)


CODECS = [(axis, group) for axis, group in (("token", None), ("token", 16), ("channel", 32))]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("axis", "group"), CODECS)
@pytest.mark.parametrize("clip", [1.0, 0.9])
@pytest.mark.parametrize("offset", ["float", "int"])
def test_packed_int_codec_equals_fake_quantization_bit_for_bit(bits, symmetric, axis, group, clip, offset):
    x = _kv()
    codec = IntCodec(bits, symmetric=symmetric, axis=axis, group=group, clip_ratio=clip, offset=offset)
    packed = codec.decode(codec.encode(x), 64)
    assert torch.equal(packed, _fake(x, codec))


def test_packed_int_codec_defaults_to_the_float_minimum_and_keeps_its_bytes():
    """Asymmetric packed codes keep the exact range: float16 scale and minimum, no zero point, same bytes."""
    x = _kv(t=8)
    packed = IntCodec(4).encode(x)
    assert set(packed.fields) == {"codes", "scale", "min"} and packed.fields["min"].dtype == F16
    assert packed.nbytes == IntCodec(4, offset="int").encode(x).nbytes == 2 * 3 * 8 * (64 // 2 + 2 + 2)
    assert set(IntCodec(4, symmetric=True).encode(x).fields) == {"codes", "scale"}


def test_float_offset_keeps_a_range_that_does_not_contain_zero():
    """A channel in [6, 7] (KIVI's keys): the float minimum spends every level on it, the integer zero point
    widens it to [0, 7]; the float grid's error is several times smaller, and both ends are reached."""
    x = 6.0 + torch.rand(1, 1, 32, 1, generator=torch.Generator().manual_seed(1))
    fmt, gran = IntFormat(3, symmetric=False), PerAxis(3)
    err = {o: (fake_quantize(x, fmt, gran, scale_dtype=F16, offset=o) - x).abs().max() for o in ("int", "float")}
    assert err["float"] * 4 < err["int"]
    lo, hi = x.amin(), x.amax()
    qp = compute_qparams(lo.view(1), hi.view(1), fmt, scale_dtype=F16, offset="float")
    assert qp.zero_point is None and torch.equal(qp.minimum, lo.to(F16).float().view(1))
    assert bool(qp.minimum + 7 * qp.scale >= hi) and torch.equal(qp.scale, qp.scale.to(F16).float())


def test_float_offset_clips_about_the_centre_and_rejects_what_it_cannot_do():
    fmt = IntFormat(4, symmetric=False)
    qp = compute_qparams(torch.tensor([2.0]), torch.tensor([4.0]), fmt, clip_ratio=0.5, offset="float")
    assert torch.equal(qp.minimum, torch.tensor([2.5])) and torch.equal(qp.scale, torch.tensor([1.0 / 15]))
    sym = compute_qparams(torch.tensor([2.0]), torch.tensor([4.0]), IntFormat(4, True), offset="float")
    assert sym.zero_point is None and sym.minimum is None  # symmetric grids have no offset
    with pytest.raises(ValueError, match="offset must be one of"):
        compute_qparams(torch.tensor([0.0]), torch.tensor([1.0]), fmt, offset="half")
    with pytest.raises(ValueError, match="mse observer"):
        fake_quantize(torch.randn(2, 8), fmt, PerRow(), observer="mse", offset="float")
    with pytest.raises(ValueError, match="zero_point or minimum, not both"):
        fake_quantize(torch.ones(1, 4), fmt, PerRow(), qparams=QParams(torch.ones(1, 1), torch.zeros(1, 1),
                                                                       torch.zeros(1, 1)))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("axis", "group"), CODECS)
def test_float32_scales_differ_only_by_the_float16_rounding_of_the_scale(symmetric, axis, group):
    """``kv: int4`` (float32 scales) against the packed int4 cache: the scale differs by its rounding up to float16
    (relative < 2^-10), so values agree to that, except the rare element whose x / s sits within that distance of
    a rounding boundary (one step apart)."""
    x = _kv()
    codec = IntCodec(4, symmetric=symmetric, axis=axis, group=group, offset="int")
    packed, fake32 = codec.decode(codec.encode(x), 64), _fake(x, codec, scale_dtype=None)
    step = (x.abs().amax() * 2 / 14).item()
    close = (packed - fake32).abs() <= 15 * step * 2**-10
    assert close.float().mean() > 0.99
    assert float((packed - fake32).abs().max()) <= step * (1 + 2**-10)


@pytest.mark.parametrize("offset", ["float", "int"])
def test_one_bit_asymmetric_codes_are_the_two_ends_of_the_range(offset):
    x = _kv(t=8)
    codec = IntCodec(1, offset=offset)
    values = codec.decode(codec.encode(x), 64)
    assert torch.equal(values, _fake(x, codec))
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if offset == "int":
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    step = hi - lo
    assert bool(((values - x).abs() <= step / 2 * 1.01).all())
    assert codec.encode(x).nbytes == 2 * 3 * 8 * (64 // 8 + 2 + 2)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("offset", ["float", "int"])
def test_static_codec_equals_static_fake_quantization_per_head(bits, symmetric, offset):
    """A static per-head packed cache is a static ``kv`` quantizer (PerAxis(1), given qparams) with float16 scales."""
    x = _kv(t=16)
    lo, hi = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))  # [3 heads]
    codec = static_codec(lo[:, None], hi[:, None], bits, symmetric, clip_ratio=0.95, offset=offset)
    fmt = IntFormat(bits, symmetric)
    qp = compute_qparams(lo[:, None], hi[:, None], fmt, 0.95, scale_dtype=F16, offset=offset)
    expected = fake_quantize(x, fmt, PerAxis(1), qparams=QParams(qp.scale, qp.zero_point, qp.minimum))
    assert torch.equal(codec.decode(codec.encode(x), 64), expected)
    assert codec.scale.dtype == F16 and (codec.zero_point is None) == (symmetric or offset == "float")
    assert (codec.minimum is not None) == (not symmetric and offset == "float")


def test_scale_dtype_rounds_up_before_the_zero_point_and_never_to_zero():
    fmt = IntFormat(4, symmetric=False)
    lo, hi = torch.tensor([[-1.0], [0.0]]), torch.tensor([[2.3456789], [0.0]])
    qp, exact = compute_qparams(lo, hi, fmt, scale_dtype=F16), compute_qparams(lo, hi, fmt)
    assert torch.equal(qp.scale, qp.scale.to(F16).float()) and bool((qp.scale > 0).all())
    up = torch.nextafter(exact.scale.to(F16), torch.tensor(1e4, dtype=F16)).float()
    assert bool((qp.scale >= exact.scale).all()) and bool((qp.scale <= up).all())  # rounded up, by under one ulp
    assert torch.equal(qp.zero_point, torch.round(-lo / qp.scale).clamp(0, 15))
    assert torch.equal(compute_qparams(lo, hi, fmt).scale[0], ((hi - lo) / 15)[0])  # float32 unless asked
    with pytest.raises(ValueError, match="dynamic mode only"):
        fake_quantize(torch.ones(1, 4), fmt, PerRow(), qparams=QParams(torch.ones(1, 1), torch.zeros(1, 1)),
                      scale_dtype=F16)


def test_nan_in_static_kv_calibration_is_a_calibration_error():
    hook = KVRangeHook(64, 64, name="layer 3")
    bad = _kv(t=4)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"NaN or inf met in KV cache calibration at the keys of layer 3"):
        hook(bad, bad, bad)
    with pytest.raises(CalibrationError, match="saw no calibration data"):
        KVRangeHook(64, 64).ranges()


def test_nan_in_a_static_kv_cache_recipe_ends_in_one_calibration_error():
    from lowbit.data import TokenData
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("nan")
    data = TokenData(eval_windows=torch.zeros(1, 8, dtype=torch.long), calib_tokens=torch.arange(100), seed=0)
    recipe = lowbit.Recipe.from_dict({"kv_cache": {"keys": {"codec": "int", "bits": 4, "static": True},
                                                   "values": {"codec": "int", "bits": 4, "static": True}},
                                      "calibration": {"samples": 2, "seq_len": 16}})
    with pytest.raises(CalibrationError, match="NaN or inf met in KV cache calibration at the keys of layer 0"):
        lowbit.quantize(model, recipe, data)
