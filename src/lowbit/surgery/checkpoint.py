"""Resumable checkpoints: safetensors files whose metadata fingerprints the settings that wrote them.

SpinQuant's rotations, block-wise reconstruction's finished layers and QAT's training state save the same way: the
tensors, plus a JSON object under the ``lowbit`` metadata key holding the run's fingerprint (the settings a resumed
run must share) and any progress (step, losses). Writes are atomic, so an interrupted save never replaces a good
checkpoint; a run loads a checkpoint only when every fingerprint entry matches, so changed settings start afresh
instead of resuming someone else's work, and says so (a warning naming what differs).

A fingerprint binds the checkpoint to everything that changes its result: the step's settings and seed, a digest of
the model's weights as the step receives them (:func:`model_digest`: another model, even with the same recipe, never
receives these weights) and a digest of the calibration samples (:func:`tensor_digest`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import LowbitWarning
from ..report import check_output_file, save_tensors_atomic


def save_checkpoint(path: str | Path, tensors: dict[str, Tensor], meta: dict) -> Path:
    """Write ``tensors`` with ``meta`` (the fingerprint and any progress, JSON) atomically to ``path``."""
    return save_tensors_atomic(path, tensors, meta)


def check_checkpoint_path(path: str | Path) -> None:
    """Refuse, before a step's work starts, a checkpoint path no file can be written to (a folder, a device, a link,
    a read-only place), so a long run never fails at its first save."""
    check_output_file(path)


def read_metadata(path: str | Path) -> dict:
    """The JSON metadata of the checkpoint at ``path`` (only the file's header is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("lowbit", "{}"))


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Every tensor and the metadata of the checkpoint at ``path``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    return tensors, read_metadata(path)


def _digest(named: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 (16 hex digits) of named tensors: names, dtypes, shapes and bytes (only names and shapes of tensors
    on the meta device, whose values live elsewhere)."""
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        if tensor.device.type != "meta":
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def tensor_digest(tensor: Tensor) -> str:
    """Digest of one tensor (e.g. the calibration samples a step trains on)."""
    return _digest([("tensor", tensor)])


def model_digest(model: nn.Module) -> str:
    """Digest of a model's parameters as they are now (what a checkpointed step starts from)."""
    return _digest(model.named_parameters())


def differing(meta: dict, fingerprint: dict) -> list[str]:
    """The entries of ``fingerprint`` that ``meta`` lacks or holds with another value, compared as stored (JSON)."""
    stored = json.loads(json.dumps(fingerprint))
    return [key for key, value in stored.items() if meta.get(key) != value]


def fingerprint_matches(meta: dict, fingerprint: dict) -> bool:
    """Whether ``meta`` holds every entry of ``fingerprint`` with the same value, compared as stored (JSON)."""
    return not differing(meta, fingerprint)


def load_checkpoint(path: str | Path | None, fingerprint: dict,
                    warn: bool = True) -> tuple[dict[str, Tensor], dict] | None:
    """The tensors and metadata at ``path`` when it exists and was written with ``fingerprint``, else None (the
    metadata is checked before any tensor is read). A checkpoint written by another run is left unread, with a
    warning naming what differs unless ``warn`` is false (it is overwritten as the new run saves)."""
    if path is None or not Path(path).is_file():
        return None
    changed = differing(read_metadata(path), fingerprint)
    if changed and warn:
        warnings.warn(f"checkpoint {path} was written by another run (different {', '.join(changed)}): starting "
                      "afresh", LowbitWarning, stacklevel=2)
    if changed:
        return None
    return read_checkpoint(path)
