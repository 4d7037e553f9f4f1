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
from ..models.arch import decoder_layers, spec_for
from ..runtime.linear import unsaved_reason
from ..state import quant_state
from ..surgery.attention import HOOKS_ATTR
from ..surgery.offload import onloaded
from ..version import __version__
from .files import new_folder, write_tensors
from .parts import describe, is_packed, packed_tensors
from .summary import quantization_config

FORMAT = "lowbit"
FORMAT_VERSION = 1
MANIFEST = "lowbit.json"
SHARD_BYTES = 2 * 1024**3


def check_savable(recipe) -> None:
    """Refuse, before any work, a recipe whose quantized weights :func:`save` could not write."""
    for scheme in (recipe.weights, recipe.embeddings, recipe.lm_head):
        why = unsaved_reason(scheme)
        if why is not None:
            raise ArtifactError(f"recipe '{recipe.name}': {why}")


def _units(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """The parts written one after another, as ``(path, module, recursive)``: each decoder layer whole, then every
    other module that holds tensors of its own. An offloaded model has one part in memory at a time."""
    arch = spec_for(model)
    layers = [(f"{arch.layers}.{i}", layer, True) for i, layer in enumerate(decoder_layers(model, arch))]
    inside = {id(m) for _, layer, _ in layers for m in layer.modules()}
    others = [(path, m, False) for path, m in model.named_modules()
              if id(m) not in inside and (m._parameters or m._buffers) and not is_packed(m)]
    linears = [(path, m, True) for path, m in model.named_modules() if id(m) not in inside and is_packed(m)]
    return layers + others + linears


def _unit_tensors(path: str, unit: nn.Module, recursive: bool, skip: set[str]) -> Iterator[tuple[str, Tensor]]:
    """One part's tensors as saved: quantized linears and tables in their on-disk form, everything else as in
    ``state_dict``."""
    stem = f"{path}." if path else ""
    if is_packed(unit):
        yield from packed_tensors(path, unit).items()
        return
    if not recursive:
        own = {**unit._parameters, **{k: v for k, v in unit._buffers.items()
                                      if k not in unit._non_persistent_buffers_set}}
        yield from ((stem + k, v.detach()) for k, v in own.items() if v is not None and stem + k not in skip)
        return
    linears = [(f"{stem}{n}", m) for n, m in unit.named_modules() if n and is_packed(m)]
    for name, linear in linears:
        yield from packed_tensors(name, linear).items()
    replaced = tuple(f"{name}." for name, _ in linears)
    for name, tensor in unit.state_dict(prefix=stem, keep_vars=True).items():
        if not name.startswith(replaced) and name not in skip:
            yield name, tensor.detach()


def _model_tensors(model: nn.Module, extra: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Every tensor to write, part by part (each part onloaded while it is read when the model is offloaded), then
    ``extra``; a lm_head tied to the embeddings is written once, as the embeddings."""
    head = model.get_output_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False) and not is_packed(head)
    skip = {name for name, m in model.named_modules() if m is head} if tied else set()
    skip = {f"{name}.weight" for name in skip}
    seen = set()
    for path, unit, recursive in _units(model):
        with onloaded(unit):
            for name, tensor in _unit_tensors(path, unit, recursive, skip):
                if tensor.device.type == "meta":
                    raise ArtifactError(f"{name} is not in memory and not in an offload store: it cannot be saved")
                key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
                yield name, tensor.clone() if key in seen else tensor
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
    with new_folder(Path(folder)) as tmp:
        files = write_tensors(tmp, _model_tensors(model, extra), shard_bytes)
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
