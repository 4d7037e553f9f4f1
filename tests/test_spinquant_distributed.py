"""SpinQuant scales out with torch.distributed: 2 gloo processes with 1 sample each take exactly the steps of one
process with 2 samples per step (gradients of the rotations and clip logits averaged), and end with identical
rotations and clips."""

import torch

import lowbit
from lowbit.data import TokenData
from lowbit.methods.quarot import RotationResult
from lowbit.recipe import Recipe
from tests.conftest import on_gloo_processes, tiny_model


def _data() -> TokenData:
    g = torch.Generator().manual_seed(7)
    return TokenData(eval_windows=torch.randint(0, 320, (1, 32), generator=g),
                     calib_tokens=torch.randint(0, 320, (3000,), generator=g), seed=0)


def _recipe(batch: int, steps: int) -> Recipe:
    return Recipe.from_dict({
        "steps": [{"method": "spinquant", "steps": steps, "lr": 1.0, "samples": 6, "seq_len": 32, "batch": batch,
                   "learn": ["rotations", "clips"]}],
        "activations": {"format": "int4", "granularity": "token", "dynamic": True},
    })


def _learn(batch: int, steps: int = 3) -> tuple[torch.Tensor, list[float]]:
    """R1 and the clip logits side by side (one tensor), and the losses."""
    _, session = lowbit.quantize_with_session(tiny_model("llama"), _recipe(batch, steps), _data())
    rot = session.get(RotationResult).learned
    return torch.cat([rot.r1.detach().flatten(), rot.clips.logits.detach()]), session.get(RotationResult).details["losses"]


def _both_runs() -> dict:
    first, _ = _learn(batch=1, steps=1)
    r1, losses = _learn(batch=1)
    return {"first": first, "r1": r1, "losses": losses}


def test_two_processes_equal_one_process_with_the_joint_batch(tmp_path):
    ranks = on_gloo_processes(tmp_path, _both_runs)
    single_first, _ = _learn(batch=2, steps=1)
    single_r1, single_losses = _learn(batch=2)
    assert torch.equal(ranks[0]["r1"], ranks[1]["r1"])  # every process took the same steps
    assert torch.allclose(ranks[0]["first"], single_first, atol=1e-6)  # the averaged gradient is the joint batch's
    # Later steps: one batch of 2 and two batches of 1 sum in different orders, and a last-bit difference can flip
    # an int4 rounding and move the next step slightly (about 1e-4 after 3 steps), so only the losses are compared.
    assert all(abs(a - b) < 1e-3 for a, b in zip(ranks[0]["losses"], single_losses, strict=True))
