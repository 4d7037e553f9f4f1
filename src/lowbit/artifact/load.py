"""``lowbit.load(folder)``: a saved quantized model back as a transformers model, never materialising full precision.

The model is built from ``config.json`` with its parameters on the ``meta`` device (accelerate's
``init_empty_weights``; buffers such as RoPE frequencies are computed as usual), lowbit's parts are put in from the
manifest, and every tensor of the safetensors files is assigned in place (no copy, no float weight for a quantized
linear). Quantized linears become real low-bit modules (:mod:`lowbit.runtime`); ``simulate=True`` gives the
fake-quant modules instead, exactly the model ``lowbit quantize`` evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ArtifactError, LowbitError
from ..models.arch import spec_for_model_type
from ..rotations import RotationMatrix
from ..schemes import QuantScheme
from ..surgery.linear import QuantLinear
from ..surgery.quantizer import ActQuantizer
from ..surgery.rotate import OnlineRotation
from .files import check_files, read_tensors
from .parts import finish, rebuild
from .save import FORMAT, FORMAT_VERSION, MANIFEST
from .weights import decode_weight


def read_manifest(folder: Path) -> dict:
    """The folder's ``lowbit.json``, checked to be a lowbit model of a version this lowbit reads."""
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


def _config(folder: Path):
    from transformers import AutoConfig

    try:
        data = json.loads((folder / "config.json").read_text())
        data.pop("quantization_config", None)
        return AutoConfig.for_model(data.pop("model_type"), **data)
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{folder / 'config.json'} cannot be read ({exc}); save the model again") from None


def simulated_linear(entry: dict, rotation: RotationMatrix | None, own: dict[str, Tensor]) -> QuantLinear:
    """The fake-quant :class:`QuantLinear` of one saved linear (what ``lowbit quantize`` evaluated)."""
    scheme = QuantScheme(**entry["weight"])
    shape = (entry["out"], entry["in"])
    bias = own.pop("bias", None)
    with torch.device("meta"):
        linear = QuantLinear(nn.Linear(entry["in"], entry["out"], bias=entry["bias"]))
    dtype = bias.dtype if bias is not None else torch.float32
    w_hat, qparams = decode_weight(own, scheme, shape, dtype)
    linear.weight = nn.Parameter(w_hat, requires_grad=False)
    linear.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    linear.set_quantized_weight(w_hat, qparams, scheme)
    if rotation is not None:
        linear.input_transform = OnlineRotation(rotation)
    if entry["input"] is not None:
        q = entry["input"]
        linear.input_quant = ActQuantizer(QuantScheme(**q["scheme"]), q["kind"], name=q["name"])
        if "input_scale" in own:
            linear.input_quant.scale = own["input_scale"]
            linear.input_quant.zero_point = own.get("input_zero_point")
    return linear


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


def _check_complete(model: nn.Module) -> None:
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.device.type == "meta":
            raise ArtifactError(f"the saved model has no tensor for {name}: a file is missing or damaged; save it again")


def load(folder: str | Path, simulate: bool = False) -> nn.Module:
    """The quantized model saved in ``folder``, in eval mode, ready for ``generate``; see the module docstring.

    Raises :class:`~lowbit.errors.ArtifactError` (one line) for a folder that is not a lowbit model, a format
    version newer than this lowbit, or a damaged or missing file.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    check_files(folder, manifest["files"])
    config = _config(folder)
    arch = spec_for_model_type(config.model_type)
    tensors = read_tensors(folder, manifest["files"])
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    make_linear = simulated_linear if simulate else _runtime_linear
    try:
        rebuild(model, arch, manifest, tensors, make_linear)
    except KeyError as exc:
        raise ArtifactError(f"the saved model lacks the tensor {exc}: a file is damaged; save it again") from None
    _assign(model, tensors)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _check_complete(model)
    finish(model, arch)
    return model.eval()


def _runtime_linear(entry: dict, rotation: RotationMatrix | None, own: dict[str, Tensor]) -> nn.Module:
    """The real low-bit module of one saved linear (:mod:`lowbit.runtime`)."""
    from ..runtime import runtime_linear

    try:
        return runtime_linear(entry, rotation, own)
    except LowbitError:
        raise
