"""End to end on the real embedded model (SmolLM2-135M-Instruct) and the real default text.

Short windows keep this to seconds; the full-length numbers live in benchmarks/.
"""

import json

import pytest

from lowbit.cli import main
from lowbit.models.loading import default_gguf_path

pytestmark = pytest.mark.slow


def _run(tmp_path, recipe, *extra):
    report = tmp_path / f"{recipe}.json"
    args = ["quantize", "--recipe", recipe, "--seq-len", "512", "--windows", "2", "--report", str(report), *extra]
    assert main(args) == 0
    return json.loads(report.read_text())


def test_w8a8_is_close_and_w4a4_breaks(tmp_path):
    w8 = _run(tmp_path, "w8a8-rtn")
    assert 10 < w8["fp"]["ppl"] < 60  # a real language model on real English text
    assert w8["quantized"]["ppl"] / w8["fp"]["ppl"] < 1.1
    assert w8["quantized"]["top1_agreement"] > 0.8
    w4 = _run(tmp_path, "w4a4-rtn", "--model", str(default_gguf_path()))  # the GGUF file itself loads too
    assert w4["fp"]["ppl"] == pytest.approx(w8["fp"]["ppl"])
    assert w4["quantized"]["ppl"] / w4["fp"]["ppl"] > 2
