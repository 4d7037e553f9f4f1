"""Token windows: disjoint calibration and evaluation, seeded, clear errors."""

import pytest
import torch

from lowbit.data import (
    DataConfig,
    TokenData,
    default_text_path,
    load_text,
    prepare_data,
)
from lowbit.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_same_source_is_split_without_overlap(tokenizer, text_file):
    data = prepare_data(DataConfig(calib=str(text_file), eval=str(text_file), seq_len=64, windows=3), tokenizer)
    assert data.eval_windows.shape == (3, 64)
    stream = torch.cat([data.eval_windows.flatten(), data.calib_tokens])
    full = torch.tensor(tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"])
    assert torch.equal(stream, full)  # evaluation = the head of the stream, calibration = the rest, nothing shared
    cal = data.calibration(8, 32)
    assert cal.shape == (8, 32)
    starts = [_find(data.calib_tokens, row) for row in cal]
    assert all(s >= 0 for s in starts)


def _find(stream: torch.Tensor, row: torch.Tensor) -> int:
    windows = stream.unfold(0, row.numel(), 1)
    hits = (windows == row).all(-1).nonzero()
    return int(hits[0]) if len(hits) else -1


def test_all_windows_leaves_a_calibration_share(tokenizer, text_file):
    data = prepare_data(DataConfig(calib=str(text_file), eval=str(text_file), seq_len=64, windows=None), tokenizer)
    total = data.eval_windows.numel() + data.calib_tokens.numel()
    assert 0.7 < data.eval_windows.numel() / total <= 0.8
    assert data.calib_tokens.numel() > 0


def test_calibration_is_seeded(tokenizer, text_file):
    cfg = DataConfig(calib=str(text_file), eval=str(text_file), seq_len=64, windows=2, seed=5)
    a, b = prepare_data(cfg, tokenizer), prepare_data(cfg, tokenizer)
    assert torch.equal(a.calibration(4, 16), b.calibration(4, 16))
    assert not torch.equal(a.calibration(4, 16), a.calibration(4, 16, seed=6))


def test_separate_sources(tokenizer, text_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("A completely different text about gardens and their flowers. " * 40)
    data = prepare_data(DataConfig(calib=str(other), eval=str(text_file), seq_len=64, windows=2), tokenizer)
    assert data.calib_tokens.numel() == len(tokenizer(other.read_text(), add_special_tokens=False)["input_ids"])


def test_errors_name_the_problem(tokenizer, text_file, tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_text(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_text(str(empty))
    with pytest.raises(DataError, match="shorter than one window"):
        prepare_data(DataConfig(calib=str(text_file), eval=str(text_file), seq_len=10**6), tokenizer)
    with pytest.raises(DataError, match="--windows"):
        prepare_data(DataConfig(calib=str(text_file), eval=str(text_file), seq_len=64, windows=10**4), tokenizer)
    small = TokenData(eval_windows=torch.zeros(1, 4, dtype=torch.long), calib_tokens=torch.arange(10), seed=0)
    with pytest.raises(DataError, match="fewer than one calibration sample"):
        small.calibration(2, 64)


def test_named_dataset_without_datasets_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "datasets" else real(n, *a))
    with pytest.raises(DataError, match=r"lowbit\[datasets\]"):
        load_text("wikitext2")


def test_default_text_is_the_lee_corpus():
    path = default_text_path()
    assert path.name == "lee_background.cor"
    assert len(load_text("default")) > 100_000


def test_named_datasets_use_disjoint_splits(monkeypatch, tokenizer):
    """wikitext2 through `datasets`: calibration from train, evaluation from test (loader stubbed: no network)."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(path, config, split):
        calls.append((path, config, split))
        words = "train words here " if split == "train" else "The committee met on Tuesday. "
        return {"text": [words * 50, "", words * 50]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = prepare_data(DataConfig(calib="wikitext2", eval="wikitext2", seq_len=32, windows=2), tokenizer)
    assert ("wikitext", "wikitext-2-raw-v1", "test") in calls and ("wikitext", "wikitext-2-raw-v1", "train") in calls
    assert data.eval_windows.shape == (2, 32)
    calib_text, eval_text = tokenizer.decode(data.calib_tokens), tokenizer.decode(data.eval_windows.flatten())
    assert "train words" in calib_text and "committee" not in calib_text
    assert "committee" in eval_text and "train" not in eval_text


def test_unreachable_named_dataset_is_a_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="could not load dataset 'c4'.*local text file"):
        load_text("c4", "eval")
