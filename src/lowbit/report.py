"""The run report: a JSON file written atomically, and a table on the terminal."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """Write ``data`` as JSON to ``path`` via a temporary file and a rename, so no partial file is ever visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_tensors_atomic(path: str | Path, tensors: dict, meta: dict) -> Path:
    """Write ``tensors`` as safetensors with ``meta`` (JSON under the ``lowbit`` key) via a temporary file and a
    rename, so an interrupted write never replaces a good checkpoint."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata={"lowbit": json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
