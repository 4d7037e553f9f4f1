"""Perplexity, KL divergence from the full-precision model, and top-1 agreement, streamed window by window.

Per window of ``L`` tokens both models predict tokens ``1..L-1`` from their prefixes; for each position we add the
target's negative log-likelihood (both models), ``KL(p_fp || p_q)`` of the next-token distributions, and whether
their arg-max tokens agree. Only running sums are kept, so memory does not grow with the number of windows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError


@dataclass
class EvalResult:
    """Aggregates over every predicted token of every window."""

    fp_ppl: float
    ppl: float
    kl_vs_fp: float
    top1_agreement: float
    tokens: int
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Sums:
    nll_fp: float = 0.0
    nll_q: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0
    seconds: float = 0.0


def _log_probs(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities ``[L-1, vocab]`` (float32) of one window ``[L]``."""
    logits = model(window.unsqueeze(0), use_cache=False).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def reference_log_probs(fp_model: nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    """The full-precision model's next-token log-probabilities per window, to evaluate many models one at a time.

    Costs ``n * (L-1) * vocab * 4`` bytes (2.4 GB for 6 windows of 2048 tokens and a 49k vocabulary).
    """
    return [_log_probs(fp_model, window) for window in windows]


@torch.no_grad()
def evaluate_many(
    fp_model: nn.Module,
    models: dict[str, nn.Module],
    windows: torch.Tensor,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    reference: list[torch.Tensor] | None = None,
) -> dict[str, EvalResult]:
    """Compare several models against ``fp_model`` on token windows ``[n, L]``, running the reference once per window.

    A model that *is* ``fp_model`` is not run again (its KL is exactly 0). ``reference``, from
    :func:`reference_log_probs` on the same windows, replaces running ``fp_model`` at all.
    """
    if reference is not None and len(reference) != len(windows):
        raise ValueError(f"reference has {len(reference)} windows, expected {len(windows)}")
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise DataError(f"evaluation needs token windows [n >= 1, L >= 2], got {shape}: pass "
                        "prepare_data(...).eval_windows")
    sums = {name: _Sums() for name in models}
    tick = progress("evaluating", len(windows) * (1 + len(models))) if progress else (lambda: None)
    for i, window in enumerate(windows):
        targets = window[1:, None]
        lp_fp = reference[i] if reference is not None else _log_probs(fp_model, window)
        nll_fp, top_fp = -lp_fp.gather(-1, targets).sum().item(), lp_fp.argmax(-1)
        tick()
        for name, model in models.items():
            s, start = sums[name], time.perf_counter()
            lp_q = lp_fp if model is fp_model else _log_probs(model, window)
            s.seconds += time.perf_counter() - start
            s.nll_fp += nll_fp
            s.nll_q -= lp_q.gather(-1, targets).sum().item()
            s.kl += 0.0 if lp_q is lp_fp else F.kl_div(lp_q, lp_fp, log_target=True, reduction="sum").item()
            s.agree += (top_fp == lp_q.argmax(-1)).sum().item()
            s.tokens += targets.numel()
            del lp_q
            tick()
    return {name: _result(s) for name, s in sums.items()}


def evaluate(
    fp_model: nn.Module,
    model: nn.Module,
    windows: torch.Tensor,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    reference: list[torch.Tensor] | None = None,
) -> EvalResult:
    """Compare ``model`` against ``fp_model`` on token windows ``[n, L]`` (the same object is evaluated once)."""
    return evaluate_many(fp_model, {"model": model}, windows, progress, reference)["model"]


def _result(s: _Sums) -> EvalResult:
    return EvalResult(
        fp_ppl=math.exp(s.nll_fp / s.tokens),
        ppl=math.exp(min(s.nll_q / s.tokens, 700.0)),
        kl_vs_fp=s.kl / s.tokens,
        top1_agreement=s.agree / s.tokens,
        tokens=s.tokens,
        seconds=s.seconds,
    )
