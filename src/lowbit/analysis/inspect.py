"""``lowbit inspect``: outlier tokens of a model before and after rotation, and with PrefixQuant's prefix in place."""

from __future__ import annotations

from pathlib import Path

from ..apply import quantize
from ..data import calibration_data, check_source
from ..errors import OutputError
from ..models.loading import check_context, load_model
from ..recipe import Recipe
from ..report import check_output_file, write_json_atomic
from .outliers import analyze, plot_ratios, select_prefix


def inspect_outliers(model: str = "default", calib: str = "default", samples: int = 16, seq_len: int = 512,
                     eta: float = 64.0, seed: int = 0, out_dir: str | Path = "outliers") -> dict:
    """Analyse the model in full precision, with QuaRot's rotations, and rotated with the selected prefix.

    Writes ``outliers.json`` (every layer's statistics, the prefix and the largest ratios) and, with matplotlib,
    ``outliers.png`` into ``out_dir``; returns the JSON summary.
    """
    check_source(calib)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, and inspect writes a folder: pass a new or existing folder")
    check_output_file(out / "outliers.json")
    check_output_file(out / "outliers.png")
    loaded = load_model(model)
    check_context(loaded.model.config, seq_len)
    batches = calibration_data(calib, loaded.tokenizer, seed).calibration(samples, seq_len)
    rotated = quantize(loaded.model, Recipe(name="quarot-rotations", steps=[{"method": "quarot", "r3": False}]),
                       seed=seed)
    reports = {"full precision": analyze(loaded.model, loaded.spec, batches, eta),
               "rotated (QuaRot)": analyze(rotated, loaded.spec, batches, eta)}
    bos = loaded.tokenizer.bos_token_id
    prefix = select_prefix(reports["rotated (QuaRot)"], bos)
    reports["rotated + prefix"] = analyze(rotated, loaded.spec, batches, eta, prefix=prefix)
    summary = {
        "model": model, "calib": calib, "samples": samples, "seq_len": seq_len, "eta": eta,
        "prefix": {"token_ids": prefix, "text": [loaded.tokenizer.decode([t]) for t in prefix]},
        "largest_ratio": {name: r.as_dict()["largest_ratio"] for name, r in reports.items()},
        "reports": {name: r.as_dict() for name, r in reports.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "outliers.json", summary)
    summary["plot"] = str(out / "outliers.png") if plot_ratios(reports, out / "outliers.png") else None
    return summary
