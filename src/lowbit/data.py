"""Text sources and token windows for calibration and evaluation.

Sources: ``"default"`` (the Lee news corpus shipped inside the ``gensim`` package, read as a plain file), any local
text file, or a named dataset (``wikitext2``, ``c4``, ``pile``) through the optional ``datasets`` package.

Calibration and evaluation never overlap. When both come from the same text, the token stream is split at one
point: evaluation takes the first ``windows × seq_len`` tokens (all full windows of the first 80% when ``windows``
is not given) and calibration samples are drawn, seeded, from the tokens after that point only. Named datasets use
their own train split for calibration and their test/validation split for evaluation.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError

DEFAULT_TEXT = "default"
GENSIM_INSTALL = "pip install --no-deps gensim"
DATASETS_INSTALL = 'pip install "lowbit[datasets]"'
EVAL_SHARE_WHEN_SHARED = 0.8

# name -> (dataset path, config, calibration split, evaluation split, text field)
NAMED_DATASETS: dict[str, tuple[str, str | None, str, str, str]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text"),
    "c4": ("allenai/c4", "en", "train", "validation", "text"),
    "pile": ("mit-han-lab/pile-val-backup", None, "validation", "validation", "text"),
}


def default_text_path() -> Path:
    """Path of ``lee_background.cor`` inside the installed ``gensim`` package, found without importing gensim."""
    found = importlib.util.find_spec("gensim")
    if found is None or not found.submodule_search_locations:
        raise DataError(f"the default text needs the gensim package: run `{GENSIM_INSTALL}`")
    path = Path(next(iter(found.submodule_search_locations))) / "test" / "test_data" / "lee_background.cor"
    if not path.is_file():
        raise DataError(f"{path} is missing from the gensim package: reinstall it with `{GENSIM_INSTALL}`")
    return path


def _load_named(name: str, role: str) -> str:
    import datasets

    path, config, calib_split, eval_split, field = NAMED_DATASETS[name]
    split = calib_split if role == "calib" else eval_split
    try:
        ds = datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # datasets raises many types for an unreachable or uncached dataset
        raise DataError(
            f"could not load dataset '{name}' ({path}, split {split}): {str(exc).splitlines()[0]}; "
            "lowbit is offline, so the dataset must already be in your datasets cache, or pass a local text file"
        ) from exc
    return "\n\n".join(t for t in ds[field] if t)


def _text_path(source: str) -> Path:
    """The file behind a non-dataset text source."""
    return default_text_path() if source == DEFAULT_TEXT else Path(source).expanduser()


MAX_INVALID_SHARE = 0.01


def _read_text_file(path: Path, source: str) -> str:
    """A file's text as UTF-8, refusing binary files and other encodings rather than evaluating replacement
    characters (a rare invalid byte in otherwise valid UTF-8 is replaced, as before)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read text '{source}': {exc.strerror}: check the file's permissions") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or raw[:2000].count(b"\x00") > 0:
        found = "UTF-16 text" if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else "NUL bytes (binary or UTF-16)"
        raise DataError(f"text '{source}' is not UTF-8: it holds {found}: convert it to UTF-8 text")
    text = raw.decode("utf-8", errors="replace")
    invalid = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if invalid > MAX_INVALID_SHARE * max(len(text), 1):
        raise DataError(f"text '{source}' is not UTF-8: {invalid} of its {len(text)} characters are invalid bytes "
                        "(binary data or another encoding): convert it to UTF-8 text")
    return text


def same_text(a: str, b: str) -> bool:
    """Whether two text sources are the same text: the same named dataset, or the same file however it is spelled
    (``./news.txt`` and ``news.txt``, a link, or the default text's own path against ``default``)."""
    if a in NAMED_DATASETS or b in NAMED_DATASETS:
        return a == b
    pa, pb = _text_path(a), _text_path(b)
    try:
        return pa.resolve() == pb.resolve() or pa.samefile(pb)
    except OSError:
        return a == b


def check_source(source: str) -> None:
    """Fail fast, before any model is loaded, when a text source cannot exist (missing file or package)."""
    if source in NAMED_DATASETS:
        if importlib.util.find_spec("datasets") is None:
            raise DataError(f"dataset '{source}' needs the datasets package: run `{DATASETS_INSTALL}`")
        return
    path, named = _text_path(source), ", ".join(NAMED_DATASETS)
    if path.is_dir():
        raise DataError(f"text '{source}' is a folder: pass a text file, 'default', or one of {named}")
    if not path.is_file():
        raise DataError(f"text '{source}' not found: pass 'default', a local text file, or one of {named}")


def load_text(source: str, role: str = "eval") -> str:
    """The raw text of a source; ``role`` ("calib" or "eval") picks the split of a named dataset."""
    check_source(source)
    if source in NAMED_DATASETS:
        text = _load_named(source, role)
    else:
        text = _read_text_file(_text_path(source), source)
    if not text.strip():
        raise DataError(f"text source '{source}' is empty: pass a file with text in it")
    return text


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """The whole text as one 1-D token stream, without special tokens (windows are cut from it)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it is cut. ``windows=None`` evaluates every full window available."""

    calib: str = DEFAULT_TEXT
    eval: str = DEFAULT_TEXT
    seq_len: int = 2048
    windows: int | None = 6
    seed: int = 0


@dataclass
class TokenData:
    """Evaluation windows ``[windows, seq_len]`` and the calibration token stream they never overlap with."""

    eval_windows: torch.Tensor
    calib_tokens: torch.Tensor
    seed: int

    def calibration(self, samples: int, seq_len: int, seed: int | None = None, reserve: int = 0) -> torch.Tensor:
        """``samples`` random windows of ``seq_len`` tokens from the calibration stream, ``[samples, seq_len]``;
        never from its last ``reserve`` tokens (kept for :meth:`held_out`)."""
        n = self.calib_tokens.numel() - reserve
        if samples < 1 or seq_len < 1:
            raise DataError(f"calibration needs at least 1 sample of at least 1 token, got {samples} x {seq_len}: "
                            "pass positive numbers")
        if n < seq_len:
            held = f" once {reserve} are held out" if reserve else ""
            raise DataError(
                f"calibration text has {n} tokens{held}, fewer than one calibration sample of {seq_len}: "
                "use a longer --calib-data, fewer --windows, or a shorter calibration seq_len in the recipe"
                + (" (or hold out less)" if reserve else "")
            )
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        starts = torch.randint(0, n - seq_len + 1, (samples,), generator=gen)
        return torch.stack([self.calib_tokens[s : s + seq_len] for s in starts.tolist()])

    def held_out(self, samples: int, seq_len: int) -> torch.Tensor:
        """``samples`` consecutive windows of ``seq_len`` tokens at the end of the calibration stream: the text that
        ``calibration(..., reserve=samples * seq_len)`` never draws from (validation of what trains on the rest)."""
        total = samples * seq_len
        if samples < 1 or seq_len < 1 or total >= self.calib_tokens.numel():
            raise DataError(f"cannot hold out {samples} x {seq_len} tokens of a {self.calib_tokens.numel()}-token "
                            "calibration text and still calibrate on the rest: hold out fewer or pass a longer text")
        return self.calib_tokens[-total:].view(samples, seq_len)


def _cut_windows(tokens: torch.Tensor, seq_len: int, windows: int | None, source: str) -> torch.Tensor:
    available = tokens.numel() // seq_len
    if available < 1:
        raise DataError(
            f"evaluation text '{source}' has {tokens.numel()} tokens, shorter than one window of {seq_len}: "
            "use a longer text or a smaller --seq-len"
        )
    count = available if windows is None else windows
    if count > available:
        raise DataError(
            f"evaluation text '{source}' holds {available} windows of {seq_len} tokens, {count} were asked: "
            f"use --windows {available} or less"
        )
    return tokens[: count * seq_len].view(count, seq_len)


def prepend_tokens(prefix: list[int], batches: torch.Tensor) -> torch.Tensor:
    """``batches`` ``[n, L]`` with the same ``prefix`` tokens before every row: ``[n, len(prefix) + L]``."""
    head = torch.tensor([prefix], dtype=batches.dtype, device=batches.device).expand(batches.shape[0], -1)
    return torch.cat([head, batches], dim=1)


def calibration_data(source: str, tokenizer, seed: int = 0) -> TokenData:
    """A whole text as calibration material only (for when evaluation happens elsewhere, e.g. in lm-eval)."""
    tokens = tokenize(load_text(source, "calib"), tokenizer)
    return TokenData(eval_windows=tokens[:0].view(0, 0), calib_tokens=tokens, seed=seed)


def prepare_data(config: DataConfig, tokenizer) -> TokenData:
    """Tokenize the sources and cut disjoint evaluation windows and calibration text (see the module docstring)."""
    if config.seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {config.seq_len}")
    if config.windows is not None and config.windows < 1:
        raise DataError(f"windows must be at least 1, got {config.windows}")
    if not isinstance(config.seed, int) or not -(2**62) < config.seed < 2**62:
        raise DataError(f"seed must be an integer of magnitude below 2^62, got {config.seed!r}")
    eval_tokens = tokenize(load_text(config.eval, "eval"), tokenizer)
    shared = same_text(config.calib, config.eval) and config.calib not in NAMED_DATASETS
    if not shared:
        windows = _cut_windows(eval_tokens, config.seq_len, config.windows, config.eval)
        calib_tokens = tokenize(load_text(config.calib, "calib"), tokenizer)
        return TokenData(eval_windows=windows, calib_tokens=calib_tokens, seed=config.seed)
    windows_wanted = config.windows
    if windows_wanted is None:
        windows_wanted = max(1, int(eval_tokens.numel() * EVAL_SHARE_WHEN_SHARED) // config.seq_len)
    windows = _cut_windows(eval_tokens, config.seq_len, windows_wanted, config.eval)
    return TokenData(eval_windows=windows, calib_tokens=eval_tokens[windows.numel() :], seed=config.seed)
