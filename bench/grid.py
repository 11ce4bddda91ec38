"""Grids: YAML -> validated :class:`Grid` -> :class:`Cell` list, each with a stable ``cell_id``.

A cell is one (dataset, teacher/student pair, method with its fully resolved hyperparameters, seed,
budget). Its ``cell_id`` hashes exactly that, so re-running a grid skips finished cells and changing
a hyperparameter makes a new cell. YAML is parsed with ``yaml.safe_load``; nothing in a grid runs code
except the plugins it names.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from bench.config import ConfigError, from_mapping, to_dict
from bench.data import list_datasets
from bench.method import get_method, load_plugin
from bench.models import list_models
from bench.students import check_spec
from bench.teachers import recipe_for

# Bump when a change makes earlier results incomparable; part of every cell_id, so a bump re-runs every cell.
# 2: DAFL trains in channels_last on CPU too (other numerics), latency is timed on a contiguous copy,
#    runs.csv gained the amp column.
PROTOCOL_VERSION = 2


@dataclass
class PairSpec:
    teacher: str
    student: str
    teacher_checkpoint: str | None = None  # the user's own teacher weights (a plain state dict)
    methods: list[str] | None = None  # labels of the method entries to run on this pair (default: all)
    datasets: list[str] | None = None  # the grid's datasets this pair runs on (default: all)


@dataclass
class MethodEntry:
    name: str
    params: dict[str, Any] = field(default_factory=dict)  # overrides of the method's Config fields
    preset: str | None = None  # default: the method's preset for the dataset
    budget: float | None = None  # default: the grid's budget
    label: str | None = None  # display name when one method appears with several settings
    amp: bool | None = None  # default: the grid's amp


@dataclass
class Grid:
    name: str
    datasets: list[str]
    pairs: list[PairSpec]
    methods: list[MethodEntry]
    seeds: list[int] = field(default_factory=lambda: [0])
    budget: float = 1.0  # fraction of each method's paper iteration budget
    teacher_seed: int = 0
    teacher_recipe: dict[str, dict[str, Any]] = field(default_factory=dict)  # per dataset: recipe overrides
    plugins: list[str] = field(default_factory=list)
    amp: bool = False  # bf16 autocast where a method supports it (CUDA, or a CPU with native bf16)
    latency_threads: int = 1
    description: str = ""

    def validate(self) -> None:
        if not (0 < self.budget <= 10):
            raise ConfigError(f"budget must be in (0, 10], got {self.budget}")
        for key in ("datasets", "pairs", "methods", "seeds"):
            if not getattr(self, key):
                raise ConfigError(f"{key} must not be empty")
        for entry in self.methods:
            if entry.budget is not None and not (0 < entry.budget <= 10):
                raise ConfigError(f"methods: {entry.name}: budget must be in (0, 10], got {entry.budget}")


@dataclass(frozen=True)
class Cell:
    grid: str
    dataset: str
    teacher: str
    student: str
    teacher_checkpoint: str | None
    teacher_recipe: dict[str, Any]
    teacher_seed: int
    method: str
    label: str
    preset: str | None
    params: dict[str, Any]
    seed: int
    budget: float
    amp: bool
    latency_threads: int
    cell_id: str

    def identity(self) -> dict[str, Any]:
        """Everything that defines the experiment (the grid name and display label do not)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("grid", "label", "cell_id", "latency_threads")}


def builtin_grids_dir() -> Path:
    return Path(str(resources.files("bench") / "grids"))


def list_grids() -> list[str]:
    return sorted(p.stem for p in builtin_grids_dir().glob("*.yaml"))


def grid_path(name_or_path: str) -> Path:
    """A built-in grid by name, or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"grid file {name_or_path!r} does not exist")
        return path
    builtin = builtin_grids_dir() / f"{name_or_path}.yaml"
    if not builtin.is_file():
        raise ConfigError(f"unknown grid {name_or_path!r}; built-in grids: {', '.join(list_grids())} (or a path to a .yaml file)")
    return builtin


def load_grid(name_or_path: str) -> Grid:
    """Parse and validate a grid; errors name the file, the key and the bad value."""
    path = grid_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a grid must be a mapping with keys name, datasets, pairs, methods, ...; got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    methods = raw.get("methods")
    if isinstance(methods, list):
        raw["methods"] = [{"name": m} if isinstance(m, str) else m for m in methods]
    pairs = raw.get("pairs")
    if isinstance(pairs, list):
        raw["pairs"] = [_parse_pair(p) if isinstance(p, str) else p for p in pairs]
    grid = from_mapping(Grid, raw, str(path))
    for plugin in grid.plugins:
        load_plugin(str((path.parent / plugin) if plugin.endswith(".py") and not Path(plugin).is_absolute() else plugin))
    expand(grid, where=str(path))  # validates every name and hyperparameter now, before any work
    return grid


def _parse_pair(text: str) -> dict[str, str]:
    teacher, sep, student = text.partition("->")
    if not sep:
        raise ConfigError(f"pair {text!r}: write it as 'teacher -> student' or as a mapping {{teacher: ..., student: ...}}")
    return {"teacher": teacher.strip(), "student": student.strip()}


def check_name(value: str, valid: list[str], what: str, where: str, prefixes: tuple[str, ...] = ()) -> None:
    if value in valid or value.startswith(prefixes):
        return
    extra = [f"{p}<...>" for p in prefixes]
    raise ConfigError(f"{where}: unknown {what} {value!r}; valid: {', '.join(valid + extra)}")


def expand(grid: Grid, where: str = "grid") -> list[Cell]:
    """Every cell of ``grid`` with its resolved config and cell_id, in run order."""
    datasets = list_datasets()
    models = list_models()
    cells = []
    for dataset in grid.datasets:
        check_name(dataset, datasets, "dataset", f"{where}: datasets", ("imagefolder:",))
        recipe = recipe_for(dataset, grid.teacher_recipe.get(dataset), f"{where}: teacher_recipe.{dataset}")
        for i, pair in enumerate(grid.pairs):
            check_name(pair.teacher, models, "teacher model", f"{where}: pairs[{i}].teacher", ("timm:", "torchvision:"))
            check_spec(pair.student, f"{where}: pairs[{i}].student")
            unknown_data = sorted(set(pair.datasets or []) - set(grid.datasets))
            if unknown_data:
                raise ConfigError(f"{where}: pairs[{i}].datasets: {unknown_data} not in the grid's datasets; "
                                  f"valid: {', '.join(grid.datasets)}")
            if pair.datasets is not None and dataset not in pair.datasets:
                continue
            labels = [entry.label or entry.name for entry in grid.methods]
            unknown = sorted(set(pair.methods or []) - set(labels))
            if unknown:
                raise ConfigError(f"{where}: pairs[{i}].methods: unknown method entries {unknown}; valid: {', '.join(labels)}")
            for j, entry in enumerate(grid.methods):
                if pair.methods is not None and (entry.label or entry.name) not in pair.methods:
                    continue
                method = get_method(entry.name)
                preset, config = method.resolve_config(dataset, entry.preset, entry.params,
                                                       f"{where}: methods[{j}] ({entry.name}).params")
                for seed in grid.seeds:
                    cell = Cell(grid=grid.name, dataset=dataset, teacher=pair.teacher, student=pair.student,
                                teacher_checkpoint=pair.teacher_checkpoint, teacher_recipe=to_dict(recipe),
                                teacher_seed=grid.teacher_seed, method=entry.name, label=entry.label or entry.name,
                                preset=preset, params=to_dict(config), seed=seed,
                                budget=entry.budget if entry.budget is not None else grid.budget,
                                amp=entry.amp if entry.amp is not None else grid.amp,
                                latency_threads=grid.latency_threads, cell_id="")
                    blob = json.dumps({"protocol": PROTOCOL_VERSION, **cell.identity()}, sort_keys=True)
                    cells.append(Cell(**{**cell.__dict__, "cell_id": hashlib.sha256(blob.encode()).hexdigest()[:12]}))
    ids = [c.cell_id for c in cells]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"{where}: the grid lists the same cell more than once (cell_ids {', '.join(duplicates)}); "
                          "remove the repeated pair/method/seed")
    return cells
