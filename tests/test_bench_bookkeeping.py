"""Benchmark bookkeeping: the peer benchmark's rows of several tools merge and render side by side, each
peer gets its own worker arguments, Brevitas' worker builds its entry point's command line from a job, and a run on
another text keeps its results apart."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peers  # noqa: E402
from _brevitas_worker import brevitas_argv, calibration_samples  # noqa: E402

META = {"model": "default", "settings": {"windows": 6, "seq_len": 2048, "calib_samples": 64, "calib_seq_len": 512,
                                         "layers": None},
        "peer_actorder": "static", "threads": 2, "torch": "2.13.0", "lowbit": "0.1.0", "command": "python x"}


def _row(job: str, tool: str, ratio: float, **extra) -> dict:
    return {"job": job, "tool": tool, "ratio": ratio, "kl": 0.1, "top1": 0.8, "quantize_s": 1.0, "date": "d",
            "note": "", **extra}


def test_new_rows_join_saved_ones_of_other_tools_in_job_then_tool_order():
    saved = {"meta": META, "rows": [_row("w4a16-g64", "llmcompressor", 1.2), _row("w4a16-g64", "lowbit", 1.1)]}
    merged = peers.merge(saved, [_row("w4a16-g64", "brevitas", 1.3), _row("w4a16-channel", "brevitas", 1.5)], META)
    assert [(r["job"], r["tool"]) for r in merged] == [
        ("w4a16-g64", "lowbit"), ("w4a16-g64", "llmcompressor"), ("w4a16-g64", "brevitas"),
        ("w4a16-channel", "brevitas")]
    # a run on other settings does not mix with saved rows
    other = {**META, "settings": {**META["settings"], "windows": 1}}
    assert [r["tool"] for r in peers.merge(saved, [_row("w4a16-g64", "brevitas", 1.3)], other)] == ["brevitas"]


def test_table_names_each_peer_with_its_own_versions():
    rows = [_row("w4a16-g64", "llmcompressor", 1.2, versions={"llmcompressor": "0.14.0.1", "transformers": "5.17.0"}),
            _row("w4a16-g64", "brevitas", 1.3, versions={"brevitas": "0.13.4", "transformers": "5.25.0"},
                 config={"worker_args": ["--threads", "1"]})]
    head = peers.table(rows, META)[0]
    assert "llm-compressor 0.14.0.1 (transformers 5.17.0)" in head and "Brevitas 0.13.4 (transformers 5.25.0)" in head
    assert "(Brevitas: 1," in head


def test_each_peer_gets_its_own_worker_arguments():
    class Args:
        peer_actorder, brevitas_threads = "static", 1

    job, settings = peers.JOBS["w4a4-rotated"], {"layers": 2}
    assert peers.worker_args(peers.BREVITAS, job, settings, Args) == ["--layers", "2", "--threads", "1"]
    assert peers.worker_args(peers.LLMCOMPRESSOR, job, settings, Args)[:2] == ["--actorder", "static"]
    assert "--rotation-orphan-sink" in job.brevitas["flags"] and job.peer["rotations"]


def test_brevitas_gets_our_tokens_and_a_float32_model():
    calib = torch.arange(12).view(3, 4)
    argv = brevitas_argv({"flags": ["--gptq"]}, "/m", calib)
    assert argv[:8] == ["--model", "/m", "--dtype", "float32", "--nsamples", "3", "--seqlen", "4"]
    assert argv[-1] == "--gptq"
    samples = calibration_samples(calib)
    assert len(samples) == 3 and list(samples[1]) == ["input_ids"] and samples[1]["input_ids"].tolist() == [4, 5, 6, 7]


def test_a_run_on_another_text_writes_its_own_results_and_says_so():
    from argparse import Namespace

    from harness import command_line, results_paths

    canonical = Path("/r/qat.json")
    plain = Namespace(model="default", results=canonical, seq_len=2048, windows=6)
    assert results_paths(plain, canonical) == (canonical, canonical)
    cross = Namespace(**vars(plain), eval_data="benchmarks/results/enwiki.txt", text=None)
    assert results_paths(cross, canonical) == (Path("/r/qat@enwiki.json"), canonical)
    both = Namespace(**vars(plain), eval_data=None, text="enwiki.txt")
    assert results_paths(both, canonical)[0] == Path("/r/qat@enwiki-calibrated.json")
    qwen = Namespace(**{**vars(cross), "model": "qwen2.5-coder-0.5b"})
    assert results_paths(qwen, canonical)[0] == Path("/r/qat-qwen2.5-coder-0.5b@enwiki.json")
    assert command_line("python benchmarks/qat.py", cross).endswith("--eval-data benchmarks/results/enwiki.txt")


def test_a_run_on_another_text_loads_rotations_learned_on_that_text(tmp_path):
    import pytest
    import qat

    saved = tmp_path / "row-rotations.safetensors"
    recipe = qat.variant("w4a4kv4-spinquant", lambda d: d["steps"][0].update(rotations=str(saved)))
    with pytest.raises(SystemExit, match=r"row@enwiki-rotations\.safetensors: learn the rotations"):
        qat._rotations_of(recipe, "enwiki")
    (tmp_path / "row@enwiki-rotations.safetensors").write_bytes(b"")
    moved = qat._rotations_of(recipe, "enwiki")
    assert moved.steps[0].rotations == str(tmp_path / "row@enwiki-rotations.safetensors")
    assert moved.steps[1:] == recipe.steps[1:]


def test_a_peer_job_edits_its_preset_and_takes_the_peers_calibration():
    job = peers.JOBS["w4a4-rotated-o"]
    recipe = job.recipe(32, 256)
    plain = peers.JOBS["w4a4-rotated"].recipe(32, 256)
    assert recipe.steps[0].o_rotation and not plain.steps[0].o_rotation
    assert recipe.steps[1:] == plain.steps[1:] and recipe.activations == plain.activations
    assert (recipe.calibration.samples, recipe.calibration.seq_len) == (32, 256)
