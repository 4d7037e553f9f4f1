"""Recipes: one typed object for the CLI, YAML files and Python.

A :class:`Recipe` is an ordered list of steps (what to do to the model) plus the quantization schemes for weights,
linear-layer input activations and the KV cache (what number formats to land on). The same object is built from a
preset name, a YAML/JSON file or Python keyword arguments, and it round-trips to YAML. Every field is validated;
an invalid one raises :class:`~lowbit.errors.RecipeError` naming the field.

Example (YAML)::

    name: w4a8-rtn
    steps: [{method: rtn}]
    weights: {format: int4, granularity: channel}
    activations: {format: int8, granularity: token}
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import RecipeError
from .kv.config import KVCacheConfig
from .quant import parse_format

LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
TARGETABLE = (*LINEAR_ROLES, "lm_head")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantScheme(_Strict):
    """One number format and how its scales are chosen.

    ``granularity`` names which elements share a scale: ``tensor``; ``channel`` (weights: per output channel;
    activations: per input channel, static only); ``group`` (``group_size`` consecutive elements of the last
    dimension); ``token`` (activations and KV: per token, and per head for KV); ``head`` (KV only: per head, static
    over tokens when ``dynamic`` is false, else per token and head).
    """

    format: str = "int8"
    symmetric: bool = True
    granularity: Literal["tensor", "channel", "group", "token", "head"] = "channel"
    group_size: int | None = None
    dynamic: bool = True
    observer: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = Field(default=99.9, gt=0, le=100)
    clip_ratio: float = Field(default=1.0, gt=0, le=1)

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        try:
            parse_format(value)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _group_size_matches(self) -> QuantScheme:
        if self.granularity == "group" and (self.group_size is None or self.group_size < 1):
            raise ValueError("granularity 'group' needs a positive group_size (e.g. group_size: 64)")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError(f"group_size is only used with granularity 'group', not '{self.granularity}'")
        return self

    @property
    def bits(self) -> int:
        return parse_format(self.format, self.symmetric).bits

    def number_format(self):
        """The quantizer-core format object of this scheme."""
        return parse_format(self.format, self.symmetric)

    def describe(self) -> str:
        """Short human form, e.g. ``int4 sym g64`` or ``int8 sym token dyn``."""
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        sym = "" if self.format.startswith("fp") else (" sym" if self.symmetric else " asym")
        clip = f" clip{self.clip_ratio:g}" if self.clip_ratio < 1 else ""
        mode = " dyn" if self.dynamic else " static"
        return f"{self.format}{sym} {gran}{mode}{clip}"


class RTNStep(_Strict):
    """Round-to-nearest weight quantization with the recipe's weight scheme (its observer picks the clipping)."""

    method: Literal["rtn"] = "rtn"


class GPTQStep(_Strict):
    """GPTQ weight quantization with the recipe's weight scheme, layer-streamed over calibration text.

    ``damp``: fraction of the mean Hessian diagonal added before inversion; ``act_order``: process columns by
    decreasing Hessian diagonal; ``static_groups``: with groups and act-order, fix group scales up front.
    """

    method: Literal["gptq"] = "gptq"
    block_size: int = Field(default=128, ge=1)
    damp: float = Field(default=0.01, gt=0)
    act_order: bool = True
    static_groups: bool = True


class QuaRotStep(_Strict):
    """QuaRot's computational-invariance rotations with seeded random Hadamards (applied before weight steps).

    ``r1``: residual stream; ``r2``: per head on values; ``r3``: online on post-RoPE Q and K (only useful when the
    KV cache is quantized); ``r4``: online on the down_proj input; ``o_rotation``: online on the o_proj input
    across heads (QuaRot's; R2 rotates only within a head, so heads of different scale stay unequal without it;
    off by default until measured on every preset). ``seed`` defaults to the run's seed.
    ``fallback`` (``block_diagonal`` or ``random_orthogonal``) is used only for a size with no Hadamard construction;
    without it such a size is an error.
    """

    method: Literal["quarot"] = "quarot"
    r1: bool = True
    r2: bool = True
    r3: bool = True
    r4: bool = True
    o_rotation: bool = False
    seed: int | None = None
    fallback: Literal["block_diagonal", "random_orthogonal"] | None = None


class SpinQuantStep(_Strict):
    """SpinQuant: learn R1 and the per-layer R2 with Cayley SGD for the recipe's activation/KV quantizers.

    Training starts from QuaRot's seeded random Hadamards (R3/R4 stay fixed Hadamards) and minimises next-token
    cross-entropy with fake-quantized activations and KV on ``samples`` calibration sequences of ``seq_len`` tokens,
    ``batch`` per step, for ``steps`` steps at peak ``lr`` with cosine decay; each step is capped at ``1 / ||W||`` in
    ``step_norm`` (``"one"``: the matrix 1-norm, as the reference; ``"fro"``: Frobenius). The default ``lr`` 0.05 keeps
    steps proportional to the gradient; the reference's 1.5 makes nearly every step the capped one, which on the
    default model undoes in 60 steps most of what 20 steps learn (``benchmarks/spinquant_sweep.py``). ``checkpoint``: a file
    written every ``checkpoint_every`` steps; a run with the same settings resumes from it. ``rotations``: load learned rotations
    from such a file instead of training. ``quantize_weights``: also RTN fake-quantize the linear weights with the
    recipe's weight scheme while learning (for weight-only recipes, where nothing else is quantized).
    ``scale_grad``: gradients also flow through the quantizers' dynamic scales, crediting a rotation for the smaller
    rounding error of flatter tensors (without it, as in the reference, training on the default model raises the
    held-out loss instead of lowering it). ``autocast``: ``bf16`` runs training under bfloat16 autocast (about 1.7×
    faster on a CPU with bf16 instructions), ``off`` in float32; the rotations are always kept and folded in float32/64.
    ``o_rotation``: a fixed seeded rotation of o_proj's input across heads (as the QuaRot step's), online, applied
    after the learned R2 while learning and when folded. ``loss``: ``ce`` trains on next-token cross-entropy (the
    reference), ``kl`` on the KL divergence from the full-precision model's next-token distribution.
    ``learn``: what trains. ``rotations`` is SpinQuant's R1/R2; ``clips`` adds one clip ratio per activation/KV
    quantizer (in (0.5, 1), started at the scheme's ``clip_ratio``, Adam at peak ``clip_lr`` with the same cosine
    decay), as OmniQuant's and OSTQuant's learnable clipping; the recipe's final quantizers then use the learned
    ratios. ``[clips]`` alone keeps QuaRot's Hadamards: QuaRot with learned clipping. Clips need dynamic activation
    and KV schemes (static scales get theirs from calibration and the blockwise step's search).
    """

    method: Literal["spinquant"] = "spinquant"
    steps: int = Field(default=100, ge=1)
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    step_norm: Literal["one", "fro"] = "one"
    samples: int = Field(default=100, ge=1)
    seq_len: int = Field(default=512, ge=2)
    batch: int = Field(default=1, ge=1)
    r3: bool = True
    r4: bool = True
    seed: int | None = None
    checkpoint: str | None = None
    checkpoint_every: int = Field(default=10, ge=1)
    rotations: str | None = None
    quantize_weights: bool = False
    scale_grad: bool = True
    autocast: Literal["bf16", "off"] = "off"
    o_rotation: bool = False
    loss: Literal["ce", "kl"] = "ce"
    learn: list[Literal["rotations", "clips"]] = Field(default=["rotations"], min_length=1)
    clip_lr: float = Field(default=0.1, gt=0)

    @field_validator("learn")
    @classmethod
    def _learn_once_each(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"learn names each of rotations, clips at most once, got {value}")
        return value


class PrefixStep(_Strict):
    """PrefixQuant's prefix: tokens whose full-precision keys/values start every sequence.

    ``tokens``: the prefix's token ids, or None to detect them: outlier tokens (max |x| / median > ``eta`` at the
    down_proj inputs of the model as rotated so far) on ``samples`` calibration sequences of ``seq_len`` tokens.
    Place it after the rotation step and before the weight step.
    """

    method: Literal["prefix"] = "prefix"
    tokens: list[int] | None = None
    eta: float = Field(default=64.0, gt=1)
    samples: int = Field(default=64, ge=1)
    seq_len: int = Field(default=512, ge=2)


class BlockwiseStep(_Strict):
    """Block-wise reconstruction (PrefixQuant's static-scale search, then EfficientQAT's block fine-tuning).

    One decoder layer at a time, on ``samples`` calibration sequences of ``seq_len`` tokens (after the prefix when
    the recipe has one): the full-precision layer's output is the target; weights start from ``init`` (``rtn`` or
    ``gptq``, with the GPTQ solver settings below); static activation/KV scales start from the calibration maxima;
    with ``grid``, each static quantizer's clip factor is searched (0.25..0.95 coarse, then ±0.05 fine) on the first
    ``grid_samples`` sequences to minimise the layer's output error (for keys: the error of the attention
    probabilities); then ``epochs`` of AdamW with cosine decay train the layer's weights and all its quantizer scales
    through straight-through rounding to minimise the MSE to the target, ``batch`` sequences per step (0 epochs: no
    fine-tuning; a layer whose error would grow keeps its start). Learning rates are per step and scale-free:
    ``lr_weight`` in units of each linear's quantization step, ``lr_scale`` relative to each scale. ``checkpoint``: a folder that receives each finished layer; a run
    with the same settings resumes after the last one.
    """

    method: Literal["blockwise"] = "blockwise"
    init: Literal["rtn", "gptq"] = "rtn"
    grid: bool = True
    grid_samples: int = Field(default=4, ge=1)
    epochs: int = Field(default=2, ge=0)
    samples: int = Field(default=32, ge=1)
    seq_len: int = Field(default=512, ge=2)
    batch: int = Field(default=2, ge=1)
    lr_weight: float = Field(default=0.02, ge=0)
    lr_scale: float = Field(default=0.005, ge=0)
    seed: int | None = None
    checkpoint: str | None = None
    block_size: int = Field(default=128, ge=1)
    damp: float = Field(default=0.01, gt=0)
    act_order: bool = True
    static_groups: bool = True


Step = Annotated[RTNStep | GPTQStep | QuaRotStep | SpinQuantStep | PrefixStep | BlockwiseStep,
                 Field(discriminator="method")]
WEIGHT_STEPS = ("rtn", "gptq", "blockwise")
ROTATION_STEPS = ("quarot", "spinquant")


class CalibrationConfig(_Strict):
    """How much calibration text static scales (and later methods) see."""

    samples: int = Field(default=16, ge=1)
    seq_len: int = Field(default=512, ge=2)


class Recipe(_Strict):
    """What lowbit does to a model: ordered steps plus weight / activation / KV schemes (``None`` = full precision)."""

    name: str = "custom"
    description: str = ""
    steps: list[Step] = Field(default_factory=list)
    weights: QuantScheme | None = None
    activations: QuantScheme | None = None
    kv: QuantScheme | None = None
    kv_cache: KVCacheConfig | None = None
    targets: list[str] = Field(default_factory=lambda: list(LINEAR_ROLES))
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in TARGETABLE]
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}: choose from {list(TARGETABLE)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        weight_steps = [s for s in self.steps if s.method in WEIGHT_STEPS]
        methods = [s.method for s in self.steps]
        rotations = [i for i, m in enumerate(methods) if m in ROTATION_STEPS]
        if len(weight_steps) > 1:
            raise ValueError("at most one weight step (rtn, gptq or blockwise) per recipe")
        if len(rotations) > 1:
            raise ValueError("at most one rotation step (quarot or spinquant) per recipe")
        if rotations and any(methods.index(m) < rotations[0] for m in methods if m in WEIGHT_STEPS):
            raise ValueError("the rotation step must come before weight steps (rotate, then quantize)")
        if "prefix" in methods:
            at = methods.index("prefix")
            if any(methods.index(m) > at for m in methods if m in ROTATION_STEPS) or any(
                methods.index(m) < at for m in methods if m in WEIGHT_STEPS
            ):
                raise ValueError("the prefix step goes after the rotation step and before the weight step")
        if self.weights is not None and not weight_steps:
            raise ValueError("a weights scheme needs a weight step: add `{method: rtn}` to steps")
        if weight_steps and self.weights is None:
            raise ValueError(f"step '{weight_steps[0].method}' needs a weights scheme")
        if self.weights is not None and self.weights.granularity in ("token", "head"):
            raise ValueError(f"weights granularity must be tensor, channel or group, not '{self.weights.granularity}'")
        if self.activations is not None and self.activations.granularity == "head":
            raise ValueError("activations granularity 'head' is for the KV cache: use token, tensor, group or channel")
        if self.activations is not None and self.activations.granularity == "channel" and self.activations.dynamic:
            raise ValueError("activations granularity 'channel' needs static scales: set dynamic: false")
        if self.kv is not None and self.kv_cache is not None:
            raise ValueError("set either kv (fake-quantized keys/values) or kv_cache (a packed cache), not both")
        if self.kv is not None and self.kv.granularity == "channel":
            raise ValueError("kv granularity must be head, token, group or tensor, not 'channel'")
        self._check_learned_clips()
        for role, scheme in (("activations", self.activations), ("kv", self.kv)):
            if scheme is not None and not scheme.dynamic and scheme.granularity in ("token", "group"):
                raise ValueError(
                    f"{role} granularity '{scheme.granularity}' has a scale per token, which cannot be static: "
                    "use dynamic: true, or granularity tensor (or channel / head) for static scales"
                )
        return self

    def _check_learned_clips(self) -> None:
        """Learned clip ratios replace dynamic quantizers' ``clip_ratio``: they need such quantizers."""
        learning = [s for s in self.steps if s.method == "spinquant" and "clips" in s.learn]
        if not learning:
            return
        schemes = [s for s in (self.activations, self.kv) if s is not None]
        if not schemes or any(not s.dynamic for s in schemes):
            raise ValueError("spinquant learn: [clips] needs dynamic activations or kv schemes (static scales get "
                             "their clip from calibration and the blockwise search): drop clips or make them dynamic")

    def rotations_only(self) -> Recipe:
        """This recipe's rotation steps alone, with no quantization: the rotated full-precision model (learned
        clip ratios, which have no quantizer to act on there, are left out)."""
        steps = [s.model_copy(update={"learn": ["rotations"]}) if s.method == "spinquant" else s
                 for s in self.steps if s.method in ROTATION_STEPS]
        return Recipe(name=f"{self.name}-rotations", steps=steps, targets=self.targets)

    @property
    def needs_calibration(self) -> bool:
        """True when some scheme has static scales fitted on calibration text."""
        static_cache = self.kv_cache is not None and self.kv_cache.static
        return static_cache or any(s is not None and not s.dynamic for s in (self.activations, self.kv))

    # --- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict, origin: str = "recipe") -> Recipe:
        """Validate a plain mapping, turning pydantic errors into one :class:`RecipeError` line per bad field."""
        if not isinstance(data, dict):
            raise RecipeError(f"{origin}: a recipe must be a mapping of fields, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(f"{origin}: {_describe_errors(exc)}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """Read a YAML or JSON recipe file."""
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} not found: pass a preset name (see `lowbit recipes`) or a file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        return cls.from_dict(data, origin=str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=False), sort_keys=False)

    def updated(self, **changes) -> Recipe:
        """A validated copy with some fields replaced."""
        return Recipe.from_dict({**self.model_dump(), **changes}, origin=self.name)


def _describe_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        steps = ("rtn", "gptq", "quarot", "spinquant", "prefix", "blockwise")
        field = ".".join(str(p) for p in err["loc"] if p not in steps) or "recipe"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"field '{field}': {msg}")
    return "; ".join(parts)


@lru_cache(maxsize=1)
def _presets() -> dict[str, dict]:
    text = resources.files("lowbit").joinpath("presets.yaml").read_text()
    return {name: {"name": name, **body} for name, body in yaml.safe_load(text).items()}


def preset_names() -> list[str]:
    """Names of the presets shipped with lowbit, in the order `lowbit recipes` lists them."""
    return list(_presets())


def load_preset(name: str) -> Recipe:
    """A shipped preset by name (defined in ``lowbit/presets.yaml``)."""
    if name not in _presets():
        raise RecipeError(f"unknown recipe '{name}': choose one of {', '.join(preset_names())} or pass a YAML file")
    return Recipe.from_dict(dict(_presets()[name]), origin=f"preset {name}")


def combine(first: Recipe, second: Recipe) -> Recipe:
    """``first`` with ``second``'s steps appended and its schemes (weights, activations, kv, kv_cache) where set.

    This is how a KV-cache preset joins a weight/activation preset, e.g. ``w4a16-gptq+kv-kivi``.
    """
    data = first.model_dump()
    extra = second.model_dump(exclude_unset=True)
    data["steps"] = [*data["steps"], *extra.pop("steps", [])]
    for field in ("weights", "activations", "kv", "kv_cache"):
        if second.model_dump()[field] is not None:
            data[field] = second.model_dump()[field]
    if "calibration" in extra:
        data["calibration"] = extra["calibration"]
    data["name"], data["description"] = f"{first.name}+{second.name}", f"{first.description} + {second.description}"
    return Recipe.from_dict(data, origin=data["name"])


def load_recipe(name_or_path: str | Path | Recipe) -> Recipe:
    """A :class:`Recipe` from a preset name, a YAML/JSON path, ``A+B`` (see :func:`combine`), or a recipe as is."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml", ".json")) or Path(text).is_file():
        return Recipe.from_file(text)
    if "+" in text:
        recipes = [load_recipe(part) for part in text.split("+")]
        combined = recipes[0]
        for other in recipes[1:]:
            combined = combine(combined, other)
        return combined
    return load_preset(text)
