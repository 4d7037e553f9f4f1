"""Evaluation: exact identities and streaming."""

import math

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.evaluate import evaluate, reference_log_probs
from tests.conftest import tiny_model


def test_model_against_itself_is_exact(tokens):
    model = tiny_model("llama")
    result = evaluate(model, model, tokens)
    assert result.ppl == result.fp_ppl and result.kl_vs_fp == 0 and result.top1_agreement == 1
    assert result.tokens == tokens.numel() - tokens.shape[0]


def test_matches_a_direct_computation(tokens):
    fp, q = tiny_model("llama"), lowbit.quantize(tiny_model("llama"), "w4a4-rtn")
    result = evaluate(fp, q, tokens)
    with torch.no_grad():
        lp, lq = (F.log_softmax(m(tokens).logits[:, :-1].float(), -1) for m in (fp, q))
    targets = tokens[:, 1:]
    nll = -lq.gather(-1, targets[..., None]).mean()
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    agree = (lp.argmax(-1) == lq.argmax(-1)).float().mean()
    assert result.ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert result.kl_vs_fp == pytest.approx(kl.item(), rel=1e-4)
    assert result.top1_agreement == pytest.approx(agree.item())
    assert result.kl_vs_fp > 0


def test_one_window_at_a_time():
    """The model never sees more than one window per call, so memory does not grow with the window count."""
    model = tiny_model("llama")
    shapes = []
    handle = model.register_forward_pre_hook(lambda m, args, kw: shapes.append(kw["input_ids"].shape
                                                                               if "input_ids" in kw else args[0].shape),
                                             with_kwargs=True)
    windows = torch.randint(0, 320, (5, 16))
    evaluate(model, model, windows)
    handle.remove()
    assert shapes == [torch.Size([1, 16])] * 5


def test_cached_reference_gives_the_same_result_without_running_fp(tokens):
    """Precomputed FP log-probabilities give exactly the live result, and the FP model is not run again."""
    fp, q = tiny_model("llama"), lowbit.quantize(tiny_model("llama"), "w4a4-rtn")
    live = evaluate(fp, q, tokens)
    reference = reference_log_probs(fp, tokens)
    calls = []
    handle = fp.register_forward_pre_hook(lambda *a: calls.append(1))
    cached = evaluate(fp, q, tokens, reference=reference)
    handle.remove()
    assert not calls
    assert (cached.ppl, cached.kl_vs_fp, cached.top1_agreement) == (live.ppl, live.kl_vs_fp, live.top1_agreement)
    with pytest.raises(ValueError, match="reference has 1 windows"):
        evaluate(fp, q, tokens, reference=reference[:1])
