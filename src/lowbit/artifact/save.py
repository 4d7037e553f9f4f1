"""``lowbit.save(model, folder)``: write a quantized model as a folder a :func:`lowbit.load` rebuilds exactly.

The folder is a Hugging Face model folder: ``config.json`` (the model's config with a ``quantization_config`` in
compressed-tensors' field names, ``quant_method: lowbit``), ``model.safetensors`` (or shards and an index: packed
weights, scales, everything else of the model's ``state_dict``), the tokenizer's files, and ``lowbit.json`` (the
manifest :func:`lowbit.artifact.parts.describe` builds: every part, rotation, the recipe, the prefix, the packed
cache, lowbit's version and each file's checksum). It is written into a temporary folder renamed at the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor, nn

from ..errors import ArtifactError
from ..state import quant_state
from ..surgery.attention import HOOKS_ATTR
from ..version import __version__
from .files import new_folder, write_tensors
from .parts import describe
from .summary import quantization_config

FORMAT = "lowbit"
FORMAT_VERSION = 1
MANIFEST = "lowbit.json"
SHARD_BYTES = 2 * 1024**3


def _model_tensors(model: nn.Module, replaced: set[str], extra: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """The model's own tensors in module order (skipping the quantized linears', which ``extra`` replaces, and a
    lm_head tied to the embeddings), then ``extra``; each storage is written once."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = model.get_output_embeddings()
    head_weight = head.weight if tied and head is not None else None
    seen = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if any(name.startswith(p) for p in replaced):
            continue
        if head_weight is not None and tensor is head_weight and name.endswith("lm_head.weight"):
            continue
        if tensor.device.type == "meta":
            raise ArtifactError(f"{name} is not in memory (an offloaded model): onload it before saving")
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        yield name, tensor.detach().clone() if key in seen else tensor.detach()
        seen.add(key)
    yield from extra.items()


def stored_bits(model: nn.Module) -> dict[str, float]:
    """The model's bits per weight, activation and KV element (:mod:`lowbit.bits`), recorded with it."""
    from ..bits import activation_bits, kv_bits, weight_bits
    from ..models.arch import head_dim, spec_for

    spec, state = spec_for(model), quant_state(model)
    weights = weight_bits(model, spec)
    if state.cache_spec is not None:
        from ..kv.cache import cache_bits

        kv = cache_bits(state.cache_spec, head_dim(model.config), model.config.max_position_embeddings)
    else:
        hook = next((h for m in model.modules() for h in getattr(m, HOOKS_ATTR, ()) if hasattr(h, "k_quant")), None)
        kv = kv_bits(hook.k_quant.scheme if hook else None, head_dim(model.config))
    return {**weights, "activation": activation_bits(model, spec), "kv": kv}


def save(model: nn.Module, folder: str | Path, tokenizer=None, shard_bytes: int = SHARD_BYTES,
         source: str | None = None) -> Path:
    """Write the quantized ``model`` (and its ``tokenizer``) into the new folder ``folder``; returns its path.

    ``source`` names the full-precision model it came from (``lowbit eval`` compares against it by default).
    Raises :class:`~lowbit.errors.ArtifactError` for a model lowbit did not quantize, a folder that already holds
    something, or a part that cannot be saved. Nothing is left behind when it fails.
    """
    if quant_state(model) is None:
        raise ArtifactError("this model was not quantized by lowbit: quantize it first (lowbit.quantize)")
    manifest, extra = describe(model)
    replaced = {f"{path}." for path in manifest["linears"]}
    with new_folder(Path(folder)) as tmp:
        files = write_tensors(tmp, _model_tensors(model, replaced, extra), shard_bytes)
        config = model.config.to_dict()
        config.pop("_attn_implementation_autoset", None)
        config["quantization_config"] = quantization_config(manifest, __version__)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "lowbit_version": __version__,
                  "model_type": model.config.model_type, "source": source, "files": files,
                  "bits": stored_bits(model)}
        (tmp / MANIFEST).write_text(json.dumps({**header, **manifest}, indent=1, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(folder)
