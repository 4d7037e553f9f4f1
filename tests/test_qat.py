"""Quantization-aware training (the qat step): it lowers the KL it trains on, leaves a frozen model on its grid that
saves and runs like any other, trains only what it is told to, and works without text."""

import pytest
import torch

import lowbit
from lowbit.errors import RecipeError
from lowbit.quant import round_scale, split_relative_scale
from lowbit.quant.qparams import RELATIVE_DTYPES
from lowbit.recipe import Recipe, load_preset
from lowbit.surgery.block_finetune import sign_keeper
from lowbit.surgery.kvcache import packed_cache_suspended
from lowbit.surgery.linear import QuantLinear
from lowbit.surgery.qat import _Best, norm_weights, self_generated
from lowbit.surgery.quantizer import ActQuantizer
from lowbit.surgery.teacher import kl_from_teacher
from tests.conftest import tiny_data, tiny_model

W3A4 = {"weights": {"format": "int3", "granularity": "channel"},
        "activations": {"format": "int4", "granularity": "token", "dynamic": True},
        "calibration": {"samples": 4, "seq_len": 32}}


def _peaky_model(family: str = "llama"):
    """A tiny model with larger weights, so that its next-token distributions are sharp and rounding shows."""
    model = tiny_model(family)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3)
    return model


def _recipe(qat: dict | None, base: dict = W3A4, first: tuple = ({"method": "rtn"},)) -> Recipe:
    """``qat`` settings on the base scheme; no held-out validation unless they ask for it (these tests watch what
    training itself does)."""
    steps = [*first] + ([{"method": "qat", "samples": 8, "seq_len": 48, "holdout": 0, **qat}] if qat is not None
                        else [])
    return Recipe.from_dict({"steps": steps, **base})


def _kl(student, teacher, tokens) -> float:
    with torch.no_grad():
        return kl_from_teacher(student(tokens).logits, teacher(tokens).logits).item()


def test_kl_from_teacher_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert kl_from_teacher(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_from_teacher(logits + torch.randn(2, 5, 11), logits).item() > 0.01


@pytest.mark.parametrize(("given", "expected"), [
    ({}, 0.004), ({"train": "scales_norms"}, 0.004), ({"train": "weights"}, 0.001),
    ({"train": "weights", "lr_scale": 0.01}, 0.01), ({"lr_scale": 0.0}, 0.0)])
def test_scale_learning_rate_defaults_by_what_trains_and_a_given_one_stays(given, expected):
    step = Recipe.from_dict({"steps": [{"method": "rtn"}, {"method": "qat", **given}], **W3A4}).steps[-1]
    assert step.lr_scale == expected
    assert type(step).model_validate(step.model_dump()) == step  # a dumped recipe reads back the same


@pytest.mark.parametrize(("autocast", "teacher"), [("off", "auto"), ("bf16", "auto"), ("off", "topk")])
def test_qat_lowers_the_kl_on_its_training_text(autocast, teacher):
    """The full KL falls whichever teacher trains it: the model itself, or its top-64 tokens of 320 cached."""
    model, data = _peaky_model(), tiny_data()
    batches = data.calibration(8, 48)  # what the step draws: the same seeded calibration sample
    before = _kl(lowbit.quantize(model, _recipe(None), data), model, batches)
    fast = {"steps": 60, "lr_weight": 0.02, "lr_scale": 0.005, "lr_norm": 1e-4}  # a tiny model, few steps
    qat = {**fast, "autocast": autocast, "teacher": teacher, "top_k": 64}
    qmodel, session = lowbit.quantize_with_session(model, _recipe(qat), data)
    assert all(p.dtype == torch.float32 for p in qmodel.parameters())
    after = _kl(qmodel, model, batches)
    assert after < 0.8 * before
    report = session.report()["qat"]
    assert report["steps"] == 60 and report["kl_last_10"] < report["kl_first_10"]
    assert report["teacher"] == ("model" if teacher == "auto" else "top-64")  # auto: the model, in memory


def test_trained_model_is_frozen_on_its_grid_and_saves_and_loads(tmp_path, tokens):
    model = _peaky_model()
    qmodel = lowbit.quantize(model, _recipe({"steps": 5}), tiny_data())
    linears = [m for m in qmodel.modules() if isinstance(m, QuantLinear) and m.weight_scheme is not None]
    untrained = lowbit.quantize(model, _recipe(None), tiny_data())
    flags = [p.requires_grad for p in qmodel.parameters()]
    assert linears and flags == [p.requires_grad for p in untrained.parameters()]
    for linear in linears:
        assert not linear.learning and not isinstance(linear.weight_scale, torch.nn.Parameter)
        assert torch.equal(linear.quantized_weight(), linear.weight)  # rounding it again changes nothing
    lowbit.save(qmodel, tmp_path / "qat")
    loaded = lowbit.load(tmp_path / "qat")
    with torch.no_grad():
        assert torch.allclose(loaded(tokens).logits, qmodel(tokens).logits, atol=1e-3)


@pytest.mark.parametrize("train", ["scales", "weights"])
@pytest.mark.parametrize(("fmt", "scale_dtype"), [("int4", "float16"), ("fp4_e2m1", "float8_e4m3"),
                                                  ("fp4_e2m1", "e8m0")])
def test_trained_scales_stay_values_their_dtype_stores(fmt, scale_dtype, train, tmp_path, tokens):
    """Group scales stored in float16, FP8 (NVFP4) or E8M0 (MXFP4) train on and end at values of that dtype, so the
    model measured after training is the model saved, not one whose scales the file would round."""
    weights = {"format": fmt, "granularity": "group", "group_size": 16, "scale_dtype": scale_dtype}
    base = {"weights": weights, "calibration": {"samples": 4, "seq_len": 32}}
    model, data = _peaky_model(), tiny_data()
    qmodel = lowbit.quantize(model, _recipe({"steps": 10, "train": train, "lr_scale": 0.01}, base), data)
    for m in qmodel.modules():
        if isinstance(m, QuantLinear) and m.weight_scheme is not None:
            dtype, s = m.weight_scheme.scale_torch_dtype, m.weight_scale
            if dtype in RELATIVE_DTYPES:  # E4M3 multiples of one per-tensor unit
                values, unit = split_relative_scale(s, dtype)
                stored = values.float() * unit
            else:
                stored = round_scale(s, dtype)
            assert torch.equal(stored, s)
    lowbit.save(qmodel, tmp_path / "q")
    with torch.no_grad():
        loaded = lowbit.load(tmp_path / "q", simulate=True)
        assert torch.allclose(loaded(tokens).logits, qmodel(tokens).logits, atol=1e-5)


@pytest.mark.parametrize(("fmt", "scale_dtype"), [("int4", "float16"), ("fp4_e2m1", "float8_e4m3"),
                                                  ("fp4_e2m1", "e8m0")])
def test_training_starts_from_the_scales_on_their_grid(fmt, scale_dtype):
    """Starting to train, and freezing without a step, leave every weight and scale as it was: training rounds the
    scales on the grid (for NVFP4, the per-tensor unit) they were stored on, not on one of its own."""
    weights = {"format": fmt, "granularity": "group", "group_size": 16, "scale_dtype": scale_dtype, "observer": "mse"}
    qmodel = lowbit.quantize(_peaky_model(), Recipe.from_dict({"steps": [{"method": "rtn"}], "weights": weights}))
    for m in qmodel.modules():
        if isinstance(m, QuantLinear) and m.weight_scheme is not None:
            weight, scale = m.weight.detach().clone(), m.weight_scale.clone()
            m.learn_weight(codes_fixed=True)
            assert torch.equal(m.quantized_weight(), weight)
            m.freeze_weight()
            assert torch.equal(m.weight_scale, scale) and torch.equal(m.weight, weight)


@pytest.mark.parametrize(("train", "norms_move", "codes_move"),
                         [("scales", False, False), ("scales_norms", True, False), ("weights", True, True)])
def test_train_chooses_what_moves(train, norms_move, codes_move):
    model, data = _peaky_model(), tiny_data()
    start = lowbit.quantize(model, _recipe(None), data)
    tuned = lowbit.quantize(model, _recipe({"steps": 20, "train": train, "lr_weight": 0.1}), data)
    moved = [not torch.equal(a, b) for a, b in zip(norm_weights(start), norm_weights(tuned), strict=True)]
    assert any(moved) == norms_move
    scales_moved = codes_moved = False
    for name, a in start.named_modules():
        if isinstance(a, QuantLinear) and a.weight_scheme is not None:
            b = tuned.get_submodule(name)
            scales_moved |= not torch.equal(a.weight_scale, b.weight_scale)
            # with the latent weight frozen, the new scale alone decides the codes: w_start on b's grid
            on_b = torch.clamp(torch.round(a.weight / b.weight_scale), -3, 3) * b.weight_scale
            codes_moved |= not torch.equal(on_b, b.weight)
    assert scales_moved
    assert codes_moved == codes_move


def test_signed_scales_of_the_full_grid_train_and_keep_their_signs():
    """int_range full: a negative scale puts a granule's largest weight on -8; training keeps every sign."""
    full = {**W3A4, "weights": {"format": "int4", "granularity": "group", "group_size": 32, "int_range": "full"}}
    model, data = _peaky_model(), tiny_data()
    batches = data.calibration(8, 48)
    start = lowbit.quantize(model, _recipe(None, full), data)
    fast = {"steps": 60, "lr_weight": 0.02, "lr_scale": 0.005, "lr_norm": 1e-4}
    tuned = lowbit.quantize(model, _recipe(fast, full), data)
    assert _kl(tuned, model, batches) < 0.8 * _kl(start, model, batches)
    pairs = [(a, tuned.get_submodule(n)) for n, a in start.named_modules()
             if isinstance(a, QuantLinear) and a.weight_scheme is not None]
    assert pairs and any((a.weight_scale < 0).any() for a, _ in pairs)
    for a, b in pairs:
        assert torch.equal(a.weight_scale < 0, b.weight_scale < 0) and (b.weight_scale != 0).all()
        assert not torch.equal(a.weight_scale, b.weight_scale)
        assert torch.equal(b.quantized_weight(), b.weight)


def test_sign_keeper_holds_each_scale_on_its_side_of_zero():
    scale = torch.tensor([0.5, -0.5, 0.2, -0.2])
    keep = sign_keeper([scale])
    scale.copy_(torch.tensor([-0.1, 0.3, 0.0, -0.4]))  # a step that crossed zero, reached it, or stayed
    keep()
    assert torch.equal(scale, torch.tensor([1e-8, -1e-8, 1e-8, -0.4]))


def test_scales_alone_lower_the_kl_on_their_fixed_codes():
    """EfficientQAT's end-to-end phase: the weights' codes stay, their scales learn (gradient: the code). LSQ's
    gradient on an already rounded weight is zero, which left scales alone to drift."""
    model, data = _peaky_model(), tiny_data()
    batches = data.calibration(8, 48)
    start = lowbit.quantize(model, _recipe(None), data)
    tuned = lowbit.quantize(model, _recipe({"steps": 60, "train": "scales", "lr_scale": 0.005}), data)
    assert _kl(tuned, model, batches) < 0.9 * _kl(start, model, batches)
    for name, a in start.named_modules():
        if isinstance(a, QuantLinear) and a.weight_scheme is not None:
            b = tuned.get_submodule(name)
            assert torch.equal(torch.round(a.weight / a.weight_scale), torch.round(b.weight / b.weight_scale))


def test_static_scales_train_and_end_frozen():
    """Static activation scales train, and end as buffers holding values of their storage dtype (float16)."""
    acts = {"format": "int4", "granularity": "tensor", "dynamic": False, "scale_dtype": "float16"}
    static = {**W3A4, "activations": acts}
    model, data = _peaky_model(), tiny_data()
    start = lowbit.quantize(model, _recipe(None, static), data)
    tuned = lowbit.quantize(model, _recipe({"steps": 20, "train": "scales"}, static), data)
    pairs = [(a, tuned.get_submodule(n)) for n, a in start.named_modules() if isinstance(a, ActQuantizer)]
    assert pairs and any(not torch.equal(a.scale, b.scale) for a, b in pairs)
    assert not any(isinstance(b.scale, torch.nn.Parameter) for _, b in pairs)
    assert all(torch.equal(round_scale(b.scale, torch.float16), b.scale) for _, b in pairs)


def test_self_generated_text_is_the_teachers_own_and_needs_no_data():
    model = _peaky_model()
    model.config.bos_token_id = 1
    a, b = self_generated(model, 5, 12, seed=0, batch=2), self_generated(model, 5, 12, seed=0, batch=2)
    assert a.shape == (5, 12) and torch.equal(a, b) and (a[:, 0] == 1).all()
    assert not torch.equal(a, self_generated(model, 5, 12, seed=1, batch=2))
    qmodel, session = lowbit.quantize_with_session(model, _recipe({"steps": 3, "data": "self"}))  # no data given
    assert session.report()["qat"]["data"] == "self"


@pytest.mark.parametrize("family", ["qwen2-real", "mistral"])
def test_qat_after_quarot_gptq_and_a_kv_cache(family, tokens):
    """The full W4A4KV4 pipeline (online R3/R4, KV quantizers with a key centre) trains end to end."""
    base = {"weights": {"format": "int4", "granularity": "channel"},
            "activations": {"format": "int4", "granularity": "token", "dynamic": True},
            "kv": {"format": "int4", "symmetric": False, "granularity": "head", "key_centre": "mean"},
            "calibration": {"samples": 4, "seq_len": 32}}
    model = tiny_model(family)
    qmodel, session = lowbit.quantize_with_session(
        model, _recipe({"steps": 4}, base, ({"method": "quarot"}, {"method": "gptq"})), tiny_data())
    assert len(session.report()["qat"]["losses"]) == 4
    with torch.no_grad():
        assert torch.isfinite(qmodel(tokens).logits).all()


def test_qat_trains_on_exact_kv_under_a_packed_cache_that_applies_again_after():
    """A packed cache's codes have no gradient: training sees exact keys and values, the evaluation the cache."""
    base = {**W3A4, "kv_cache": load_preset("kv-turbo3").model_dump()["kv_cache"]}
    model, data = _peaky_model(), tiny_data()
    qmodel, session = lowbit.quantize_with_session(model, _recipe({"steps": 3, "lr_weight": 0}, base), data)
    assert len(session.report()["qat"]["losses"]) == 3
    plain = lowbit.quantize(model, _recipe({"steps": 3, "lr_weight": 0}), data)
    tokens = torch.randint(0, 320, (1, 160), generator=torch.Generator().manual_seed(0))  # past the exact window
    with torch.no_grad():  # the same trained model but for the cache (no weight moved): the cache still costs
        assert not torch.allclose(qmodel(tokens).logits, plain(tokens).logits, atol=1e-4)
        with packed_cache_suspended(qmodel):
            torch.testing.assert_close(qmodel(tokens).logits, plain(tokens).logits)


def test_qat_runs_after_the_weight_step_only():
    with pytest.raises(RecipeError):
        Recipe.from_dict({"steps": [{"method": "qat"}, {"method": "rtn"}], **W3A4})


@pytest.mark.parametrize(("recipe", "message"), [
    ({"steps": [{"method": "qat"}], "activations": W3A4["activations"]}, "a qat step trains quantized weights"),
])
def test_qat_refuses_what_it_cannot_train(recipe, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(recipe)


def test_qat_after_prefixquant_trains_the_static_scales_behind_the_prefix(tokens):
    """PrefixQuant's static recipe (prefix, block-wise GPTQ and clip search) then QAT: the student runs after its
    full-precision prefix, the teacher without one, and the logits line up token for token."""
    data = load_preset("w4a4kv4-prefix-noft").model_dump()
    data["steps"] = [{**s, "samples": 4, "seq_len": 32} if s["method"] == "blockwise" else s for s in data["steps"]]
    data["steps"].append({"method": "qat", "steps": 3, "samples": 4, "seq_len": 32, "train": "scales"})
    data["calibration"] = {"samples": 4, "seq_len": 32}
    qmodel, session = lowbit.quantize_with_session(tiny_model("llama"), Recipe.from_dict(data), tiny_data())
    assert len(session.report()["qat"]["losses"]) == 3 and session.prefix is not None
    with torch.no_grad():
        assert qmodel(tokens).logits.shape == (*tokens.shape, 320)


def test_best_keeps_the_values_of_the_lowest_offer():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    best = _Best([p])
    best.offer(0, 0.5)
    with torch.no_grad():
        p.add_(1.0)
    best.offer(10, 0.3)  # better: these values are kept
    with torch.no_grad():
        p.add_(1.0)
    best.offer(20, 0.4)
    best.restore()
    assert torch.equal(p.detach(), torch.tensor([2.0, 3.0])) and best.step == 10
    assert best.history == {0: 0.5, 10: 0.3, 20: 0.4}


def test_holdout_keeps_the_start_when_training_only_hurts(tokens):
    """A learning rate that wrecks the model: held-out validation measures it and the model keeps its starting
    values (the PTQ result, logit for logit); without validation the wreck is kept."""
    model, data = _peaky_model(), tiny_data()
    start = lowbit.quantize(model, _recipe(None), data)
    wreck = {"steps": 6, "lr_weight": 50.0, "lr_scale": 0.5, "lr_norm": 0.5}
    kept, session = lowbit.quantize_with_session(model, _recipe({**wreck, "holdout": 2, "eval_every": 3}), data)
    report = session.report()["qat"]
    assert report["kept_step"] == 0 and set(report["held_out_kl"]) == {"0", "3", "6"}
    assert min(report["held_out_kl"].values()) == report["held_out_kl"]["0"]
    unvalidated = lowbit.quantize(model, _recipe(wreck), data)
    with torch.no_grad():
        assert torch.allclose(kept(tokens).logits, start(tokens).logits, atol=1e-5)
        assert not torch.allclose(unvalidated(tokens).logits, start(tokens).logits, atol=1e-2)


def test_holdout_is_text_training_never_sees():
    data = tiny_data()
    held = data.held_out(2, 48)
    total = data.calib_tokens.numel()
    assert torch.equal(held.flatten(), data.calib_tokens[total - 96:])
    drawn = data.calibration(200, 48, reserve=96)
    # every drawn window lies in the first total - 96 tokens: its start is at most total - 96 - 48
    stream = data.calib_tokens[: total - 96]
    starts = [next(i for i in range(stream.numel() - 47) if torch.equal(stream[i:i + 48], w)) for w in drawn[:20]]
    assert max(starts) <= total - 96 - 48
    with pytest.raises(lowbit.errors.DataError, match="hold out"):
        data.held_out(total // 48 + 1, 48)


def test_self_generated_holdout_is_more_of_the_teachers_text():
    model = _peaky_model()
    model.config.bos_token_id = 1
    _, session = lowbit.quantize_with_session(model, _recipe({"steps": 2, "data": "self", "holdout": 2,
                                                              "eval_every": 1}))
    report = session.report()["qat"]
    assert set(report["held_out_kl"]) == {"0", "1", "2"} and report["tokens"] == 8 * 48


class _Stop(Exception):
    pass


@pytest.mark.parametrize("holdout", [0, 2])
def test_an_interrupted_run_resumes_exactly_from_its_checkpoint(holdout, tmp_path, tokens):
    """Stopped after 2 of 6 steps (checkpoints every 2), the same recipe resumes at step 2 and ends where one
    uninterrupted run ends: trained values and optimizer moments (without validation the last step's values are
    kept, so every one counts) and the held-out record and best values (with it) all come back."""
    model, data = _peaky_model(), tiny_data()
    settings = {"steps": 6, "holdout": holdout, "eval_every": 2, "lr_weight": 1.0, "checkpoint_every": 2}
    whole, whole_session = lowbit.quantize_with_session(model, _recipe(settings), data)
    path = tmp_path / "qat.safetensors"
    ticks = []

    def progress(label, total):
        def tick(*_):
            ticks.append(label)
            if label == "quantization-aware training" and ticks.count(label) == 2:
                raise _Stop

        return tick

    with pytest.raises(_Stop):
        lowbit.quantize_with_session(model, _recipe({**settings, "checkpoint": str(path)}), data, progress=progress)
    ticks.clear()
    counting = lambda label, total: (lambda *_: ticks.append(label))  # noqa: E731
    resumed, session = lowbit.quantize_with_session(model, _recipe({**settings, "checkpoint": str(path)}), data,
                                                    progress=counting)
    assert ticks.count("quantization-aware training") == 4  # it went on from step 2
    report, expected = session.report()["qat"], whole_session.report()["qat"]
    assert report["losses"][:2] == expected["losses"][:2] and len(report["losses"]) == 6
    assert report["held_out_kl"] == pytest.approx(expected["held_out_kl"], abs=1e-6)
    assert report["kept_step"] == expected["kept_step"]
    with torch.no_grad():
        assert torch.allclose(resumed(tokens).logits, whole(tokens).logits, atol=1e-5)
    # other settings never resume this run's checkpoint: they start afresh, with a warning
    with pytest.warns(lowbit.errors.LowbitWarning, match="written by another run"):
        lowbit.quantize_with_session(model, _recipe({**settings, "lr_weight": 0.3, "checkpoint": str(path)}), data)


def test_clips_train_and_end_in_the_quantizers_schemes(tmp_path, tokens):
    model, data = _peaky_model(), tiny_data()
    start = lowbit.quantize(model, _recipe(None), data)
    tuned, session = lowbit.quantize_with_session(model, _recipe({"steps": 20, "clips": True, "lr_clip": 0.2}), data)
    pairs = [(a, tuned.get_submodule(n)) for n, a in start.named_modules() if isinstance(a, ActQuantizer)]
    assert pairs and all(b.learned_clip is None for _, b in pairs)
    ratios = [b.scheme.clip_ratio for _, b in pairs]
    assert all(0.5 < r < 1.0 for r in ratios) and len(set(ratios)) > 1  # each its own, none left at the start
    assert session.report()["qat"]["clip_ratios"]["learned"] == len(pairs)
    lowbit.save(tuned, tmp_path / "clips")
    loaded = lowbit.load(tmp_path / "clips")
    with torch.no_grad():
        assert torch.allclose(loaded(tokens).logits, tuned(tokens).logits, atol=1e-3)


def test_without_clips_the_dynamic_quantizers_keep_their_ratios():
    model, data = _peaky_model(), tiny_data()
    tuned = lowbit.quantize(model, _recipe({"steps": 5}), data)
    assert all(q.scheme.clip_ratio == 1.0 for q in tuned.modules() if isinstance(q, ActQuantizer))
