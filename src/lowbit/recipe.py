"""Recipes: one typed object for the CLI, YAML files and Python.

A :class:`Recipe` is an ordered list of steps (what to do to the model) plus the quantization schemes for weights,
linear-layer input activations and the KV cache (what number formats to land on), and optionally for the token
embedding table and lm_head (each rounded to nearest with its own scheme after the steps). The same object is built
from a preset name, a YAML/JSON file or Python keyword arguments, and it round-trips to YAML. Every field is
validated; an invalid one raises :class:`~lowbit.errors.RecipeError` naming the field.

Example (YAML)::

    name: w4a8-rtn
    steps: [{method: rtn}]
    weights: {format: int4, granularity: channel}
    activations: {format: int8, granularity: token}
    embeddings: {format: int8, granularity: channel}      # optional: the token embedding table, a scale per row
"""

from __future__ import annotations

import sys
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .kv.config import KVCacheConfig
from .methods import PHASES, registered
from .schemes import LINEAR_ROLES, TARGETABLE, CalibrationConfig, QuantScheme, StrictConfig

__all__ = ["LINEAR_ROLES", "TARGETABLE", "CalibrationConfig", "QuantScheme", "Recipe", "Step", "load_recipe",
           "load_preset", "preset_names", "combine"]


Step = Annotated[Union[tuple(m.config for m in registered())], Field(discriminator="method")]  # noqa: UP007


class Recipe(StrictConfig):
    """What lowbit does to a model: ordered steps plus weight / activation / KV schemes (``None`` = full precision).

    ``embeddings`` and ``lm_head`` are weight schemes for the token embedding table and the output projection,
    applied by round to nearest after the steps (so rotations folded into them are included); a tied lm_head is
    untied when either is quantized. ``lm_head`` gives it its own weight scheme (weight only: its input is not
    quantized); ``targets: [..., lm_head]`` instead quantizes it with ``weights`` in the weight step (GPTQ rounds it
    to nearest) and its input with ``activations``.
    """

    name: str = "custom"
    description: str = ""
    steps: list[Step] = Field(default_factory=list)
    weights: QuantScheme | None = None
    activations: QuantScheme | None = None
    kv: QuantScheme | None = None
    kv_cache: KVCacheConfig | None = None
    embeddings: QuantScheme | None = None
    lm_head: QuantScheme | None = None
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
        self._check_step_order()
        weight_steps = [s for s in self.steps if s.phase == "weights"]
        if not self.targets and (self.weights is not None or self.activations is not None):
            raise ValueError("targets is empty, so weights/activations would quantize nothing: list linears to "
                             f"quantize (from {list(TARGETABLE)}) or drop the schemes")
        if self.weights is not None and not weight_steps:
            raise ValueError("a weights scheme needs a weight step: add `{method: rtn}` to steps")
        if weight_steps and self.weights is None:
            raise ValueError(f"step '{weight_steps[0].method}' needs a weights scheme")
        for role in ("weights", "activations", "embeddings", "lm_head"):
            if getattr(self, role) is not None and getattr(self, role).key_centre:
                raise ValueError(f"key_centre is for the kv scheme's keys, not {role}: move it under kv")
        for role in ("weights", "embeddings", "lm_head"):
            scheme = getattr(self, role)
            if scheme is not None and scheme.granularity in ("token", "head"):
                raise ValueError(f"{role} granularity must be tensor, channel or group, not '{scheme.granularity}'")
        if self.lm_head is not None and "lm_head" in self.targets:
            raise ValueError("lm_head is both a target (quantized with `weights`) and has its own scheme: drop it "
                             "from targets, or drop the lm_head scheme")
        if self.activations is not None and self.activations.granularity == "head":
            raise ValueError("activations granularity 'head' is for the KV cache: use token, tensor, group or channel")
        if self.activations is not None and self.activations.granularity == "channel" and self.activations.dynamic:
            raise ValueError("activations granularity 'channel' needs static scales: set dynamic: false")
        if self.kv is not None and self.kv_cache is not None:
            raise ValueError("set either kv (fake-quantized keys/values) or kv_cache (a packed cache), not both")
        if self.kv is not None and self.kv.granularity == "channel":
            raise ValueError("kv granularity must be head, token, group or tensor, not 'channel'")
        if self.kv is not None and self.kv.key_centre and not self.kv.dynamic:
            raise ValueError("kv key_centre needs dynamic kv scales (static ones are fitted without it): "
                             "set dynamic: true or drop key_centre")
        self._check_learned_clips()
        self._check_training()
        for role, scheme in (("activations", self.activations), ("kv", self.kv)):
            if scheme is not None and not scheme.dynamic and scheme.granularity in ("token", "group"):
                raise ValueError(
                    f"{role} granularity '{scheme.granularity}' has a scale per token, which cannot be static: "
                    "use dynamic: true, or granularity tensor (or channel / head) for static scales"
                )
        return self

    def _check_step_order(self) -> None:
        """Steps run phase by phase (rotate, then fix the prefix, then quantize weights), at most one per phase."""
        for phase in PHASES:
            named = [s.method for s in self.steps if s.phase == phase]
            if len(named) > 1:
                raise ValueError(f"at most one {phase} step per recipe, got {named}")
        for earlier, later in zip(self.steps, self.steps[1:]):
            if PHASES.index(earlier.phase) > PHASES.index(later.phase):
                raise ValueError(f"step '{later.method}' ({later.phase}) must come before step '{earlier.method}' "
                                 f"({earlier.phase}): steps run {', then '.join(PHASES)}")

    def _check_learned_clips(self) -> None:
        """Learned clip ratios replace dynamic quantizers' ``clip_ratio``: they need such quantizers."""
        learning = [s for s in self.steps if s.method == "spinquant" and "clips" in s.learn]
        if not learning:
            return
        schemes = [s for s in (self.activations, self.kv) if s is not None]
        if not schemes or any(not s.dynamic for s in schemes):
            raise ValueError("spinquant learn: [clips] needs dynamic activations or kv schemes (static scales get "
                             "their clip from calibration and the blockwise search): drop clips or make them dynamic")

    def _check_training(self) -> None:
        """A train step (qat) needs quantized weights to train."""
        if any(s.phase == "train" for s in self.steps) and self.weights is None:
            raise ValueError("a qat step trains quantized weights and their scales: add a weights scheme and a weight "
                             "step (e.g. {method: rtn})")

    def rotations_only(self) -> Recipe:
        """This recipe's rotation steps alone, with no quantization: the rotated full-precision model (learned
        clip ratios, which have no quantizer to act on there, are left out)."""
        steps = [s.model_copy(update={"learn": ["rotations"]}) if s.method == "spinquant" else s
                 for s in self.steps if s.phase == "rotation"]
        return Recipe(name=f"{self.name}-rotations", steps=steps, targets=self.targets)

    @property
    def key_centre(self) -> str | None:
        """Where the keys' centre comes from (``bias`` or ``mean``) for the KV quantizer or packed cache, or None."""
        return next((c.key_centre for c in (self.kv, self.kv_cache) if c is not None and c.key_centre), None)

    @property
    def needs_calibration(self) -> bool:
        """True when some scheme has static scales, or keys a mean centre, fitted on calibration text."""
        static_cache = self.kv_cache is not None and self.kv_cache.static
        return static_cache or self.key_centre == "mean" or any(s is not None and not s.dynamic for s in (self.activations, self.kv))

    # --- construction -------------------------------------------------------------------------------------------

    def __init__(self, **data) -> None:
        """``Recipe(weights=..., ...)`` from Python: an invalid field is a :class:`RecipeError`, as from a file."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise RecipeError(f"recipe: {_describe_errors(exc)}") from None

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
        if path.is_dir():
            raise RecipeError(f"recipe {path} is a folder: pass a preset name (see `lowbit recipes`) or a YAML file")
        if not path.is_file():
            raise RecipeError(f"recipe file {path} not found: pass a preset name (see `lowbit recipes`) or a file")
        data = _read_yaml(path)
        if isinstance(data, dict) and data and not set(map(str, data)) & set(cls.model_fields):
            raise RecipeError(f"{path} is not a lowbit recipe (none of its keys is a recipe field): pass a recipe "
                              "file (see `lowbit recipes NAME` for examples)")
        return cls.from_dict(data, origin=str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=False), sort_keys=False,
                              width=sys.maxsize)  # one line per value: a copy-pasted or redirected file round-trips

    def updated(self, **changes) -> Recipe:
        """A validated copy with some fields replaced."""
        return Recipe.from_dict({**self.model_dump(), **changes}, origin=self.name)


def _read_yaml(path: Path):
    """A YAML file's content; an unreadable or invalid file is a :class:`RecipeError` that never quotes the file."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecipeError(f"cannot read recipe file {path}: {exc.strerror}: check its permissions") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe file {path} is not UTF-8 text: pass a YAML or JSON recipe") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise RecipeError(f"recipe file {path} is not valid YAML{where}: {problem}: fix the file") from None


def _describe_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        steps = {m.name for m in registered()}
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
    """``first`` with ``second``'s steps appended and its schemes (weights, activations, kv, kv_cache, embeddings,
    lm_head) where set.

    This is how a KV-cache preset joins a weight/activation preset, e.g. ``w4a16-gptq+kv-kivi``.
    """
    data = first.model_dump()
    extra = second.model_dump(exclude_unset=True)
    data["steps"] = [*data["steps"], *extra.pop("steps", [])]
    for field in ("weights", "activations", "kv", "kv_cache", "embeddings", "lm_head"):
        if second.model_dump()[field] is not None:
            data[field] = second.model_dump()[field]
    if "calibration" in extra:
        data["calibration"] = extra["calibration"]
    data["name"], data["description"] = f"{first.name}+{second.name}", f"{first.description} + {second.description}"
    return Recipe.from_dict(data, origin=data["name"])


def load_recipe(name_or_path: str | Path | dict | Recipe) -> Recipe:
    """A :class:`Recipe` from a preset name, a YAML/JSON path, a mapping of fields, ``A+B`` (see :func:`combine`),
    or a recipe as is."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if isinstance(name_or_path, dict):
        return Recipe.from_dict(name_or_path)
    if not isinstance(name_or_path, (str, Path)):
        raise RecipeError(f"a recipe is a preset name, a file path, a dict or a Recipe, got "
                          f"{type(name_or_path).__name__}")
    text = str(name_or_path)
    if Path(text).expanduser().is_dir():
        raise RecipeError(f"recipe {text} is a folder: pass a preset name (see `lowbit recipes`) or a YAML file")
    if text.endswith((".yaml", ".yml", ".json")) or Path(text).is_file():
        return Recipe.from_file(text)
    if "+" in text:
        recipes = [load_recipe(part) for part in text.split("+")]
        combined = recipes[0]
        for other in recipes[1:]:
            combined = combine(combined, other)
        return combined
    return load_preset(text)
