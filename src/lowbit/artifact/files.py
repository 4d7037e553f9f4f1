"""The files of a saved model: sharded safetensors with an index, written into a temporary folder renamed at the end.

Tensors are written shard by shard in the order given (a streaming caller never holds more than one shard);
``lowbit.json`` records each shard's size and SHA-256 so that a load finds a damaged or truncated file before it
reads a tensor. Only safetensors are ever read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor

from ..errors import ArtifactError
from ..report import check_output_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _readable(folder: Path) -> None:
    """Give the folder and its files the permissions the user's umask allows (mkdtemp makes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def check_new_folder(target: Path) -> None:
    """Refuse a save target that exists and is not an empty folder, or that cannot be created (under a file, in a
    read-only place): checked before any long job starts too."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ArtifactError(f"{target} already exists: save into a new folder (lowbit never overwrites a model)")
    check_output_file(target / "lowbit.json")  # under a file, or in a place that cannot be written: say so now


@contextmanager
def new_folder(target: Path) -> Iterator[Path]:
    """A temporary folder beside ``target`` that becomes ``target`` when the block ends without error (else it is
    removed). ``target`` must not exist or be an empty folder: a save never overwrites a model."""
    target = Path(target)
    check_new_folder(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _readable(tmp)
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _shards(items: Iterable[tuple[str, Tensor]], shard_bytes: int) -> Iterator[dict[str, Tensor]]:
    shard, size = {}, 0
    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            yield shard
            shard, size = {}, 0
        tensor = tensor.contiguous()
        if tensor.untyped_storage().nbytes() != nbytes:  # a view (a fused linear's rows): safetensors wants owners
            tensor = tensor.clone()
        shard[name] = tensor
        size += nbytes
    if shard:
        yield shard


def write_tensors(folder: Path, items: Iterable[tuple[str, Tensor]], shard_bytes: int) -> dict[str, dict]:
    """Write ``(name, tensor)`` pairs into ``model.safetensors`` or numbered shards with an index; returns each
    file's size and SHA-256."""
    from safetensors.torch import save_file

    names = []
    for i, shard in enumerate(_shards(items, shard_bytes)):
        name = f"model-{i + 1:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        names.append((name, list(shard)))
    if len(names) == 1:
        os.replace(folder / names[0][0], folder / SINGLE)
        names = [(SINGLE, names[0][1])]
    else:
        total = len(names)
        renamed = []
        for i, (name, keys) in enumerate(names):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(folder / name, folder / final)
            renamed.append((final, keys))
        names = renamed
        index = {"metadata": {}, "weight_map": {k: name for name, keys in names for k in keys}}
        (folder / INDEX).write_text(json.dumps(index, indent=1))
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256(folder / name)} for name, _ in names}


def check_files(folder: Path, files: dict[str, dict]) -> None:
    """Every recorded file is present, of its size and hash; one clear line otherwise."""
    for name, info in files.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: the saved model is incomplete; save it again")
        if path.stat().st_size != info["bytes"] or sha256(path) != info["sha256"]:
            raise ArtifactError(f"{path} is damaged (its size or checksum differs from when it was saved); save the "
                                "model again")


def read_tensors(folder: Path, files: dict[str, dict]) -> dict[str, Tensor]:
    """Every tensor of the recorded safetensors files."""
    from safetensors import safe_open

    out = {}
    for name in files:
        try:
            with safe_open(folder / name, framework="pt") as f:
                for key in f.keys():
                    out[key] = f.get_tensor(key)
        except Exception as exc:  # a header safetensors cannot parse
            raise ArtifactError(f"{folder / name} is not a readable safetensors file ({exc}); save the model again") from None
    return out
