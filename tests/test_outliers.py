"""Outlier-token analysis: statistics, prefix selection (PrefixQuant's rule), and the `lowbit inspect` command."""

import json

import pytest
import torch

from lowbit.analysis.outliers import OutlierReport, analyze, select_prefix, site_stats
from lowbit.cli import main
from lowbit.models.arch import spec_for
from tests.conftest import tiny_model


def _maxima_with_outliers():
    """2 layers x 3 samples x 8 tokens; position 0 is huge everywhere, token 7 is huge wherever it appears."""
    batches = torch.tensor([[1, 7, 2, 3, 4, 5, 6, 2], [1, 2, 3, 7, 4, 9, 9, 9], [1, 2, 3, 4, 5, 6, 7, 8]])
    maxima = torch.ones(2, 3, 8)
    maxima[:, :, 0] = 500.0
    maxima[1][batches == 7] = 300.0
    return maxima, batches


def test_site_statistics_count_outliers_tokens_and_positions():
    maxima, batches = _maxima_with_outliers()
    stats = site_stats(maxima, batches, eta=64)
    assert stats[0].outliers_per_sample == 1 and stats[0].token_ids == {} and stats[0].positions == {0: 3}
    assert stats[1].outliers_per_sample == 2 and stats[1].token_ids == {7: 3}
    assert stats[1].max_ratio == pytest.approx(500.0)


def test_prefix_rule():
    maxima, batches = _maxima_with_outliers()
    report = OutlierReport(64, 3, 8, {"down_proj_input": site_stats(maxima, batches, 64)})
    assert select_prefix(report, bos_token_id=1) == [7, 1]  # o = 2: the one non-initial outlier id, then BOS
    only_first = OutlierReport(64, 3, 8, {"down_proj_input": site_stats(maxima[:1], batches, 64)})
    assert select_prefix(only_first, bos_token_id=1) == [1]  # only position 0: the prefix is just BOS
    bos_outlier = batches.clone()
    bos_outlier[bos_outlier == 7] = 1
    report = OutlierReport(64, 3, 8, {"down_proj_input": site_stats(maxima, bos_outlier, 64)})
    assert select_prefix(report, bos_token_id=1) == [1]  # never a doubled BOS


def test_analyze_a_model_with_and_without_prefix():
    model = tiny_model("llama")
    batches = torch.randint(2, 320, (3, 24), generator=torch.Generator().manual_seed(0))
    report = analyze(model, spec_for(model), batches, eta=4.0)
    assert len(report.sites["down_proj_input"]) == 2 and len(report.sites["residual"]) == 2
    with_prefix = analyze(model, spec_for(model), batches, eta=4.0, prefix=[1])
    assert with_prefix.seq_len == 24 and with_prefix.as_dict()["largest_ratio"]["residual"] > 0
    with pytest.raises(ValueError, match="eta must be > 1"):
        analyze(model, spec_for(model), batches, eta=1.0)


def test_inspect_command(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "outliers"
    args = ["inspect", "--model", str(tiny_model_dir), "--calib-data", str(text_file), "--samples", "2",
            "--seq-len", "32", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "outliers.json").read_text())
    assert set(summary["reports"]) == {"full precision", "rotated (QuaRot)", "rotated + prefix"}
    assert "prefix:" in capsys.readouterr().out
    assert main([*args[:-2], "--eta", "0.5"]) == 2
