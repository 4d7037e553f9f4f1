"""The shared training loop, its schedule, the checkpoint helper and the layer streamer."""

import itertools

import pytest
import torch

from lowbit.models.arch import decoder_layers, spec_for
from lowbit.surgery.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from lowbit.surgery.sequential import LayerStream
from lowbit.surgery.train import Trainer, cosine
from tests.conftest import tiny_model


def test_cosine_without_warmup_decays_from_one_and_with_warmup_rises_first():
    assert [cosine(i, 4) for i in range(5)] == pytest.approx([1, 0.5 + 0.5 ** 0.5 / 2, 0.5, 0.5 - 0.5 ** 0.5 / 2, 0])
    warm = [cosine(i, 10, warmup=2) for i in range(10)]
    assert warm[:2] == [0.5, 1.0] and warm[2] == 1.0 and all(a > b for a, b in itertools.pairwise(warm[2:]))
    assert cosine(0, 0) == 1.0  # no division by zero for an empty schedule


def _quadratic(seed: int = 0) -> tuple[torch.nn.Parameter, torch.optim.Optimizer, torch.Tensor]:
    target = torch.randn(8, generator=torch.Generator().manual_seed(seed))
    x = torch.nn.Parameter(torch.zeros(8))
    return x, torch.optim.Adam([x], lr=0.1), target


def test_trainer_sets_each_groups_scheduled_rate_and_calls_hooks_in_order():
    x, optimizer, target = _quadratic()
    events, rates = [], []

    def loss_at(step: int) -> torch.Tensor:
        events.append(("loss", step))
        rates.append(optimizer.param_groups[0]["lr"])
        return (x - target).square().sum()

    def after_backward(loss: torch.Tensor) -> torch.Tensor:
        events.append(("grad", x.grad is not None))
        return loss * 0 + 7.0  # the loss to report

    trainer = Trainer([optimizer], 4, after_backward=after_backward, after_step=lambda: events.append(("step",)))
    losses = trainer.run(loss_at, on_step=lambda step, seen: events.append(("on_step", step, len(seen))))
    assert losses == [7.0] * 4 and rates == pytest.approx([0.1 * cosine(i, 4) for i in range(4)])
    assert events[:4] == [("loss", 0), ("grad", True), ("step",), ("on_step", 0, 1)] and len(events) == 16


def test_trainer_in_two_parts_equals_one_run_and_ticks_progress():
    whole, optimizer, target = _quadratic()
    one = Trainer([optimizer], 6).run(lambda _: (whole - target).square().sum())
    part, optimizer, _ = _quadratic()
    trainer = Trainer([optimizer], 6)
    ticks = []

    def progress(label: str, total: int):
        ticks.append((label, total))
        return lambda status: ticks.append(status)

    two = trainer.run(lambda _: (part - target).square().sum(), stop=2, progress=progress, label="fitting")
    two += trainer.run(lambda _: (part - target).square().sum(), start=2)
    assert two == one and torch.equal(part, whole) and one[-1] < one[0]
    assert ticks[0] == ("fitting", 2) and ticks[1].startswith("loss ") and len(ticks) == 3


def test_trainer_runs_with_gradients_under_no_grad():
    x, optimizer, target = _quadratic()
    with torch.no_grad():
        Trainer([optimizer], 1).run(lambda _: (x - target).square().sum())
    assert x.abs().sum() > 0


def test_checkpoint_loads_only_with_a_matching_fingerprint(tmp_path):
    path = tmp_path / "sub" / "ckpt.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int8)}
    save_checkpoint(path, tensors, {"seed": 1, "learn": ["x"], "step": 3})
    loaded, meta = load_checkpoint(path, {"seed": 1, "learn": ("x",)})  # compared as stored: a tuple is a list
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items()) and meta["step"] == 3
    assert load_checkpoint(path, {"seed": 2}) is None and load_checkpoint(tmp_path / "none", {}) is None
    assert load_checkpoint(None, {}) is None and read_checkpoint(path)[1] == meta
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.safetensors"]  # no temporary file left behind


def test_committed_spinquant_rotations_still_load_as_saved():
    """The checkpoint helper reads the committed rotations file: the same tensors as safetensors itself gives."""
    from pathlib import Path

    from safetensors.torch import load_file

    from lowbit.methods.spinquant import load_rotations

    path = Path(__file__).parents[1] / "benchmarks" / "results" / "w4a4kv4-spinquant-rotations.safetensors"
    if not path.is_file():
        pytest.skip("committed rotations file not present")
    raw = load_file(str(path))
    rot, meta = load_rotations(path)
    assert torch.equal(rot.r1, raw["r1"]) and len(rot.r2) == sum(k.startswith("r2.") for k in raw)
    assert all(torch.equal(r, raw[f"r2.{i}"]) for i, r in enumerate(rot.r2)) and "step" in meta
    if "clip_logits" in raw:
        assert torch.equal(rot.clips.logits, raw["clip_logits"]) and len(rot.clips.names) == len(raw["clip_logits"])


def test_two_streams_carry_full_precision_and_perturbed_inputs_through_the_layers():
    """Each stream flows through the layers independently; a callback may return its own outputs per stream."""
    model = tiny_model("llama")
    spec = spec_for(model)
    samples = torch.randint(0, 320, (3, 10), generator=torch.Generator().manual_seed(0))
    stream = LayerStream(model, spec, samples, streams=2, batch_size=2)
    seen = []

    def on_layer(current):
        seen.append((current.index, [h.clone() for h in current.inputs]))
        fp, other = current.inputs
        return [current.run(fp), current.run(other) * 0.5] if current.index == 0 else None

    with torch.no_grad():
        stream.walk(on_layer)
        hidden = model(samples, output_hidden_states=True).hidden_states
    assert [i for i, _ in seen] == list(range(len(decoder_layers(model, spec))))
    fp, half = seen[1][1]
    assert torch.allclose(fp, hidden[1], atol=1e-5) and torch.allclose(half, hidden[1] * 0.5, atol=1e-5)
    assert torch.equal(*seen[0][1])  # both streams start from the same embeddings


def test_a_callback_returning_the_wrong_number_of_streams_is_an_error():
    model = tiny_model("llama")
    stream = LayerStream(model, spec_for(model), torch.randint(0, 320, (2, 8)), streams=2)
    with torch.no_grad(), pytest.raises(ValueError, match="1 outputs for 2 streams"):
        stream.walk(lambda current: [current.run(current.inputs[0])])
