"""Search spaces: the distribution each method declares over its tunable config fields.

The equal-tuning protocol (docs/tuning.md; DomainBed's, Gulrajani and Lopez-Paz, ICLR 2021) gives every
method the same number of trials drawn from the distribution it declares beside its config::

    search_space = {"lr": Float(1e-4, 1e-1, log=True), "batch_size": Choice(64, 128, 256, 512)}

A space is small and honest: the fields its paper says matter (learning rates, loss weights, generator
width, batch size, steps per round). The paper's value must lie inside it: :func:`check_space` refuses
a space that leaves out the value the ``paper`` track runs on the grey 32-px family the benchmark
tunes (the method's preset for ``mnist``, else its Config default), when the method is registered. Plugins declare one the same way.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from bench.config import ConfigError

TUNED_FAMILY_DATASET = "mnist"  # the dataset whose paper preset the range must contain (the grey 32-px family)


@dataclass(frozen=True)
class Float:
    """A real field drawn uniformly in [low, high], or log-uniformly with ``log``."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ConfigError(f"Float({self.low}, {self.high}): need finite low < high")
        if self.log and self.low <= 0:
            raise ConfigError(f"Float({self.low}, {self.high}, log=True): a log scale needs low > 0")

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def distribution(self):
        import optuna

        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)

    def __str__(self) -> str:
        return f"{'log-uniform' if self.log else 'uniform'} [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Int:
    """An integer field drawn uniformly in [low, high] (log-uniformly with ``log``)."""

    low: int
    high: int
    log: bool = False

    def __post_init__(self):
        if not self.low < self.high:
            raise ConfigError(f"Int({self.low}, {self.high}): need low < high")
        if self.log and self.low <= 0:
            raise ConfigError(f"Int({self.low}, {self.high}, log=True): a log scale needs low > 0")

    def contains(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high

    def suggest(self, trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, log=self.log)

    def distribution(self):
        import optuna

        return optuna.distributions.IntDistribution(self.low, self.high, log=self.log)

    def __str__(self) -> str:
        return f"integer {'log-uniform' if self.log else 'uniform'} [{self.low}, {self.high}]"


@dataclass(frozen=True)
class Choice:
    """One of a few values (numbers, strings or booleans)."""

    choices: tuple

    def __init__(self, *choices):
        if len(choices) < 2:
            raise ConfigError(f"Choice{choices}: give at least two choices")
        object.__setattr__(self, "choices", tuple(choices))

    def contains(self, value: Any) -> bool:
        return value in self.choices

    def suggest(self, trial, name: str):
        return trial.suggest_categorical(name, list(self.choices))

    def distribution(self):
        import optuna

        return optuna.distributions.CategoricalDistribution(list(self.choices))

    def __str__(self) -> str:
        return "one of " + ", ".join(str(c) for c in self.choices)


Space = Mapping[str, "Float | Int | Choice"]


def paper_values(method_cls: type) -> list[tuple[str, dict[str, Any]]]:
    """The paper's values a space must contain: those the ``paper`` track runs on the tuned family (the
    method's preset for mnist over its Config defaults; the defaults alone where it has no such preset:
    defaults often hold another dataset's protocol, e.g. CIFAR's SGD at lr 0.1, which a grey space need not)."""
    defaults = {f.name: getattr(method_cls.Config(), f.name) for f in dataclasses.fields(method_cls.Config)}
    preset = method_cls.preset_for_dataset.get(TUNED_FAMILY_DATASET)
    if preset:
        return [(f"preset {preset!r}", {**defaults, **method_cls.presets.get(preset, {})})]
    return [("Config default", defaults)]


def check_space(method_cls: type) -> None:
    """Refuse a space that names a field the config lacks, or leaves out a paper value (see the module doc)."""
    space = getattr(method_cls, "search_space", {}) or {}
    name = getattr(method_cls, "name", "") or method_cls.__name__
    fields = {f.name for f in dataclasses.fields(method_cls.Config)}
    for field, dist in space.items():
        if not isinstance(dist, (Float, Int, Choice)):
            raise ConfigError(f"method {name!r}: search_space[{field!r}] is a {type(dist).__name__}; "
                              f"use bench.search_space.Float, Int or Choice")
        if field not in fields:
            raise ConfigError(f"method {name!r}: search_space names {field!r}, which is not a field of "
                              f"{method_cls.Config.__name__}; valid fields: {', '.join(sorted(fields))}")
        for where, values in paper_values(method_cls):
            if not dist.contains(values[field]):
                raise ConfigError(f"method {name!r}: search_space[{field!r}] = {dist} does not contain the "
                                  f"paper's value {values[field]!r} ({where}); widen the range so the paper's "
                                  f"setting is one the search can draw")


def describe(space: Space) -> str:
    """One line per field: ``lr: log-uniform [0.0001, 0.1]``."""
    return "\n".join(f"{field}: {dist}" for field, dist in space.items())


def distributions(space: Space) -> dict[str, Any]:
    """The space as Optuna distributions (for ``study.ask``)."""
    return {field: dist.distribution() for field, dist in space.items()}
