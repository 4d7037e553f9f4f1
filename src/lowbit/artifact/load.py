"""``lowbit.load(folder)``: a saved quantized model back as a transformers model, never materialising full precision.

The model is built from ``config.json`` with its parameters on the ``meta`` device (accelerate's
``init_empty_weights``; buffers such as RoPE frequencies are computed as usual), lowbit's parts are put in from the
manifest, and every tensor of the safetensors files is assigned in place (no copy, no float weight for a quantized
linear). Quantized linears and embedding tables become real low-bit modules (:mod:`lowbit.runtime`); ``simulate=True``
gives the fake-quant modules instead, exactly the model ``lowbit quantize`` evaluated.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ArtifactError
from ..models.arch import decoder_layers, get_module, spec_for_model_type
from ..quant import QParams, granule_shape
from ..rotations import RotationMatrix
from ..runtime import IntLinear, RuntimeEmbedding, RuntimeLinear, fuse_groups, to_quant_embedding
from ..runtime.linear import scale_values
from ..schemes import QuantScheme
from ..surgery.embedding import QuantEmbedding
from ..surgery.linear import QuantLinear
from ..surgery.quantizer import ActQuantizer, granularity_for
from ..surgery.rotate import OnlineRotation
from .files import check_files, read_tensors
from .parts import finish, rebuild
from .save import FORMAT, FORMAT_VERSION, MANIFEST


def read_manifest(folder: str | Path) -> dict:
    """The folder's ``lowbit.json``, checked to be a lowbit model of a version this lowbit reads."""
    folder = Path(folder).expanduser()
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a folder: pass the folder `lowbit quantize --save` wrote")
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a lowbit model (no {MANIFEST}): pass a folder written by "
                            "`lowbit quantize --save` or lowbit.save")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is damaged ({exc.__class__.__name__}): save the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a lowbit manifest: pass a folder written by `lowbit quantize --save`")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{folder} was saved in lowbit format version {version} by lowbit "
                            f"{manifest.get('lowbit_version')}; this lowbit reads up to {FORMAT_VERSION}: upgrade lowbit")
    return manifest


def read_config(folder: str | Path):
    """The saved model's transformers config (its quantization_config left out: lowbit's manifest rebuilds the parts)."""
    from transformers import AutoConfig

    folder = Path(folder).expanduser()
    try:
        data = json.loads((folder / "config.json").read_text())
        data.pop("quantization_config", None)
        return AutoConfig.for_model(data.pop("model_type"), **data)
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{folder / 'config.json'} cannot be read ({exc}); save the model again") from None


def _fill(module: nn.Module, own: dict[str, Tensor], what: str) -> nn.Module:
    """``module`` with its saved tensors assigned in place; a mismatch with its scheme is one clear error."""
    try:
        module.load_state_dict(own, assign=True, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"a saved {what}'s tensors do not match its scheme ({str(exc).splitlines()[0]}); "
                            "save the model again") from None
    return module


def _linear_schemes(entry: dict) -> tuple[QuantScheme, QuantScheme | None]:
    """A saved linear's weight and input schemes."""
    return QuantScheme(**entry["weight"]), QuantScheme(**entry["input"]["scheme"]) if entry["input"] else None


def _stored(entry: dict, own: dict[str, Tensor], dtype: torch.dtype) -> RuntimeLinear:
    """One saved linear's tensors in the runtime module that holds them (the base class: storage, no kernel)."""
    stored = RuntimeLinear(entry["in"], entry["out"], entry["bias"], *_linear_schemes(entry), dtype)
    for name in ("input_scale", "input_zero_point"):  # static input qparams keep their saved shape (per channel)
        if name in own:
            stored.register_buffer(name, torch.empty_like(own[name], device="meta"))
    return _fill(stored, own, "linear")


def simulated_linear(entry: dict, rotation: RotationMatrix | None, own: dict[str, Tensor],
                     dtype: torch.dtype = torch.float32) -> QuantLinear:
    """The fake-quant :class:`QuantLinear` of one saved linear: exactly what ``lowbit quantize`` evaluated."""
    stored = _stored(entry, own, dtype)
    scheme = stored.weight_scheme
    with torch.device("meta"):
        linear = QuantLinear(nn.Linear(entry["in"], entry["out"], bias=entry["bias"]))
    granules = granule_shape((entry["out"], entry["in"]), granularity_for(scheme, "weight"))
    zero = getattr(stored, "weight_zero_point", None)
    zero = None if zero is None else (zero.float() + 2 ** (scheme.bits - 1)).reshape(granules)
    w_hat = stored.dequantized_weight(dtype)
    linear.weight = nn.Parameter(w_hat, requires_grad=False)
    linear.bias = None if stored.bias is None else nn.Parameter(stored.bias, requires_grad=False)
    linear.set_quantized_weight(w_hat, QParams(scale_values(stored).reshape(granules), zero), scheme)
    if rotation is not None:
        linear.input_transform = OnlineRotation(rotation)
    if entry["input"] is not None:
        q = entry["input"]
        linear.input_quant = ActQuantizer(stored.input_scheme, q["kind"], name=q["name"])
        if "input_scale" in own:
            scale = stored.input_scale
            linear.input_quant.scale = scale.reshape(1, 1) if scale.numel() == 1 else scale
            zp = getattr(stored, "input_zero_point", None)
            linear.input_quant.zero_point = None if zp is None else (zp.float() + 2 ** (stored.input_scheme.bits - 1)).reshape(linear.input_quant.scale.shape)
    return linear


def runtime_linear(entry: dict, rotation: RotationMatrix | None, own: dict[str, Tensor],
                   dtype: torch.dtype = torch.float32, packed: bool = False) -> RuntimeLinear:
    """The real low-bit module of one saved linear, prepared (:class:`~lowbit.errors.NoKernelError` when its schemes
    have no kernel: the message names ``simulate=True``). ``packed``: an :class:`IntLinear` keeps no int8 copy of
    its codes (see :func:`load`)."""
    module = _fill(RuntimeLinear.empty(entry["in"], entry["out"], entry["bias"], *_linear_schemes(entry), dtype),
                   own, "linear")
    module.input_transform = None if rotation is None else OnlineRotation(rotation)
    return module.prepare(int8_copy=False) if packed and isinstance(module, IntLinear) else module.prepare()


def runtime_embedding(entry: dict, own: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> RuntimeEmbedding:
    """The runtime table of one saved quantized embedding table, prepared."""
    module = RuntimeEmbedding.empty(entry["num"], entry["dim"], QuantScheme(**entry["weight"]), dtype,
                                    entry["padding_idx"])
    return _fill(module, own, "embedding table").prepare()


def simulated_embedding(entry: dict, own: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> QuantEmbedding:
    """The fake-quant :class:`QuantEmbedding` of one saved table: exactly what ``lowbit quantize`` evaluated."""
    return to_quant_embedding(runtime_embedding(entry, own, dtype))


def _assign(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Put every tensor in place (parameters and buffers, including buffers registered as None); an unknown name
    means the file does not belong to this model."""
    for name, tensor in tensors.items():
        path, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ArtifactError(f"the saved tensor {name} has no place in this model: the files do not match "
                                "config.json and lowbit.json; save the model again") from None
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        elif attr in module._buffers:
            module._buffers[attr] = tensor
        else:
            raise ArtifactError(f"the saved tensor {name} has no place in this model; save the model again")


def _check_finite(tensors: dict[str, Tensor]) -> None:
    """Refuse saved float tensors (scales, biases, tables, norms, fp8 weights) holding NaN or infinity, naming the
    first: a damaged file would otherwise load and compute NaN silently."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            values = tensor if tensor.element_size() > 1 else tensor.to(torch.float32)  # fp8 has no isfinite
            if not torch.isfinite(values).all():
                raise ArtifactError(f"the saved tensor {name} holds NaN or infinite values: the model is damaged; "
                                    "quantize and save it again")


def _check_complete(model: nn.Module) -> None:
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.device.type == "meta":
            raise ArtifactError(f"the saved model has no tensor for {name}: a file is missing or damaged; save it again")


def _return_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc ``malloc_trim``): the kernel layouts are built from
    temporaries of every layer, and without it their freed space stays resident (measured in benchmarks/README.md)."""
    import ctypes
    import ctypes.util
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def shared_input_groups(model: nn.Module, arch) -> list[list[nn.Module]]:
    """Per decoder layer, the linears that read one input (q/k/v, gate/up: ``ArchSpec.input_groups``)."""
    roles = arch.linear_roles
    return [[get_module(layer, roles[r]) for r in group] for layer in decoder_layers(model, arch)
            for group in arch.input_groups if len(group) > 1]


def load(folder: str | Path, simulate: bool = False, lean: bool = False, fuse: bool = True,
         packed: bool = False) -> nn.Module:
    """The quantized model saved in ``folder``, in eval mode, ready for ``generate``; see the module docstring.

    ``lean=True`` frees each real low-bit linear's stored weight codes where its kernel layout no longer reads them
    (:meth:`~lowbit.runtime.RuntimeLinear.drop_stored_codes`): less resident memory, and the model cannot be saved
    again (``lowbit eval``, ``generate`` and ``bench`` load lean). ``fuse=True`` runs the real low-bit linears that
    read one input (q/k/v, gate/up) as one (:mod:`lowbit.runtime.fused`: the same outputs and bytes on disk, one
    activation quantization and one GEMM per group). ``packed=True`` keeps the int2-int4 weights of int x int
    linears packed two per byte and unpacks them on every call (``IntLinear.prepare(int8_copy=False)``): half the
    resident bytes of the default int8 copy, slower decode; it changes nothing on CPUs without int8 dot products,
    whose fbgemm layout is int8 (``benchmarks/README.md``).

    Raises :class:`~lowbit.errors.ArtifactError` (one line) for a folder that is not a lowbit model, a format
    version newer than this lowbit, or a damaged or missing file.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    check_files(folder, manifest["files"])
    config = read_config(folder)
    arch = spec_for_model_type(config.model_type)
    tensors = read_tensors(folder, manifest["files"])
    _check_finite(tensors)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    make = simulated_linear if simulate else partial(runtime_linear, packed=packed)
    make_table = simulated_embedding if simulate else runtime_embedding

    def make_linear(entry, rotation, own):
        module = make(entry, rotation, own, dtype)
        _return_freed_memory()  # each layer's unpacking temporaries: else the peak grows with the model
        return module

    def make_embedding(entry, own):
        return make_table(entry, own, dtype)

    try:
        rebuild(model, arch, manifest, tensors, make_linear, make_embedding)
    except KeyError as exc:
        raise ArtifactError(f"the saved model lacks the tensor {exc}: a file is damaged; save it again") from None
    _assign(model, tensors)
    del tensors
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _check_complete(model)
    finish(model, arch)
    if fuse and not simulate:
        fuse_groups(shared_input_groups(model, arch))
    if lean:
        for module in model.modules():
            if isinstance(module, RuntimeLinear):
                module.drop_stored_codes()
    _return_freed_memory()
    return model.eval()


def load_tokenizer(folder: str | Path):
    """The tokenizer saved beside the model (one clear error when the folder has none)."""
    from transformers import AutoTokenizer

    folder = Path(folder).expanduser()
    read_manifest(folder)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{folder} has no usable tokenizer ({str(exc).splitlines()[0]}); save the model with "
                            "its tokenizer (lowbit.save(model, folder, tokenizer))") from None
