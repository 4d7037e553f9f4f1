"""Write a quantized lowbit model as a GGUF file that llama.cpp runs: :func:`write_gguf`.

What llama.cpp executes is a fixed graph over block-quantized weights, so a model is exportable when

* its decoder linears lie on the requested block grid (``Q4_0``: blocks of 32 along each row, one float16 scale,
  codes -8..7; ``Q8_0``: the same with int8 codes), which the ``gguf-q4_0`` / ``gguf-q8_0`` recipes produce (GPTQ or
  RTN onto that grid, float16 scale rounding included in the fake quantization, so the file dequantizes to
  exactly lowbit's weights);
* every transform is folded into the weights (QuaRot / SpinQuant R1 and R2), with nothing online: no R3/R4
  rotation, no activation or KV-cache quantization (llama.cpp quantizes activations itself, to Q8 blocks), no
  packed cache, no prefix;
* its family is one llama.cpp's ``llama`` (Llama, Mistral) or ``qwen2`` architecture describes.

Anything else is refused with one line naming the nearest recipe that can be exported. The file is written to a
temporary name in the target folder and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import gguf
from torch import nn

from ..errors import ArtifactError, LowbitError, ModelError, RecipeError
from ..models.arch import ArchSpec, decoder_layers, get_module, head_dim, spec_for
from ..report import file_mode
from ..state import quant_state
from ..surgery.attach import quant_linears
from ..surgery.attention import attention_hooks
from ..surgery.linear import QuantLinear
from .gguf_tensors import FLOAT_TYPES, fits, model_tensors
from .gguf_vocab import build_vocab, copy_vocab

BLOCK_TYPES = ("Q4_0", "Q8_0")
FULL_PRECISION = ("F32", "F16")  # every matrix as floats: the source llama.cpp's own quantizer starts from
TYPES = BLOCK_TYPES + FULL_PRECISION
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
FILE_TYPES = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16}
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # llama.cpp's converter writes Mistral as llama
PERMUTES_QK = {"llama": True, "qwen2": False}  # qwen2 runs NEOX-style RoPE on HF's row order


def preset_for(gguf_type: str) -> str:
    """The preset recipe that quantizes onto ``gguf_type``'s grid (``gguf-q4_0``; Q4_0's for a float type)."""
    return f"gguf-{(gguf_type if gguf_type in BLOCK_TYPES else 'Q4_0').lower()}"


def check_type(gguf_type: str) -> str:
    """The canonical block type name for ``gguf_type`` (``q4_0`` -> ``Q4_0``), or a :class:`LowbitError` saying why
    not: K-quants need rows that are multiples of 256, other types are unknown."""
    name = gguf_type.strip().upper()
    if name in TYPES:
        return name
    if name == "Q4_1":
        raise LowbitError("--type Q4_1 is not written by lowbit yet (its per-block float minimum has no lowbit weight "
                          "scheme); use --type Q4_0, which llama.cpp also runs faster")
    if name.startswith(K_QUANTS):
        raise LowbitError(f"--type {gguf_type}: K-quants pack super-blocks of 256 weights along each row, and rows "
                          "must be a multiple of 256 (the default model's 576-wide rows are not); use --type Q4_0")
    raise LowbitError(f"unknown GGUF --type {gguf_type!r}: lowbit writes {', '.join(TYPES)} (F32 / F16: the model "
                      "in full precision, e.g. for llama.cpp's own quantizer)")


def check_new_file(path: Path) -> None:
    """Refuse an existing target or a missing folder before any work starts."""
    if path.exists():
        raise ArtifactError(f"{path} already exists: pass a new file name to --out (lowbit never overwrites)")
    if not path.parent.is_dir():
        raise ArtifactError(f"folder {path.parent} does not exist: create it or pass another --out")


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"


def rope_theta(config) -> float:
    """RoPE's base frequency (transformers 5 keeps it in ``rope_parameters``)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.rope_theta)


def gguf_arch(model: nn.Module) -> tuple[str, ArchSpec]:
    """The llama.cpp architecture for the model and its spec, or a :class:`ModelError` naming what GGUF cannot say."""
    spec, config = spec_for(model), model.config
    arch = ARCHS.get(spec.family)
    problems = []
    if arch is None:
        problems.append(f"family {spec.family} has no llama.cpp architecture here (lowbit writes {sorted(ARCHS)})")
    if _rope_type(config) != "default":
        problems.append(f"its RoPE is scaled ({_rope_type(config)}), which this exporter does not write")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"its MLP uses {config.hidden_act}, not llama.cpp's SiLU-gated MLP")
    if arch == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        problems.append("its linears have biases, which llama.cpp's llama architecture does not read")
    if getattr(config, "use_sliding_window", False):
        problems.append("it uses sliding-window attention, which llama.cpp's qwen2 architecture does not run")
    if problems:
        raise ModelError(f"GGUF cannot describe this {config.model_type} model: {'; '.join(problems)}")
    return arch, spec


def check_runs_in_llama_cpp(model: nn.Module, spec: ArchSpec, gguf_type: str) -> None:
    """Refuse online parts (rotations, activation / KV quantizers, prefix, packed cache) and decoder linears that
    are not on ``gguf_type``'s grid, with one line naming the recipe to use instead."""
    state = quant_state(model)
    recipe = (state.recipe or {}).get("name", "this recipe") if state is not None else "this model"
    use = f"export a recipe without it, e.g. --recipe {preset_for(gguf_type)} (R1/R2 folded, GPTQ onto {gguf_type})"
    if state is not None and state.prefix_length:
        raise RecipeError(f"'{recipe}' keeps a PrefixQuant prefix, which llama.cpp cannot hold: {use}")
    if state is not None and state.cache_spec is not None:
        raise RecipeError(f"'{recipe}' packs the KV cache, which llama.cpp does not read: {use}")
    for name, what in _online_parts(model, spec):
        raise RecipeError(f"'{recipe}' {what} ({name}), which llama.cpp cannot run: {use}")
    if gguf_type in FULL_PRECISION:  # floats hold any weight; only the online parts above cannot be written
        return
    for i, layer in enumerate(decoder_layers(model, spec)):
        for role, path in spec.linear_roles.items():
            linear = get_module(layer, path)
            scheme = getattr(linear, "weight_scheme", None)
            if not isinstance(linear, QuantLinear) or not fits(scheme, gguf_type):
                have = scheme.describe() if scheme is not None else "full precision"
                raise RecipeError(f"'{recipe}' leaves layer {i} {role} weights {have}, not on the {gguf_type} grid "
                                  f"(int, groups of 32, float16 scales): quantize with --recipe "
                                  f"{preset_for(gguf_type)} or a recipe with that weights scheme")


def _online_parts(model: nn.Module, spec: ArchSpec) -> Iterator[tuple[str, str]]:
    """``(module path, what it does)`` for every part that acts at run time: input rotations and quantizers of the
    linears, attention hooks (online Q/K rotation, KV quantizers)."""
    for name, linear in quant_linears(model):
        if linear.input_transform is not None:
            yield name, "rotates a linear's input online (R4 / o_rotation)"
        if linear.input_quant is not None:
            yield name, "quantizes activations"
    for i, layer in enumerate(decoder_layers(model, spec)):
        for hook in attention_hooks(get_module(layer, spec.attn)):
            kind = type(hook).__name__
            what = {"KVQuantHook": "quantizes the KV cache", "QKRotationHook": "rotates queries and keys online (R3)"}
            yield f"{spec.layers}.{i}.{spec.attn}", what.get(kind, f"hooks {kind} into attention")


def _metadata(writer: gguf.GGUFWriter, model: nn.Module, arch: str, gguf_type: str, name: str) -> None:
    """The ``general.*`` and ``{arch}.*`` keys llama.cpp (and transformers' GGUF loader) read."""
    config = model.config
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    context = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if arch == "llama" and window:  # Mistral: full attention is the same within the window
        context = min(context, window)
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(get_module(model, spec_for(model).embed).weight.shape[0])
    d = head_dim(config)
    writer.add_rope_dimension_count(d)
    if d != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(d)
        writer.add_value_length(d)


def _write(path: Path, model: nn.Module, arch: str, spec: ArchSpec, gguf_type: str, float_type: str,
           tokenizer, vocab_gguf: Path | None, name: str) -> None:
    """Write the whole file at ``path`` (which the caller renames into place)."""
    writer = gguf.GGUFWriter(path, arch)
    try:
        _metadata(writer, model, arch, gguf_type, name)
        rows = get_module(model, spec.embed).weight.shape[0]
        tokens = copy_vocab(writer, vocab_gguf) if vocab_gguf is not None else build_vocab(writer, tokenizer, rows)
        if tokens != rows:
            raise ModelError(f"the tokenizer has {tokens} tokens but the embedding table {rows} rows: "
                             "pass the tokenizer (or source GGUF) of this model")
        block = gguf_type if gguf_type in BLOCK_TYPES else None
        for t in model_tensors(model, spec, block, float_type, PERMUTES_QK[arch]):
            writer.add_tensor(t.name, t.data, raw_dtype=t.raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def write_gguf(model: nn.Module, path: str | Path, gguf_type: str = "Q4_0", *, tokenizer=None,
               vocab_gguf: str | Path | None = None, float_type: str = "F16", name: str | None = None) -> Path:
    """Write the quantized ``model`` (a lowbit fake-quant model, in memory) as a GGUF file at ``path``; returns it.

    ``gguf_type``: the block type of the decoder linears (``Q4_0`` or ``Q8_0``); the weights must already lie on its
    grid (see the module docstring). ``F32`` / ``F16`` write every matrix as floats (the model as it computes,
    quantized weights as their dequantized values): llama.cpp's full-precision reference. The embedding table and an untied lm_head go in the smallest block type
    their own schemes fit, else as ``float_type`` (``F16``, llama.cpp's converter default, or ``F32``). The
    tokenizer is copied from ``vocab_gguf`` (the source GGUF) when given, else built from the Hugging Face
    ``tokenizer``. ``path`` must not exist; nothing is left behind on failure.
    """
    path = Path(path).expanduser()
    gguf_type = check_type(gguf_type)
    if float_type not in FLOAT_TYPES:
        raise LowbitError(f"float type {float_type!r} is not one of {', '.join(FLOAT_TYPES)}")
    if gguf_type in FULL_PRECISION:
        float_type = gguf_type
    check_new_file(path)
    arch, spec = gguf_arch(model)
    check_runs_in_llama_cpp(model, spec, gguf_type)
    if vocab_gguf is None and tokenizer is None:
        raise ModelError("a GGUF file needs the model's tokenizer: pass tokenizer= or the source vocab_gguf=")
    name = name or getattr(model.config, "_name_or_path", "") or model.config.model_type
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _write(Path(tmp), model, arch, spec, gguf_type, float_type, tokenizer,
               None if vocab_gguf is None else Path(vocab_gguf), Path(str(name)).name)
        if path.exists():
            raise ArtifactError(f"{path} appeared while exporting: pass a new file name to --out")
        os.chmod(tmp, file_mode(path))  # the user's umask, not mkstemp's private 600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
