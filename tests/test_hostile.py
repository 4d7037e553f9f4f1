"""Hostile and careless input (issue 21): every case ends in one ``lowbit: error:`` line naming the problem and the
fix, exit code 2, no traceback, nothing written and nothing left in the cache; silent-wrong-result cases are
refused or handled, and output never clobbers what it must not.

The CLI table runs ``lowbit.cli.main`` in-process on the tiny model folder and tiny text of ``conftest.py``; each row
builds its damaged input in ``tmp_path`` and names a fragment the error line must hold.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit.cli import main
from lowbit.data import DataConfig, TokenData, prepare_data
from lowbit.errors import DataError, LowbitWarning, ModelError, RecipeError
from lowbit.evaluate import evaluate

# --- builders of damaged inputs ------------------------------------------------------------------------------------


def _copy(model_dir: Path, tmp: Path) -> Path:
    folder = tmp / "model"
    shutil.copytree(model_dir, folder)
    return folder


def _broken_config(model_dir: Path, tmp: Path) -> Path:
    folder = _copy(model_dir, tmp)
    (folder / "config.json").write_text("{not json")
    return folder


def _edit_config(model_dir: Path, tmp: Path, **changes) -> Path:
    folder = _copy(model_dir, tmp)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def _edit_weights(model_dir: Path, tmp: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    folder = _copy(model_dir, tmp)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _nan_weight(tensors: dict) -> None:
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = math.nan


def _drop_weight(tensors: dict) -> None:
    del tensors["model.layers.0.mlp.up_proj.weight"]


def _pickle_only(model_dir: Path, tmp: Path) -> Path:
    from safetensors.torch import load_file

    folder = _copy(model_dir, tmp)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def _truncated_safetensors(model_dir: Path, tmp: Path) -> Path:
    folder = _copy(model_dir, tmp)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def _no_tokenizer(model_dir: Path, tmp: Path) -> Path:
    folder = tmp / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, folder / name)
    return folder


def _file(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def _two_ggufs(tmp: Path) -> Path:
    folder = tmp / "ggufs"
    folder.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (folder / name).write_bytes(b"GGUF")
    return folder


def _gguf_of_family(tmp: Path, arch: str) -> Path:
    """A GGUF with metadata only (no tensors) that says it holds a model of ``arch``."""
    from gguf import GGUFWriter

    path = tmp / f"{arch}.gguf"
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _recipe_file(tmp: Path, text: str, name: str = "r.yaml") -> Path:
    return _file(tmp, name, text.encode())


SHADOW = "root:$6$secrethash$abcdefgh:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"

# (id, extra CLI arguments built from (model_dir, text_file, tmp), fragment of the error line)
QUANTIZE_CASES = [
    ("config-invalid-json", lambda m, t, d: ["--model", str(_broken_config(m, d))], "not a valid model config"),
    ("config-unknown-model-type", lambda m, t, d: ["--model", str(_edit_config(m, d, model_type="nosucharch"))],
     "not a valid model config"),
    ("config-shapes-mismatch", lambda m, t, d: ["--model", str(_edit_config(m, d, intermediate_size=200))],
     "do not match config.json"),
    ("no-tokenizer", lambda m, t, d: ["--model", str(_no_tokenizer(m, d))], "tokenizer"),
    ("gguf-empty", lambda m, t, d: ["--model", str(_file(d, "e.gguf", b""))], "not a complete GGUF file"),
    ("gguf-random", lambda m, t, d: ["--model", str(_file(d, "r.gguf", os.urandom(4096)))],
     "not a complete GGUF file"),
    ("gguf-truncated", lambda m, t, d: ["--model", str(_file(d, "t.gguf", b"GGUF\x03\x00\x00\x00" + b"\x00" * 9))],
     "not a complete GGUF file"),
    ("two-ggufs", lambda m, t, d: ["--model", str(_two_ggufs(d))], "holds 2 .gguf files"),
    ("gguf-unsupported-family", lambda m, t, d: ["--model", str(_gguf_of_family(d, "gemma2"))],
     "unsupported architecture 'gemma2'"),
    ("model-plain-file", lambda m, t, d: ["--model", str(_file(d, "weights.txt", b"hello"))], "not a .gguf file"),
    ("safetensors-truncated", lambda m, t, d: ["--model", str(_truncated_safetensors(m, d))], "damaged"),
    ("safetensors-missing-tensor", lambda m, t, d: ["--model", str(_edit_weights(m, d, _drop_weight))],
     "lack or misshape 1 tensor"),
    ("pickle-only", lambda m, t, d: ["--model", str(_pickle_only(m, d))], "safetensors only"),
    ("nan-weights", lambda m, t, d: ["--model", str(_edit_weights(m, d, _nan_weight))],
     "model.layers.1.mlp.down_proj.weight holds 1 NaN"),
    ("seed-too-large", lambda m, t, d: ["--seed", str(2**63 + 1)], "--seed"),
    ("threads-absurd", lambda m, t, d: ["--threads", "100000"], "pass at most"),
    ("argparse-format", lambda m, t, d: ["--windows", "many"], "--windows"),
    ("recipe-folder", lambda m, t, d: ["--recipe", str(d)], "is a folder"),
    ("recipe-not-a-recipe", lambda m, t, d: ["--recipe", str(_recipe_file(d, SHADOW, "shadow"))],
     "not a lowbit recipe"),
    ("recipe-invalid-yaml", lambda m, t, d: ["--recipe", str(_recipe_file(d, "steps: [\n  - {method: rtn\n"))],
     "not valid YAML"),
    ("recipe-clip-nan", lambda m, t, d: ["--recipe", str(_recipe_file(
        d, "steps: [{method: rtn}]\nweights: {format: int4, clip_ratio: .nan}\n"))], "finite number"),
    ("recipe-targets-empty", lambda m, t, d: ["--recipe", str(_recipe_file(
        d, "steps: [{method: rtn}]\nweights: {format: int8}\ntargets: []\n"))], "targets is empty"),
    ("data-folder", lambda m, t, d: ["--eval-data", str(d)], "is a folder"),
    ("data-binary", lambda m, t, d: ["--eval-data", str(_file(d, "b.bin", bytes(range(256)) * 64))], "not UTF-8"),
    ("data-utf16", lambda m, t, d: ["--calib-data", str(_file(d, "u.txt", ("hello world " * 400).encode("utf-16")))],
     "UTF-16"),
    ("data-invalid-utf8", lambda m, t, d: ["--eval-data", str(_file(d, "l.txt", ("caf\xe9 " * 500).encode("latin-1")))],
     "invalid bytes"),
    ("seq-len-beyond-context", lambda m, t, d: ["--seq-len", "600", "--windows", "1"], "beyond the model's context"),
    ("report-is-folder", lambda m, t, d: ["--report", str(d)], "not a regular file"),
    ("report-is-fifo", lambda m, t, d: ["--report", _fifo(d)], "not a regular file"),
    ("report-is-symlink", lambda m, t, d: ["--report", _symlink(d)], "symbolic link"),
    ("report-under-a-file", lambda m, t, d: ["--report", str(_file(d, "plain", b"x") / "r.json")], "is a file"),
    ("save-under-a-file", lambda m, t, d: ["--save", str(_file(d, "plain", b"x") / "model")], "is a file"),
]


def _fifo(tmp: Path) -> str:
    path = tmp / "fifo.json"
    os.mkfifo(path)
    return str(path)


def _symlink(tmp: Path) -> str:
    target = _file(tmp, "target.json", b"{}")
    link = tmp / "link.json"
    link.symlink_to(target)
    return str(link)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(folder))
    return folder


def _assert_one_error_line(err: str, fragment: str) -> None:
    assert err.startswith("lowbit: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert fragment in err, err


def _snapshot(folder: Path) -> dict[str, tuple]:
    return {str(p.relative_to(folder)): (p.is_file(), p.stat().st_size if p.is_file() else 0, p.is_symlink())
            for p in folder.rglob("*")}


@pytest.mark.parametrize("case, build, fragment", QUANTIZE_CASES, ids=[c[0] for c in QUANTIZE_CASES])
def test_quantize_refuses_hostile_input(tiny_model_dir, text_file, tmp_path, cache, capsys, case, build, fragment):
    work = tmp_path / "work"
    work.mkdir()
    report = tmp_path / "out" / "r.json"
    extra = build(tiny_model_dir, text_file, work)
    before = _snapshot(work)
    args = ["quantize", "--model", str(tiny_model_dir), "--calib-data", str(text_file), "--eval-data",
            str(text_file), "--seq-len", "32", "--windows", "2", "--report", str(report), *extra]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse
        code = exc.code
    assert code == 2
    _assert_one_error_line(capsys.readouterr().err, fragment)
    assert not report.exists() and not (tmp_path / "out").exists()
    assert _snapshot(work) == before  # nothing written, replaced or left beside the inputs
    assert not cache.exists() or not list(cache.rglob(".tmp-*"))
    if case == "gguf-unsupported-family":  # refused from the header: no conversion was started
        assert not (cache / "gguf").exists()


@pytest.mark.parametrize("contents", ["file", "read-only folder"])
def test_an_unusable_cache_is_one_line(tmp_path, monkeypatch, capsys, contents):
    """LOWBIT_CACHE pointing at a file or a read-only folder: a GGUF conversion says to move the cache."""
    cache = tmp_path / "cache"
    if contents == "file":
        cache.write_text("x")
    else:
        cache.mkdir()
        cache.chmod(0o500)
        if os.access(cache, os.W_OK):
            pytest.skip("running as root: a read-only folder is writable")
    monkeypatch.setenv("LOWBIT_CACHE", str(cache))
    gguf = _file(tmp_path, "m.gguf", b"GGUF")
    assert main(["quantize", "--model", str(gguf), "--report", str(tmp_path / "r.json")]) == 2
    _assert_one_error_line(capsys.readouterr().err, "LOWBIT_CACHE")
    cache.chmod(0o700) if cache.is_dir() else None


def test_inspect_refuses_nan_eta_and_an_out_file(tiny_model_dir, text_file, tmp_path, capsys):
    base = ["inspect", "--model", str(tiny_model_dir), "--calib-data", str(text_file), "--samples", "1",
            "--seq-len", "16"]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--eta", "nan", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    _assert_one_error_line(capsys.readouterr().err, "finite number")
    out = _file(tmp_path, "o.txt", b"keep me")
    assert main([*base, "--out", str(out)]) == 2
    _assert_one_error_line(capsys.readouterr().err, "is a file")
    assert out.read_bytes() == b"keep me"


def test_tasks_offline_fail_before_the_run(tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    """An lm-eval task whose data is not cached fails before the model is even loaded."""
    pytest.importorskip("lm_eval")
    import lowbit.pipeline

    def no_load(*_, **__):
        raise AssertionError("the model was loaded before the tasks were checked")

    class Manager:  # lm-eval's own indexes every task (minutes on a busy machine); this one knows none
        def load(self, names):
            raise KeyError(f"Spec '{names[0]}' is not a registered task/group/tag name or valid YAML path")

    monkeypatch.setattr(lowbit.pipeline, "load_model", no_load)
    monkeypatch.setattr("lm_eval.tasks.TaskManager", Manager)
    args = ["quantize", "--model", str(tiny_model_dir), "--calib-data", str(text_file), "--eval-data",
            str(text_file), "--report", str(tmp_path / "r.json"), "--tasks", "no_such_task_xyz"]
    assert main(args) == 2
    _assert_one_error_line(capsys.readouterr().err, "lm-eval cannot build tasks")


def test_recipe_errors_never_echo_the_file(tmp_path, capsys):
    """A recipe path to a file that is not a recipe (e.g. /etc/shadow) never prints the file's contents back."""
    for text in (SHADOW, "a: [\n" + SHADOW, "- " + SHADOW):
        with pytest.raises(RecipeError) as exc:
            lowbit.load_recipe(str(_recipe_file(tmp_path, text, "secret")))
        assert "secrethash" not in str(exc.value) and "\n" not in str(exc.value)


# --- the Python API ------------------------------------------------------------------------------------------------


def test_python_api_misuse_raises_lowbit_errors(model_and_data):
    model, data = model_and_data
    cases = [
        (lambda: lowbit.Recipe(weights={"format": "int12"}), RecipeError, "int12"),
        (lambda: lowbit.load_recipe({"steps": [{"method": "rtn"}], "weights": {"format": "int9"}}), RecipeError,
         "int9"),
        (lambda: lowbit.load_recipe(42), RecipeError, "got int"),
        (lambda: lowbit.quantize(model, "w8a8-rtn", "news.txt"), DataError, "tokenize the text first"),
        (lambda: lowbit.run(model="x", data="news.txt"), DataError, "DataConfig"),
        (lambda: data.calibration(0, 16), DataError, "at least 1 sample"),
        (lambda: prepare_data(DataConfig(seed=2**64), None), DataError, "seed must be"),
        (lambda: evaluate(model, model, data.eval_windows[:0]), DataError, "token windows"),
    ]
    for call, kind, fragment in cases:
        with pytest.raises(kind, match=fragment):
            call()


def test_a_recipe_given_as_a_dict_is_used(model_and_data):
    recipe = lowbit.load_recipe({"name": "d", "steps": [{"method": "rtn"}], "weights": {"format": "int8"}})
    assert recipe.name == "d" and recipe.weights.format == "int8"


@pytest.fixture
def model_and_data():
    model = tiny_model("llama")
    tokens = torch.randint(0, 320, (4000,), generator=torch.Generator().manual_seed(0))
    return model, TokenData(eval_windows=tokens[:64].view(2, 32), calib_tokens=tokens[64:], seed=0)


# --- silent wrong results ------------------------------------------------------------------------------------------


def test_quantizing_a_quantized_model_is_refused(model_and_data):
    model, data = model_and_data
    once = lowbit.quantize(model, "w8a8-rtn", data)
    with pytest.raises(ModelError, match="already quantized"):
        lowbit.quantize(once, "w4a16-rtn-g64", data)


def test_the_same_file_spelled_twice_is_one_text(text_file, tiny_model_dir, monkeypatch):
    """``./news.txt`` against an absolute path (or a link to it) is the shared-text split, not two texts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    monkeypatch.chdir(text_file.parent)
    link = text_file.parent / "link.txt"
    link.unlink(missing_ok=True)
    link.symlink_to(text_file)
    shared = prepare_data(DataConfig(calib=str(text_file), eval=str(text_file), seq_len=32, windows=2), tokenizer)
    for calib in (f"./{text_file.name}", "link.txt", f"{text_file.parent}/../{text_file.parent.name}/news.txt"):
        other = prepare_data(DataConfig(calib=calib, eval=str(text_file), seq_len=32, windows=2), tokenizer)
        assert torch.equal(other.calib_tokens, shared.calib_tokens), calib
    link.unlink()


def test_default_text_against_its_own_path_is_one_text():
    from lowbit.data import default_text_path, same_text

    try:
        path = default_text_path()
    except DataError:
        pytest.skip("gensim is not installed")
    assert same_text("default", str(path)) and not same_text("default", "wikitext2")


def test_nan_in_a_report_is_strict_json(tmp_path):
    from lowbit.report import write_json_atomic

    path = write_json_atomic(tmp_path / "r.json", {"ppl": math.nan, "x": [math.inf, 1.0], "y": {"z": -math.inf}})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON")) == {
        "ppl": None, "x": [None, 1.0], "y": {"z": None}}


def test_a_replaced_report_keeps_its_mode_and_a_new_one_follows_the_umask(tmp_path):
    from lowbit.report import write_json_atomic

    kept = tmp_path / "kept.json"
    kept.write_text("{}")
    kept.chmod(0o640)
    write_json_atomic(kept, {"a": 1})
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and json.loads(kept.read_text()) == {"a": 1}
    umask = os.umask(0o022)
    try:
        new = write_json_atomic(tmp_path / "new.json", {})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o644


def _blockwise_recipe(folder: Path):
    return lowbit.load_recipe({"name": "bw", "steps": [{"method": "blockwise", "grid": False, "epochs": 0,
                                                          "samples": 2, "seq_len": 16, "checkpoint": str(folder)}],
                               "weights": {"format": "int4", "granularity": "channel"}})


def test_a_blockwise_checkpoint_is_bound_to_its_model_and_data(model_and_data, tmp_path):
    """Model B with model A's recipe and checkpoint folder does not receive A's layers; it says so."""
    from lowbit.methods.blockwise import BlockwiseResult

    _, data = model_and_data
    recipe = _blockwise_recipe(tmp_path / "blocks")
    lowbit.quantize_with_session(tiny_model("llama", seed=0), recipe, data)
    _, again = lowbit.quantize_with_session(tiny_model("llama", seed=0), recipe, data)
    assert again.get(BlockwiseResult).restored == 2
    with pytest.warns(LowbitWarning, match="model") as record:
        _, other = lowbit.quantize_with_session(tiny_model("llama", seed=1), recipe, data)
    assert other.get(BlockwiseResult).restored == 0
    assert sum(issubclass(w.category, LowbitWarning) for w in record) == 1  # one line per run, not one per layer
    shifted = TokenData(eval_windows=data.eval_windows, calib_tokens=data.calib_tokens.roll(7), seed=0)
    with pytest.warns(LowbitWarning, match="calibration"):
        _, moved = lowbit.quantize_with_session(tiny_model("llama", seed=0), recipe, shifted)
    assert moved.get(BlockwiseResult).restored == 0


def test_a_spinquant_checkpoint_is_bound_to_its_model(model_and_data, tmp_path):
    """Model B does not resume model A's rotations (nor report A's losses)."""
    from lowbit.methods.quarot import RotationResult

    _, data = model_and_data
    ckpt = tmp_path / "rot.safetensors"
    recipe = lowbit.load_recipe({"name": "sq", "steps": [{"method": "spinquant", "steps": 2, "samples": 1,
                                                          "seq_len": 16, "checkpoint": str(ckpt)}],
                                 "activations": {"format": "int4", "granularity": "token"}})
    _, first = lowbit.quantize_with_session(tiny_model("llama", seed=0), recipe, data)
    with pytest.warns(LowbitWarning, match="model"):
        _, other = lowbit.quantize_with_session(tiny_model("llama", seed=1), recipe, data)
    a, b = (s.get(RotationResult).details["losses"] for s in (first, other))
    assert len(b) == 2 and a != b


def test_reports_are_deterministic(tiny_model_dir, text_file, tmp_path):
    """The same input gives the same report, twice in one process (seeded: rotations and calibration sampling)."""
    reports = []
    for i in range(2):
        args = ["quantize", "--model", str(tiny_model_dir), "--recipe", "w8a8-quarot", "--calib-data",
                str(text_file), "--eval-data", str(text_file), "--seq-len", "32", "--windows", "2", "--seed", "3",
                "--report", str(tmp_path / f"r{i}.json")]
        assert main(args) == 0
        report = json.loads((tmp_path / f"r{i}.json").read_text())
        report.pop("seconds")
        report.get("rotation", {}).pop("seconds", None)
        reports.append(report)
    assert reports[0] == reports[1]


# --- faults: interrupting a GGUF conversion ------------------------------------------------------------------------

FAULT_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import lowbit.cli, lowbit.models.loading as loading

    signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with SIGINT ignored

    def signal_now(*args):
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))

    def write(gguf, folder):  # where: "start" (nothing written yet), "mid" (a partial file), "rename" (all written)
        if sys.argv[3] == "start":
            signal_now()
        (Path(folder) / "part.safetensors").write_bytes(b"x" * 1000)
        if sys.argv[3] == "mid":
            signal_now()
        (Path(folder) / "config.json").write_text("{}")

    loading._write_conversion = write
    loading.os.replace = signal_now  # "rename": the signal arrives as the finished folder is moved into place
    gguf = Path(sys.argv[1])
    sys.exit(lowbit.cli.main(["quantize", "--model", str(gguf), "--report", str(gguf.parent / "r.json")]))
""")


@pytest.mark.parametrize("where", ["start", "mid", "rename"])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_gguf_conversion_leaves_no_temporary(tmp_path, sig, where):
    cache = tmp_path / "cache"
    gguf = _file(tmp_path, "m.gguf", b"GGUF")
    env = {**os.environ, "LOWBIT_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", FAULT_SCRIPT, str(gguf), sig, where], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == (130 if sig == "SIGINT" else 143), proc.stderr
    assert "Traceback" not in proc.stderr
    assert cache.is_dir() and not list(cache.rglob(".tmp-*")) and not (tmp_path / "r.json").exists()
    assert not [p for p in cache.rglob("config.json")]  # nothing half-converted is left to be taken as a model


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    from lowbit.models.loading import remove_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for name in (f".tmp-{dead.stdout.strip()}-abc", ".tmp-old", f".tmp-{os.getpid()}-live", "kept-folder"):
        (tmp_path / name).mkdir()
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".tmp-{os.getpid()}-live", "kept-folder"]


def test_sigterm_is_an_interrupt_in_the_cli(tmp_path):
    """SIGTERM during a run ends like Ctrl-C (cleanup runs, exit 143), with one line and no traceback."""
    script = ("import os, signal, sys, lowbit.cli, lowbit.recipe as r\n"
              "def slow(*a, **k):\n    os.kill(os.getpid(), signal.SIGTERM)\n"
              "r.load_preset = slow\nsys.exit(lowbit.cli.main(['recipes', 'w8a8-rtn']))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143 and proc.stderr.strip() == "lowbit: terminated"


# --- faults: SIGINT and SIGTERM during GPTQ and SpinQuant runs -----------------------------------------------------

RUN_FAULT_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import lowbit.cli, lowbit.methods.gptq as gptq, lowbit.surgery.spinquant as sq

    signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with SIGINT ignored

    where, sig, after = sys.argv[1], getattr(signal, sys.argv[2]), int(sys.argv[3])
    module, name = (gptq, "gptq_layer") if where == "gptq" else (sq, "_train_step")
    real, calls = getattr(module, name), [0]

    def signalled(*args, **kwargs):
        calls[0] += 1
        if calls[0] == after:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    setattr(module, name, signalled)
    sys.exit(lowbit.cli.main(sys.argv[4:]))
""")

GPTQ_YAML = ("name: g\nsteps: [{method: gptq}]\nweights: {format: int4, granularity: group, group_size: 32}\n"
             "calibration: {samples: 2, seq_len: 32}\n")
SPIN_YAML = ("name: s\nsteps: [{method: spinquant, steps: 4, samples: 2, seq_len: 32, checkpoint_every: 1, "
             "checkpoint: CKPT}]\nactivations: {format: int4, granularity: token}\n")


def _quantize_args(model_dir: Path, text: Path, recipe: Path, report: Path) -> list[str]:
    return ["quantize", "--model", str(model_dir), "--recipe", str(recipe), "--calib-data", str(text),
            "--eval-data", str(text), "--seq-len", "32", "--windows", "2", "--report", str(report)]


@pytest.mark.parametrize("sig, after", [("SIGTERM", 1), ("SIGINT", 2)])
@pytest.mark.parametrize("where", ["gptq", "spinquant"])
def test_a_signalled_run_writes_nothing_and_the_next_run_resumes_exactly(tiny_model_dir, text_file, tmp_path, where,
                                                                         sig, after):
    """A run signalled mid-way exits 130/143 with one line, writes no report and leaves no temporary; the next run
    works, and a resumed SpinQuant run reports exactly what an uninterrupted one does."""
    ckpt = tmp_path / "rot.safetensors"
    recipe = _recipe_file(tmp_path, GPTQ_YAML if where == "gptq" else SPIN_YAML.replace("CKPT", str(ckpt)))
    report = tmp_path / "r.json"
    args = _quantize_args(tiny_model_dir, text_file, recipe, report)
    proc = subprocess.run([sys.executable, "-c", RUN_FAULT_SCRIPT, where, sig, str(after), *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == (143 if sig == "SIGTERM" else 130), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("lowbit: ")
    assert not report.exists() and not list(tmp_path.glob(".*"))  # no report, no temporary
    assert main(args) == 0
    resumed = json.loads(report.read_text())
    if where == "spinquant":
        whole_recipe = _recipe_file(tmp_path, SPIN_YAML.replace("CKPT", str(tmp_path / "whole.safetensors")), "w.yaml")
        assert main(_quantize_args(tiny_model_dir, text_file, whole_recipe, tmp_path / "w.json")) == 0
        whole = json.loads((tmp_path / "w.json").read_text())
        assert resumed["quantized"] == whole["quantized"]
        assert resumed["rotation"]["losses"] == whole["rotation"]["losses"]


def test_a_damaged_cache_entry_is_converted_again(tiny_model_dir, tmp_path, monkeypatch):
    """A cached GGUF conversion whose weights were damaged is removed and converted again, not a traceback."""
    import lowbit.models.loading as loading

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    conversions = []

    def convert(gguf, folder):
        conversions.append(gguf)
        shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)

    monkeypatch.setattr(loading, "_write_conversion", convert)
    gguf = _file(tmp_path, "m.gguf", b"GGUF")
    loading.load_model(str(gguf))
    entry = loading._gguf_cache_folder(gguf)
    (entry / "model.safetensors").write_bytes(b"damaged")
    loaded = loading.load_model(str(gguf))
    assert len(conversions) == 2 and loaded.model.config.model_type == "llama"
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


def test_checkpoint_paths_are_checked_before_training(model_and_data, tmp_path):
    """A SpinQuant checkpoint path that is a folder, or a block-wise checkpoint folder that is a file, fails before
    any training step, in one line."""
    from lowbit.errors import OutputError

    _, data = model_and_data
    spin = lowbit.load_recipe({"steps": [{"method": "spinquant", "steps": 2, "samples": 1, "seq_len": 16,
                                          "checkpoint": str(tmp_path)}],
                               "activations": {"format": "int4", "granularity": "token"}})
    with pytest.raises(OutputError, match="not a regular file"):
        lowbit.quantize(tiny_model("llama"), spin, data)
    with pytest.raises(OutputError, match="is a file"):
        lowbit.quantize(tiny_model("llama"), _blockwise_recipe(_file(tmp_path, "blocks", b"x")), data)


def test_a_device_is_never_a_report():
    """``--report /dev/null`` is refused before anything runs (as root, a rename would replace the device)."""
    from lowbit.errors import OutputError
    from lowbit.report import check_output_file

    with pytest.raises(OutputError, match="not a regular file"):
        check_output_file("/dev/null")
