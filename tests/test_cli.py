"""The command line: a full run on a tiny model, and one clear line for every kind of bad input."""

import json
import subprocess
import sys

import pytest

from lowbit.cli import main

REPORT_KEYS = {
    "model": None,
    "recipe": None,
    "eval": {"data", "seq_len", "windows", "tokens"},
    "fp": {"ppl"},
    "quantized": {"ppl", "kl_vs_fp", "top1_agreement"},
    "bits": {"weight", "activation", "kv"},
    "seconds": {"load", "calibrate", "quantize", "eval"},
}


def _args(model_dir, text_file, report, *extra):
    return ["quantize", "--model", str(model_dir), "--eval-data", str(text_file), "--calib-data", str(text_file),
            "--seq-len", "64", "--windows", "2", "--report", str(report), *extra]


def test_quantize_writes_a_complete_report(tiny_model_dir, text_file, tmp_path, capsys):
    report = tmp_path / "out" / "report.json"
    assert main(_args(tiny_model_dir, text_file, report, "--recipe", "w4a4kv4-rtn")) == 0
    data = json.loads(report.read_text())
    for key, sub in REPORT_KEYS.items():
        assert key in data
        if sub:
            assert sub <= set(data[key]), key
    assert data["recipe"] == "w4a4kv4-rtn"
    assert data["eval"]["windows"] == 2 and data["eval"]["tokens"] == 2 * 63
    assert data["bits"]["weight"] < 5 and data["bits"]["kv"] < 5
    assert data["quantized"]["kl_vs_fp"] > 0
    assert "ppl ratio" in capsys.readouterr().out


def _run_yaml(model_dir, text_file, tmp_path, recipe_text: str) -> dict:
    """Run ``lowbit quantize`` with a recipe written to a YAML file; returns the report."""
    recipe, report = tmp_path / "recipe.yaml", tmp_path / "r.json"
    recipe.write_text(recipe_text)
    assert main(_args(model_dir, text_file, report, "--recipe", str(recipe))) == 0
    return json.loads(report.read_text())


def test_static_recipe_from_yaml(tiny_model_dir, text_file, tmp_path):
    data = _run_yaml(tiny_model_dir, text_file, tmp_path,
                     "name: static-a8\n"
                     "activations: {format: int8, granularity: tensor, dynamic: false}\n"
                     "calibration: {samples: 2, seq_len: 32}\n")
    assert data["recipe"] == "static-a8" and data["seconds"]["calibrate"] > 0
    # calibrated int8 per-tensor scales: every linear input quantized, close to full precision but not equal to it
    assert data["bits"]["activation"] == 8 and 0 < data["quantized"]["kl_vs_fp"] < 0.05


def test_prefix_recipe_reports_bits_of_the_wrapped_model(tiny_model_dir, text_file, tmp_path):
    """A PrefixQuant recipe's report counts the bits of the quantized linears and names the prefix."""
    data = _run_yaml(tiny_model_dir, text_file, tmp_path,
                     "name: prefix-w4a8\n"
                     "steps: [{method: quarot}, {method: prefix, tokens: [5]}, {method: blockwise, grid: false, "
                     "epochs: 0, samples: 2, seq_len: 32}]\n"
                     "weights: {format: int4, granularity: channel}\n"
                     "activations: {format: int8, granularity: tensor, dynamic: false}\n"
                     "calibration: {samples: 2, seq_len: 32}\n")
    assert 4 <= data["bits"]["weight"] < 5 and data["bits"]["activation"] == 8
    assert data["prefix"]["tokens"] == [5]


def test_prefix_with_a_packed_kv_cache_reports_the_cache_bits(tiny_model_dir, text_file, tmp_path):
    """A prefixed model with a packed KV cache: the report counts the packed cache's bits."""
    data = _run_yaml(tiny_model_dir, text_file, tmp_path,
                     "name: prefix-kv4\n"
                     "steps: [{method: quarot}, {method: prefix, tokens: [5]}]\n"
                     "kv_cache: {keys: {codec: int, bits: 4, group: 16}, values: {codec: int, bits: 4, group: 16}, "
                     "window: 8}\n")
    assert 4 < data["bits"]["kv"] < 8 and data["prefix"]["tokens"] == [5]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--recipe", "w3a3-magic"], "unknown recipe 'w3a3-magic'"),
        (["--recipe", "missing.yaml"], "recipe file missing.yaml not found"),
        (["--model", "/no/such/model"], "model '/no/such/model' not found"),
        (["--eval-data", "/no/such.txt"], "text '/no/such.txt' not found"),
        (["--seq-len", "100000"], "shorter than one window"),
        (["--windows", "9999"], "use --windows"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_model_dir, text_file, tmp_path, capsys, extra, message):
    report = tmp_path / "r.json"
    assert main(_args(tiny_model_dir, text_file, report) + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not report.exists() and not list(tmp_path.glob(".r.json*"))


def test_invalid_bit_width_in_a_recipe_file(tiny_model_dir, text_file, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("steps: [{method: rtn}]\nweights: {format: int12}\n")
    assert main(_args(tiny_model_dir, text_file, tmp_path / "r.json", "--recipe", str(recipe))) == 2
    err = capsys.readouterr().err
    assert "field 'weights.format'" in err and "int2" in err


def test_recipes_lists_every_preset(capsys):
    from lowbit.recipe import preset_names

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in preset_names())
    assert main(["recipes", "w4a16-rtn-g64"]) == 0
    assert "group_size: 64" in capsys.readouterr().out


def test_recipes_printed_to_a_file_round_trip(tmp_path, capsys):
    """`lowbit recipes NAME > x.yaml` (stdout not a terminal) writes YAML that loads back to the very preset."""
    from lowbit.recipe import Recipe, load_preset, preset_names

    for name in preset_names():
        assert main(["recipes", name]) == 0
        path = tmp_path / f"{name}.yaml"
        path.write_text(capsys.readouterr().out)
        assert Recipe.from_file(path) == load_preset(name), name


def test_a_redirected_preset_runs(tiny_model_dir, text_file, tmp_path):
    """The README's "copy a preset to make your own": the printed w4a4kv4-quarot (calibration shrunk) runs."""
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "recipes", "w4a4kv4-quarot"], capture_output=True,
                          text=True, check=True)
    text = proc.stdout.replace("samples: 32", "samples: 2").replace("seq_len: 512", "seq_len: 32")
    data = _run_yaml(tiny_model_dir, text_file, tmp_path, text)
    assert data["recipe"] == "w4a4kv4-quarot" and data["bits"]["kv"] < 5


def test_console_script_has_no_traceback_on_error():
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "recipes", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("lowbit: error: unknown recipe 'nope'")
    assert "Traceback" not in proc.stderr


def test_save_then_eval_generate_and_bench_the_saved_model(tiny_model_dir, text_file, tmp_path, capsys):
    """quantize --save, then eval reproduces the quantize report's perplexity (real kernels within 0.5%, simulated
    exactly), generate streams text, bench writes its tables; a second --save onto the folder is refused."""
    saved, report = tmp_path / "w4a4", tmp_path / "q.json"
    assert main(_args(tiny_model_dir, text_file, report, "--recipe", "w4a4kv4-quarot-rtn", "--save", str(saved))) == 0
    quantized = json.loads(report.read_text())
    assert quantized["saved"] == str(saved) and (saved / "lowbit.json").is_file()
    for extra in ([], ["--simulate"]):
        out = tmp_path / f"eval{len(extra)}.json"
        args = ["eval", "--model", str(saved), "--eval-data", str(text_file), "--seq-len", "64", "--windows", "2",
                "--report", str(out), *extra]
        assert main(args) == 0
        ev = json.loads(out.read_text())
        assert ev["eval"]["tokens"] == quantized["eval"]["tokens"]
        assert ev["fp"]["ppl"] == pytest.approx(quantized["fp"]["ppl"], rel=1e-6)
        tolerance = 1e-6 if extra else 5e-3
        assert ev["quantized"]["ppl"] == pytest.approx(quantized["quantized"]["ppl"], rel=tolerance)
    capsys.readouterr()
    assert main(["generate", "--model", str(saved), "--prompt", "The committee", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
    bench = tmp_path / "bench.json"
    assert main(["bench", "--model", str(saved), "--prefill", "32", "--prompt", "8", "--new-tokens", "4",
                 "--batches", "1,2", "--repeats", "1", "--report", str(bench)]) == 0
    rows = json.loads(bench.read_text())["rows"]
    assert set(rows) == {"quantized", "fp32", "bf16"} and rows["quantized"]["prefill_tokens_per_s"] > 0
    assert rows["quantized"]["resident_bytes"]["quantized linears"] > 0
    assert main(_args(tiny_model_dir, text_file, report, "--recipe", "w8a8-rtn", "--save", str(saved))) == 2
    assert "already exists" in capsys.readouterr().err
