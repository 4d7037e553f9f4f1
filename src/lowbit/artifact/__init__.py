"""Saved quantized models: :func:`save` writes a folder, :func:`load` rebuilds the model from it (see ``save.py``)."""

from .load import load, read_manifest
from .save import save

__all__ = ["load", "read_manifest", "save"]
