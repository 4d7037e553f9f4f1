"""The run report: a JSON file written atomically, and a table on the terminal."""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import OutputError


def check_output_file(path: str | Path) -> Path:
    """Refuse, before any work, a path a file cannot be written to atomically: a folder, a device or pipe, a
    symbolic link (a rename would replace the link), a read-only file, or a place lowbit cannot create files in."""
    path = Path(path).expanduser()
    if path.is_symlink():
        raise OutputError(f"{path} is a symbolic link, which lowbit would replace: pass the file it points to")
    if path.exists() and not path.is_file():
        raise OutputError(f"{path} is not a regular file (a folder, device or pipe): pass a file path to write to")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{path} is read-only: make it writable or pass another path")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: {folder} is a file, not a folder: pass another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: {folder} is not writable: pass a path in a writable folder")
    return path


def file_mode(path: Path) -> int:
    """The permissions a replaced file keeps, or those the user's umask gives a new one (mkstemp's are 600)."""
    if path.is_file():
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _finite(value):
    """``value`` with every NaN or infinity replaced by None: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary file beside ``path`` that replaces it, with ``path``'s permissions, when the block ends without
    error (else it is removed): no partial or clobbered file is ever visible, and no device or link is replaced."""
    path = check_output_file(path)
    mode = file_mode(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """Write ``data`` as strict JSON (NaN and infinities become null) to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(_finite(data), f, indent=2, allow_nan=False)
            f.write("\n")
    return Path(path).expanduser()


def save_tensors_atomic(path: str | Path, tensors: dict, meta: dict) -> Path:
    """Write ``tensors`` as safetensors with ``meta`` (JSON under the ``lowbit`` key) through :func:`atomic_file`,
    so an interrupted write never replaces a good checkpoint."""
    from safetensors.torch import save_file

    with atomic_file(path, suffix=".safetensors") as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata={"lowbit": json.dumps(meta)})
    return Path(path).expanduser()


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"


def render_table(report: dict, console: Console | None = None) -> None:
    """Print the headline numbers of one report."""
    console = console or Console()
    q, bits, ev = report["quantized"], report["bits"], report["eval"]
    table = Table(title=f"lowbit · {report['recipe']} · {report['model']}", title_justify="left")
    for col in ("", "value"):
        table.add_column(col)
    rows = [
        ("eval", f"{ev['data']} · {ev['windows']}×{ev['seq_len']} tokens"),
        ("fp ppl", _fmt(report["fp"]["ppl"])),
        ("quantized ppl", _fmt(q["ppl"])),
        ("ppl ratio", _fmt(q["ppl_ratio"], 4)),
        ("KL vs fp", _fmt(q["kl_vs_fp"], 4)),
        ("top-1 agreement", _fmt(q["top1_agreement"], 4)),
        ("bits W / A / KV", f"{bits['weight']:.2f} / {bits['activation']:.2f} / {bits['kv']:.2f}" if bits else "-"),
        ("seconds", " · ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items())),
    ]
    for task, metrics in report.get("tasks", {}).items():
        shown = {k: v for k, v in metrics.items() if "stderr" not in k}
        rows.append((task, " · ".join(f"{k} {v:.4f}" for k, v in shown.items())))
    for row in rows:
        table.add_row(*row)
    console.print(table)
