"""One Brevitas job for ``peer_brevitas.py``, run with the Brevitas venv's python (not meant to be run by hand).

Brevitas' LLM entry point (``brevitas_examples.llm.main.quantize_llm``) reads its calibration text from the Hugging
Face hub only. This worker hands it exactly the calibration token samples that the main script saved instead (its
dataset function is replaced by one returning those samples), turns its own evaluation off, then scores the
quantized model with lowbit's evaluation on the saved windows against a second, full-precision copy, and writes a
JSON result. Any failure is written to the result as an ``error`` message.

lowbit is imported from ``src/`` through PYTHONPATH (the venv does not install it): only its evaluation helpers, which
are plain torch on any Hugging Face causal LM, and the peer worker's loader.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time

import torch
from _peer_worker import keep_layers, load, serve, worker_parser


def brevitas_argv(job: dict, model_dir: str, calib: torch.Tensor) -> list[str]:
    """Brevitas' own command line for one job: the job's flags on the model folder, float32, its evaluation off."""
    return ["--model", model_dir, "--dtype", "float32", "--nsamples", str(calib.shape[0]),
            "--seqlen", str(calib.shape[1]), *job["flags"]]


def calibration_samples(calib: torch.Tensor) -> list[dict]:
    """The samples ``[n, L]`` as Brevitas' collate function takes them: one ``input_ids`` row each."""
    return [{"input_ids": row.numpy()} for row in calib]


def quantized_summary(model) -> dict:
    """What Brevitas left on the model: quantized linears (weights / inputs) and the rotation modules it inserted,
    a check that the flags did what they say."""
    counts = {"quant_linears": 0, "weights_quantized": 0, "inputs_quantized": 0, "online_rotations": 0}
    for module in model.modules():
        name = type(module).__name__
        counts["online_rotations"] += int(name == "RotatedModule")
        if name != "QuantLinear":
            continue
        counts["quant_linears"] += 1
        for part in ("weight", "input"):
            proxy = getattr(module, f"{part}_quant", None)
            counts[f"{part}s_quantized"] += int(bool(getattr(proxy, "is_quant_enabled", False)))
    return counts


class _Truncated:
    """Stands in for ``AutoModelForCausalLM`` in the entry point: loads the model, then keeps its first layers."""

    def __init__(self, auto, layers: int):
        self.auto, self.layers = auto, layers

    def from_pretrained(self, *args, **kwargs):
        return keep_layers(self.auto.from_pretrained(*args, **kwargs), self.layers)


def keep_blocks_on_cpu() -> None:
    """Brevitas' block-wise GPxQ (``--gpxq-block-name``) moves each cached block input to ``'cuda'``
    unconditionally; without a GPU, keep them where they are. Its plain GPTQ runs the whole model over the whole
    calibration set once per linear layer group (about 200 passes for this model), hours on 2 CPU cores; block by
    block it runs each layer over its cached inputs, the same sequential algorithm."""
    import brevitas_examples.llm.llm_quant.gpxq as gpxq

    if torch.cuda.is_available():
        return
    send = gpxq.send_to_device
    gpxq.send_to_device = lambda tensors, device, *a, **k: send(tensors, "cpu" if device == "cuda" else device, *a, **k)


def versions() -> dict:
    return {n: importlib.metadata.version(n) for n in ("brevitas", "transformers", "torch")}


def run(args: argparse.Namespace) -> dict:
    """Quantize with Brevitas' entry point on our tokens, time it, evaluate with lowbit's metrics."""
    import brevitas_examples.llm.main as entry
    from brevitas.export.inference.manager import quant_inference_mode

    from lowbit.evaluate import evaluate

    keep_blocks_on_cpu()
    data = torch.load(args.data)
    job = json.loads(args.job)
    calib = data["calibration"]
    samples = calibration_samples(calib)
    entry.get_dataset_for_model = lambda **_: samples  # both of its splits: our calibration tokens (eval is off)
    if args.layers is not None:  # the same truncation as the other tools, on the model the entry point loads
        entry.AutoModelForCausalLM = _Truncated(entry.AutoModelForCausalLM, args.layers)
    argv = brevitas_argv(job, args.model_dir, calib)
    parser = entry.create_args_parser()
    bargs, extra = entry.parse_args(parser, argv, override_defaults=entry.override_defaults(argv))
    result = {"versions": versions(), "argv": argv}
    start = time.perf_counter()
    _, model = entry.quantize_llm(bargs, extra)
    result["quantize_s"] = time.perf_counter() - start
    result["quantized"] = quantized_summary(model)
    _, fp_model = load(args.model_dir, args.layers)
    first = {"input_ids": calib[:1], "attention_mask": torch.ones_like(calib[:1])}
    with torch.no_grad(), quant_inference_mode(model):
        model(**first)  # Brevitas' inference mode records its quantizers on a first call
        result["eval"] = evaluate(fp_model, model.eval(), data["windows"]).as_dict()
    return result


def main() -> None:
    serve(worker_parser(__doc__.splitlines()[0], "the job's Brevitas flags, as JSON {'flags': [...]}"), run)


if __name__ == "__main__":
    main()
