"""QAT scales out with torch.distributed: 2 gloo processes with 1 sequence each take the steps of one process with
2 sequences per step (the trained weights' gradients averaged), and end with the same model."""

from functools import partial

import pytest
import torch

import lowbit
from lowbit.data import TokenData
from lowbit.recipe import Recipe
from tests.conftest import on_gloo_processes, tiny_model


def _data() -> TokenData:
    g = torch.Generator().manual_seed(7)
    return TokenData(eval_windows=torch.randint(0, 320, (1, 32), generator=g),
                     calib_tokens=torch.randint(0, 320, (3000,), generator=g), seed=0)


def _train(batch: int, steps: int = 3, train: str = "weights") -> tuple[torch.Tensor, list[float]]:
    """Every quantized weight of the trained model, flattened into one tensor, and the step losses."""
    recipe = Recipe.from_dict({
        "steps": [{"method": "rtn"}, {"method": "qat", "steps": steps, "samples": 8, "seq_len": 32, "batch": batch,
                                      "holdout": 2, "eval_every": 2, "lr_weight": 0.5,
                                      "lr_scale": 0.05 if train == "scales" else 0.001,
                                      "train": train}],
        "weights": {"format": "int4", "granularity": "channel"},
        "activations": {"format": "int8", "granularity": "token", "dynamic": True},
    })
    model, session = lowbit.quantize_with_session(tiny_model("llama"), recipe, _data())
    weights = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "proj" in n])
    return weights, session.report()["qat"]["losses"]


def _both_runs(train: str) -> dict:
    first, _ = _train(batch=1, steps=1, train=train)
    weights, losses = _train(batch=1, train=train)
    return {"first": first, "weights": weights, "losses": losses}


@pytest.mark.parametrize("train", ["weights", "scales"])
def test_two_processes_equal_one_process_with_the_joint_batch(train, tmp_path):
    ranks = on_gloo_processes(tmp_path, partial(_both_runs, train))
    single_first, _ = _train(batch=2, steps=1, train=train)
    _, single_losses = _train(batch=2, train=train)
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])  # every process took the same steps
    if train == "weights":  # one step: the averaged gradient is the joint batch's, so the rounded weights agree
        assert (ranks[0]["first"] != single_first).float().mean() < 1e-3  # but for a rare tie
    else:  # the codes stay; each scale differs from the joint batch's by float32 rounding of the averaged gradient
        assert torch.allclose(ranks[0]["first"], single_first, rtol=1e-5, atol=0)
    assert all(abs(a - b) < 1e-3 for a, b in zip(ranks[0]["losses"], single_losses, strict=True))
