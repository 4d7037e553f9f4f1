"""GPTQ solver: Hessian accumulation, error reduction over RTN, grid exactness, ordering, damping and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from lowbit.errors import CalibrationError
from lowbit.gptq import GPTQConfig, GPTQResult, HessianAccumulator, gptq_quantize
from lowbit.quant import (
    FP4_E2M1,
    FP8_E4M3,
    Format,
    Granularity,
    IntFormat,
    PerGroup,
    PerRow,
    PerTensor,
    QParams,
    compute_qparams,
    dequantize,
    fake_quantize,
    granule_shape,
    minmax_range,
    parse_format,
    quantize,
)

INT4_SYM = IntFormat(4, True)
INT4_ASYM = IntFormat(4, False)
STATIC = GPTQConfig(act_order=True, static_groups=True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(tokens: int, features: int, seed: int) -> Tensor:
    """Inputs ``Z @ A`` with a random mixing ``A``, so that ``X^T X`` is far from diagonal."""
    gen = _gen(seed)
    mixing = torch.randn(features, features, generator=gen) / features**0.5 + 0.3 * torch.eye(features)
    return torch.randn(tokens, features, generator=gen) @ mixing


def _hessian(x: Tensor) -> Tensor:
    """``2/N X^T X``, the GPTQ Hessian, computed directly."""
    return 2.0 / x.shape[0] * x.T @ x


def _output_error(x: Tensor, w: Tensor, w_hat: Tensor) -> float:
    """``||X W^T - X W_hat^T||^2``, the quantity GPTQ minimises."""
    return float((x @ (w.float() - w_hat.float()).T).square().sum())


def _heavy_tailed(shape: tuple[int, int], seed: int, dof: int = 3) -> Tensor:
    """Student-t samples with ``dof`` degrees of freedom: normal / sqrt(chi2_dof / dof)."""
    gen = _gen(seed)
    chi2 = torch.randn(dof, *shape, generator=gen).square().sum(0)
    return torch.randn(shape, generator=gen) / (chi2 / dof).sqrt()


def _assert_on_grid(res: GPTQResult, fmt: Format, gran: Granularity) -> None:
    """The result re-quantizes to itself with its own qparams, and integer codes lie in [qmin, qmax]."""
    w = res.weight
    assert res.scale.shape == granule_shape(w.shape, gran)
    codes = quantize(w, res.qparams, fmt, gran)
    assert torch.equal(dequantize(codes, res.qparams, fmt, gran, dtype=w.dtype), w)
    if isinstance(fmt, IntFormat):
        assert bool((codes >= fmt.qmin).all() & (codes <= fmt.qmax).all())
        assert torch.equal(codes, codes.round())


# --- HessianAccumulator -------------------------------------------------------------------------------------


def test_hessian_accumulator_independent_of_batching() -> None:
    """One batch of 64 tokens, 4 batches of 16 (some 3-D) and 2/N X^T X all agree; tokens are counted."""
    x = torch.randn(64, 24, generator=_gen(0))
    one = HessianAccumulator(24)
    one.add(x)
    four = HessianAccumulator(24)
    for i, chunk in enumerate(x.split(16)):
        four.add(chunk.reshape(2, 8, 24) if i % 2 else chunk)
    assert one.tokens == four.tokens == 64
    torch.testing.assert_close(four.hessian, one.hessian, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one.hessian, _hessian(x), rtol=1e-5, atol=1e-5)


def test_hessian_accumulator_float64_and_copy() -> None:
    """float64 storage matches the float64 formula; the returned Hessian is a copy; inputs are untouched."""
    x = torch.randn(10, 6, generator=_gen(1), dtype=torch.float64)
    before = x.clone()
    acc = HessianAccumulator(6, dtype=torch.float64)
    acc.add(x[:3])
    acc.add(x[3:])
    h = acc.hessian
    torch.testing.assert_close(h, _hessian(x))
    h.zero_()
    assert float(acc.hessian.abs().sum()) > 0 and torch.equal(x, before)


def test_hessian_accumulator_errors() -> None:
    """No tokens, a wrong feature count and NaN inputs are refused with a message."""
    acc = HessianAccumulator(8)
    with pytest.raises(CalibrationError, match="no calibration tokens"):
        _ = acc.hessian
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        acc.add(torch.zeros(4, 7))
    with pytest.raises(CalibrationError, match="NaN or inf"):
        acc.add(torch.full((2, 8), float("nan")))
    acc.add(torch.zeros(0, 8))  # an empty batch is a no-op
    assert acc.tokens == 0
    with pytest.raises(ValueError):
        HessianAccumulator(0)


# --- quality ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [INT4_SYM, INT4_ASYM], ids=["sym", "asym"])
@pytest.mark.parametrize("gran", [PerRow(), PerGroup(32)], ids=["row", "g32"])
def test_gptq_beats_rtn_on_correlated_inputs(fmt: Format, gran: Granularity) -> None:
    """With a far-from-diagonal Hessian, GPTQ's output error is well below round-to-nearest's (< 0.8x)."""
    x = _correlated_inputs(512, 128, seed=2)
    w = torch.randn(64, 128, generator=_gen(3))
    res = gptq_quantize(w, _hessian(x), fmt, gran)
    assert _output_error(x, w, res.weight) < 0.8 * _output_error(x, w, fake_quantize(w, fmt, gran))


@pytest.mark.parametrize("fmt", [INT4_SYM, INT4_ASYM, FP4_E2M1], ids=["sym", "asym", "fp4"])
@pytest.mark.parametrize("gran", [PerRow(), PerGroup(32), PerGroup(24)], ids=["row", "g32", "g24"])
def test_identity_hessian_equals_rtn(fmt: Format, gran: Granularity) -> None:
    """With H = I the inverse-Hessian rows have no off-diagonal entries: no update, so GPTQ == RTN exactly."""
    w = torch.randn(32, 96, generator=_gen(4))
    res = gptq_quantize(w, torch.eye(96), fmt, gran)
    assert torch.equal(res.weight, fake_quantize(w, fmt, gran))


def test_loss_is_the_damped_quadratic_form() -> None:
    """loss == 1/2 tr(dW H_damped dW^T), and its undamped part is ||X dW^T||^2 / N."""
    x = _correlated_inputs(256, 64, seed=5)
    w = torch.randn(16, 64, generator=_gen(6))
    h = _hessian(x)
    res = gptq_quantize(w, h, INT4_SYM, PerGroup(16))
    dw = w - res.weight
    damped = h + res.damp_used * h.diagonal().mean() * torch.eye(64)
    assert res.loss == pytest.approx(0.5 * float(torch.trace(dw @ damped @ dw.T)), rel=1e-3)
    lam_term = 0.5 * res.damp_used * float(h.diagonal().mean()) * float(dw.square().sum())
    assert res.loss == pytest.approx(_output_error(x, w, res.weight) / 256 + lam_term, rel=1e-3)


def _naive_obs(w: Tensor, h: Tensor, fmt: Format, qp: QParams, damp: float) -> Tensor:
    """Unblocked GPTQ from the paper's OBS equations (2)-(3) with an explicit inverse, in float64.

    For each column q: quantize it, spread ``(w_q - quant(w_q)) / Hinv_qq * Hinv[q, :]`` over the row, then
    remove q from the inverse: ``Hinv -= Hinv[:, q] Hinv[q, :] / Hinv_qq``.
    """
    work = w.double().clone()
    hinv = torch.linalg.inv(h.double() + damp * h.diagonal().double().mean() * torch.eye(h.shape[0]).double())
    out = torch.empty_like(work)
    for q in range(work.shape[1]):
        col = work[:, q : q + 1].float()
        col_qp = QParams(qp.scale, qp.zero_point)
        out[:, q] = fake_quantize(col, fmt, PerRow(), qparams=col_qp).double()[:, 0]
        err = (work[:, q] - out[:, q]) / hinv[q, q]
        work -= torch.outer(err, hinv[q])
        hinv = hinv - torch.outer(hinv[:, q], hinv[q]) / hinv[q, q]
    return out.float()


@pytest.mark.parametrize("fmt", [INT4_SYM, INT4_ASYM], ids=["sym", "asym"])
def test_matches_naive_obs_reference(fmt: Format) -> None:
    """The Cholesky, lazy-batch form gives the same weights as the explicit OBS recursion (float rounding aside)."""
    x = _correlated_inputs(256, 48, seed=7)
    w = torch.randn(24, 48, generator=_gen(8))
    h = _hessian(x)
    res = gptq_quantize(w, h, fmt, PerRow(), config=GPTQConfig(block_size=16))
    ref = _naive_obs(w, h, fmt, compute_qparams(*minmax_range(w, PerRow()), fmt), 0.01)
    assert float((res.weight == ref).float().mean()) > 0.97
    assert _output_error(x, w, res.weight) == pytest.approx(_output_error(x, w, ref), rel=0.02)


@pytest.mark.parametrize("gran", [PerRow(), PerGroup(32), PerGroup(20)], ids=["row", "g32", "g20"])
def test_block_size_only_changes_speed(gran: Granularity) -> None:
    """Blocks of 1, 8 (groups spanning blocks), 12 (misaligned) and 128 give the same result up to rounding."""
    x = _correlated_inputs(256, 96, seed=9)
    w = torch.randn(32, 96, generator=_gen(10))
    h = _hessian(x)
    results = [gptq_quantize(w, h, INT4_ASYM, gran, config=GPTQConfig(block_size=b)) for b in (128, 1, 8, 12)]
    first = results[0]
    codes = quantize(first.weight, first.qparams, INT4_ASYM, gran)
    for res in results[1:]:  # dynamic group scales see float-rounding-level differences only
        torch.testing.assert_close(res.scale, first.scale, rtol=1e-5, atol=0.0)
        assert float((quantize(res.weight, res.qparams, INT4_ASYM, gran) == codes).float().mean()) > 0.99
        assert res.loss == pytest.approx(first.loss, rel=1e-4)


def test_mse_observer_no_worse_than_minmax_on_heavy_tails() -> None:
    """On student-t weights the MSE clip search gives no larger output error than min/max scales."""
    x = _correlated_inputs(512, 128, seed=11)
    w = _heavy_tailed((64, 128), seed=12)
    h = _hessian(x)
    fmt = IntFormat(3, True)
    for gran in (PerRow(), PerGroup(32)):
        plain = gptq_quantize(w, h, fmt, gran)
        mse = gptq_quantize(w, h, fmt, gran, observer="mse", grid=40)
        assert _output_error(x, w, mse.weight) <= _output_error(x, w, plain.weight)


def test_clip_ratio_shrinks_scales() -> None:
    """clip_ratio scales the per-row min/max scales, exactly as compute_qparams does."""
    w = torch.randn(8, 32, generator=_gen(13))
    full = gptq_quantize(w, torch.eye(32), INT4_SYM, PerRow())
    clipped = gptq_quantize(w, torch.eye(32), INT4_SYM, PerRow(), clip_ratio=0.9)
    torch.testing.assert_close(clipped.scale, full.scale * 0.9)


# --- grid exactness -----------------------------------------------------------------------------------------


GRID_CASES = [
    (INT4_SYM, PerRow(), GPTQConfig()),
    (IntFormat(3, False), PerRow(), GPTQConfig(act_order=True)),
    (INT4_SYM, PerGroup(32), GPTQConfig()),
    (INT4_ASYM, PerGroup(40), GPTQConfig()),
    (INT4_ASYM, PerGroup(40), STATIC),
    (INT4_ASYM, PerGroup(40), GPTQConfig(act_order=True, block_size=24)),
    (IntFormat(8, False), PerGroup(16), GPTQConfig(static_groups=True, block_size=24)),
    (FP8_E4M3, PerRow(), GPTQConfig()),
    (FP4_E2M1, PerGroup(32), STATIC),
]


@pytest.mark.parametrize(("fmt", "gran", "config"), GRID_CASES)
def test_every_row_on_the_grid(fmt: Format, gran: Granularity, config: GPTQConfig) -> None:
    """dequantize(quantize(W_hat)) == W_hat with the returned qparams; codes in range; partial groups work."""
    x = _correlated_inputs(256, 100, seed=14)
    w = torch.randn(48, 100, generator=_gen(15))
    _assert_on_grid(gptq_quantize(w, _hessian(x), fmt, gran, config=config), fmt, gran)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**16),
    shape=st.tuples(st.integers(1, 12), st.integers(1, 40)),
    fmt=st.sampled_from([INT4_SYM, IntFormat(2, False), FP8_E4M3, FP4_E2M1]),
    group=st.sampled_from([None, 1, 7, 16]),
    order=st.sampled_from([GPTQConfig(block_size=5), GPTQConfig(act_order=True, static_groups=True),
                           GPTQConfig(act_order=True, block_size=6)]),
)
def test_grid_property(
    seed: int, shape: tuple[int, int], fmt: Format, group: int | None, order: GPTQConfig
) -> None:
    """Any shape, format, group size and order: the result lies on its grid, and inputs are untouched."""
    out, n = shape
    x = _correlated_inputs(4 * n, n, seed)
    w = torch.randn(out, n, generator=_gen(seed + 1)) * 3
    h = _hessian(x)
    w0, h0 = w.clone(), h.clone()
    gran: Granularity = PerRow() if group is None else PerGroup(group)
    _assert_on_grid(gptq_quantize(w, h, fmt, gran, config=order), fmt, gran)
    assert torch.equal(w, w0) and torch.equal(h, h0)


# --- act-order and dead columns -----------------------------------------------------------------------------


def _uneven_inputs(tokens: int, features: int, seed: int) -> Tensor:
    """Correlated inputs whose column magnitudes span ~3 decades in shuffled order (very uneven diag(H))."""
    x = _correlated_inputs(tokens, features, seed)
    gen = _gen(seed + 100)
    magnitudes = torch.logspace(-1.5, 1.5, features)[torch.randperm(features, generator=gen)]
    return x * magnitudes


def test_act_order_per_row_is_at_least_comparable() -> None:
    """Per-channel act-order is at least as good as natural order on a very uneven diag(H) (~0.7x here)."""
    x = _uneven_inputs(512, 128, seed=16)
    w = torch.randn(64, 128, generator=_gen(17))
    h = _hessian(x)
    plain = gptq_quantize(w, h, INT4_SYM, PerRow())
    act = gptq_quantize(w, h, INT4_SYM, PerRow(), config=GPTQConfig(act_order=True))
    assert _output_error(x, w, act.weight) <= _output_error(x, w, plain.weight)
    _assert_on_grid(act, INT4_SYM, PerRow())


def test_act_order_static_groups_is_comparable() -> None:
    """Act-order with static groups is at least as good as natural-order dynamic groups here, and beats RTN."""
    x = _uneven_inputs(512, 128, seed=18)
    w = torch.randn(64, 128, generator=_gen(19))
    h = _hessian(x)
    gran = PerGroup(32)
    plain = gptq_quantize(w, h, INT4_ASYM, gran)
    act = gptq_quantize(w, h, INT4_ASYM, gran, config=STATIC)
    assert _output_error(x, w, act.weight) <= _output_error(x, w, plain.weight)
    assert _output_error(x, w, act.weight) < 0.8 * _output_error(x, w, fake_quantize(w, INT4_ASYM, gran))
    static_scale = compute_qparams(*minmax_range(w, gran), INT4_ASYM).scale
    assert torch.equal(act.scale, static_scale)  # fitted up front on the original weight, natural order
    _assert_on_grid(act, INT4_ASYM, gran)


def test_act_order_equals_manual_permutation() -> None:
    """act_order is GPTQ on the columns sorted by descending diag(H), put back in the original order."""
    x = _uneven_inputs(256, 64, seed=20)
    w = torch.randn(16, 64, generator=_gen(21))
    h = _hessian(x)
    perm = torch.argsort(h.diagonal(), descending=True)
    act = gptq_quantize(w, h, INT4_SYM, PerRow(), config=GPTQConfig(act_order=True))
    manual = gptq_quantize(w[:, perm], h[perm][:, perm], INT4_SYM, PerRow())
    assert float((act.weight[:, perm] == manual.weight).float().mean()) > 0.98


@pytest.mark.parametrize(
    ("gran", "config"),
    [(PerRow(), GPTQConfig()), (PerRow(), GPTQConfig(act_order=True)), (PerGroup(16), GPTQConfig()),
     (PerGroup(16), STATIC)],
)
def test_dead_columns_are_zeroed(gran: Granularity, config: GPTQConfig) -> None:
    """Inputs that are always zero (H_ii == 0) get zero weights, in the original column positions."""
    x = _correlated_inputs(256, 64, seed=22)
    dead = torch.tensor([0, 5, 17, 40, 63])
    x[:, dead] = 0.0
    w = torch.randn(16, 64, generator=_gen(23))
    res = gptq_quantize(w, _hessian(x), INT4_ASYM, gran, config=config)
    assert torch.equal(res.weight[:, dead], torch.zeros(16, len(dead)))
    assert bool((res.weight.abs().sum(0) > 0).sum() >= 50)
    _assert_on_grid(res, INT4_ASYM, gran)


def _first_touch_reference(w: Tensor, h: Tensor, fmt: Format, size: int) -> Tensor:
    """Act-order GPTQ column by column, no lazy blocks: each group of ``size`` original columns is fitted (minmax)
    on its current weights when the first of its columns comes up in the descending-diag(H) order."""
    perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    damped = h[perm][:, perm] + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0])
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    wp, groups, fitted = w[:, perm].clone(), perm // size, {}
    for k in range(wp.shape[1]):
        g = int(groups[k])
        if g not in fitted:
            fitted[g] = compute_qparams(*minmax_range(wp[:, groups == g], PerRow()), fmt)
        q = fake_quantize(wp[:, k : k + 1], fmt, PerRow(), qparams=fitted[g])[:, 0]
        wp[:, k:] -= torch.outer((wp[:, k] - q) / u[k, k], u[k, k:])
        wp[:, k] = q
    return wp[:, torch.argsort(perm)]


def test_act_order_dynamic_groups_fit_at_first_touch() -> None:
    """Act-order with dynamic groups: natural-layout groups, each fitted on its error-updated weights when the loop
    first reaches one of its columns, equals the column-by-column reference through the lazy block updates."""
    x = _uneven_inputs(512, 96, seed=30)
    w = torch.randn(24, 96, generator=_gen(31))
    h = _hessian(x)
    res = gptq_quantize(w, h, INT4_ASYM, PerGroup(32), config=GPTQConfig(act_order=True, block_size=20))
    reference = _first_touch_reference(w, h, INT4_ASYM, 32)
    assert float(((res.weight - reference).abs() < 1e-5).float().mean()) > 0.99  # same codes up to float rounding
    _assert_on_grid(res, INT4_ASYM, PerGroup(32))
    assert not torch.equal(res.scale, gptq_quantize(w, h, INT4_ASYM, PerGroup(32), config=STATIC).scale)
    assert _output_error(x, w, res.weight) < 0.8 * _output_error(x, w, fake_quantize(w, INT4_ASYM, PerGroup(32)))


# --- damping and errors -------------------------------------------------------------------------------------


def test_non_positive_definite_hessian_raises_with_fix() -> None:
    """H = -I cannot be damped into positive definiteness: CalibrationError names the layer, damping and fix."""
    with pytest.raises(CalibrationError) as info:
        gptq_quantize(torch.randn(8, 16, generator=_gen(24)), -torch.eye(16), INT4_SYM, PerRow())
    message = str(info.value)
    assert "8x16" in message and "0.01" in message and "1000" in message
    assert "more tokens" in message and "damp" in message


def test_rank_deficient_hessian_succeeds_via_damping() -> None:
    """8 tokens for 64 inputs give a singular H; the default 1% damping makes it invertible."""
    x = torch.randn(8, 64, generator=_gen(25))
    w = torch.randn(16, 64, generator=_gen(26))
    res = gptq_quantize(w, _hessian(x), INT4_SYM, PerRow())
    assert res.damp_used == 0.01 and bool(torch.isfinite(res.weight).all())
    assert _output_error(x, w, res.weight) < _output_error(x, w, fake_quantize(w, INT4_SYM, PerRow()))
    _assert_on_grid(res, INT4_SYM, PerRow())


def test_damping_retries_times_ten() -> None:
    """An H with eigenvalues down to -5% of its mean diagonal fails at 1% damping and succeeds at 10%."""
    x = torch.randn(8, 32, generator=_gen(27))
    h = _hessian(x)
    h = h - 0.05 * h.diagonal().mean() * torch.eye(32)
    res = gptq_quantize(torch.randn(4, 32, generator=_gen(28)), h, INT4_SYM, PerRow())
    assert res.damp_used == pytest.approx(0.1)
    with pytest.raises(CalibrationError, match="0.01"):
        gptq_quantize(torch.randn(4, 32), h, INT4_SYM, PerRow(), config=GPTQConfig(max_damp_retries=0))


def test_bad_inputs_are_refused() -> None:
    """Wrong shapes, unsupported granularities, NaN Hessians and bad configs raise with a message."""
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="Hessian of shape"):
        gptq_quantize(w, torch.eye(7), INT4_SYM, PerRow())
    with pytest.raises(ValueError, match="PerRow"):
        gptq_quantize(w, h, INT4_SYM, PerTensor())
    with pytest.raises(CalibrationError, match="NaN"):
        gptq_quantize(w, h * float("nan"), INT4_SYM, PerRow())
    for bad in ({"block_size": 0}, {"damp": -0.1}, {"damp": float("inf")}, {"max_damp_retries": -1}):
        with pytest.raises(ValueError):
            GPTQConfig(**bad)  # type: ignore[arg-type]


# --- inputs and dtypes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_untouched_and_dtype_kept(dtype: torch.dtype) -> None:
    """The weight and Hessian are not modified; the output has the weight's dtype and lies on its grid."""
    x = _correlated_inputs(128, 64, seed=29)
    x[:, 3] = 0.0  # a dead column, which the solver zeroes in its own copy only
    w = torch.randn(16, 64, generator=_gen(30)).to(dtype)
    h = _hessian(x)
    w0, h0 = w.clone(), h.clone()
    res = gptq_quantize(w, h, parse_format("int4", symmetric=False), PerGroup(16), config=GPTQConfig(block_size=8))
    assert torch.equal(w, w0) and torch.equal(h, h0)
    assert res.weight.dtype == dtype and res.weight.shape == w.shape
    assert res.scale.dtype == torch.float32
    _assert_on_grid(res, INT4_ASYM, PerGroup(16))


def test_hessian_accumulated_in_lower_blocks_equals_the_full_product(monkeypatch) -> None:
    """The block-lower-triangular accumulation, mirrored on reading, equals ``2/N X^T X`` and is symmetric."""
    import lowbit.gptq as gptq

    monkeypatch.setattr(gptq, "_GRAM_BLOCK", 7)  # 3 blocks of 7 and a partial one of 2 over 23 inputs
    x = torch.randn(3, 50, 23, generator=_gen(11))
    acc = HessianAccumulator(23)
    for batch in x:
        acc.add(batch)
    h = acc.hessian
    rows = x.reshape(-1, 23)
    torch.testing.assert_close(h, 2 * rows.T @ rows / len(rows), rtol=1e-5, atol=1e-5)
    assert torch.equal(h, h.T)
