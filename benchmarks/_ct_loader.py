"""Score a compressed-tensors folder with plain transformers, in a process that cannot import lowbit.

Run by ``benchmarks/export.py``:  python _ct_loader.py FOLDER WINDOWS.pt OUT.pt
Loads FOLDER with ``AutoModelForCausalLM.from_pretrained`` (``CompressedTensorsConfig(dequantize=True)`` when the
checkpoint has an asymmetric pack-quantized group: transformers 5.24's default path cannot load its packed zero
points), evaluates the windows and saves each window's next-token NLLs and arg-max tokens plus the load time. Imports
only torch, transformers and compressed-tensors: an import of lowbit raises.
"""

from __future__ import annotations

import importlib.abc
import json
import sys
import time


class _NoLowbit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "lowbit" or name.startswith("lowbit."):
            raise ImportError("the compressed-tensors loader must run without lowbit")


def main(folder: str, windows_path: str, out_path: str) -> None:
    sys.meta_path.insert(0, _NoLowbit())
    sys.path.remove(sys.path[0])  # this folder: a module here named like a package transformers probes (`kernels`) would shadow it
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    groups = json.load(open(f"{folder}/config.json"))["quantization_config"]["config_groups"].values()
    asym = any(g["format"] == "pack-quantized" and not g["weights"]["symmetric"] for g in groups)
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asym else {}
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, **kw).eval()
    load_s = time.perf_counter() - start
    windows, nll, top1 = torch.load(windows_path), [], []
    start = time.perf_counter()
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0, :-1].float(), dim=-1)
            nll.append(-logp.gather(-1, w[1:, None])[:, 0])
            top1.append(logp.argmax(-1))
    torch.save({"nll": torch.stack(nll), "top1": torch.stack(top1), "load_s": load_s,
                "eval_s": time.perf_counter() - start, "dequantize": asym,
                "lowbit_imported": "lowbit" in sys.modules}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
