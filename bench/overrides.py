"""Command-line overrides of a grid: ``--set key=value``, ``--seeds``, ``--budget``, ``--only``.

``--set`` takes ``key=value`` pairs; each value is YAML (``yaml.safe_load``: ``0.01``, ``true``,
``[0.5, 0.5, 0.5]``, ``{seconds: 60}``), so it is typed exactly as the same value in a grid file, and
validated the same way (a method field through the method's ``Config``, a cell setting through
:class:`~bench.grid.Grid`). A key is one of

- a field of a method's Config (``lr=0.01``): applied to every method entry whose Config has it;
- a cell setting (:data:`CELL_SETTINGS`: ``budget=0.1``, ``budget.seconds=60``, ``amp=true``,
  ``validation=0``, ``latency_threads=1``, ...): applied to the grid and to every method entry;
- a data option (``image_size=48``, ``augment=crop_flip``, ``mean=[...]``, ``std=[...]``,
  :class:`~bench.data.DataOptions`): applied to every dataset of the grid;
- ``teacher_recipe.<field>`` (``teacher_recipe.epochs=5``): the teacher's training recipe, every dataset.

A name that is both a method field and a data option (``augment``) must be qualified:
``params.augment=true`` (the method's field) or ``data.augment=crop_flip`` (the dataset's augmentation).

An unknown key is an error that lists every valid one. Several pairs may share one ``--set``
(``--set "mean=[0.5] std=[0.25]"``).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable

import yaml

from bench.config import ConfigError, from_mapping, to_dict
from bench.data import DataOptions
from bench.grid import Grid, MethodEntry, PairSpec, expand
from bench.method import get_method
from bench.teachers import TeacherRecipe

# cell settings a --set may change, with what they mean (shown in the error for an unknown key)
CELL_SETTINGS = {
    "budget": "a fraction of the paper budget, or caps: budget.seconds=60, budget.teacher_queries=N, "
              "budget.student_steps=N, budget={fraction: 0.5, seconds: 60}",
    "amp": "bf16 autocast where the method and the device support it (true/false)",
    "validation": "validation images held out of the training split (0: none)",
    "latency_threads": "CPU threads of the latency measurement",
    "teacher_seed": "seed of the harness-trained teacher",
    "checkpoint_every": "seconds between in-cell checkpoints (0: never)",
    "teacher_outputs": "what a teacher behind an API returns to `outputs` methods: logits or probs",
}
DATA_OPTIONS = tuple(f.name for f in dataclasses.fields(DataOptions))
RECIPE_PREFIX = "teacher_recipe"
_PAIR_START = re.compile(r"\s+(?=[A-Za-z_][\w.]*=)")


def parse_assignments(items: Iterable[str], where: str = "--set") -> list[tuple[str, Any]]:
    """``["lr=0.01", "mean=[0.5] std=[0.25]"]`` -> ``[("lr", 0.01), ("mean", [0.5]), ("std", [0.25])]``."""
    pairs = []
    for item in items:
        for text in _PAIR_START.split(item.strip()):
            key, sep, value = text.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"{where} {text!r}: write key=value, e.g. lr=0.01, budget.seconds=60, image_size=48")
            try:
                parsed = yaml.safe_load(value) if value.strip() else None
            except yaml.YAMLError as exc:
                raise ConfigError(f"{where} {text!r}: the value is not valid YAML: {exc}") from None
            pairs.append((key, parsed))
    return pairs


def method_fields(grid: Grid) -> dict[str, list[str]]:
    """Config field name -> the labels of the grid's method entries whose Config has it."""
    fields: dict[str, list[str]] = {}
    for entry in grid.methods:
        for f in dataclasses.fields(get_method(entry.name).Config):
            if f.init:
                fields.setdefault(f.name, []).append(entry.label or entry.name)
    return fields


def valid_keys_text(grid: Grid) -> str:
    fields = method_fields(grid)
    names = ", ".join(sorted({e.name for e in grid.methods}))
    recipe = ", ".join(f.name for f in dataclasses.fields(TeacherRecipe))
    return (f"method fields ({names}): {', '.join(sorted(fields)) or '(none)'}; "
            f"cell settings: {', '.join(CELL_SETTINGS)} (budget: {CELL_SETTINGS['budget']}); "
            f"data options: {', '.join(DATA_OPTIONS)}; teacher recipe: {RECIPE_PREFIX}.<{recipe.replace(', ', '|')}>")


def _merge_budget(current: Any, sub: str, value: Any) -> dict[str, Any]:
    base = dict(current) if isinstance(current, dict) else {"fraction": 1.0 if current is None else current}
    base[sub] = value
    return base


def apply(grid: Grid, assignments: list[tuple[str, Any]], where: str = "--set") -> Grid:
    """``grid`` with the ``key=value`` assignments applied and validated (see the module docstring)."""
    if not assignments:
        return grid
    raw = to_dict(grid)
    fields = method_fields(grid)
    for key, value in assignments:
        head, _, sub = key.partition(".")
        scope = ""
        if head in ("params", "data") and sub:
            scope, (head, _, sub) = head, sub.partition(".")
        elif head in fields and (head in DATA_OPTIONS or head in CELL_SETTINGS):
            raise ConfigError(f"{where}: {key!r} is both a method field and a {'data option' if head in DATA_OPTIONS else 'cell setting'}; "
                              f"write params.{key}=... (the method's field) or "
                              f"{'data.' + key if head in DATA_OPTIONS else key}=... (the {'dataset' if head in DATA_OPTIONS else 'cell'}'s)")
        if scope == "params" and head in fields and not sub:
            for entry in raw["methods"]:
                if (entry.get("label") or entry["name"]) in fields[head]:
                    entry["params"][head] = value
        elif scope == "data" and not (head in DATA_OPTIONS and not sub):
            raise ConfigError(f"{where}: unknown data option {key!r}; valid: {', '.join('data.' + k for k in DATA_OPTIONS)}")
        elif scope == "params":
            raise ConfigError(f"{where}: unknown method field {key!r}; valid keys: {valid_keys_text(grid)}")
        elif head == "budget":
            if sub:
                raw["budget"] = _merge_budget(raw["budget"], sub, value)
                for entry in raw["methods"]:
                    if entry.get("budget") is not None:
                        entry["budget"] = _merge_budget(entry["budget"], sub, value)
            else:
                raw["budget"] = value
                for entry in raw["methods"]:
                    entry["budget"] = None
        elif head == "amp" and not sub:
            raw["amp"] = value
            for entry in raw["methods"]:
                entry["amp"] = None
        elif head in CELL_SETTINGS and not sub:
            raw[head] = value
        elif head in DATA_OPTIONS and not sub:
            for dataset in raw["datasets"]:
                options = raw["dataset_options"].setdefault(dataset, {})
                options[head] = value
        elif head == RECIPE_PREFIX and sub:
            for dataset in raw["datasets"]:
                raw["teacher_recipe"].setdefault(dataset, {})[sub] = value
        elif head in fields and not sub:
            for entry in raw["methods"]:
                if (entry.get("label") or entry["name"]) in fields[head]:
                    entry["params"][head] = value
        else:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {valid_keys_text(grid)}")
    raw["dataset_options"] = {d: {k: v for k, v in o.items() if v is not None} for d, o in raw["dataset_options"].items()}
    for entry in raw["methods"]:
        if entry.get("budget") is None:
            entry.pop("budget", None)
    new = from_mapping(Grid, raw, where)
    expand(new, where=where)  # every method field typed and validated by its Config now, before any work
    return new


def parse_budget(text: str, where: str = "--budget") -> Any:
    """``0.5`` -> 0.5; ``seconds=60`` or ``fraction=0.5,seconds=60`` -> a mapping (a Budget's fields)."""
    if "=" not in text:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{where} {text!r}: give a fraction of the paper budget (0.5) or caps "
                              f"(seconds=60, teacher_queries=N, student_steps=N, fraction=F; comma-separated)") from None
    return dict(parse_assignments([text.replace(",", " ")], where))


def parse_seeds(text: str, where: str = "--seeds") -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise ConfigError(f"{where} {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where} {text!r}: give distinct comma-separated integers, e.g. 0,1,2")
    return seeds


def select_methods(entries: list, labels: list[str], where: str = "--only") -> list:
    """The method entries (anything with ``label`` and ``name``) whose label is one of ``labels``; an unknown
    label is an error naming the valid ones. Shared by classification and translation grids."""
    have = [e.label or e.name for e in entries]
    unknown = [label for label in labels if label not in have]
    if unknown:
        raise ConfigError(f"{where}: unknown method entries {unknown}; valid: {', '.join(have)}")
    return [e for e in entries if (e.label or e.name) in labels]


def only(grid: Grid, labels: list[str], where: str = "--only") -> Grid:
    """``grid`` restricted to the method entries with these labels (pairs that ran none of them are dropped)."""
    methods = select_methods(grid.methods, labels, where)
    pairs = []
    for pair in grid.pairs:
        if pair.methods is None:
            pairs.append(pair)
        elif kept := [m for m in pair.methods if m in labels]:
            pairs.append(dataclasses.replace(pair, methods=kept))
    if not pairs:
        raise ConfigError(f"{where}: no pair of grid {grid.name!r} runs {', '.join(labels)}")
    return dataclasses.replace(grid, methods=methods, pairs=pairs)


def single_cell_grid(dataset: str, teacher: str, student: str, method: str, *, seed: int = 0,
                     checkpoint: str | None = None, pretrained: str | None = None,
                     assignments: list[tuple[str, Any]] = ()) -> Grid:
    """The in-memory one-cell grid of ``bench distill`` (named "distill"), with ``--set`` applied and validated."""
    grid = Grid(name="distill", datasets=[dataset], seeds=[seed], budget=1.0,
                pairs=[PairSpec(teacher=teacher, student=student, teacher_checkpoint=checkpoint,
                                teacher_pretrained=pretrained)],
                methods=[MethodEntry(name=method)],
                description="cells run one at a time by bench distill")
    grid.validate()
    grid = apply(grid, list(assignments))
    expand(grid, where="bench distill")
    return grid
