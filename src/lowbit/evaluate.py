"""Perplexity, KL divergence from the full-precision model, and top-1 agreement, streamed window by window.

Per window of ``L`` tokens both models predict tokens ``1..L-1`` from their prefixes; for each position we add the
target's negative log-likelihood (both models), ``KL(p_fp || p_q)`` of the next-token distributions, and whether
their arg-max tokens agree. Only running sums are kept, so memory does not grow with the number of windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EvalResult:
    """Aggregates over every predicted token of every window."""

    fp_ppl: float
    ppl: float
    kl_vs_fp: float
    top1_agreement: float
    tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Sums:
    nll_fp: float = 0.0
    nll_q: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0


def _log_probs(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities ``[L-1, vocab]`` (float32) of one window ``[L]``."""
    logits = model(window.unsqueeze(0), use_cache=False).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def evaluate(
    fp_model: nn.Module,
    model: nn.Module,
    windows: torch.Tensor,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
) -> EvalResult:
    """Compare ``model`` against ``fp_model`` on token windows ``[n, L]`` (the same object is evaluated once)."""
    sums = _Sums()
    tick = progress("evaluating", len(windows)) if progress else (lambda: None)
    for window in windows:
        targets = window[1:]
        lp_fp = _log_probs(fp_model, window)
        lp_q = lp_fp if model is fp_model else _log_probs(model, window)
        sums.nll_fp -= lp_fp.gather(-1, targets[:, None]).sum().item()
        sums.nll_q -= lp_q.gather(-1, targets[:, None]).sum().item()
        sums.kl += F.kl_div(lp_q, lp_fp, log_target=True, reduction="sum").item() if lp_q is not lp_fp else 0.0
        sums.agree += (lp_fp.argmax(-1) == lp_q.argmax(-1)).sum().item()
        sums.tokens += targets.numel()
        tick()
    n = sums.tokens
    return EvalResult(
        fp_ppl=math.exp(sums.nll_fp / n),
        ppl=math.exp(min(sums.nll_q / n, 700.0)),
        kl_vs_fp=sums.kl / n,
        top1_agreement=sums.agree / n,
        tokens=n,
    )
