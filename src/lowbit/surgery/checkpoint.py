"""Resumable checkpoints: safetensors files whose metadata fingerprints the settings that wrote them.

SpinQuant's rotations and block-wise reconstruction's finished layers (and QAT next) save the same way: the
tensors, plus a JSON object under the ``lowbit`` metadata key holding the run's fingerprint (the settings a resumed
run must share) and any progress (step, losses). Writes are atomic, so an interrupted save never replaces a good
checkpoint; a run loads a checkpoint only when every fingerprint entry matches, so changed settings start afresh
instead of resuming someone else's work.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from ..report import save_tensors_atomic


def save_checkpoint(path: str | Path, tensors: dict[str, Tensor], meta: dict) -> Path:
    """Write ``tensors`` with ``meta`` (the fingerprint and any progress, JSON) atomically to ``path``."""
    return save_tensors_atomic(path, tensors, meta)


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


def fingerprint_matches(meta: dict, fingerprint: dict) -> bool:
    """Whether ``meta`` holds every entry of ``fingerprint`` with the same value, compared as stored (JSON)."""
    stored = json.loads(json.dumps(fingerprint))
    return all(meta.get(key) == value for key, value in stored.items())


def load_checkpoint(path: str | Path | None, fingerprint: dict) -> tuple[dict[str, Tensor], dict] | None:
    """The tensors and metadata at ``path`` when it exists and was written with ``fingerprint``, else None (the
    metadata is checked before any tensor is read)."""
    if path is None or not Path(path).is_file() or not fingerprint_matches(read_metadata(path), fingerprint):
        return None
    return read_checkpoint(path)
