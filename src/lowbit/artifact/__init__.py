"""Saved quantized models: :func:`save` writes a folder, :func:`load` rebuilds the model from it (see ``save.py``)."""

from .files import check_new_folder
from .load import load, load_tokenizer, read_config, read_manifest
from .save import check_savable, save

__all__ = ["check_new_folder", "check_savable", "load", "load_tokenizer", "read_config", "read_manifest", "save"]
