"""Every part lowbit attached to a model, as a JSON manifest plus named tensors, and back onto a bare model.

:func:`describe` walks a quantized model: quantized linears (weight scheme, input quantizer, online input rotation),
quantized embedding tables (shape and weight scheme), each attention module's hooks (online Q/K rotation, KV fake-quantizers), shared rotations (once each, by identity:
R3 and R4 are one matrix for every layer) and the model's :class:`~lowbit.state.QuantState` (recipe, prefix,
packed-cache spec). :func:`rebuild` puts the same parts, empty, onto a freshly built model of the same config; the
loader then assigns the tensors. A part lowbit does not know how to save is an error, never skipped.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..errors import ArtifactError, CalibrationError
from ..kv.attention import KEY_CENTRE_ATTR
from ..kv.config import KVCacheConfig
from ..kv.spec import CacheSpec
from ..kv.static import StaticIntCodec
from ..models.arch import ArchSpec, decoder_layers, get_module, head_dim, set_module
from ..rotations import RotationMatrix, rotation_from_record, rotation_record
from ..runtime import RuntimeEmbedding, RuntimeLinear, quant_embedding_state, quant_linear_state
from ..schemes import QuantScheme
from ..state import STATE_NAME, ensure_state, quant_state
from ..surgery.attention import HOOKS_ATTR, KVQuantHook, add_attention_hook
from ..surgery.embedding import QuantEmbedding
from ..surgery.key_centre import attach_cache_key_centre, attach_key_centre
from ..surgery.kvcache import attach_packed_cache, use_decode_cache
from ..surgery.linear import QuantLinear
from ..surgery.prefix import restore_prefix
from ..surgery.quantizer import ActQuantizer
from ..surgery.rotate import OnlineRotation, QKRotationHook


class _Rotations:
    """Rotations met while describing a model, each recorded once under an id (``r0``, ``r1``, ...)."""

    def __init__(self) -> None:
        self.ids: dict[int, str] = {}
        self.meta: dict[str, dict] = {}
        self.tensors: dict[str, Tensor] = {}

    def add(self, rotation: RotationMatrix) -> str:
        key = id(rotation)
        if key not in self.ids:
            name = self.ids[key] = f"r{len(self.ids)}"
            self.meta[name], tensors = rotation_record(rotation)
            self.tensors.update({f"{STATE_NAME}.rotations.{name}.{k}": v for k, v in tensors.items()})
        return self.ids[key]


def _quantizer_entry(q: ActQuantizer) -> dict:
    return {"scheme": q.scheme.model_dump(mode="json"), "kind": q.kind, "name": q.name}


def _linear(path: str, linear: QuantLinear | RuntimeLinear, rotations: _Rotations) -> dict:
    """One quantized linear's manifest entry (its tensors come from :func:`linear_tensors`)."""
    transform = linear.input_transform
    if transform is not None and not isinstance(transform, OnlineRotation):
        raise ArtifactError(f"{path} has an input transform lowbit cannot save ({type(transform).__name__})")
    if isinstance(linear, RuntimeLinear):
        scheme = linear.input_scheme
        quantizer = None if scheme is None else {"scheme": scheme.model_dump(mode="json"), "kind": "activation",
                                                 "name": f"{path}.input"}
    else:
        if linear.weight_scheme is None or linear.learning:
            raise ArtifactError(f"{path} has no frozen quantized weight: finish quantizing before saving")
        quantizer = None if linear.input_quant is None else _quantizer_entry(linear.input_quant)
    return {"in": linear.in_features, "out": linear.out_features, "bias": linear.bias is not None,
            "weight": linear.weight_scheme.model_dump(mode="json"), "input": quantizer,
            "input_transform": None if transform is None else rotations.add(transform.rotation)}


def linear_tensors(path: str, linear: QuantLinear | RuntimeLinear) -> dict[str, Tensor]:
    """One quantized linear's tensors, named from the model root: the runtime module's ``state_dict``, which is the
    on-disk format (:func:`lowbit.runtime.quant_linear_state` for a fake-quant layer, whose weight must be in memory)."""
    if isinstance(linear, RuntimeLinear):
        tensors = {k: v for k, v in linear.state_dict().items() if not k.startswith("input_transform.")}
    else:
        try:
            tensors = quant_linear_state(linear)
        except (ValueError, CalibrationError) as exc:
            raise ArtifactError(f"{path}: {exc}") from None
    return {f"{path}.{k}": v for k, v in tensors.items()}


def is_quantized_linear(module: nn.Module) -> bool:
    return isinstance(module, (QuantLinear, RuntimeLinear))


def _embedding(path: str, table: QuantEmbedding | RuntimeEmbedding) -> dict:
    """One quantized embedding table's manifest entry (its tensors come from :func:`packed_tensors`)."""
    if table.weight_scheme is None:
        raise ArtifactError(f"{path} has no quantized table: finish quantizing before saving")
    return {"num": table.num_embeddings, "dim": table.embedding_dim, "padding_idx": table.padding_idx,
            "weight": table.weight_scheme.model_dump(mode="json")}


def is_packed(module: nn.Module) -> bool:
    """A quantized linear or embedding table: written in its runtime module's on-disk form, never as a float weight."""
    return isinstance(module, (QuantLinear, RuntimeLinear, QuantEmbedding, RuntimeEmbedding))


def packed_tensors(path: str, module: nn.Module) -> dict[str, Tensor]:
    """A packed part's tensors, named from the model root (:func:`linear_tensors` for a linear; a table's runtime
    ``state_dict``, :func:`lowbit.runtime.quant_embedding_state` for a fake-quant table)."""
    if isinstance(module, RuntimeEmbedding):
        return {f"{path}.{k}": v for k, v in module.state_dict().items()}
    if isinstance(module, QuantEmbedding):
        try:
            return {f"{path}.{k}": v for k, v in quant_embedding_state(module).items()}
        except ValueError as exc:
            raise ArtifactError(f"{path}: {exc}") from None
    return linear_tensors(path, module)


def _hook(hook: nn.Module, rotations: _Rotations) -> dict:
    if isinstance(hook, QKRotationHook):
        return {"kind": "qk_rotation", "rotation": rotations.add(hook.rotate.rotation)}
    if isinstance(hook, KVQuantHook):
        return {"kind": "kv_quant", "k": _quantizer_entry(hook.k_quant), "v": _quantizer_entry(hook.v_quant),
                "key_centre": hook.centre is not None}
    raise ArtifactError(f"attention hook {type(hook).__name__} cannot be saved: remove it before saving")


def _cache_tensors(spec: CacheSpec | None) -> dict[str, Tensor]:
    """The calibrated tensors of a static packed cache (per layer); seeded codecs are rebuilt from the recipe."""
    if spec is None or spec.layers is None:
        return {}
    out = {}
    for i, layer in enumerate(spec.layers):
        for part in ("keys", "values"):
            codec = getattr(layer, part)
            if isinstance(codec, StaticIntCodec):
                for f in dataclasses.fields(codec):
                    value = getattr(codec, f.name)
                    if isinstance(value, Tensor):
                        out[f"{STATE_NAME}.kv_cache.{i}.{part}.{f.name}"] = value
    return out


def describe(model: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """The manifest of every lowbit part of ``model`` and the model-level tensors outside its ``state_dict``
    (rotations; a static packed cache's scales). The quantized linears' and tables' tensors come from
    :func:`packed_tensors`, part by part as the model is written."""
    rotations, linears, embeddings, attention, tensors, cache_centres = _Rotations(), {}, {}, {}, {}, []
    for path, module in model.named_modules():
        if is_quantized_linear(module):
            linears[path] = _linear(path, module, rotations)
        elif is_packed(module):
            embeddings[path] = _embedding(path, module)
        hooks = getattr(module, HOOKS_ATTR, None)
        if hooks:
            attention[path] = [_hook(h, rotations) for h in hooks]
        if getattr(module, KEY_CENTRE_ATTR, None) is not None:
            cache_centres.append(path)
    state = quant_state(model)
    recipe = state.recipe if state is not None else None
    manifest = {"linears": linears, "embeddings": embeddings, "attention": attention, "rotations": rotations.meta,
                "recipe": recipe, "prefix_length": state.prefix_length if state is not None else 0,
                "packed_kv_cache": state is not None and state.cache_spec is not None,
                "cache_key_centres": cache_centres}
    tensors.update(rotations.tensors)
    tensors.update(_cache_tensors(state.cache_spec if state is not None else None))
    return manifest, tensors


def _quantizer(entry: dict) -> ActQuantizer:
    return ActQuantizer(QuantScheme(**entry["scheme"]), entry["kind"], name=entry["name"])


def _take(tensors: dict[str, Tensor], stem: str) -> dict[str, Tensor]:
    """Remove and return the tensors named ``stem + name``, keyed by ``name``."""
    return {k[len(stem):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(stem)]}


def _rebuild_rotations(manifest: dict, tensors: dict[str, Tensor]) -> dict[str, RotationMatrix]:
    out = {}
    for name, meta in manifest["rotations"].items():
        out[name] = rotation_from_record(meta, _take(tensors, f"{STATE_NAME}.rotations.{name}."))
    return out


def _rebuild_cache(manifest: dict, tensors: dict[str, Tensor], layers: int) -> CacheSpec | None:
    """The packed cache's spec: from the recipe's ``kv_cache`` and, when static, the saved per-layer scales."""
    if not manifest["packed_kv_cache"]:
        return None
    config = KVCacheConfig(**manifest["recipe"]["kv_cache"])
    if not config.static:
        return config.spec()
    specs = []
    for i in range(layers):
        codecs = []
        for part, codec_config, seed in (("keys", config.keys, config.seed), ("values", config.values, config.seed + 1)):
            own = _take(tensors, f"{STATE_NAME}.kv_cache.{i}.{part}.")
            if getattr(codec_config, "static", False):
                codecs.append(StaticIntCodec(bits=codec_config.bits, symmetric=codec_config.symmetric,
                                             **{f.name: own.get(f.name) for f in dataclasses.fields(StaticIntCodec)
                                                if f.name not in ("bits", "symmetric")}))
            else:
                codecs.append(KVCacheConfig._codec(codec_config, None, seed, i))
        specs.append(CacheSpec(*codecs, config.window, config.sink))
    return CacheSpec(specs[0].keys, specs[0].values, config.window, config.sink, layers=tuple(specs))


def _rebuild_key_centres(model: nn.Module, arch: ArchSpec, centred: set[int], cache_centred: set[int]) -> None:
    """Empty key centres (assigned by the loader, as the model's own tensors) on the attention modules whose ids are
    given: on their KV fake-quantizers (``centred``) or for their packed cache (``cache_centred``)."""
    empty = torch.zeros(model.config.num_key_value_heads, head_dim(model.config))
    for i, layer in enumerate(decoder_layers(model, arch)):
        attn = id(get_module(layer, arch.attn))
        if attn in centred:
            attach_key_centre(model, arch, i, empty)
        if attn in cache_centred:
            attach_cache_key_centre(model, arch, i, empty)


def rebuild(model: nn.Module, arch: ArchSpec, manifest: dict, tensors: dict[str, Tensor], make_linear,
            make_embedding) -> None:
    """Put the manifest's parts onto ``model`` (built from the saved config, weights still unset).

    ``make_linear(entry, rotation, own)`` returns the module for one quantized linear, built from its own tensors
    ``own`` (names without the path): a real-kernel module, or a fake-quant :class:`QuantLinear` when simulating;
    ``make_embedding(entry, own)`` likewise for a quantized embedding table. The linears' and tables' tensors,
    rotations and a static cache's scales are taken out of ``tensors``; the loader assigns the rest.
    """
    rotations = _rebuild_rotations(manifest, tensors)
    for path, entry in manifest["linears"].items():
        rotation = rotations[entry["input_transform"]] if entry["input_transform"] else None
        set_module(model, path, make_linear(entry, rotation, _take(tensors, f"{path}.")))
    for path, entry in manifest.get("embeddings", {}).items():
        set_module(model, path, make_embedding(entry, _take(tensors, f"{path}.")))
    centred = set()
    for path, hooks in manifest["attention"].items():
        attn = get_module(model, path)
        for hook in hooks:
            if hook["kind"] == "qk_rotation":
                add_attention_hook(model, attn, QKRotationHook(rotations[hook["rotation"]]))
            else:
                add_attention_hook(model, attn, KVQuantHook(_quantizer(hook["k"]), _quantizer(hook["v"])))
                if hook.get("key_centre"):
                    centred.add(id(attn))
    cache_centred = {id(get_module(model, path)) for path in manifest.get("cache_key_centres", [])}
    _rebuild_key_centres(model, arch, centred, cache_centred)
    state = ensure_state(model)
    state.recipe = manifest["recipe"]
    n = manifest["prefix_length"]
    if n:
        shape = tensors[f"{STATE_NAME}.prefix_keys"].shape
        state.prefix_tokens = torch.zeros(n, dtype=torch.long)
        state.prefix_keys = torch.empty(shape, device="meta")
        state.prefix_values = torch.empty(shape, device="meta")
    spec = _rebuild_cache(manifest, tensors, model.config.num_hidden_layers)
    if spec is not None:
        attach_packed_cache(model, spec)


def finish(model: nn.Module, arch: ArchSpec) -> None:
    """After the tensors are assigned: start requests from the prefix when the model has one; ``generate`` decodes
    with lowbit's cache (:func:`~lowbit.surgery.kvcache.use_decode_cache`)."""
    if quant_state(model).prefix_length:
        restore_prefix(model, arch)
    use_decode_cache(model)
