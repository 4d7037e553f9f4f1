"""A learnable clip ratio: an unconstrained logit mapped smoothly into ``(CLIP_FLOOR, 1)``.

Learnable clipping (OmniQuant's LWC/LAC, OSTQuant) trains how far a quantizer shrinks its observed range. Training
the ratio itself needs a projection back into range after every step; a sigmoid of a free parameter stays in range
by construction and its gradient vanishes smoothly at both ends, so an optimizer such as Adam can drive it freely.
The floor keeps at least half of the range: below it, clipping error dominates for every tensor we quantize.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CLIP_FLOOR = 0.5
CLIP_START_MAX = 0.99  # a ratio of 1 (no clipping) has an infinite logit: learning starts just below it


def clip_from_logit(theta: Tensor) -> Tensor:
    """The clip ratio ``CLIP_FLOOR + (1 - CLIP_FLOOR) * sigmoid(theta)``, differentiable in ``theta``."""
    return CLIP_FLOOR + (1.0 - CLIP_FLOOR) * torch.sigmoid(theta)


def logit_from_clip(ratio: float) -> float:
    """The logit whose clip ratio is ``ratio`` (the inverse of :func:`clip_from_logit`), ``ratio`` in
    ``(CLIP_FLOOR, 1]``; ratios above ``CLIP_START_MAX`` start at it."""
    if not CLIP_FLOOR < ratio <= 1.0:
        raise ValueError(f"a learnable clip ratio starts in ({CLIP_FLOOR}, 1], got {ratio}")
    p = (min(ratio, CLIP_START_MAX) - CLIP_FLOOR) / (1.0 - CLIP_FLOOR)
    return math.log(p / (1.0 - p))
