"""Quantize / dequantize / fake-quantize: error bounds, idempotence, symmetry, zero point, STE and LSQ gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import (
    FP4_E2M1,
    FP8_E4M3,
    FP8_E5M2,
    FloatFormat,
    Format,
    Granularity,
    IntFormat,
    PerAxis,
    PerGroup,
    PerRow,
    PerTensor,
    QParams,
    compute_qparams,
    dequantize,
    expand_to_elements,
    fake_quantize,
    minmax_range,
    quantize,
    round_ste,
    round_to_float_format,
)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
INT_FORMATS: list[Format] = [IntFormat(b, s) for b in range(2, 9) for s in (True, False)]
FLOAT_FORMATS: list[Format] = [FP8_E4M3, FP8_E5M2, FP4_E2M1]
SYMMETRIC_FORMATS = [f for f in INT_FORMATS if f.symmetric] + FLOAT_FORMATS
ASYMMETRIC_FORMATS = [f for f in INT_FORMATS if not f.symmetric]
ALL_GRANS: list[Granularity] = [PerTensor(), PerRow(), PerGroup(4), PerGroup(3), PerAxis(0), PerAxis(-1)]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """A seeded random 1-3-d float32 tensor with a random magnitude (1e-3..1e3), sometimes with outliers."""
    shape = [*draw(st.lists(st.integers(1, 6), min_size=0, max_size=2)), draw(st.integers(1, 12))]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(shape, generator=gen) * 10.0 ** draw(st.integers(-3, 3))
    if draw(st.booleans()):
        x = x * torch.where(torch.rand(shape, generator=gen) < 0.05, 20.0, 1.0)
    return x


@st.composite
def grans(draw: st.DrawFn, ndim: int) -> Granularity:
    """Any granularity valid for an ``ndim``-d tensor; PerGroup sizes often leave a partial last group."""
    return draw(
        st.one_of(
            st.just(PerTensor()),
            st.just(PerRow()),
            st.builds(PerGroup, st.integers(1, 8)),
            st.builds(PerAxis, st.integers(-ndim, ndim - 1)),
        )
    )


@st.composite
def cases(draw: st.DrawFn, formats: Sequence[Format]) -> tuple[torch.Tensor, Format, Granularity]:
    """A tensor, a format from ``formats`` and a granularity for it."""
    x = draw(tensors())
    return x, draw(st.sampled_from(formats)), draw(grans(x.ndim))


def _qparams(x: torch.Tensor, fmt: Format, gran: Granularity, clip_ratio: float = 1.0) -> QParams:
    """The qparams dynamic min/max fake quantization uses for ``x``."""
    return compute_qparams(*minmax_range(x, gran), fmt, clip_ratio=clip_ratio)


def _per_element(t: torch.Tensor | None, gran: Granularity, x: torch.Tensor) -> torch.Tensor:
    """Per-granule stats broadcast to one value per element of ``x`` (zeros for a missing zero point)."""
    return torch.zeros_like(x) if t is None else expand_to_elements(t, gran, x.shape)


@SETTINGS
@given(cases(INT_FORMATS), st.sampled_from([1.0, 0.9, 0.6]))
def test_int_error_at_most_half_scale_inside_range(
    case: tuple[torch.Tensor, Format, Granularity], clip_ratio: float
) -> None:
    """|x - fq(x)| <= s/2 for every element inside its granule's representable range (all of them at clip 1)."""
    x, fmt, gran = case
    assert isinstance(fmt, IntFormat)
    qp = _qparams(x, fmt, gran, clip_ratio)
    s, z = _per_element(qp.scale, gran, x), _per_element(qp.zero_point, gran, x)
    inside = (x >= s * (fmt.qmin - z - 0.5)) & (x <= s * (fmt.qmax - z + 0.5))
    if clip_ratio == 1.0:
        assert bool(inside.all())
    err = (x - fake_quantize(x, fmt, gran, clip_ratio=clip_ratio)).abs()
    assert bool((err[inside] <= s[inside] * (0.5 + 1e-5)).all())


@SETTINGS
@given(cases(FLOAT_FORMATS))
def test_float_error_at_most_half_ulp(case: tuple[torch.Tensor, Format, Granularity]) -> None:
    """For float formats the error is at most half a grid spacing: ``2^-(m+1)`` relative, or half a subnormal."""
    x, fmt, gran = case
    assert isinstance(fmt, FloatFormat)
    s = _per_element(_qparams(x, fmt, gran).scale, gran, x)
    subnormal_step = 2.0 ** (fmt.min_normal_exp - fmt.man_bits)
    bound = torch.maximum(x.abs() * 2.0 ** -(fmt.man_bits + 1), s * subnormal_step / 2)
    err = (x - fake_quantize(x, fmt, gran)).abs()
    assert bool((err <= bound * (1 + 1e-5)).all())


@SETTINGS
@given(cases(INT_FORMATS + FLOAT_FORMATS))
def test_idempotent(case: tuple[torch.Tensor, Format, Granularity]) -> None:
    """Static: fq(fq(x)) == fq(x) exactly. Dynamic min/max: equal up to float rounding of the re-derived scale."""
    x, fmt, gran = case
    qp = _qparams(x, fmt, gran)
    once = fake_quantize(x, fmt, gran, qparams=qp)
    assert torch.equal(fake_quantize(once, fmt, gran, qparams=qp), once)
    dyn_once = fake_quantize(x, fmt, gran)
    assert torch.equal(dyn_once, once)
    tol = _per_element(qp.scale, gran, x) * 1e-4
    assert bool(((fake_quantize(dyn_once, fmt, gran) - dyn_once).abs() <= tol).all())


@SETTINGS
@given(cases(SYMMETRIC_FORMATS), st.sampled_from(["minmax", "percentile", "mse"]))
def test_symmetric_formats_are_odd(case: tuple[torch.Tensor, Format, Granularity], observer: str) -> None:
    """fq(-x) == -fq(x) exactly for symmetric int and float formats, with every observer."""
    x, fmt, gran = case
    kw: dict[str, Any] = {"grid": 10} if observer == "mse" else {}
    negated = fake_quantize(-x, fmt, gran, observer=observer, **kw)
    assert torch.equal(negated, -fake_quantize(x, fmt, gran, observer=observer, **kw))


@SETTINGS
@given(cases(INT_FORMATS + FLOAT_FORMATS))
def test_codes_in_range_and_dequantize_matches(case: tuple[torch.Tensor, Format, Granularity]) -> None:
    """Codes are integers in [qmin, qmax] (int) or grid values within ±max (float); dequantize(quantize) == fq."""
    x, fmt, gran = case
    qp = _qparams(x, fmt, gran)
    q = quantize(x, qp, fmt, gran)
    assert q.shape == x.shape and q.dtype == torch.float32
    if isinstance(fmt, IntFormat):
        assert bool(((q >= fmt.qmin) & (q <= fmt.qmax) & (q == q.round())).all())
    else:
        assert torch.equal(round_to_float_format(q, fmt), q) and bool((q.abs() <= fmt.max_value).all())
    assert torch.equal(dequantize(q, qp, fmt, gran, x.shape), fake_quantize(x, fmt, gran))
    assert torch.equal(dequantize(q.flatten(), qp, fmt, gran, x.shape), dequantize(q, qp, fmt, gran))


@SETTINGS
@given(cases(ASYMMETRIC_FORMATS))
def test_asymmetric_zero_is_exact(case: tuple[torch.Tensor, Format, Granularity]) -> None:
    """The zero point is an integer code in range, and zeros (even with an all-positive range) come back as 0."""
    x, fmt, gran = case
    assert isinstance(fmt, IntFormat)
    x = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.3, 0.0, x.abs() + 1.0)
    qp = _qparams(x, fmt, gran)
    assert qp.zero_point is not None
    z = qp.zero_point
    assert bool(((z >= fmt.qmin) & (z <= fmt.qmax) & (z == z.round())).all())
    out = fake_quantize(x, fmt, gran)
    assert bool((out[x == 0] == 0).all())


def test_ste_gradient_inside_one_clamped_zero() -> None:
    """Static int4 with s=1: gradient 1 where round(x/s) lands in [-7, 7], 0 where it is clamped."""
    fmt = IntFormat(4, symmetric=True)
    x = torch.tensor([-20.3, -7.4, -5.2, 0.4, 3.6, 7.0, 7.6, 9.9, 30.0], requires_grad=True)
    fake_quantize(x, fmt, PerTensor(), qparams=QParams(torch.tensor(1.0))).sum().backward()
    assert x.grad is not None
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("fmt", [IntFormat(3, symmetric=False), FP4_E2M1])
def test_ste_gradient_asymmetric_and_float(fmt: Format) -> None:
    """Same rule for an asymmetric int (codes 0..7, zero point 2) and FP4 (values beyond 7 = 6 + half a step)."""
    zero = torch.tensor(2.0) if isinstance(fmt, IntFormat) else None
    x = torch.tensor([-9.0, -2.2, -1.0, 0.3, 4.9, 5.8, 7.5], requires_grad=True)
    fake_quantize(x, fmt, PerTensor(), qparams=QParams(torch.tensor(1.0), zero)).sum().backward()
    assert x.grad is not None
    expected = [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0] if isinstance(fmt, IntFormat) else [0, 1, 1, 1, 1, 1, 0]
    assert x.grad.tolist() == [float(e) for e in expected]


@SETTINGS
@given(cases(SYMMETRIC_FORMATS))
def test_dynamic_minmax_gradient_is_one(case: tuple[torch.Tensor, Format, Granularity]) -> None:
    """Dynamic min/max statistics are detached and nothing saturates, so dx is exactly 1 everywhere."""
    x, fmt, gran = case
    x = x.clone().requires_grad_(True)
    fake_quantize(x, fmt, gran).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))


def test_scale_grad_routes_the_rounding_error_to_each_rows_largest_element() -> None:
    """Dynamic symmetric min/max with ``scale_grad``: ``out = x + s e`` with ``s = max|x| / qmax``, so d sum(out) /
    dx is 1 everywhere plus ``sign(x_max) / qmax * sum(e)`` at each row's largest element; without it, exactly 1."""
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    fmt = IntFormat(4, True)
    for scale_grad in (True, False):
        leaf = x.clone().requires_grad_(True)
        fake_quantize(leaf, fmt, PerRow(), scale_grad=scale_grad).sum().backward()
        expected = torch.ones_like(x)
        if scale_grad:
            top = x.abs().argmax(-1)
            s = x.abs().amax(-1, keepdim=True) / fmt.qmax
            rows = torch.arange(3)
            expected[rows, top] += torch.sign(x[rows, top]) / fmt.qmax * (torch.round(x / s) - x / s).sum(-1)
        torch.testing.assert_close(leaf.grad, expected, rtol=1e-5, atol=1e-5)  # computed in float32


@pytest.mark.parametrize("fmt", [IntFormat(4, True), IntFormat(4, False), FP4_E2M1])
def test_lsq_scale_gradient(fmt: Format) -> None:
    """LSQ: d sum(fq) / ds per row = sum of (round(x/s) - x/s) inside, plus (qmin or qmax) - z where clamped."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 16, generator=gen) * 3.0
    zero = torch.full((3, 1), 3.0) if isinstance(fmt, IntFormat) and not fmt.symmetric else None
    scale = torch.tensor([[0.4], [0.7], [1.3]], requires_grad=True)
    fake_quantize(x, fmt, PerRow(), qparams=QParams(scale, zero)).sum().backward()
    with torch.no_grad():
        z = torch.zeros(3, 1) if zero is None else zero
        v = x / scale
        if isinstance(fmt, IntFormat):
            q = torch.round(v) + z
            inside = torch.where(q > fmt.qmax, fmt.qmax - z, torch.round(v) - v)
            per_el = torch.where(q < fmt.qmin, fmt.qmin - z, inside)
        else:
            saturated = round_to_float_format(v, fmt)  # ±max_value beyond the rounding limit (7 for FP4)
            per_el = torch.where(v.abs() > fmt.rounding_limit, saturated, round_to_float_format(v, fmt) - v)
    assert scale.grad is not None
    torch.testing.assert_close(scale.grad, per_el.sum(-1, keepdim=True))


def test_x_and_scale_get_gradients_together() -> None:
    """A learnable scale and the input both receive finite gradients in one backward pass."""
    x = torch.randn(2, 8, requires_grad=True)
    scale = torch.full((2, 2, 1), 0.2, requires_grad=True)
    fake_quantize(x, FP8_E4M3, PerGroup(4), qparams=QParams(scale)).pow(2).sum().backward()
    assert x.grad is not None and scale.grad is not None
    assert bool(torch.isfinite(scale.grad).all()) and bool(scale.grad.abs().sum() > 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("fmt", [IntFormat(4, False), FP8_E4M3])
def test_dtype_preserved(dtype: torch.dtype, fmt: Format) -> None:
    """Output and gradient dtypes equal the input dtype; values match the float32 computation."""
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(5)).to(dtype).requires_grad_(True)
    out = fake_quantize(x, fmt, PerGroup(5))
    out.sum().backward()
    assert out.dtype == dtype and x.grad is not None and x.grad.dtype == dtype
    assert torch.equal(out, fake_quantize(x.detach().float(), fmt, PerGroup(5)).to(dtype))


@pytest.mark.parametrize("fmt", INT_FORMATS[::3] + FLOAT_FORMATS)
@pytest.mark.parametrize("gran", ALL_GRANS)
@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_constant_and_zero_tensors_are_finite(fmt: Format, gran: Granularity, observer: str) -> None:
    """All-zero tensors come back as zeros and constant tensors stay finite and close, with finite gradients."""
    kw: dict[str, Any] = {"grid": 5} if observer == "mse" else {}
    zeros = torch.zeros(3, 7, requires_grad=True)
    out = fake_quantize(zeros, fmt, gran, observer=observer, **kw)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(3, 7)) and zeros.grad is not None and bool(torch.isfinite(zeros.grad).all())
    const = torch.full((3, 7), -2.5)
    out = fake_quantize(const, fmt, gran, observer=observer, **kw)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, const, rtol=0.2 if fmt is FP4_E2M1 else 1e-5, atol=0.0)


def test_round_ste() -> None:
    """Forward is round-half-to-even, backward is identity."""
    x = torch.tensor([-1.5, -0.5, 0.5, 1.5, 2.5, 0.49], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [-2.0, -0.0, 0.0, 2.0, 2.0, 0.0]
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))


def test_inputs_not_mutated() -> None:
    """fake_quantize, quantize and dequantize leave their inputs and qparams untouched."""
    x = torch.randn(3, 10)
    qp = _qparams(x, IntFormat(4, False), PerGroup(4))
    assert qp.zero_point is not None
    originals = (x, qp.scale, qp.zero_point)
    copies = [t.clone() for t in originals]
    fake_quantize(x, IntFormat(4, False), PerGroup(4), qparams=qp)
    dequantize(quantize(x, qp, IntFormat(4, False), PerGroup(4)), qp, IntFormat(4, False), PerGroup(4))
    fake_quantize(x, FP8_E5M2, PerAxis(0), observer="mse", grid=4)
    assert all(torch.equal(a, b) for a, b in zip(originals, copies, strict=True))


def test_static_mode_errors_are_helpful() -> None:
    """Mis-shaped or mismatched qparams and observer options in static mode raise clear ValueErrors."""
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"scale of shape \(4,\) does not broadcast to the per-granule shape \(4, 1\)"):
        fake_quantize(x, IntFormat(4, True), PerRow(), qparams=QParams(torch.ones(4)))
    with pytest.raises(ValueError, match="needs zero_point set"):
        fake_quantize(x, IntFormat(4, False), PerRow(), qparams=QParams(torch.ones(4, 1)))
    with pytest.raises(ValueError, match="needs zero_point None"):
        fake_quantize(x, FP8_E4M3, PerRow(), qparams=QParams(torch.ones(4, 1), torch.zeros(4, 1)))
    with pytest.raises(ValueError, match="dynamic mode only"):
        fake_quantize(x, IntFormat(4, True), PerRow(), qparams=QParams(torch.ones(4, 1)), clip_ratio=0.9)
    with pytest.raises(ValueError, match="scale_grad"):
        fake_quantize(x, IntFormat(4, True), PerRow(), qparams=QParams(torch.ones(4, 1)), scale_grad=True)
    with pytest.raises(ValueError, match="clip_ratio must be"):
        fake_quantize(x, IntFormat(4, True), PerRow(), clip_ratio=0.0)
    with pytest.raises(ValueError, match="floating-point"):
        fake_quantize(torch.ones(3, dtype=torch.int32), IntFormat(4, True), PerRow())


def test_empty_tensor() -> None:
    """An empty tensor passes through unchanged."""
    x = torch.empty(0, 8)
    assert fake_quantize(x, IntFormat(4, True), PerRow()).shape == (0, 8)


def test_learnable_clip_logit_round_trips_and_stays_in_range():
    """``clip_from_logit`` inverts ``logit_from_clip`` on (0.5, 0.99]; 1 starts at 0.99; any logit maps into
    (0.5, 1); a start outside (0.5, 1] is refused."""
    from lowbit.quant.clip import clip_from_logit, logit_from_clip

    for ratio in (0.6, 0.9, 0.95, 0.99):
        assert float(clip_from_logit(torch.tensor(logit_from_clip(ratio)))) == pytest.approx(ratio, abs=1e-6)
    assert float(clip_from_logit(torch.tensor(logit_from_clip(1.0)))) == pytest.approx(0.99, abs=1e-6)
    extremes = clip_from_logit(torch.tensor([-30.0, 0.0, 30.0]))
    assert 0.5 <= float(extremes[0]) < 0.5001 and float(extremes[1]) == 0.75 and 0.9999 < float(extremes[2]) <= 1
    for bad in (0.5, 0.2, 1.5):
        with pytest.raises(ValueError, match="clip ratio"):
            logit_from_clip(bad)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", [1.0, 0.95])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_shortcut_is_the_general_path_bit_for_bit(bits, symmetric, clip, dtype):
    """fake_quantize_rows == fake_quantize(PerRow, dynamic minmax), zero and constant rows included; the dynamic
    per-token ActQuantizer takes it at inference and the general path under autograd."""
    from lowbit.quant.fake import fake_quantize_rows
    from lowbit.schemes import QuantScheme
    from lowbit.surgery.quantizer import ActQuantizer

    g = torch.Generator().manual_seed(bits)
    scheme = QuantScheme(format=f"int{bits}", symmetric=symmetric, granularity="token", clip_ratio=clip)
    fmt = scheme.number_format()
    x = (torch.randn(2, 3, 17, 64, generator=g) * torch.rand(2, 3, 17, 1, generator=g) * 10).to(dtype)
    x[0, 0, 0], x[0, 0, 1], x[1, 2, 3] = 0.0, 3.0, -2.5
    want = fake_quantize(x, fmt, PerRow(), clip_ratio=clip)
    assert torch.equal(fake_quantize_rows(x, fmt, clip), want)
    quant = ActQuantizer(scheme, "kv")
    assert quant._rows_shortcut
    with torch.no_grad():
        assert torch.equal(quant(x), want)
    xg = x.float().requires_grad_(True)
    quant(xg).sum().backward()  # the straight-through gradient of the general path (0 where clipped)
    assert xg.grad is not None and xg.grad.sum() > 0.5 * xg.numel()
