"""What a method is: a typed step config, an ``apply`` registered for it, and a typed result.

A method is one module under :mod:`lowbit.methods`. It defines a :class:`StepConfig` subclass (its recipe step, with
a ``method`` literal naming it, the ``phase`` it belongs to and whether it needs calibration text) and registers
``apply(model, step, session) -> MethodResult | None`` for it with :func:`register`. The recipe's step union and
the order rule (phases in :data:`PHASES` order, at most one step per phase) are built from this registry, and
:func:`lowbit.apply.apply_recipe` dispatches through it: neither imports any method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import nn

from ..schemes import StrictConfig

if TYPE_CHECKING:
    from .session import Session

Phase = Literal["rotation", "balance", "prefix", "weights", "train"]
PHASES: tuple[Phase, ...] = ("rotation", "balance", "prefix", "weights", "train")  # the order steps of phases run in


class StepConfig(StrictConfig):
    """A recipe step: a method's typed settings. Subclasses set ``method: Literal[...]`` and ``phase``.

    ``phase``: ``rotation`` steps change the basis (before anything is quantized), ``balance`` steps rescale what the
    KV quantizer sees (exactly, in the weights), ``prefix`` steps fix the tokens
    every sequence starts from, ``weights`` steps quantize the weights with the recipe's weight scheme (and need one),
    ``train`` steps train the finished quantized model (every quantizer attached and calibrated) against the
    full-precision one (``Session.teacher``, which the method's ``prepare`` sets up).
    """

    phase: ClassVar[Phase]

    @property
    def name(self) -> str:
        return self.method  # type: ignore[attr-defined]

    def needs_calibration(self) -> bool:
        """True when this step reads calibration text (checked before any work starts)."""
        return False


class MethodResult:
    """What a method reports: ``key`` names its section in the report, :meth:`report` fills it (JSON values)."""

    key: ClassVar[str]

    def report(self) -> dict[str, Any]:
        raise NotImplementedError


Apply = Callable[[nn.Module, Any, "Session"], MethodResult | None]
Prepare = Callable[[nn.Module, Any, "Session"], None]


@dataclass(frozen=True)
class Method:
    """One registered method: its step config type, the function that applies such a step to a model, and an
    optional ``prepare`` that reads the model before any step of the recipe changes it (a ``train`` step's
    full-precision teacher)."""

    config: type[StepConfig]
    apply: Apply
    prepare: Prepare | None = None

    @property
    def name(self) -> str:
        return self.config.model_fields["method"].default


_METHODS: dict[str, Method] = {}


def register(config: type[StepConfig], prepare: Prepare | None = None) -> Callable[[Apply], Apply]:
    """Decorator: register ``apply`` as the method for steps of type ``config`` (one method per name), with
    ``prepare`` run on the untouched model before the recipe's first step."""

    def decorate(apply: Apply) -> Apply:
        method = Method(config, apply, prepare)
        if config.phase not in PHASES:
            raise ValueError(f"method {method.name}: phase must be one of {PHASES}, got {config.phase!r}")
        if method.name in _METHODS and _METHODS[method.name].config is not config:
            raise ValueError(f"a method named {method.name!r} is already registered")
        _METHODS[method.name] = method
        return apply

    return decorate


def method_for(step: StepConfig) -> Method:
    """The registered method that applies ``step``."""
    return _METHODS[step.name]


def registered() -> list[Method]:
    """Every registered method, in registration order."""
    return list(_METHODS.values())
