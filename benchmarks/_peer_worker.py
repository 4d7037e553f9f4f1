"""One llm-compressor job for ``peers.py``, run with the peer venv's python (not meant to be run by hand).

Reads the evaluation windows and calibration token samples that the main script saved, loads the model from lowbit's
converted Hugging Face folder (twice: one copy stays full precision as the reference), quantizes one copy with
llm-compressor's ``oneshot`` on exactly those calibration tokens, scores it with lowbit's own evaluation, and writes
a JSON result. Any failure is written to the result as an ``error`` message, so the main script can record it.

lowbit is imported from ``src/`` through PYTHONPATH (the venv does not install it), which is why only its
evaluation helpers are used here: they are plain torch and work on any Hugging Face causal LM.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
import traceback
from pathlib import Path

import torch


def keep_layers(model, count: int | None):
    """Keep only the first ``count`` decoder layers (in place; None keeps all): a small model for quick checks."""
    if count is None:
        return model
    model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:count])
    model.config.num_hidden_layers = count
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:count]
    return model


def load(model_dir: str, layers: int | None = None):
    """Tokenizer and fp32 model from a local Hugging Face folder, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    return tokenizer, keep_layers(model, layers).eval()


def calibration_dataset(samples: torch.Tensor):
    """The calibration samples ``[n, L]`` as an already tokenized dataset, so that oneshot feeds them unchanged."""
    from datasets import Dataset

    ids = samples.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})


def quantization_args(spec: dict | None):
    """Integer quantization arguments from the job's plain description (None stays None: full precision)."""
    from compressed_tensors.quantization import QuantizationArgs

    return None if spec is None else QuantizationArgs(type="int", **spec)


def build_recipe(job: dict, actorder: str | None) -> list:
    """The modifiers of one job: optional rotations first, then GPTQ on every Linear layer except lm_head."""
    from compressed_tensors.quantization import QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    modifiers = []
    if job.get("rotations"):
        from llmcompressor.modifiers.transform import SpinQuantModifier

        modifiers.append(SpinQuantModifier(**job["rotations"]))
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=quantization_args(job.get("weights")),
        input_activations=quantization_args(job.get("activations")),
    )
    modifiers.append(GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], actorder=actorder))
    return modifiers


def describe(modifiers: list) -> list[dict]:
    """The modifiers as data, for the results file (what exactly was run)."""
    out = []
    for m in modifiers:
        try:
            body = m.model_dump(mode="json", exclude_none=True)
            body = {k: v for k, v in body.items() if not k.endswith("_")}  # drop lifecycle flags
        except Exception:  # a field pydantic cannot serialise: fall back to its repr
            body = {"repr": repr(m)}
        out.append({type(m).__name__: body})
    return out


def quantized_summary(model) -> dict:
    """What oneshot left on the model: quantized linears (weights / input activations) and online transforms.

    A check that the recipe did what it says, since a scheme that matches no module is silently a no-op.
    """
    from compressed_tensors.transform import TransformBase

    counts = {"linears": 0, "weights_quantized": 0, "inputs_quantized": 0, "online_transforms": 0}
    for module in model.modules():
        counts["online_transforms"] += int(isinstance(module, TransformBase))
        if not isinstance(module, torch.nn.Linear):
            continue
        counts["linears"] += 1
        scheme = getattr(module, "quantization_scheme", None)
        counts["weights_quantized"] += int(getattr(scheme, "weights", None) is not None)
        counts["inputs_quantized"] += int(getattr(scheme, "input_activations", None) is not None)
    return counts


def versions() -> dict:
    names = ("llmcompressor", "compressed-tensors", "transformers", "torch")
    return {n: importlib.metadata.version(n) for n in names}


def run(args: argparse.Namespace) -> dict:
    """Quantize with oneshot, time it, evaluate with lowbit's metrics; returns the result mapping."""
    from llmcompressor import oneshot

    from lowbit.evaluate import evaluate

    data = torch.load(args.data)
    job = json.loads(args.job)
    tokenizer, fp_model = load(args.model_dir, args.layers)
    _, model = load(args.model_dir, args.layers)
    modifiers = build_recipe(job, None if args.actorder == "none" else args.actorder)
    result = {"versions": versions(), "recipe": describe(modifiers)}
    calib = data["calibration"]
    start = time.perf_counter()
    oneshot(
        model=model,
        # The tokenizer goes in as the processor (oneshot refuses both at once): a converted GGUF folder has no
        # processor config for oneshot to find, and it wants one whenever a dataset is given.
        processor=tokenizer,
        recipe=modifiers,
        dataset=calibration_dataset(calib),
        num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
    )
    result["quantize_s"] = time.perf_counter() - start
    result["quantized"] = quantized_summary(model)
    if args.save:  # llm-compressor's own export, as its users write it
        model.save_pretrained(args.save, save_compressed=True)
        tokenizer.save_pretrained(args.save)
    result["eval"] = evaluate(fp_model, model.eval(), data["windows"]).as_dict()
    return result


def worker_parser(description: str, job_help: str) -> argparse.ArgumentParser:
    """The arguments every peer worker takes: data, model folder, job, threads, layer cut, where to answer."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", required=True, help=".pt file with 'windows' and 'calibration' token tensors")
    parser.add_argument("--model-dir", required=True, help="Hugging Face model folder")
    parser.add_argument("--job", required=True, help=job_help)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    return parser


def serve(parser: argparse.ArgumentParser, run) -> None:
    """Parse the arguments, run the job and write its JSON answer; a failure is written as an ``error`` message."""
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run(args)
    except Exception as exc:  # any failure of the peer is a result to record, not a crash of the benchmark
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = worker_parser(__doc__.splitlines()[0], "the job's peer configuration, as JSON")
    parser.add_argument("--actorder", default="static", help="GPTQ activation ordering: static, weight or none")
    parser.add_argument("--save", help="also save the quantized model here (save_compressed=True)")
    serve(parser, run)


if __name__ == "__main__":
    main()
