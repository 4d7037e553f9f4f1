"""KV codecs: round trips within half a step, bytes as documented, scores equal to decoded keys' scores."""

import pytest
import torch

from lowbit.kv.cache import PackedRun
from lowbit.kv.codebook import codebook_mse
from lowbit.kv.codecs import IntCodec, QJLKeyCodec, TurboCodec
from lowbit.kv.qjl import estimate_scores, qjl_projection, sketch_keys


def _kv(t=64, d=64, seed=0):
    return torch.randn(2, 3, t, d, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.5, 3, d)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("axis", "group"), [("token", None), ("token", 32), ("channel", 32)])
def test_round_trip_within_half_a_step(bits, symmetric, axis, group):
    x = _kv()
    codec = IntCodec(bits, symmetric=symmetric, axis=axis, group=group)
    packed = codec.encode(x)
    x_hat = codec.decode(packed, 64)
    assert x_hat.shape == x.shape
    step = codec._grouped(x).abs().amax(-1, keepdim=True) * 2 / (2**bits - 1 - (1 if symmetric else 0))
    err = codec._grouped((x_hat - x).abs())
    assert bool((err <= step / 2 * 1.01 + 1e-3).all())
    assert torch.allclose(codec.scores(x[:, :, :5], packed, 64), x[:, :, :5] @ x_hat.transpose(-1, -2), atol=1e-3)


def test_bytes_are_what_the_layout_says():
    x = _kv(t=64, d=64)
    per_token = IntCodec(4).encode(x)  # 4 bits + fp16 scale and zero point per 64 channels
    assert per_token.nbytes == 2 * 3 * 64 * (64 * 4 // 8 + 2 + 2)
    kivi_keys = IntCodec(2, axis="channel", group=32).encode(x)  # 2 bits + fp16 scale, zero point / channel / 32 tokens
    assert kivi_keys.nbytes == 2 * 3 * (64 * 64 * 2 // 8 + 2 * 64 * 2 * 2)
    assert kivi_keys.fields["scale"].shape == (2, 3, 2, 64)


def test_runs_concatenate_and_select():
    x = _kv(t=64)
    codec = IntCodec(3, axis="channel", group=32)
    whole = codec.decode(codec.encode(x), 64)
    run = PackedRun(codec.encode(x[:, :, :32]))  # how a cache appends flushed groups
    run.append(codec.encode(x[:, :, 32:]))
    joined = run.packed
    assert joined.tokens == 64 and torch.equal(codec.decode(joined, 64), whole)
    assert torch.equal(codec.decode(joined.select(torch.tensor([1])), 64), whole[1:])


def test_more_bits_less_error_and_clip_helps_outliers():
    x = _kv()
    errs = [float((IntCodec(b).decode(IntCodec(b).encode(x), 64) - x).pow(2).mean()) for b in (2, 3, 4)]
    assert errs[0] > 3 * errs[1] > 9 * errs[2]
    spiky = x.clone()
    spiky[..., 0] *= 20
    plain, clipped = IntCodec(2), IntCodec(2, clip_ratio=0.7)
    mse = [float((c.decode(c.encode(spiky), 64) - spiky)[..., 1:].pow(2).mean()) for c in (plain, clipped)]
    assert mse[1] < mse[0]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="from 1 to 8"):
        IntCodec(0)
    with pytest.raises(ValueError, match="at least 2 bits"):
        IntCodec(1, symmetric=True)
    with pytest.raises(ValueError, match="whole number of 32-token groups"):
        IntCodec(2, axis="channel", group=32).encode(_kv(t=40))
    with pytest.raises(ValueError, match="not a multiple of the channel group"):
        IntCodec(2, group=48).encode(_kv())


def _with_outlier_channels(t=64, seed=0):
    x = torch.randn(1, 2, t, 64, generator=torch.Generator().manual_seed(seed))
    x[..., [3, 17]] *= 12  # two channels an order of magnitude larger, as keys have
    return x


def test_qjl_scores_are_the_inlier_estimate_plus_the_exact_outliers():
    """The packed-form score equals est(<q_in, k_in>) on masked vectors plus <q_out, k_out>, group by group."""
    keys, q = _with_outlier_channels(), torch.randn(1, 2, 3, 64, generator=torch.Generator().manual_seed(9))
    codec = QJLKeyCodec(m=128, outliers=4, group=32, seed=5)
    packed = codec.encode(keys)
    got = codec.scores(q, packed, 64)
    proj = qjl_projection(64, 128, 5)
    for g in range(2):
        k = keys[:, :, 32 * g:32 * (g + 1)]
        top = k.norm(dim=2).topk(4, dim=-1).indices  # [1, 2, 4]
        mask = torch.zeros(1, 2, 64).scatter(-1, top, 1.0).unsqueeze(2)
        est = estimate_scores(q * (1 - mask), sketch_keys(k * (1 - mask), proj), proj)
        exact = (q * mask) @ (k * mask).to(torch.float16).float().transpose(-1, -2)
        assert torch.allclose(got[..., 32 * g:32 * (g + 1)], est + exact, rtol=1e-4, atol=1e-3)
    assert packed.fields["index"].dtype == torch.uint8 and packed.fields["index"].shape == (1, 2, 2, 4)


def test_qjl_unbiased_and_outliers_cut_the_error():
    keys, q = _with_outlier_channels(t=32), torch.randn(1, 2, 1, 64, generator=torch.Generator().manual_seed(3))
    exact = q @ keys.transpose(-1, -2)
    runs = {o: torch.stack([QJLKeyCodec(128, outliers=o, seed=s).scores(q, QJLKeyCodec(128, outliers=o, seed=s)
                                                                          .encode(keys), 64) for s in range(200)])
            for o in (0, 4)}
    for est in runs.values():
        z = (est.mean(0) - exact) / (est.std(0) / 200**0.5)
        assert float(z.abs().max()) < 4.5
    assert float(runs[4].std(0).mean()) < 0.5 * float(runs[0].std(0).mean())


def test_turbo_round_trip_error_matches_the_codebook():
    x = _kv(t=256)
    for bits in (2, 3, 4):
        codec = TurboCodec(bits, seed=1)
        rel = float(((codec.decode(codec.encode(x), 64) - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean())
        assert rel == pytest.approx(codebook_mse(64, bits) * 64, rel=0.15)
    assert TurboCodec(3).encode(x).nbytes == 2 * 3 * 256 * (24 + 2)
    assert TurboCodec(2, residual_qjl=True).encode(x).nbytes == 2 * 3 * 256 * (16 + 2 + 8 + 2)


def test_turbo_scores_match_decoded_and_residual_sketch_is_unbiased():
    x, q = _kv(t=32), torch.randn(2, 3, 2, 64, generator=torch.Generator().manual_seed(4))
    plain = TurboCodec(3, seed=2)
    packed = plain.encode(x)
    assert torch.allclose(plain.scores(q, packed, 64), q @ plain.decode(packed, 64).transpose(-1, -2), atol=1e-3)
    exact = q @ x.transpose(-1, -2)
    est = torch.stack([TurboCodec(2, residual_qjl=True, seed=s).scores(q, TurboCodec(2, residual_qjl=True, seed=s)
                                                                        .encode(x), 64) for s in range(150)])
    z = (est.mean(0) - exact) / (est.std(0) / 150**0.5)
    assert float(z.abs().max()) < 4.5


@pytest.mark.parametrize("codec", [IntCodec(3), TurboCodec(3, seed=4)])
def test_weighted_sum_equals_weights_times_decoded_values(codec):
    v = _kv(t=32)
    w = torch.softmax(torch.randn(2, 3, 5, 32, generator=torch.Generator().manual_seed(2)), -1)
    packed = codec.encode(v)
    assert torch.allclose(codec.weighted_sum(w, packed, 64), w @ codec.decode(packed, 64), atol=1e-5)


def test_static_codec_stores_codes_only_and_round_trips_in_range():
    from lowbit.kv.static import static_codec

    x = _kv(t=16)  # [2, 3, 16, 64]
    g = x.reshape(2, 3, 16, 8, 8)
    lo, hi = g.amin(dim=(0, 2, 4)), g.amax(dim=(0, 2, 4))  # [3 heads, 8 groups of 8 channels]
    for symmetric in (False, True):
        codec = static_codec(lo, hi, 4, symmetric)
        packed = codec.encode(x)
        assert set(packed.fields) == {"codes"} and packed.nbytes == 2 * 3 * 16 * 32
        step = (hi - lo).max() / 15 if not symmetric else 2 * torch.maximum(lo.abs(), hi.abs()).max() / 14
        assert float((codec.decode(packed, 64) - x).abs().max()) <= float(step) / 2 * 1.01 + 1e-3
