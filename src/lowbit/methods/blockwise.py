"""Block-wise reconstruction: PrefixQuant's static quantization, one decoder layer at a time.

Calibration samples run through the model layer by layer twice over: through the full-precision layers (the
targets) and through the layers already quantized (the inputs each quantized layer will really see). For each layer:

1. its full-precision output on the full-precision inputs is the target;
2. its weights are quantized (RTN or GPTQ);
3. its static activation/KV quantizers get their calibration ranges from its quantized-path inputs;
4. optionally, each quantizer's clip factor is grid-searched (:mod:`.clip_search`);
5. optionally, weights and scales are fine-tuned to the target (:mod:`.block_finetune`), kept only when that
   lowers the layer's error on its samples;
6. its quantized outputs become the next layer's inputs.

With a PrefixQuant prefix every sample runs after the prefix's full-precision cache, so prefix positions never
reach a quantizer or a loss. Only one layer is on the compute device at a time. With ``checkpoint`` each finished
layer is written to a folder, and a rerun with the same settings restores those layers instead of redoing them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..models.arch import decoder_layers
from ..surgery.attach import (
    act_quantizers,
    attach_activation_quantizers,
    attach_kv_quantizers,
    calibrate_quantizers,
    quantizers_off,
)
from ..surgery.block_finetune import FinetuneConfig, finetune_layer, output_error
from ..surgery.checkpoint import (
    check_checkpoint_path,
    load_checkpoint,
    model_digest,
    save_checkpoint,
    tensor_digest,
)
from ..surgery.clip_search import grid_search_layer
from ..surgery.gptq import gptq_config, gptq_layer, quantize_head_rtn
from ..surgery.linear import QuantLinear
from ..surgery.prefix import keep_prefix_exact
from ..surgery.quantizer import ActQuantizer
from ..surgery.sequential import LayerStream, StreamedLayer
from .registry import MethodResult, StepConfig, register
from .session import Session


class BlockwiseStep(StepConfig):
    """Block-wise reconstruction (PrefixQuant's static-scale search, then EfficientQAT's block fine-tuning).

    One decoder layer at a time, on ``samples`` calibration sequences of ``seq_len`` tokens (after the prefix when
    the recipe has one): the full-precision layer's output is the target; weights start from ``init`` (``rtn`` or
    ``gptq``, with the GPTQ solver settings below); static activation/KV scales start from the calibration maxima;
    with ``grid``, each static quantizer's clip factor is searched (0.25..0.95 coarse, then ±0.05 fine) on the first
    ``grid_samples`` sequences to minimise the layer's output error (for keys: the error of the attention
    probabilities); then ``epochs`` of AdamW with cosine decay train the layer's weights and all its quantizer scales
    through straight-through rounding to minimise the MSE to the target, ``batch`` sequences per step (0 epochs: no
    fine-tuning; a layer whose error would grow keeps its start). Learning rates are per step and scale-free:
    ``lr_weight`` in units of each linear's quantization step, ``lr_scale`` relative to each scale. ``loss``:
    ``mse``, or ``relative`` (each token's squared error over its target's squared norm: the next layer normalises
    every token, and the plain MSE is ruled by the few tokens with massive activations). ``checkpoint``: a folder
    that receives each finished layer; a run with the same settings resumes after the last one.
    """

    method: Literal["blockwise"] = "blockwise"
    phase: ClassVar = "weights"
    init: Literal["rtn", "gptq"] = "rtn"
    grid: bool = True
    grid_samples: int = Field(default=4, ge=1)
    epochs: int = Field(default=2, ge=0)
    samples: int = Field(default=32, ge=1)
    seq_len: int = Field(default=512, ge=2)
    batch: int = Field(default=2, ge=1)
    lr_weight: float = Field(default=0.02, ge=0)
    lr_scale: float = Field(default=0.005, ge=0)
    loss: Literal["mse", "relative"] = "mse"
    seed: int | None = None
    checkpoint: str | None = None
    block_size: int = Field(default=128, ge=1)
    damp: float = Field(default=0.01, gt=0)
    act_order: bool = True
    static_groups: bool = True

    def needs_calibration(self) -> bool:
        return True


@dataclass
class BlockwiseResult(MethodResult):
    """Per-layer rows (output MSE after each stage, clip factors, epoch losses, fine-tuning seconds, whether the
    fine-tuning was reverted), how many layers came from a checkpoint, and the wall time."""

    key: ClassVar[str] = "blockwise"
    layers: list[dict] = field(default_factory=list)
    restored: int = 0
    seconds: float = 0.0

    def report(self) -> dict:
        return {"layers": self.layers, "restored": self.restored, "seconds": round(self.seconds, 3)}


class LayerCheckpoint:
    """A folder of finished layers (``layer_<i>.safetensors``), valid for one set of step settings."""

    def __init__(self, folder: str | None, fingerprint: dict) -> None:
        self.folder = Path(folder).expanduser() if folder else None
        self.fingerprint = fingerprint
        self.warned = False
        if self.folder is not None:
            check_checkpoint_path(self.path(0))  # a file in the folder's place, or an unwritable place: say so now

    def path(self, index: int) -> Path:
        return self.folder / f"layer_{index}.safetensors"

    def load(self, index: int) -> dict[str, Tensor] | None:
        """The saved tensors of layer ``index`` when saved with the same settings, else None."""
        if self.folder is None:
            return None
        found = load_checkpoint(self.path(index), self.fingerprint, warn=not self.warned)
        self.warned |= found is None and self.path(index).is_file()  # one warning per run, not one per layer
        return None if found is None else found[0]

    def save(self, index: int, layer: nn.Module) -> None:
        if self.folder is not None:
            save_checkpoint(self.path(index), quantized_state(layer), self.fingerprint)


def quantized_state(layer: nn.Module) -> dict[str, Tensor]:
    """What quantization changed in a layer: quantized weights, their scales, activation/KV scales and ranges
    (detached views, not copies)."""
    names = ("weight", "weight_scale", "weight_zero", "scale", "zero_point", "range_min", "range_max")
    state = {}
    for path, module in layer.named_modules():
        if isinstance(module, (QuantLinear, ActQuantizer)):
            for name in names:
                value = getattr(module, name, None)
                if isinstance(value, Tensor):
                    state[f"{path}.{name}" if path else name] = value.detach()
    return state


@torch.no_grad()
def restore_state(layer: nn.Module, state: dict[str, Tensor], scheme) -> None:
    """Put a :func:`quantized_state` back into a freshly prepared layer."""
    for key, value in state.items():
        path, name = key.rsplit(".", 1)
        module = layer.get_submodule(path)
        if name == "weight":
            module.weight.data.copy_(value)
        else:
            setattr(module, name, value.clone())
        if isinstance(module, QuantLinear):
            module.weight_scheme = scheme


def _prepare(model: nn.Module, session: Session) -> None:
    """Attach the recipe's quantizers now (the layers need them) and keep prefix positions exact in KV hooks."""
    recipe = session.recipe
    if recipe.activations is not None:
        attach_activation_quantizers(model, recipe.activations)
    if recipe.kv is not None:
        attach_kv_quantizers(model, session.spec, recipe.kv, session.default_calibration)
    if session.prefix is not None:
        keep_prefix_exact(model, session.spec, len(session.prefix.tokens))


def _error(out: Tensor, target: Tensor) -> float:
    """The plain MSE the rows report, whatever loss the fine-tuning trains on."""
    return float(output_error(out, target))


def _quantize_layer(current: StreamedLayer, step: BlockwiseStep, session: Session, rows: list[dict],
                    seed: int) -> list[Tensor]:
    """Steps 1-5 for one layer; returns its full-precision target outputs and its quantized outputs."""
    layer, index, run = current.layer, current.index, current.run
    fp_in, q_in = current.inputs
    latent: dict[QuantLinear, Tensor] = {}  # RTN: fine-tuning starts from the float weights, not the rounded ones
    with quantizers_off(layer):
        target = run(fp_in)
        if step.init == "gptq":
            gptq_layer(layer, session.spec, partial(current.chunks, q_in), session.recipe.weights, gptq_config(step))
        else:
            for linear in (m for m in layer.modules() if isinstance(m, QuantLinear)):
                if step.epochs:
                    latent[linear] = linear.weight.detach().clone()
                linear.quantize_weight_rtn(session.recipe.weights)
    calibrate_quantizers(list(act_quantizers(layer)), lambda: run(q_in))
    out = run(q_in)  # the quantized outputs as the layer stands after each stage
    row = {"layer": index, "mse_init": _error(out, target)}
    if step.grid:
        n = min(step.grid_samples, len(q_in))
        row["clip"] = grid_search_layer(layer, session.spec, lambda: run(q_in[:n]), target[:n])
        out = run(q_in)
        row["mse_grid"] = _error(out, target)
    if step.epochs:
        out = _finetune(current, target, out, step, session, row, seed, latent)
    rows.append(row)
    return [target, out]


def _finetune(current: StreamedLayer, target: Tensor, out: Tensor, step: BlockwiseStep, session: Session,
              row: dict, seed: int, latent: dict[QuantLinear, Tensor]) -> Tensor:
    """Step 5: fine-tune the layer towards ``target``; keeps the result only when it lowers the layer's error on
    its samples (else restores the layer exactly). Returns the layer's quantized outputs as it then stands."""
    layer, q_in = current.layer, current.inputs[1]
    before = {k: v.clone() for k, v in quantized_state(layer).items()}  # a copy: training changes them in place
    relative = step.loss == "relative"
    config = FinetuneConfig(step.epochs, step.batch, step.lr_weight, step.lr_scale, seed=seed + current.index,
                            relative=relative)
    started = time.perf_counter()
    row["epoch_losses"] = finetune_layer(layer, current.forward, q_in, target, config, latent=latent)
    row["finetune_s"] = time.perf_counter() - started
    tuned = current.run(q_in)
    row["mse_finetuned"] = _error(tuned, target)
    if output_error(tuned, target, relative) > output_error(out, target, relative):  # worse: keep the start
        restore_state(layer, before, session.recipe.weights)
        row["reverted"] = True
        return out
    return tuned


def _status(row: dict) -> str:
    """A layer's output MSE at the start and after the last stage that kept its result, for the progress bar."""
    stages = [row["mse_init"], row.get("mse_grid"), None if row.get("reverted") else row.get("mse_finetuned")]
    kept = [m for m in stages if m is not None]
    return f"layer {row['layer']} MSE {kept[0]:.3g} -> {kept[-1]:.3g}"


@register(BlockwiseStep)
@torch.no_grad()
def apply(model: nn.Module, step: BlockwiseStep, session: Session) -> BlockwiseResult:
    """Quantize the model one decoder layer at a time (see the module docstring)."""
    spec, recipe, start = session.spec, session.recipe, time.perf_counter()
    seed = session.seed if step.seed is None else step.seed
    batches = session.calibration_text("block-wise quantization").sample(step.samples, step.seq_len)
    _prepare(model, session)
    prefix = session.prefix
    stream = LayerStream(model, spec, batches, streams=2, batch_size=step.batch,
                         prefix=prefix.cache if prefix else None)  # streams: full-precision, quantized
    fingerprint = {"recipe": recipe.model_dump(mode="json"), "seed": seed, "prefix": prefix.tokens if prefix else []}
    if step.checkpoint is not None:  # bound to this model and these samples: another's layers are never restored
        fingerprint.update(model=model_digest(model), calibration=tensor_digest(batches))
    checkpoint = LayerCheckpoint(step.checkpoint, fingerprint)
    result = BlockwiseResult()
    tick = session.tick("block-wise quantization", len(decoder_layers(model, spec)))

    def on_layer(current: StreamedLayer) -> list[Tensor]:
        saved = checkpoint.load(current.index)
        if saved is None:
            outputs = _quantize_layer(current, step, session, result.layers, seed)
            checkpoint.save(current.index, current.layer)
            tick(_status(result.layers[-1]))
        else:
            outputs = _restore_layer(current, saved, recipe.weights)
            result.restored += 1
            tick(f"layer {current.index} from checkpoint")
        return outputs

    stream.walk(on_layer)
    quantize_head_rtn(model, spec, recipe.weights)
    result.seconds = time.perf_counter() - start
    return result


def _restore_layer(current: StreamedLayer, saved: dict[str, Tensor], scheme) -> list[Tensor]:
    """A layer finished by an earlier run: its full-precision outputs, then its saved state and quantized outputs."""
    fp_in, q_in = current.inputs
    with quantizers_off(current.layer):
        target = current.run(fp_in)
    restore_state(current.layer, saved, scheme)
    return [target, current.run(q_in)]
