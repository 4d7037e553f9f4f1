"""lm-evaluation-harness adapter: evaluate a lowbit-quantized model on lm-eval tasks.

Needs the optional extra ``pip install "lowbit[lm-eval]"``; importing this module without it raises a
:class:`~lowbit.errors.LowbitError` with that command. Three ways in:

- an already quantized model: ``lm_eval.simple_evaluate(model=harness_model(qmodel, tokenizer), tasks=[...])``;
- quantizing on the fly through lm-eval's registry: importing this module registers ``"lowbit"``, so
  ``lm_eval.simple_evaluate(model="lowbit", model_args="model=default,recipe=w4a8-rtn", tasks=[...])`` works;
- the lowbit CLI: ``lowbit quantize --tasks piqa,arc_easy`` adds the scores to the report.

lowbit is offline: task datasets must already be in the local datasets cache (or be local files in a task YAML).
"""

from __future__ import annotations

import importlib.util

from ..errors import LowbitError

LM_EVAL_INSTALL = 'pip install "lowbit[lm-eval]"'

if importlib.util.find_spec("lm_eval") is None:
    raise LowbitError(f"lm-eval tasks need the lm-eval package: run `{LM_EVAL_INSTALL}`")

import lm_eval
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM


def harness_model(model, tokenizer, batch_size: int = 1, max_length: int | None = None) -> HFLM:
    """Wrap a (quantized) transformers model and its tokenizer as an lm-eval ``HFLM``."""
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


@register_model("lowbit")
class LowbitLM(HFLM):
    """lm-eval model that loads a model with lowbit and quantizes it with a recipe before evaluation.

    ``model_args``: ``model`` (``default``, a folder or a .gguf file), ``recipe`` (preset or YAML file),
    ``calib_data`` (text for static scales), ``seed``, and HFLM's ``batch_size`` / ``max_length``.
    """

    def __init__(
        self,
        model: str = "default",
        recipe: str = "fp",
        calib_data: str = "default",
        seed: int = 0,
        batch_size: int = 1,
        max_length: int | None = None,
        **_: object,
    ) -> None:
        from ..apply import quantize
        from ..data import calibration_data
        from ..models.loading import load_model

        loaded = load_model(model)
        qmodel = quantize(loaded.model, recipe, calibration_data(calib_data, loaded.tokenizer, int(seed)), inplace=True)
        super().__init__(pretrained=qmodel, tokenizer=loaded.tokenizer, batch_size=int(batch_size),
                         max_length=max_length)


def check_tasks(tasks: list[str]) -> None:
    """Fail before any model is loaded when a task is unknown or its data is not in the local datasets cache (the
    check builds the tasks, as the run will, so an offline miss is found in seconds, not after quantizing)."""
    from lm_eval import tasks as lm_tasks

    try:
        manager = lm_tasks.TaskManager()
        manager.load(tasks) if hasattr(manager, "load") else lm_tasks.get_task_dict(tasks, manager)
    except Exception as exc:  # lm-eval raises many types for unknown tasks or datasets missing offline
        raise _tasks_error("cannot build", tasks, exc) from None


def _tasks_error(what: str, tasks: list[str], exc: Exception) -> LowbitError:
    """One line for an lm-eval failure: its first line and the offline/task-name fix."""
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    return LowbitError(f"lm-eval {what} tasks {tasks}: {first}; task data must be in your local datasets cache "
                       "(lowbit runs offline) and the names must be lm-eval task names")


def run_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 1) -> dict:
    """Score ``model`` on lm-eval ``tasks``; returns ``{task: {metric: value}}`` with every numeric metric."""
    try:
        out = lm_eval.simple_evaluate(model=harness_model(model, tokenizer, batch_size), tasks=tasks, limit=limit)
    except Exception as exc:  # lm-eval raises many types for unknown tasks or datasets missing offline
        raise _tasks_error("could not run", tasks, exc) from exc
    return {
        task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for task, metrics in out["results"].items()
    }
