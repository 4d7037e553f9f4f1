"""SpinQuant on tiny models: the functional rotation equals QuaRot's, training lowers the loss and keeps rotations
orthogonal, the folded model stays invariant, and training resumes from a checkpoint or loads saved rotations."""

import pytest
import torch

import lowbit
from lowbit.data import TokenData
from lowbit.methods.quarot import RotationResult
from lowbit.methods.spinquant import initial_rotations, load_rotations
from lowbit.models.arch import spec_for
from lowbit.recipe import Recipe
from lowbit.surgery.spinquant import rotated_parameters
from tests.conftest import recording_progress, tiny_model


@pytest.fixture
def calib():
    g = torch.Generator().manual_seed(7)
    return TokenData(eval_windows=torch.randint(0, 320, (2, 48), generator=g),
                     calib_tokens=torch.randint(0, 320, (4000,), generator=g), seed=0)


def _recipe(steps: dict, activations=True) -> Recipe:
    data = {"steps": [{"method": "spinquant", "samples": 4, "seq_len": 32, **steps}]}
    if activations:
        data["activations"] = {"format": "int4", "granularity": "token", "dynamic": True, "clip_ratio": 0.9}
        data["kv"] = {"format": "int4", "symmetric": False, "granularity": "head", "dynamic": True}
    return Recipe.from_dict(data)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


@pytest.mark.parametrize("o_rotation", [False, True])
def test_functional_rotation_matches_quarot(family, calib, o_rotation):
    """With the initial Hadamards, the differentiable rotated weights are QuaRot's weights (same seeds), also with
    the rotation across heads applied after R2."""
    quarot = lowbit.quantize(tiny_model(family), Recipe.from_dict({"steps": [{"method": "quarot", "r3": False,
                                                                               "r4": False, "o_rotation": o_rotation}]}), seed=3)
    model = tiny_model(family)
    spec = spec_for(model)
    from lowbit.surgery.rotate import fold_norms, o_rotation_matrix, rotation_seeds
    from lowbit.surgery.spinquant import frozen_originals

    fold_norms(model, spec)
    rot = initial_rotations(model, spec, 3)
    if o_rotation:
        rot.o = o_rotation_matrix(model, rotation_seeds(model, spec, 3)).dense().float()
    rotated = rotated_parameters(frozen_originals(model, spec), spec, rot,
                                 model.config.hidden_size // model.config.num_attention_heads)
    params = dict(quarot.named_parameters())
    for name, value in rotated.items():
        assert torch.allclose(value, params[name], atol=1e-5), name


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama trained for a few seconds to memorise phrases (a random model's loss is flat: nothing to learn)."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(3)
    phrases = [torch.randint(0, 320, (16,), generator=gen) for _ in range(12)]
    stream = torch.cat([phrases[i] for i in torch.randint(0, 12, (600,), generator=gen)])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        starts = torch.randint(0, len(stream) - 65, (8,), generator=gen)
        batch = torch.stack([stream[s:s + 64] for s in starts])
        optimizer.zero_grad()
        model(batch, labels=batch).loss.backward()
        optimizer.step()
    model.eval().requires_grad_(False)
    return model, TokenData(eval_windows=stream[:96].view(2, 48), calib_tokens=stream[96:], seed=0)


def test_training_lowers_the_quantized_loss_and_keeps_the_model_invariant(trained):
    """With 2-bit activations (a large quantization loss) learning the rotations on one batch cuts its loss; the
    learned rotations are orthogonal and, folded into the full-precision model, change none of its outputs."""
    model, data = trained
    recipe = _recipe({"steps": 10, "lr": 1.5, "samples": 1, "seq_len": 64})
    recipe = recipe.updated(activations={**recipe.activations.model_dump(), "format": "int2"})
    progress, seen = recording_progress()
    _, session = lowbit.quantize_with_session(model, recipe, data, progress=progress)
    losses = session.get(RotationResult).details["losses"]
    assert len(losses) == 10 and losses[-1] < 0.75 * losses[0]
    shown = [float(s.removeprefix("loss ")) for d, s in seen if d == "learning rotations"]
    assert shown == pytest.approx(losses, abs=2e-3)  # the progress bar shows each step's loss
    assert session.get(RotationResult).details["max_orthogonality_error"] < 1e-5
    fp = lowbit.quantize(model, _recipe({"rotations": None}, activations=False).updated(
        steps=[{"method": "spinquant", "steps": 10, "lr": 1.5, "samples": 1, "seq_len": 64}]), data)
    from lowbit.pipeline import rotation_invariance

    learned = rotation_invariance(model, recipe, data, session.get(RotationResult).learned)
    assert learned["max_abs_logit_diff_vs_fp"] < 1e-4
    assert torch.allclose(_logits(fp, data.eval_windows), _logits(model, data.eval_windows), atol=1e-4)


def _interrupted(monkeypatch, recipe: Recipe, data) -> None:
    """Run ``recipe`` with training stopped by a KeyboardInterrupt at its third step, as a user's Ctrl-C would."""
    import lowbit.surgery.spinquant as sq

    real, calls = sq._train_step, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(sq, "_train_step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            lowbit.quantize(tiny_model("llama"), recipe, data)


def test_resume_after_interruption_and_load_saved_rotations(calib, tmp_path, monkeypatch):
    ckpt = tmp_path / "rot.safetensors"
    recipe = _recipe({"steps": 4, "lr": 1.0, "checkpoint": str(ckpt), "checkpoint_every": 2})
    whole = lowbit.quantize(tiny_model("llama"), recipe.updated(
        steps=[{**recipe.steps[0].model_dump(), "checkpoint": str(tmp_path / "whole.safetensors")}]), calib)
    _interrupted(monkeypatch, recipe, calib)
    _, meta = load_rotations(ckpt)
    assert meta["step"] == 1 and len(meta["losses"]) == 2
    resumed, session = lowbit.quantize_with_session(tiny_model("llama"), recipe, calib)
    assert len(session.get(RotationResult).details["losses"]) == 4
    assert torch.allclose(_logits(resumed, calib.eval_windows), _logits(whole, calib.eval_windows), atol=1e-5)
    loaded = lowbit.quantize(tiny_model("llama"), _recipe({"rotations": str(ckpt)}), calib)
    assert torch.allclose(_logits(loaded, calib.eval_windows), _logits(resumed, calib.eval_windows), atol=1e-5)


def test_o_rotation_learns_keeps_the_model_invariant_and_must_match_when_loaded(trained, tmp_path):
    """With the rotation across heads, learned R2s are folded before it (``W_o · R2 · Q``): the full-precision model
    is unchanged; rotations learned with it refuse a recipe without it."""
    model, data = trained
    ckpt = tmp_path / "rot.safetensors"
    recipe = _recipe({"steps": 3, "samples": 1, "seq_len": 64, "o_rotation": True, "checkpoint": str(ckpt)})
    _, session = lowbit.quantize_with_session(model, recipe, data)
    assert "o_proj input" in session.get(RotationResult).details and len(session.get(RotationResult).details["losses"]) == 3
    from lowbit.pipeline import rotation_invariance

    assert rotation_invariance(model, recipe, data, session.get(RotationResult).learned)["max_abs_logit_diff_vs_fp"] < 1e-4
    with pytest.raises(lowbit.LowbitError, match="o_rotation"):
        lowbit.quantize(model, _recipe({"rotations": str(ckpt)}), data)


def test_missing_rotations_file_is_named(calib, tmp_path):
    with pytest.raises(lowbit.LowbitError, match="not found"):
        lowbit.quantize(tiny_model("llama"), _recipe({"rotations": str(tmp_path / "nope.safetensors")}), calib)


def test_weight_only_training_fake_quantizes_the_rotated_weights(trained):
    """quantize_weights: the loss is the RTN-quantized model's, so it is above the full-precision one."""
    model, data = trained
    base = {"steps": 2, "lr": 0.5, "samples": 1, "seq_len": 64}
    weights = {"format": "int2", "symmetric": True, "granularity": "channel"}
    first_loss = []
    for steps in ({**base}, {**base, "quantize_weights": True}):
        recipe = Recipe.from_dict({"steps": [{"method": "spinquant", **steps}, {"method": "rtn"}], "weights": weights})
        _, session = lowbit.quantize_with_session(model, recipe, data)
        first_loss.append(session.get(RotationResult).details["losses"][0])
    assert first_loss[1] > 1.5 * first_loss[0]


def test_spinquant_presets_validate():
    from lowbit.recipe import load_preset

    for name in ("w4a4kv4-spinquant", "w4a4kv4-spinquant-paper", "w4a16-spinquant", "w4a4kv4-quarot-clips"):
        assert load_preset(name).steps[0].method == "spinquant"
    assert load_preset("w4a4kv4-spinquant").steps[0].learn == ["rotations", "clips"]
    assert load_preset("w4a4kv4-spinquant-paper").steps[0].learn == ["rotations"]
    assert load_preset("w4a4kv4-quarot-clips").steps[0].learn == ["clips"]
    paper, preset = load_preset("w4a4kv4-spinquant-paper"), load_preset("w4a4kv4-spinquant")
    same = ("weights", "activations", "kv", "calibration")  # the two differ only in what they learn
    assert all(getattr(paper, k) == getattr(preset, k) for k in same)


@pytest.mark.parametrize("weight_step", [{"method": "rtn"}, {"method": "blockwise", "epochs": 1, "samples": 2,
                                                                "seq_len": 32}])
def test_key_centre_mean_recipes_learn_rotations_and_fit_blocks(calib, weight_step):
    """KV4 around the calibrated mean key (``key_centre: mean``) while SpinQuant learns and while blocks are fitted:
    the training and block quantizers measure their centres on the calibration text (once they failed for want of
    it), and the final KV quantizers have theirs."""
    from lowbit.surgery.attention import KVQuantHook, attention_hooks

    recipe = Recipe.from_dict({
        "steps": [{"method": "spinquant", "steps": 2, "samples": 2, "seq_len": 32}, weight_step],
        "weights": {"format": "int4", "granularity": "channel"},
        "activations": {"format": "int4", "granularity": "token", "dynamic": True},
        "kv": {"format": "int4", "symmetric": False, "granularity": "head", "dynamic": True, "key_centre": "mean"}})
    model, session = lowbit.quantize_with_session(tiny_model("llama"), recipe, calib)
    hooks = [h for layer in model.model.layers for h in attention_hooks(layer.self_attn) if isinstance(h, KVQuantHook)]
    assert hooks and all(h.centre is not None for h in hooks)
    assert len(session.get(RotationResult).details["losses"]) == 2


def test_static_recipes_learn_through_dynamic_per_token_quantizers(calib):
    """A static recipe (per-tensor activations, per-head KV) learns its rotations with the same formats applied
    dynamically per token, then gets its static scales fitted once the rotations are folded in."""
    from lowbit.methods.spinquant import training_recipe
    from lowbit.surgery.quantizer import ActQuantizer

    static = Recipe.from_dict({
        "steps": [{"method": "spinquant", "steps": 2, "samples": 2, "seq_len": 32}, {"method": "rtn"}],
        "weights": {"format": "int4", "granularity": "channel"},
        "activations": {"format": "int4", "granularity": "tensor", "dynamic": False},
        "kv": {"format": "int4", "symmetric": False, "granularity": "head", "dynamic": False}})
    learning = training_recipe(static)
    assert learning.activations.dynamic and learning.activations.granularity == "token" and learning.kv.dynamic
    assert learning.activations.format == "int4" and training_recipe(learning) is learning
    model, session = lowbit.quantize_with_session(tiny_model("llama"), static, calib)
    quants = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    assert quants and all(q.static and q.calibrated for q in quants) and len(session.get(RotationResult).details["losses"]) == 2


def test_training_in_parts_with_stop_step_equals_one_run(trained):
    """``stop_step`` ends a call early and ``start_step`` continues the same cosine schedule: two calls, one run."""
    import copy

    from lowbit.methods.spinquant import prepare_training
    from lowbit.surgery.spinquant import (
        TrainConfig,
        frozen_originals,
        rotation_loss,
        train_rotations,
    )

    model, data = trained
    model = copy.deepcopy(model)
    spec, recipe = spec_for(model), _recipe({})
    prepare_training(model, spec, recipe, 0, True, True)
    batches, config = data.calibration(4, 32), TrainConfig(steps=6, lr=0.5)
    whole, parts = initial_rotations(model, spec, 0), initial_rotations(model, spec, 0)
    losses = train_rotations(model, spec, whole, batches, config)
    split = train_rotations(model, spec, parts, batches, config, stop_step=2)
    split += train_rotations(model, spec, parts, batches, config, start_step=2)
    assert len(split) == 6 and split == pytest.approx(losses, rel=1e-5)
    assert torch.allclose(whole.r1, parts.r1, atol=1e-6)
    with torch.no_grad():
        d = model.config.hidden_size // model.config.num_attention_heads
        held = rotation_loss(model, spec, whole, frozen_originals(model, spec), data.eval_windows, d)
    assert torch.isfinite(held) and held > 0


def test_scale_grad_adds_the_scales_gradient_and_restores_the_quantizers(trained):
    """With ``scale_grad`` the rotations' gradient also carries the dynamic scales' part (so it differs from the
    detached straight-through one) and every quantizer's flag is back to off once the loss is computed."""
    import copy

    from lowbit.methods.spinquant import prepare_training
    from lowbit.surgery.quantizer import ActQuantizer
    from lowbit.surgery.spinquant import frozen_originals, rotation_loss

    model, data = trained
    model = copy.deepcopy(model)
    spec = spec_for(model)
    prepare_training(model, spec, _recipe({}), 0, True, True)
    originals, d = frozen_originals(model, spec), model.config.hidden_size // model.config.num_attention_heads
    grads = {}
    for on in (True, False):
        rot = initial_rotations(model, spec, 0)
        with torch.enable_grad():
            rotation_loss(model, spec, rot, originals, data.calibration(2, 32), d, scale_grad=on).backward()
        grads[on] = rot.r1.grad.clone()
        assert not any(q.scale_grad for q in model.modules() if isinstance(q, ActQuantizer))
    assert not torch.allclose(grads[True], grads[False], rtol=1e-3, atol=1e-6)


def test_bf16_autocast_training_learns_and_keeps_float32_rotations(trained):
    """``autocast: bf16`` trains under bfloat16 autocast: the loss still falls, the rotations stay float32 and
    orthogonal; an unknown autocast value is refused by the recipe."""
    model, data = trained
    recipe = _recipe({"steps": 10, "lr": 1.5, "samples": 1, "seq_len": 64, "autocast": "bf16"})
    recipe = recipe.updated(activations={**recipe.activations.model_dump(), "format": "int2"})
    _, session = lowbit.quantize_with_session(model, recipe, data)
    losses, rot = session.get(RotationResult).details["losses"], session.get(RotationResult).learned
    assert len(losses) == 10 and losses[-1] < 0.85 * losses[0]
    assert rot.r1.dtype == torch.float32 and session.get(RotationResult).details["max_orthogonality_error"] < 1e-5
    from lowbit.errors import RecipeError

    with pytest.raises(RecipeError, match="autocast"):
        _recipe({"autocast": "fp16"})


def test_kl_loss_is_zero_without_quantizers_and_learns_with_them(trained):
    """``loss: kl`` measures the quantized model against the full-precision one: with every quantizer off it is 0
    at any rotation (invariance), with 2-bit activations it is positive, training lowers it, and the quantizers are
    left on."""
    import copy

    from lowbit.methods.spinquant import prepare_training
    from lowbit.surgery.quantizer import ActQuantizer
    from lowbit.surgery.spinquant import frozen_originals, rotation_loss

    model, data = trained
    recipe = _recipe({"steps": 10, "lr": 1.5, "samples": 1, "seq_len": 64, "loss": "kl"})
    recipe = recipe.updated(activations={**recipe.activations.model_dump(), "format": "int2"})
    prepared = copy.deepcopy(model)
    spec = spec_for(prepared)
    prepare_training(prepared, spec, recipe, 0, True, True)
    originals, d = frozen_originals(prepared, spec), prepared.config.hidden_size // prepared.config.num_attention_heads
    quantizers = [q for q in prepared.modules() if isinstance(q, ActQuantizer)]
    tokens = data.calibration(2, 32)
    with torch.no_grad():
        quantized = rotation_loss(prepared, spec, initial_rotations(prepared, spec, 0), originals, tokens, d, loss="kl")
        assert all(q.enabled for q in quantizers)
        for q in quantizers:
            q.enabled = False
        off = rotation_loss(prepared, spec, initial_rotations(prepared, spec, 5), originals, tokens, d, loss="kl")
    assert abs(float(off)) < 1e-5 and float(quantized) > 0.01
    with pytest.raises(ValueError, match="'ce' or 'kl'"):
        rotation_loss(prepared, spec, initial_rotations(prepared, spec, 0), originals, tokens, d, loss="mse")
    _, session = lowbit.quantize_with_session(model, recipe, data)
    losses = session.get(RotationResult).details["losses"]
    assert len(losses) == 10 and losses[-1] < 0.75 * losses[0]


def _int2(steps: dict) -> Recipe:
    recipe = _recipe({"samples": 1, "seq_len": 64, **steps})
    return recipe.updated(activations={**recipe.activations.model_dump(), "format": "int2"})


def test_learned_clips_lower_the_loss_and_reach_the_final_quantizers(trained):
    """``learn: [clips]`` keeps QuaRot's Hadamards and trains one clip ratio per quantizer: the loss falls, the
    ratios move off the scheme's and stay in (0.5, 1), and the recipe's final quantizers carry exactly them."""
    from lowbit.surgery.quantizer import ActQuantizer

    model, data = trained
    quantized, session = lowbit.quantize_with_session(model, _int2({"steps": 10, "learn": ["clips"], "clip_lr": 0.2}), data)
    losses, rot = session.get(RotationResult).details["losses"], session.get(RotationResult).learned
    assert len(losses) == 10 and losses[-1] < 0.9 * losses[0]
    assert torch.equal(rot.r1, initial_rotations(model, spec_for(model), 0).r1)  # rotations not learned
    assert "not learned" in session.get(RotationResult).details["R1"]
    learned = rot.clips.ratios()
    final = {q.name: q.scheme.clip_ratio for q in quantized.modules() if isinstance(q, ActQuantizer)}
    assert final == learned and len(final) == 2 * 7 + 2 * 2  # 7 linears and K, V in each of the 2 layers
    values = torch.tensor(list(learned.values()))
    assert (values > 0.5).all() and (values < 1).all() and (values - 0.9).abs().max() > 0.05
    assert session.get(RotationResult).details["clip_ratios"]["learned"] == len(final)


def test_joint_learning_moves_both_and_a_static_recipe_refuses_clips(trained):
    """Rotations and clips learn together (both change, the model stays invariant in full precision); clips need
    dynamic quantizers."""
    from lowbit.errors import RecipeError
    from lowbit.pipeline import rotation_invariance

    model, data = trained
    recipe = _int2({"steps": 6, "lr": 1.5, "learn": ["rotations", "clips"], "clip_lr": 0.2})
    _, session = lowbit.quantize_with_session(model, recipe, data)
    rot = session.get(RotationResult).learned
    assert not torch.allclose(rot.r1, initial_rotations(model, spec_for(model), 0).r1, atol=1e-3)
    assert session.get(RotationResult).details["losses"][-1] < 0.9 * session.get(RotationResult).details["losses"][0]
    assert min(rot.clips.ratios().values()) < 0.89 or max(rot.clips.ratios().values()) > 0.91
    assert rotation_invariance(model, recipe, data, rot)["max_abs_logit_diff_vs_fp"] < 1e-4
    with pytest.raises(RecipeError, match="dynamic"):
        recipe.updated(activations={**recipe.activations.model_dump(), "granularity": "tensor", "dynamic": False})


def test_clips_resume_exactly_and_load_from_the_rotations_file(calib, tmp_path, monkeypatch):
    """Interrupted clip learning resumes with its Adam state (the same clips as one run); a saved file gives the
    same quantized model without training, and a file without clips is refused by a step that learns them."""
    ckpt = tmp_path / "rot.safetensors"
    steps = {"steps": 4, "lr": 1.0, "learn": ["rotations", "clips"], "clip_lr": 0.1, "checkpoint_every": 1}
    whole, whole_info = lowbit.quantize_with_session(tiny_model("llama"), _recipe({**steps, "checkpoint": str(tmp_path / "w.safetensors")}),
                            calib)
    _interrupted(monkeypatch, _recipe({**steps, "checkpoint": str(ckpt)}), calib)
    resumed, session = lowbit.quantize_with_session(tiny_model("llama"), _recipe({**steps, "checkpoint": str(ckpt)}), calib)
    assert len(session.get(RotationResult).details["losses"]) == 4
    assert torch.allclose(session.get(RotationResult).learned.clips.logits, whole_info.get(RotationResult).learned.clips.logits,
                          atol=1e-6)
    assert torch.allclose(_logits(resumed, calib.eval_windows), _logits(whole, calib.eval_windows), atol=1e-5)
    loaded = lowbit.quantize(tiny_model("llama"), _recipe({"rotations": str(ckpt), "learn": ["rotations", "clips"]}),
                             calib)
    assert torch.allclose(_logits(loaded, calib.eval_windows), _logits(resumed, calib.eval_windows), atol=1e-5)
    plain = tmp_path / "plain.safetensors"
    lowbit.quantize(tiny_model("llama"), _recipe({"steps": 1, "checkpoint": str(plain)}), calib)
    with pytest.raises(lowbit.LowbitError, match="no learned clip ratios"):
        lowbit.quantize(tiny_model("llama"), _recipe({"rotations": str(plain), "learn": ["clips"]}), calib)


def test_learned_clips_reach_the_quantizers_of_a_prefixed_model(calib):
    """With a PrefixQuant prefix after the clips are learned, the prefixed model's quantizers still carry them."""
    from lowbit.surgery.prefix import prefix_tokens
    from lowbit.surgery.quantizer import ActQuantizer

    recipe = _recipe({"steps": 2, "learn": ["clips"]}).updated(
        steps=[{"method": "spinquant", "steps": 2, "samples": 4, "seq_len": 32, "learn": ["clips"]},
               {"method": "prefix", "tokens": [5]}])
    model, session = lowbit.quantize_with_session(tiny_model("llama"), recipe, calib)
    final = {q.name: q.scheme.clip_ratio for q in model.modules() if isinstance(q, ActQuantizer)}
    assert prefix_tokens(model) and final == session.get(RotationResult).learned.clips.ratios()
