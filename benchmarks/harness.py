"""What every benchmark script shares: load once, measure a recipe the pipeline's way, keep results, render tables.

The scripts in this folder run as ``python benchmarks/<script>.py`` and import this module as a sibling. Each script
keeps only its rows (recipes, or its own kind of measurement) and its table's columns; everything else is here:

- :class:`Bench`: the model, the text and the full-precision reference log-probabilities, loaded once per run;
  :meth:`Bench.measure` quantizes with one recipe and scores it against that reference, with bits (weights,
  activations, KV including packed caches and a PrefixQuant prefix) taken from :func:`lowbit.pipeline.build_report`,
  so a benchmark row and ``lowbit quantize``'s report count bits by one definition.
- :class:`Results`: a JSON results file written atomically after every row, so an interrupted run resumes where it
  stopped; rows already saved are skipped unless ``--force``. Only the script's own file renders into the README,
  so a run with ``--results /tmp/x.json`` (a quick check) never rewrites a committed table.
- :func:`add_flags`: the standard command-line flags; :func:`markdown_table`, :func:`write_block`: tables.
- Helpers the scripts used to import from one another: :func:`replace_block`, :func:`median_seconds`,
  :func:`variant`, :func:`num`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

import lowbit
from lowbit.data import DataConfig, TokenData, default_text_path
from lowbit.evaluate import evaluate, reference_log_probs
from lowbit.models.loading import LoadedModel
from lowbit.pipeline import add_rotation_invariance, build_report, quantizes
from lowbit.recipe import Recipe, load_preset, load_recipe
from lowbit.report import write_json_atomic

HERE = Path(__file__).parent
README = HERE / "README.md"
SECOND_MODEL = "qwen2.5-coder-0.5b"  # the real Qwen2-family model whose columns the quality tables add
SECOND_MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct"


def model_results(canonical: Path, model: str) -> Path:
    """A script's results file for ``model``: ``canonical`` for the default model, ``<stem>-<model>.json`` else
    (the model's name made safe for a file name)."""
    if model == "default":
        return canonical
    return canonical.with_name(f"{canonical.stem}-{model_file_name(model)}.json")


def model_file_name(model: str) -> str:
    """``model`` (a name, folder or .gguf file) as the part of a results file name that says which model."""
    name = Path(model).name.removesuffix(".gguf")
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def results_paths(args: argparse.Namespace, canonical: Path) -> tuple[Path, Path]:
    """(the file this run writes, the file of its model that renders): ``--results`` when given, else the model's;
    a run on another text (``--eval-data T``: calibrated on the default text, evaluated on T; ``--text T``: both on
    T) writes ``<model's file>@<T>.json`` or ``@<T>-calibrated.json``, printed, not rendered."""
    own = model_results(canonical, args.model)
    other, text = getattr(args, "eval_data", None), getattr(args, "text", None)
    writes = own
    if other or text:
        writes = own.with_name(f"{own.stem}@{Path(other or text).stem}{'-calibrated' if text else ''}.json")
    return (writes if args.results == canonical else args.results), own


def probe_window(description: str) -> tuple[LoadedModel, torch.Tensor]:
    """A probe script's model and one window of the default text, from its flags: ``--model`` (default the second
    real model), ``--tokens`` tokens from token ``--start``. Returns (loaded model, ids ``[1, tokens]``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=SECOND_MODEL)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--start", type=int, default=5000)
    args = parser.parse_args()
    loaded = lowbit.load_model(args.model)
    ids = loaded.tokenizer(default_text_path().read_text(), return_tensors="pt").input_ids
    return loaded, ids[:, args.start:args.start + args.tokens]


# --- loading once, measuring a recipe -----------------------------------------------------------------------------


@dataclass
class Bench:
    """The model, its token data and evaluation windows for every row of one run.

    ``windows`` are the evaluation windows (``data.eval_windows``, or another text's with ``eval_data``); the
    full-precision reference on them is computed on first use only, so scripts that only time things never pay for it.
    """

    loaded: LoadedModel
    config: DataConfig
    data: TokenData
    windows: torch.Tensor

    @classmethod
    def load(cls, model: str = "default", config: DataConfig | None = None,
             eval_data: str | None = None) -> Bench:
        """Load ``model`` and cut its text by ``config``; ``eval_data`` evaluates on windows of another text."""
        config = config or DataConfig()
        loaded = lowbit.load_model(model)
        data = lowbit.prepare_data(config, loaded.tokenizer)
        windows = data.eval_windows
        if eval_data is not None:
            config = replace(config, eval=eval_data)
            windows = eval_windows(loaded, config)
        return cls(loaded, config, data, windows)

    def windows_of(self, text: str) -> torch.Tensor:
        """Evaluation windows of another ``text`` (file or dataset name), cut as this run's are."""
        return eval_windows(self.loaded, replace(self.config, eval=text))

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @cached_property
    def reference(self) -> list[torch.Tensor]:
        """Full-precision next-token log-probabilities on :attr:`windows` (one FP pass, reused by every row)."""
        return reference_log_probs(self.model, self.windows)

    def setup(self) -> dict:
        """What rows must share to be comparable (saved under ``meta["setup"]`` of a results file)."""
        c = self.config
        return {"model": self.loaded.source, "seq_len": int(self.windows.shape[1]), "windows": len(self.windows),
                "calib": c.calib, "eval": c.eval, "seed": c.seed}

    def quantize(self, recipe: Recipe) -> tuple[torch.nn.Module, object, float]:
        """(quantized model, session, wall seconds); a recipe that quantizes nothing gives the model itself."""
        if not quantizes(recipe):
            return self.model, None, 0.0
        start = time.perf_counter()
        model, session = lowbit.quantize_with_session(self.model, recipe, self.data)
        return model, session, time.perf_counter() - start

    def measure(self, recipe: Recipe | str, invariance: bool = False,
                extra: Callable[[torch.nn.Module], dict] | None = None) -> dict:
        """Quantize with ``recipe``, evaluate against the reference and return one row (see :func:`row_from_report`).

        ``invariance``: also measure the rotated full-precision model's largest logit difference from the original
        (under ``rotation``), as ``lowbit quantize`` does for rotation recipes. ``extra(model)``: a script's own
        measurements of the quantized model (a forward time, say), merged into the row.
        """
        recipe = load_recipe(recipe)
        model, session, seconds = self.quantize(recipe)
        more = extra(model) if extra is not None else {}
        result = evaluate(self.model, model, self.windows, reference=self.reference)
        timings = {"quantize": seconds, "eval": result.seconds}
        report = build_report(self.loaded.source, recipe, self.config, self.data, result, model, self.loaded.spec,
                              timings, session)
        if invariance:
            add_rotation_invariance(report, self.model, recipe, self.data, session)
        return {**row_from_report(report, self.loaded.tokenizer, seconds), **more}


# method sections a row keeps from the report, when present
SECTIONS = ("rotation", "gptq", "prefix", "blockwise", "qat")


def eval_windows(loaded: LoadedModel, config: DataConfig) -> torch.Tensor:
    """The evaluation windows ``config`` cuts from its ``eval`` text with ``loaded``'s tokenizer."""
    return lowbit.prepare_data(config, loaded.tokenizer).eval_windows


def row_from_report(report: dict, tokenizer, quantize_s: float) -> dict:
    """A flat table row from a pipeline report: quality, bits and wall times, plus the methods' sections.

    ``bits_kv`` is the report's KV bits (fake-quant scheme or packed cache), amortised over a PrefixQuant prefix's
    full-precision keys and values when there is one (the report's ``kv_bits_with_prefix``).
    """
    q, bits = report["quantized"], report["bits"]
    prefix = report.get("prefix")
    row = {
        "recipe": report["recipe"], "description": report["recipe_config"].get("description", ""),
        "recipe_config": report["recipe_config"], "fp_ppl": report["fp"]["ppl"], "ppl": q["ppl"],
        "ratio": q["ppl_ratio"], "kl": q["kl_vs_fp"], "top1": q["top1_agreement"], "tokens": report["eval"]["tokens"],
        "bits_w": bits["weight"], "bits_a": bits["activation"],
        "bits_kv": prefix["kv_bits_with_prefix"] if prefix else bits["kv"],
        "quantize_s": quantize_s, "eval_s": report["seconds"]["eval"],
        "calibration_tokens": report.get("gptq", {}).get("tokens", 0),  # GPTQ's, as the QUAROT table shows
    }
    row.update({key: report[key] for key in SECTIONS if key in report})
    if prefix:
        row["prefix_text"] = [tokenizer.decode([t]) for t in prefix["tokens"]]
    return row


def recipe_step(data: dict, method: str) -> dict:
    """The first ``method`` step of a recipe's plain-dict form, for an edit to change in place."""
    return next(s for s in data["steps"] if s["method"] == method)


def step_update(method: str, **fields) -> Callable[[dict], None]:
    """An edit that sets ``fields`` on the recipe's ``method`` step."""
    return lambda data: recipe_step(data, method).update(fields)


def set_field(path: str, value) -> Callable[[dict], None]:
    """An edit that sets ``steps.<method>.<field>`` or ``<section>.<field>`` to ``value``."""
    head, name = path.rsplit(".", 1)

    def edit(data: dict) -> None:
        target = recipe_step(data, head.split(".", 1)[1]) if head.startswith("steps.") else data[head]
        target[name] = value

    return edit


def variant(preset: str, *edits: Callable[[dict], None]) -> Recipe:
    """``preset`` with ``edits`` applied in order to its plain-dict form (validated again): an ablation row's
    recipe."""
    data = load_preset(preset).model_dump()
    for edit in edits:
        edit(data)
    return Recipe.from_dict(data, origin=f"variant of {preset}")


# --- results files ------------------------------------------------------------------------------------------------


class Results:
    """A JSON results file ``{"meta": ..., "rows": ...}``, written atomically after every row so a run resumes.

    ``rows`` is a mapping label -> row; with ``list_key`` the file keeps them as a list identified by that field (the
    format ``presets.json`` has always had). ``canonical`` is the script's own file: only it renders into the README.
    """

    def __init__(self, path: Path, canonical: Path | None = None, list_key: str | None = None):
        self.path, self.canonical, self.list_key = Path(path), Path(canonical or path), list_key
        self.saved = json.loads(self.path.read_text()) if self.path.is_file() else {"meta": {}}
        self.saved.setdefault("meta", {})
        rows = self.saved.get("rows", {})
        self.rows: dict[str, dict] = {r[list_key]: r for r in rows} if list_key else dict(rows)

    @property
    def meta(self) -> dict:
        return self.saved["meta"]

    @property
    def renders(self) -> bool:
        """Whether this file's tables go into the README (the script's own file, not a check's temporary one)."""
        return self.path.resolve() == self.canonical.resolve()

    def check_setup(self, setup: dict) -> None:
        """Refuse to mix rows of different setups (model, text, window size) in one file; record the setup."""
        saved = self.meta.get("setup")
        if self.rows and saved and saved != setup:
            raise SystemExit(f"{self.path} holds rows measured with {saved}, this run is {setup}: "
                             "pass --results OTHER.json to keep them apart")
        self.meta["setup"] = setup

    def todo(self, labels: Iterable[str], force: bool) -> list[str]:
        """The labels still to measure: those not saved yet, or all of them with ``force``."""
        return [label for label in labels if force or label not in self.rows]

    def put(self, label: str, row: dict) -> None:
        """Store one row and write the file at once."""
        self.rows[label] = row
        self.save()

    def save(self) -> None:
        """Write the file atomically (a temporary file renamed over it)."""
        if self.rows or "rows" in self.saved:  # files without rows (hadamard.json) stay as they are
            self.saved["rows"] = list(self.rows.values()) if self.list_key else self.rows
        write_json_atomic(self.path, self.saved)


def run_meta(command: str, bench: Bench | None = None) -> dict:
    """The run's description for a results file: command, sizes, torch, threads, date."""
    meta = {"command": command, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    if bench is not None:
        meta.update(windows=len(bench.windows), seq_len=int(bench.windows.shape[1]))
    return meta


def measure_rows(results: Results, labels: list[str], measure: Callable[[str], dict]) -> None:
    """``measure(label)`` for each label, saving the results file after every row and printing a line per row."""
    for label in labels:
        row = measure(label)
        results.put(label, row)
        print(f"{label}: ratio {row['ratio']:.4f} KL {row['kl']:.4f} quantize {row['quantize_s']:.0f} s", flush=True)


def command_line(command: str, args: argparse.Namespace, parser: argparse.ArgumentParser | None = None,
                 names: tuple[str, ...] = ()) -> str:
    """``command`` with the data flags of this run that differ from their defaults (``--model``, ``--windows``, ...),
    and the script's own flags ``names`` that differ from ``parser``'s defaults."""
    flags = {"--model": ("model", "default"), "--seq-len": ("seq_len", 2048), "--windows": ("windows", 6),
             "--text": ("text", None), "--eval-data": ("eval_data", None)}
    flags.update({f"--{name.replace('_', '-')}": (name, parser.get_default(name)) for name in names})
    extra = [f"{flag} {getattr(args, name)}" for flag, (name, default) in flags.items()
             if getattr(args, name, default) != default]
    return " ".join([command, *extra])


def run_labelled(parser: argparse.ArgumentParser, args: argparse.Namespace, rows: list, command: str,
                 measure: Callable[[Bench, str, Recipe], dict] | None = None) -> Results:
    """Measure the ``(label, what, recipe factory)`` rows that ``--rows`` names (default: all) and that are not saved
    yet (all of them with ``--force``), saving ``--results`` after every row; returns the results for the table.
    ``measure(bench, label, recipe)`` makes a row (default: ``bench.measure(recipe)``)."""
    results = Results(*results_paths(args, parser.get_default("results")))
    todo = results.todo(check_labels(parser, args.rows, [label for label, _, _ in rows]), args.force)
    if todo and not args.tables_only:
        factories = {label: factory for label, _, factory in rows}
        bench = Bench.load(args.model, data_config(args), getattr(args, "eval_data", None))
        results.check_setup(bench.setup())
        results.meta.update(run_meta(command_line(command, args), bench))
        make = measure or (lambda b, _, recipe: b.measure(recipe))
        measure_rows(results, todo, lambda label: make(bench, label, factories[label]()))
    return results


def labelled_script(doc: str, canonical: Path, rows: list, marker: str, table: Callable[[Results], list[str]],
                    measure: Callable[[Bench, str, Recipe], dict] | None = None) -> None:
    """The whole command line of a script of labelled recipe rows: the standard flags, :func:`run_labelled`, then
    ``table(results)`` into the README block ``marker`` (or printed, for a results file of its own)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_flags(parser, canonical, text=True, eval_data=True)
    args = parser.parse_args()
    results = run_labelled(parser, args, rows, f"python benchmarks/{Path(sys.argv[0]).name}", measure)
    lines = table(results)
    if results.renders:
        write_block(marker, lines)
    else:
        print("\n".join(lines))


# --- command line -------------------------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser, results: Path | None, rows: str | None = "--rows",
              data: bool = True, text: bool = False, eval_data: bool = False) -> argparse.ArgumentParser:
    """The standard flags: ``--model``, ``--seq-len``, ``--windows`` (with ``data``), ``rows`` (labels or recipes to
    measure), ``--force``, ``--tables-only``, ``--results``, and ``--text`` / ``--eval-data`` where a script has them."""
    if data:
        parser.add_argument("--model", default="default", help="model source as lowbit.load_model takes it")
        parser.add_argument("--seq-len", type=int, default=2048, help="tokens per evaluation window")
        parser.add_argument("--windows", type=int, default=6, help="evaluation windows")
    if rows:
        parser.add_argument(rows, nargs="*", default=None, help="what to measure (default: every row)")
        parser.add_argument("--force", action="store_true", help="re-measure rows already saved")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the tables from the saved results")
    if results is not None:
        parser.add_argument("--results", type=Path, default=results,
                            help=f"results file (default {results.relative_to(HERE.parent)}; another file is "
                                 "printed, not written to the README)")
    if text or eval_data:
        other = parser.add_mutually_exclusive_group()
    if eval_data:
        other.add_argument("--eval-data", help="evaluate on windows of this text (file or dataset name) instead")
    if text:
        other.add_argument("--text", help="calibrate and evaluate on this text (disjoint parts, as the default text)")
    return parser


def data_config(args: argparse.Namespace) -> DataConfig:
    """The data configuration the standard flags ask for (``--text`` for calibration and evaluation alike)."""
    text = getattr(args, "text", None) or "default"
    return DataConfig(calib=text, eval=text, seq_len=args.seq_len, windows=args.windows)


def check_labels(parser: argparse.ArgumentParser, asked: list[str] | None, known: list[str]) -> list[str]:
    """The labels asked for (default: all known), or a usage error naming the unknown ones."""
    unknown = set(asked or []) - set(known)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; rows: {known}")
    return asked or known


# --- tables -------------------------------------------------------------------------------------------------------


def num(x: float) -> str:
    """A ratio or perplexity in 4 significant digits (3 with an exponent from 10⁴ on)."""
    return f"{x:.4g}" if x < 1e4 else f"{x:.3g}"


def markdown_table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    """Markdown lines of a table: header, separator, one line per row of cells."""
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header)] + [f"| {' | '.join(r)} |" for r in rows]


def replace_block(path: Path, begin: str, end: str, lines: list[str]) -> None:
    """Replace the text between two marker lines of a markdown file (an error if the file lacks the markers)."""
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} / {end} markers: add them where the table goes")
    block = f"{begin}\n" + "\n".join(lines) + f"\n{end}"
    path.write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.DOTALL))


def write_block(marker: str, lines: list[str], write: bool = True, path: Path = README) -> None:
    """Print ``lines`` and, when ``write``, put them between the ``<!-- MARKER:BEGIN/END -->`` lines of ``path``."""
    if write:
        replace_block(path, f"<!-- {marker}:BEGIN -->", f"<!-- {marker}:END -->", lines)
    print("\n".join(lines))


# --- timing -------------------------------------------------------------------------------------------------------


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn()``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    return statistics.median(seconds(fn) for _ in range(repeats))
