"""``lowbit`` command line: a thin shell over :mod:`lowbit.pipeline` and :mod:`lowbit.recipe`.

Bad input ends in one line naming the problem and the fix (``lowbit: error: ...``), exit code 2, no traceback, and
no report file written.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from .data import DataConfig
from .errors import LowbitError, LowbitWarning

DEFAULT_RECIPE = "w8a8-rtn"
MODEL_HELP = ("'default' (SmolLM2-135M), 'qwen2.5-coder-0.5b' (from its PyPI data packages), a HF model folder or "
              "a .gguf file")


@contextlib.contextmanager
def rich_progress(console: Console) -> Iterator:
    """A ``progress(description, total) -> tick`` callback drawing one rich bar per long step.

    ``tick(status)`` advances the bar; a status (a training loss, a layer's error) is shown beside the description.
    """
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bars:

        def progress(description: str, total: int):
            task = bars.add_task(description, total=total)

            def tick(status: str | None = None) -> None:
                if status:
                    bars.update(task, description=f"{description} [{status}]")
                bars.advance(task)

            return tick

        yield progress


MAX_SEED = 2**62
THREADS_PER_CORE = 4


class _Parser(argparse.ArgumentParser):
    """argparse with lowbit's one-line error format (``lowbit: error: ...``, exit 2) instead of a usage block."""

    def error(self, message: str):
        print(f"lowbit: error: {message}: see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _seed(text: str) -> int:
    """A seed every generator lowbit seeds accepts (also after adding a layer's index)."""
    value = int(text)
    if not 0 <= value < MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2^62, got {text}")
    return value


def _threads_count(text: str) -> int:
    """A thread count this machine can run (far more than its cores crashes the CPU backends)."""
    value, cores = _positive_int(text), os.cpu_count() or 1
    if value > THREADS_PER_CORE * cores:
        raise argparse.ArgumentTypeError(f"{value} is far more than this machine's {cores} cores: "
                                         f"pass at most {THREADS_PER_CORE * cores}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


# argparse names a type by its __name__ in "invalid <name> value: 'x'"
_positive_int.__name__, _seed.__name__, _threads_count.__name__, _finite_float.__name__ = (
    "positive integer", "seed", "thread count", "number")


def _saved_model(parser: argparse.ArgumentParser, reference: bool = True, simulate: bool = True) -> None:
    """The flags every command on a saved model takes: the folder, threads, and where it applies a reference model
    and the simulation."""
    parser.add_argument("--model", required=True, metavar="DIR", help="a folder written by `lowbit quantize --save`")
    parser.add_argument("--threads", type=_threads_count, default=None, help="torch CPU threads (default: all cores)")
    if reference:
        parser.add_argument("--reference", default="saved",
                            help="full-precision model to compare with: 'saved' (its source), 'none', or a model source")
    if simulate:
        parser.add_argument("--simulate", action="store_true", help="run the fake-quant model instead of real kernels")
    parser.add_argument("--packed", action="store_true",
                        help="keep int4 weights of int x int layers packed in memory (half the bytes, slower decode)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowbit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model with a recipe and evaluate it against full precision")
    q.add_argument("--model", default="default", help=MODEL_HELP)
    q.add_argument("--recipe", default=DEFAULT_RECIPE, help="preset name (see `lowbit recipes`) or a YAML file")
    q.add_argument("--calib-data", default="default", help="'default', a text file, or wikitext2 / c4 / pile")
    q.add_argument("--eval-data", default="default", help="'default', a text file, or wikitext2 / c4 / pile")
    q.add_argument("--seq-len", type=_positive_int, default=2048, help="evaluation window length in tokens")
    q.add_argument("--windows", type=_positive_int, default=6, help="number of evaluation windows")
    q.add_argument("--all-windows", action="store_true", help="evaluate every full window of the evaluation text")
    q.add_argument("--report", default="lowbit-report.json", help="where to write the JSON report")
    q.add_argument("--seed", type=_seed, default=0, help="seed for calibration sampling and random rotations")
    q.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks to score (needs lowbit[lm-eval])")
    q.add_argument("--task-limit", type=_positive_int, default=None, help="examples per lm-eval task")
    q.add_argument("--threads", type=_threads_count, default=None, help="torch CPU threads (default: all cores)")
    q.add_argument("--save", default=None, metavar="DIR", help="also write the quantized model into this new folder")
    g = sub.add_parser("generate", help="continue a prompt with a saved quantized model (streams the text)")
    _saved_model(g, reference=False)
    g.add_argument("--prompt", required=True, help="the text to continue (in the chat template when there is one)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=128)
    g.add_argument("--temperature", type=_finite_float, default=0.0, help="0 (the default) decodes greedily")
    g.add_argument("--seed", type=_seed, default=0, help="sampling seed")
    g.add_argument("--raw", action="store_true", help="do not wrap the prompt in the tokenizer's chat template")
    e = sub.add_parser("eval", help="perplexity of a saved quantized model, against its full-precision source")
    _saved_model(e)
    e.add_argument("--eval-data", default="default", help="'default', a text file, or wikitext2 / c4 / pile")
    e.add_argument("--seq-len", type=_positive_int, default=2048, help="evaluation window length in tokens")
    e.add_argument("--windows", type=_positive_int, default=6, help="number of evaluation windows")
    e.add_argument("--all-windows", action="store_true", help="evaluate every full window of the evaluation text")
    e.add_argument("--report", default="lowbit-eval.json", help="where to write the JSON report")
    b = sub.add_parser("bench", help="prefill/decode speed, memory and file size of a saved model vs fp32 and bf16")
    _saved_model(b, simulate=False)
    b.add_argument("--prefill", type=_positive_int, default=2048, help="prefill length in tokens (batch 1)")
    b.add_argument("--prompt", type=_positive_int, default=512, help="prompt length before decoding")
    b.add_argument("--new-tokens", type=_positive_int, default=128, help="decoded tokens")
    b.add_argument("--batches", default="1,8", help="comma-separated decode batch sizes")
    b.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per measurement (median)")
    b.add_argument("--report", default="lowbit-bench.json", help="where to write the JSON result")
    x = sub.add_parser("export", help="write a quantized model as a GGUF file (llama.cpp) or compressed-tensors folder")
    x.add_argument("--model", default="default",
                   help="'default', a HF model folder, a .gguf file (quantized with --recipe first) or a lowbit folder")
    x.add_argument("--format", required=True, choices=("gguf", "compressed-tensors"), help="the file format")
    x.add_argument("--type", default=None, help="GGUF block type of the linears: Q4_0 (default) or Q8_0; F32 / F16 "
                   "write the model unquantized (llama.cpp's own reference and quantizer input)")
    x.add_argument("--recipe", default=None,
                   help="recipe applied first (default for gguf: gguf-q4_0 / gguf-q8_0, matching --type)")
    x.add_argument("--out", required=True, help="the new file (gguf) or folder (compressed-tensors) to write")
    x.add_argument("--float-type", default="F16", choices=("F16", "F32"),
                   help="GGUF type of matrices the recipe leaves unquantized (norms and biases are always F32)")
    x.add_argument("--calib-data", default="default", help="'default', a text file, or wikitext2 / c4 / pile")
    x.add_argument("--seed", type=_seed, default=0, help="seed for calibration sampling and random rotations")
    x.add_argument("--threads", type=_threads_count, default=None, help="torch CPU threads (default: all cores)")
    r = sub.add_parser("recipes", help="list the preset recipes, or print one as YAML")
    r.add_argument("name", nargs="?", help="print this preset's full YAML")
    i = sub.add_parser("inspect", help="outlier tokens before/after rotation and with PrefixQuant's prefix")
    i.add_argument("--model", default="default", help=MODEL_HELP)
    i.add_argument("--calib-data", default="default", help="'default', a text file, or wikitext2 / c4 / pile")
    i.add_argument("--samples", type=_positive_int, default=16, help="calibration samples")
    i.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per sample")
    i.add_argument("--eta", type=_finite_float, default=64.0, help="outlier threshold on max|x| / median")
    i.add_argument("--seed", type=_seed, default=0)
    i.add_argument("--out", default="outliers", help="folder for outliers.json and outliers.png")
    return parser


def _cmd_inspect(args, console: Console) -> int:
    from .analysis.inspect import inspect_outliers

    if args.eta <= 1:
        raise LowbitError(f"--eta must be > 1, got {args.eta}")
    summary = inspect_outliers(args.model, args.calib_data, args.samples, args.seq_len, args.eta, args.seed, args.out)
    for name, ratios in summary["largest_ratio"].items():
        console.print(f"{name:<18} largest max/median: down_proj input {ratios['down_proj_input']:9.1f}, "
                      f"residual {ratios['residual']:9.1f}")
    console.print(f"prefix: {summary['prefix']['text']} (token ids {summary['prefix']['token_ids']})")
    console.print(f"written to {args.out}/outliers.json" + (" and outliers.png" if summary["plot"] else ""))
    return 0


def _cmd_recipes(args, console: Console) -> int:
    from .recipe import load_preset, preset_names

    if args.name:
        sys.stdout.write(load_preset(args.name).to_yaml())  # plain text: the console would wrap long lines
        return 0
    names = preset_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {load_preset(name).description}")
    print("(`lowbit recipes NAME` prints one preset as YAML)")
    return 0


def _cmd_quantize(args, console: Console) -> int:
    from .pipeline import run
    from .recipe import load_recipe
    from .report import render_table

    _threads(args)
    recipe = load_recipe(args.recipe)
    data = DataConfig(
        calib=args.calib_data,
        eval=args.eval_data,
        seq_len=args.seq_len,
        windows=None if args.all_windows else args.windows,
        seed=args.seed,
    )
    with rich_progress(console) as progress:
        report = run(
            model=args.model,
            recipe=recipe,
            data=data,
            report_path=args.report,
            progress=progress,
            tasks=[t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None,
            task_limit=args.task_limit,
            save_path=args.save,
        )
    render_table(report, console)
    console.print(f"report written to {args.report}" + (f"; quantized model saved to {args.save}" if args.save else ""))
    return 0


def _cmd_eval(args, console: Console) -> int:
    from .report import check_output_file, render_table, write_json_atomic
    from .saved import evaluate_saved

    _threads(args)
    check_output_file(args.report)
    data = DataConfig(eval=args.eval_data, seq_len=args.seq_len, windows=None if args.all_windows else args.windows)
    reference = None if args.reference == "none" else args.reference
    with rich_progress(console) as progress:
        report = evaluate_saved(args.model, data, reference, args.simulate, progress, packed=args.packed)
    write_json_atomic(args.report, report)
    render_table(report, console)
    console.print(f"report written to {args.report}")
    return 0


def _cmd_generate(args, console: Console) -> int:
    from .artifact import load, load_tokenizer
    from .saved import generate

    if not args.temperature >= 0:
        raise LowbitError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    _threads(args)
    model = load(args.model, simulate=args.simulate, lean=True, packed=args.packed)
    tokenizer = load_tokenizer(args.model)
    generate(model, tokenizer, args.prompt, args.max_new_tokens, chat=not args.raw, temperature=args.temperature,
             seed=args.seed, on_text=lambda text: print(text, end="", flush=True))
    print()
    return 0


def _cmd_bench(args, console: Console) -> int:
    from .bench import bench, render, write
    from .report import check_output_file

    _threads(args)
    check_output_file(args.report)
    try:
        batches = tuple(int(b) for b in args.batches.split(",") if b.strip())
    except ValueError:
        raise LowbitError(f"--batches takes comma-separated positive integers, got {args.batches!r}") from None
    if not batches or min(batches) < 1:
        raise LowbitError(f"--batches takes comma-separated positive integers, got {args.batches!r}")
    reference = None if args.reference == "none" else args.reference
    with rich_progress(console) as progress:
        result = bench(args.model, reference, args.prefill, args.prompt, args.new_tokens, batches, args.repeats,
                       progress=progress, packed=args.packed)
    write(result, args.report)
    render(result, console)
    console.print(f"result written to {args.report}")
    return 0


def _cmd_export(args, console: Console) -> int:
    _threads(args)
    if args.format == "compressed-tensors":
        return _export_compressed(args, console)
    from .export.gguf_job import export_gguf

    with rich_progress(console) as progress:
        summary = export_gguf(args.model, args.out, args.type or "Q4_0", recipe=args.recipe,
                              float_type=args.float_type, calib=args.calib_data, seed=args.seed, progress=progress)
    console.print(f"wrote {summary['file']} ({summary['bytes'] / 1e6:.1f} MB, linears {summary['type']}, recipe "
                  f"{summary['recipe']}, tokenizer {summary['tokenizer']}) in {summary['seconds']} s")
    return 0


def _export_compressed(args, console: Console) -> int:
    """``--format compressed-tensors``: quantize with ``--recipe`` (or load a lowbit folder), then write the folder."""
    if args.type is not None:
        raise LowbitError("--type is for --format gguf; compressed-tensors takes its scheme from --recipe")
    try:
        from .export.compressed import write_compressed_tensors
    except ImportError:
        raise LowbitError("--format compressed-tensors is not available in this lowbit yet: use --format gguf") from None
    from pathlib import Path

    from .artifact import load, load_tokenizer
    from .artifact.save import MANIFEST

    if Path(args.out).exists():
        raise LowbitError(f"{args.out} already exists: pass a new folder to --out (lowbit never overwrites)")
    if (Path(args.model).expanduser() / MANIFEST).is_file():
        if args.recipe is not None:
            raise LowbitError(f"{args.model} is already quantized (a lowbit folder): drop --recipe")
        model, tokenizer = load(args.model, simulate=True), load_tokenizer(args.model)
    else:
        if args.recipe is None:
            raise LowbitError("--format compressed-tensors needs --recipe (e.g. w4a16-gptq) or a lowbit folder")
        from .apply import quantize
        from .data import prepare_data
        from .models.loading import load_model
        from .recipe import load_recipe

        recipe, loaded = load_recipe(args.recipe), load_model(args.model)
        tokens = prepare_data(DataConfig(calib=args.calib_data, seed=args.seed), loaded.tokenizer)
        with rich_progress(console) as progress:
            model = quantize(loaded.model, recipe, tokens, progress=progress, inplace=True)
        tokenizer = loaded.tokenizer
    path = write_compressed_tensors(model, args.out, tokenizer=tokenizer)
    console.print(f"wrote {path}")
    return 0


def _threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt so that every cleanup an interrupt runs (temporaries, atomic writes) runs."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """lowbit's own warnings as one line; others as Python prints them."""
    if issubclass(category, LowbitWarning):
        return f"lowbit: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lowbit`` console script."""
    warnings.formatwarning = _format_warning
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    console = Console(stderr=False)
    try:
        commands = {"recipes": _cmd_recipes, "quantize": _cmd_quantize, "inspect": _cmd_inspect,
                    "eval": _cmd_eval, "generate": _cmd_generate, "bench": _cmd_bench, "export": _cmd_export}
        return commands[args.command](args, console)
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("lowbit: terminated" if isinstance(exc, Terminated) else "lowbit: interrupted", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
