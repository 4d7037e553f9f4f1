"""lowbit: quantize LLM weights, activations and KV cache to 4 bits and below, measured against full precision.

Layers, from the bottom: :mod:`lowbit.quant` (pure quantizer math), :mod:`lowbit.models` (architectures as data,
offline loading), :mod:`lowbit.surgery` (the only code that mutates models), :mod:`lowbit.methods` (one module per method),
:mod:`lowbit.recipe` (what to do), :mod:`lowbit.apply` (a recipe onto a model), :mod:`lowbit.pipeline`
(load → quantize → evaluate → report) and :mod:`lowbit.cli` (a thin shell over it). ARCHITECTURE.md has the rule.
"""

from . import kv
from .apply import quantize, quantize_with_session
from .artifact import load, save
from .data import DataConfig, prepare_data
from .errors import LowbitError
from .evaluate import evaluate
from .models.loading import load_model
from .pipeline import run
from .recipe import Recipe, load_recipe, preset_names
from .version import __version__  # noqa: F401 (public)

__all__ = [
    "DataConfig",
    "LowbitError",
    "Recipe",
    "evaluate",
    "kv",
    "load",
    "load_model",
    "load_recipe",
    "prepare_data",
    "preset_names",
    "quantize",
    "quantize_with_session",
    "run",
    "save",
]
