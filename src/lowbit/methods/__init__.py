"""Methods: one module per quantization method, each a typed step config, an ``apply`` and a typed result.

- :mod:`.quarot` — QuaRot's seeded random Hadamard rotations (phase ``rotation``).
- :mod:`.spinquant` — SpinQuant's learned rotations, optionally with learned clip ratios (``rotation``).
- :mod:`.qk_balance` — query/key energies balanced per RoPE pair before a KV key codec (``balance``).
- :mod:`.prefix` — PrefixQuant's full-precision prefix of outlier tokens (``prefix``).
- :mod:`.rtn` — round-to-nearest weights (``weights``).
- :mod:`.gptq` — GPTQ weights, layer-streamed (``weights``).
- :mod:`.blockwise` — block-wise static-scale search and fine-tuning (``weights``).

Adding a method is one module here that registers itself (see :mod:`.registry`): every module of this package is
imported below, and the recipe's step union, its order rule and the report section all follow from the registry.
"""

import importlib
import pkgutil

from .registry import PHASES, MethodResult, StepConfig, method_for, registered
from .session import Calibration, Prefix, Session

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")  # each method module registers itself

__all__ = ["PHASES", "Calibration", "MethodResult", "Prefix", "Session", "StepConfig", "method_for", "registered"]
