"""The ``quantization_config`` of a saved model's ``config.json``, in compressed-tensors' field names.

It describes the schemes the way compressed-tensors does (``config_groups`` of targets with ``weights`` and
``input_activations`` arguments, ``kv_cache_scheme``, ``transform_config`` for online rotations) so other tools can
read what the model is; ``quant_method`` is ``lowbit`` because lowbit's own loader (the manifest in ``lowbit.json``)
is what runs it. ``lowbit export`` writes true compressed-tensors checkpoints.
"""

from __future__ import annotations

import json

from ..schemes import QuantScheme

_STRATEGY = {"tensor": "tensor", "channel": "channel", "group": "group", "token": "token", "head": "attn_head"}


def quantization_args(scheme: dict, weight: bool = False) -> dict:
    """compressed-tensors' ``QuantizationArgs`` fields for a lowbit scheme (a ``weight``'s scales are static)."""
    s = QuantScheme(**scheme)
    args = {"num_bits": s.bits, "type": "float" if s.format.startswith("fp") else "int",
            "symmetric": s.symmetric, "strategy": _STRATEGY[s.granularity], "dynamic": s.dynamic and not weight,
            "observer": s.observer}
    if s.granularity == "group":
        args["group_size"] = s.group_size
    return args


def _format(weight: dict, has_input: bool) -> str:
    args = quantization_args(weight, weight=True)
    if args["type"] == "float":
        return "float-quantized"
    return "int-quantized" if has_input or args["num_bits"] == 8 else "pack-quantized"


def _groups(linears: dict) -> dict:
    groups: dict[str, dict] = {}
    for path, entry in linears.items():
        key = json.dumps([entry["weight"], entry["input"] and entry["input"]["scheme"]], sort_keys=True)
        if key not in groups:
            groups[key] = {"targets": [], "weights": quantization_args(entry["weight"], weight=True),
                           "input_activations": entry["input"] and quantization_args(entry["input"]["scheme"]),
                           "format": _format(entry["weight"], entry["input"] is not None)}
        groups[key]["targets"].append(path)
    return {f"group_{i}": g for i, g in enumerate(groups.values())}


def _transforms(manifest: dict) -> dict:
    applied: dict[str, list] = {name: [] for name in manifest["rotations"]}
    for path, entry in manifest["linears"].items():
        if entry["input_transform"]:
            applied[entry["input_transform"]].append({"targets": [path], "location": "input"})
    for path, hooks in manifest["attention"].items():
        for hook in hooks:
            if hook["kind"] == "qk_rotation":
                applied[hook["rotation"]] += [{"targets": [path], "location": loc} for loc in ("q_attn", "k_cache")]
    return {"config_groups": {
        name: {"type": "random-hadamard" if meta["plan"] else "random-matrix", "randomize": True,
               "head_dim": meta["n"], "apply": applied[name], "lowbit_construction": meta["description"]}
        for name, meta in manifest["rotations"].items()}}


def quantization_config(manifest: dict, version: str) -> dict:
    """The ``quantization_config`` entry of ``config.json`` for a manifest."""
    kv = next((h["k"]["scheme"] for hooks in manifest["attention"].values() for h in hooks
               if h["kind"] == "kv_quant"), None)
    recipe = manifest["recipe"] or {}
    tables = {path: {"weight": e["weight"], "input": None} for path, e in manifest.get("embeddings", {}).items()}
    return {"quant_method": "lowbit", "version": version, "quantization_status": "compressed",
            "format": "mixed-precision", "config_groups": _groups({**manifest["linears"], **tables}), "ignore": [],
            "kv_cache_scheme": kv and quantization_args(kv), "transform_config": _transforms(manifest),
            "lowbit": {"recipe": recipe.get("name"), "prefix_tokens": manifest["prefix_length"],
                       "packed_kv_cache": recipe.get("kv_cache")}}
