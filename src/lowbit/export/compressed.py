"""``write_compressed_tensors``: a lowbit-quantized model as a compressed-tensors checkpoint (what llm-compressor writes
and vLLM serves), loadable by plain transformers + the ``compressed-tensors`` package without lowbit.

The folder is a Hugging Face model folder: ``config.json`` whose ``quantization_config`` (``quant_method:
compressed-tensors``) is built from the package's own ``QuantizationConfig`` / ``QuantizationScheme`` /
``QuantizationArgs`` / ``TransformConfig`` classes and written by its ``ModelCompressor.update_config``, so it is valid
by construction; ``model.safetensors`` (or shards) with each quantized linear in its format's tensors
(:mod:`.compressed_schemes`); the tokenizer's files when given. Offline rotations are already folded into lowbit's
weights. An online input rotation (QuaRot/SpinQuant's R4 before ``down_proj``) becomes a ``random-hadamard``
transform at location ``input``, its matrix stored once, scaled by ``sqrt(n)``, as
``<first target>.<name>_input.weight`` (vLLM divides by ``sqrt(n)`` and shares it across layers; transformers ignores
``transform_config``, so such exports are vLLM-only). What the format cannot say is refused before anything is
written: R3 (q/k rotation after RoPE), a KV-cache quantizer or packed cache, a PrefixQuant prefix, quantized embedding
tables or lm_head (vLLM keeps lm_head in full precision), and schemes without an equivalent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..artifact.files import check_new_folder, new_folder, write_tensors
from ..artifact.parts import linear_tensors
from ..errors import ArtifactError
from ..rotations import RotationMatrix
from ..runtime import RuntimeEmbedding, RuntimeLinear
from ..state import STATE_NAME, quant_state
from ..surgery.attention import HOOKS_ATTR, KVQuantHook
from ..surgery.embedding import QuantEmbedding
from ..surgery.linear import QuantLinear
from ..surgery.rotate import OnlineRotation, QKRotationHook
from .compressed_schemes import FALLBACK, ct_scheme, ct_tensors

SHARD_BYTES = 2 * 1024**3
FUSED = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})  # vLLM runs each set as one linear


@dataclass
class _Linear:
    """One linear lowbit changed: its compressed-tensors scheme (None: full-precision weight) and rotation."""

    module: nn.Module
    scheme: dict | None
    rotation: RotationMatrix | None


@dataclass
class _Plan:
    linears: dict[str, _Linear] = field(default_factory=dict)


_NO_EQUIVALENT = "has no compressed-tensors/vLLM equivalent"
_VLLM_KV = "(vLLM quantizes its own cache: --kv-cache-dtype fp8)"
REFUSALS = {
    "prefix": f"a PrefixQuant prefix {_NO_EQUIVALENT}: use the recipe without the prefix step",
    "kv_cache": f"a packed KV cache {_NO_EQUIVALENT}: drop kv_cache from the recipe {_VLLM_KV}",
    "kv": f"KV-cache quantization {_NO_EQUIVALENT}: drop kv from the recipe {_VLLM_KV}",
    "r3": f"the online q/k rotation after RoPE (R3) {_NO_EQUIVALENT}: use the same recipe with r3: false",
    "embeddings": f"a quantized embedding table {_NO_EQUIVALENT}: drop embeddings from the recipe",
    "lm_head": "vLLM's compressed-tensors loader keeps lm_head in full precision: drop lm_head from the recipe (and from "
               "targets)",
}


_NOTHING = ("the model has no quantized linear layer: compressed-tensors stores quantized weights; quantize the weights "
            "(e.g. recipe w4a16-gptq)")


def _refused(key: str, where: str = "") -> ArtifactError:
    return ArtifactError(f"{where}{': ' if where else ''}{REFUSALS[key]}, {FALLBACK}")


def check_recipe(recipe) -> None:
    """Refuse, before anything is quantized, a :class:`~lowbit.recipe.Recipe` whose result compressed-tensors cannot
    describe (the same lines :func:`plan` gives for the quantized model; group sizes are checked there, per layer)."""
    for step in recipe.steps:
        if step.method == "prefix":
            raise _refused("prefix")
        if getattr(step, "r3", False):
            raise _refused("r3", f"step {step.method}")
    for key in ("kv_cache", "kv", "embeddings", "lm_head"):
        if getattr(recipe, key) is not None:
            raise _refused(key)
    if "lm_head" in recipe.targets and recipe.weights is not None:
        raise _refused("lm_head")
    if recipe.weights is None:
        raise ArtifactError(_NOTHING)
    ct_scheme("recipe", recipe.weights, recipe.activations, None)


def _refuse_model_parts(model: nn.Module) -> None:
    """The model-level parts compressed-tensors cannot describe: one line each, naming what to use instead."""
    state = quant_state(model)
    if state is None:
        raise ArtifactError("this model was not quantized by lowbit: quantize it first (lowbit.quantize)")
    if state.prefix_length:
        raise _refused("prefix")
    if state.cache_spec is not None:
        raise _refused("kv_cache")


def _refuse_module(path: str, module: nn.Module, head: nn.Module | None) -> None:
    for hook in getattr(module, HOOKS_ATTR, ()):
        if isinstance(hook, QKRotationHook):
            raise _refused("r3", path)
        if isinstance(hook, KVQuantHook):
            raise _refused("kv", path)
        raise ArtifactError(f"{path}: attention hook {type(hook).__name__} cannot be exported")
    if isinstance(module, (QuantEmbedding, RuntimeEmbedding)):
        raise _refused("embeddings", path)
    if module is head and getattr(module, "weight_scheme", None) is not None:
        raise _refused("lm_head", path)


def _schemes(linear: nn.Module):
    """The weight and input schemes of a lowbit linear (fake-quant or runtime)."""
    if isinstance(linear, RuntimeLinear):
        return linear.weight_scheme, linear.input_scheme
    q = linear.input_quant
    if q is not None and q.learned_clip is not None:
        raise ArtifactError(f"{q.name or 'an input quantizer'}: a learned activation clip has no compressed-tensors "
                            f"equivalent, {FALLBACK}")
    return linear.weight_scheme, None if q is None else q.scheme


def _rotation(path: str, linear: nn.Module) -> RotationMatrix | None:
    transform = linear.input_transform
    if transform is None:
        return None
    if not isinstance(transform, OnlineRotation):
        raise ArtifactError(f"{path}: input transform {type(transform).__name__} cannot be exported")
    if transform.rotation.plan is None:
        raise ArtifactError(f"{path}: a dense random orthogonal online rotation is not a Hadamard transform vLLM "
                            "runs: use a size with a Hadamard construction or fallback block_diagonal")
    return transform.rotation


def _check_fused(linears: dict[str, _Linear]) -> None:
    """vLLM fuses q/k/v and gate/up into one linear: each set needs one scheme."""
    seen: dict[tuple[str, int], tuple[str, str]] = {}
    for path, entry in linears.items():
        parent, _, leaf = path.rpartition(".")
        for i, names in enumerate(FUSED):
            if leaf in names:
                key, value = (parent, i), json.dumps(entry.scheme, sort_keys=True)
                if key in seen and seen[key][1] != value:
                    raise ArtifactError(f"{seen[key][0]} and {path} have different schemes but vLLM runs "
                                        f"{'/'.join(sorted(names))} as one linear: give them one scheme")
                seen.setdefault(key, (path, value))


def plan(model: nn.Module) -> _Plan:
    """Every linear lowbit changed, with its compressed-tensors scheme; :class:`ArtifactError` (one line, naming
    what to use instead) for anything the format cannot describe. Reads the model only."""
    _refuse_model_parts(model)
    head, out = model.get_output_embeddings(), _Plan()
    for path, module in model.named_modules():
        _refuse_module(path, module, head)
        if isinstance(module, (QuantLinear, RuntimeLinear)):
            w, a = _schemes(module)
            out.linears[path] = _Linear(module, ct_scheme(path, w, a, module.in_features), _rotation(path, module))
    if not any(e.scheme for e in out.linears.values()):
        raise ArtifactError(_NOTHING)
    _check_fused(out.linears)
    return out


def _quantization_config(p: _Plan):
    """compressed-tensors' ``QuantizationConfig``: one group per distinct scheme, targets by exact module name."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups: dict[str, list[str]] = {}
    for path, entry in p.linears.items():
        if entry.scheme is not None:
            groups.setdefault(json.dumps(entry.scheme, sort_keys=True), []).append(path)
    schemes = {}
    for i, (key, targets) in enumerate(groups.items()):
        s = json.loads(key)
        act = s["input_activations"]
        schemes[f"group_{i}"] = QuantizationScheme(
            targets=targets, weights=QuantizationArgs(**s["weights"]), format=s["format"],
            input_activations=None if act is None else QuantizationArgs(**act))
    formats = {s.format for s in schemes.values()}
    return QuantizationConfig(config_groups=schemes, format=formats.pop() if len(formats) == 1 else "mixed-precision",
                              quantization_status="compressed", ignore=["lm_head"])


def _rotations(p: _Plan) -> dict[str, tuple[RotationMatrix, list[str]]]:
    """Online rotations by transform name (``R4`` for the one before every ``down_proj``), each with its targets."""
    by_id: dict[int, tuple[RotationMatrix, list[str]]] = {}
    for path, entry in p.linears.items():
        if entry.rotation is not None:
            by_id.setdefault(id(entry.rotation), (entry.rotation, []))[1].append(path)
    out = {}
    for rotation, targets in by_id.values():
        leaves = {t.rpartition(".")[2] for t in targets}
        name = "R4" if leaves == {"down_proj"} else f"online_{'_'.join(sorted(leaves))}"
        while name in out:
            name += "_"
        out[name] = (rotation, targets)
    return out


def _transform_config(rotations: dict):
    if not rotations:
        return None
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    return TransformConfig(config_groups={
        name: TransformScheme(type="random-hadamard", apply=[TransformArgs(targets=targets, location="input")])
        for name, (_, targets) in rotations.items()})


def _is_tied(model: nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and emb is not None and getattr(head, "weight", None) is emb.weight


def _tensors(model: nn.Module, p: _Plan, rotations: dict, dtype: torch.dtype):
    """Every tensor of the checkpoint: the model's own (a tied lm_head once, as the embeddings), each quantized
    linear in its format, each online rotation's matrix once."""
    head_names = {f"{n}.weight" for n, m in model.named_modules() if m is model.get_output_embeddings()}
    skip = head_names if _is_tied(model) else set()
    stems = tuple(f"{path}." for path in p.linears) + (f"{STATE_NAME}.",)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not name.startswith(stems) and name not in skip:
            yield name, _in_memory(name, tensor.detach())
    for path, entry in p.linears.items():
        stem = f"{path}."
        if entry.scheme is None:
            own = {k: v for k, v in entry.module.state_dict().items() if k in ("weight", "bias")}
        else:
            lowbit = {k[len(stem):]: v for k, v in linear_tensors(path, entry.module).items()}
            w = entry.module.weight_scheme
            own = ct_tensors(lowbit, entry.scheme, w, entry.module.in_features, dtype)
        yield from ((stem + k, _in_memory(stem + k, v.detach())) for k, v in own.items())
    for name, (rotation, targets) in rotations.items():
        yield f"{targets[0]}.{name}_input.weight", (rotation.dense() * math.sqrt(rotation.n)).to(dtype)


def _in_memory(name: str, tensor: Tensor) -> Tensor:
    if tensor.device.type == "meta":
        raise ArtifactError(f"{name} is offloaded (not in memory): load the model without offloading to export it")
    return tensor


def _config(model: nn.Module, tied: bool) -> dict:
    config = model.config.to_dict()
    for key in ("quantization_config", "_attn_implementation_autoset"):
        config.pop(key, None)
    config["tie_word_embeddings"] = tied
    return config


def write_compressed_tensors(model: nn.Module, out_dir: str | Path, tokenizer=None,
                             shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the lowbit-quantized ``model`` (and its ``tokenizer``) as a compressed-tensors checkpoint into the new
    folder ``out_dir``; returns its path.

    ``model``: the result of :func:`lowbit.quantize` (or the pipeline), or :func:`lowbit.load` (simulated or not).
    Raises :class:`~lowbit.errors.ArtifactError` with one line for a folder that exists, a part the format cannot
    describe (naming the recipe change that can), or a missing ``compressed-tensors`` package; nothing is written then.
    """
    out_dir = Path(out_dir)
    check_new_folder(out_dir)
    try:
        from compressed_tensors.compressors import ModelCompressor
    except ImportError:
        raise ArtifactError("compressed-tensors is not installed: pip install 'lowbit[export]'") from None
    p = plan(model)
    tied, rotations = _is_tied(model), _rotations(p)
    dtype = getattr(model, "dtype", torch.float32)
    compressor = ModelCompressor(quantization_config=_quantization_config(p),
                                 transform_config=_transform_config(rotations))
    with new_folder(out_dir) as tmp:
        write_tensors(tmp, _tensors(model, p, rotations, dtype), shard_bytes)
        (tmp / "config.json").write_text(json.dumps(_config(model, tied), indent=2, sort_keys=True, default=str))
        compressor.update_config(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir
