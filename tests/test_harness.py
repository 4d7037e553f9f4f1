"""lm-evaluation-harness adapter: a quantized model scored by lm-eval, offline, on a local task."""

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="the lm-eval extra is part of lowbit[test]; install it to run this")

import lowbit

TASK_YAML = """
task: lowbit_local_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture
def local_task(tmp_path):
    rows = [
        {"question": "The committee met on", "choices": [" Tuesday", " flowers"], "answer": 0},
        {"question": "Heavy rain is expected across the", "choices": [" north", " budget"], "answer": 0},
        {"question": "Shares in the company rose", "choices": [" sharply", " moon"], "answer": 0},
    ]
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "task.yaml").write_text(TASK_YAML.format(data=data))
    return tmp_path


def test_quantized_model_runs_an_lm_eval_task(tiny_model_dir, local_task):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lowbit.integrations.harness import harness_model

    loaded = lowbit.load_model(str(tiny_model_dir))
    qmodel = lowbit.quantize(loaded.model, "w4a8-rtn")
    out = lm_eval.simple_evaluate(
        model=harness_model(qmodel, loaded.tokenizer),
        tasks=["lowbit_local_mc"],
        task_manager=TaskManager(include_path=str(local_task)),
    )
    acc = out["results"]["lowbit_local_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert len(out["samples"]["lowbit_local_mc"]) == 3


def test_loglikelihoods_come_from_the_quantized_model(tiny_model_dir):
    from lm_eval.api.instance import Instance

    from lowbit.integrations.harness import harness_model

    loaded = lowbit.load_model(str(tiny_model_dir))
    request = [Instance("loglikelihood", doc={}, arguments=("The committee met on", " Tuesday"), idx=0)]
    fp_ll = harness_model(loaded.model, loaded.tokenizer).loglikelihood(request)[0][0]
    q_ll = harness_model(lowbit.quantize(loaded.model, "w4a4-rtn"), loaded.tokenizer).loglikelihood(request)[0][0]
    assert torch.isfinite(torch.tensor([fp_ll, q_ll])).all()
    assert fp_ll != q_ll


def test_registered_as_lowbit_model():
    from lm_eval.api.registry import get_model

    from lowbit.integrations.harness import LowbitLM

    assert get_model("lowbit") is LowbitLM
