"""Grids: YAML -> validated :class:`Grid` -> :class:`Cell` list, each with a stable ``cell_id``.

A cell is one (dataset, teacher/student pair, method with its fully resolved hyperparameters, seed,
budget). Its ``cell_id`` hashes everything that changes a figure: that configuration, the validation
split, the device type and the latency threads, and, through :class:`Provenance`, the content of the
data (a fingerprint), of a user's teacher checkpoint, and of the code (the method's source and the
harness's numerics, :mod:`bench.provenance`). Re-running a grid skips finished cells; changing a
hyperparameter, a file or a method's code makes new cells. YAML is parsed with ``yaml.safe_load``;
nothing in a grid runs code except the plugins it names.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from bench import tracks
from bench.config import ConfigError, from_mapping, to_dict
from bench.data import DataOptions, DatasetMissingError, check_dataset_name, data_options, fingerprint, task_data
from bench.method import TeacherAccess, get_method, load_plugin
from bench.models import MODELS, architecture_code
from bench.monitor import Budget
from bench.provenance import file_hash, harness_hash, method_source_hash
from bench.students import check_spec, student_code
from bench.teacher_access import OUTPUT_KINDS
from bench.teachers import recipe_for, teacher_code_hash


@dataclass
class PairSpec:
    teacher: str
    student: str
    teacher_checkpoint: str | None = None  # the user's own trained teacher (a plain state dict), used as it is
    teacher_pretrained: str | None = None  # local weights (e.g. ImageNet) the harness starts training the teacher from
    methods: list[str] | None = None  # labels of the method entries to run on this pair (default: all)
    datasets: list[str] | None = None  # the grid's datasets this pair runs on (default: all)


@dataclass
class MethodEntry:
    name: str
    params: dict[str, Any] = field(default_factory=dict)  # overrides of the method's Config fields
    # the track (bench.tracks): paper (default: the method's preset for the dataset), tuned (bench tune's values
    # from a development task of the same family), oracle (tuned on this dataset: an upper bound), or a named preset
    preset: str | None = None
    # default: the grid's budget. A number is a fraction of the paper budget; a mapping may name a cap:
    # {teacher_queries: N} | {seconds: S} | {student_steps: N} (and a fraction beside it)
    budget: float | Budget | None = None
    label: str | None = None  # display name when one method appears with several settings
    amp: bool | None = None  # default: the grid's amp


REPORT_AXES = ("seconds", "teacher_queries")  # the anytime axes a best-at-budget table reads


@dataclass
class Grid:
    name: str
    datasets: list[str]
    pairs: list[PairSpec]
    methods: list[MethodEntry]
    seeds: list[int] = field(default_factory=lambda: [0])
    budget: float | Budget = 1.0  # fraction of each method's paper budget, or a mapping with caps (see MethodEntry)
    teacher_seed: int = 0
    teacher_recipe: dict[str, dict[str, Any]] = field(default_factory=dict)  # per dataset: recipe overrides
    # per dataset: how its images are presented (image_size, augment, mean, std; bench.data.DataOptions)
    dataset_options: dict[str, DataOptions] = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)
    amp: bool = False  # bf16 autocast where a method supports it (CUDA, or a CPU with native bf16)
    latency_threads: int = 1
    # seconds of timed runs per architecture and latency backend at batch 1 (default bench.latency.MIN_RUN_TIME);
    # the smoke grid lowers it: its latencies check the plumbing, they are not figures to compare
    latency_min_run_time: float | None = None
    # validation images held out of each training split (None: the dataset's documented default;
    # 0: none, a paper's full-train protocol: no validation accuracy, no anytime curve)
    validation: int | None = None
    checkpoint_every: float = 300.0  # seconds between in-cell checkpoints (0: never); not part of the identity
    # cells run at once on this machine by the local executor (`bench run --jobs`), and the torch threads of
    # each (default: this machine's cores // jobs; part of a cell's identity: its numbers depend on it)
    jobs: int = 1
    threads: int | None = None
    # what a teacher behind an API returns to `outputs` methods: "logits" or "probs" (bench.teacher_access)
    teacher_outputs: str = "logits"
    description: str = ""
    # the tuned-presets file that `preset: tuned` / `oracle` entries read (default bench/tuned.yaml), relative to
    # the grid file; and the development task `bench tune` tunes this grid's methods on (bench.tune.TuneSpec)
    tuned_file: str | None = None
    tune: dict[str, Any] | None = None
    # budgets the report's best-method-at-each-budget tables read besides their round ladder, per anytime axis
    # (e.g. {seconds: [45, 150, 600]}: a study that reads one long cap at several budgets)
    report_budgets: dict[str, list[float]] = field(default_factory=dict)

    def validate(self) -> None:
        for key in ("datasets", "pairs", "methods", "seeds"):
            if not getattr(self, key):
                raise ConfigError(f"{key} must not be empty")
        as_budget(self.budget, "budget")
        for entry in self.methods:
            if entry.budget is not None:
                as_budget(entry.budget, f"methods: {entry.name}: budget")
        if self.validation is not None and self.validation < 0:
            raise ConfigError(f"validation must be >= 0 images (0: no validation split), got {self.validation}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0 seconds (0: never), got {self.checkpoint_every}")
        if self.latency_threads < 1:
            raise ConfigError(f"latency_threads must be >= 1, got {self.latency_threads}")
        if self.latency_min_run_time is not None and self.latency_min_run_time <= 0:
            raise ConfigError(f"latency_min_run_time must be > 0 seconds, got {self.latency_min_run_time}")
        if self.teacher_outputs not in OUTPUT_KINDS:
            raise ConfigError(f"teacher_outputs must be one of {', '.join(OUTPUT_KINDS)}, got {self.teacher_outputs!r}")
        if self.jobs < 1 or (self.threads is not None and self.threads < 1):
            raise ConfigError(f"jobs and threads must be >= 1, got jobs={self.jobs}, threads={self.threads}")
        unknown = sorted(set(self.dataset_options) - set(self.datasets))
        if unknown:
            raise ConfigError(f"dataset_options: {unknown} not in the grid's datasets; valid: {', '.join(self.datasets)}")
        for axis, budgets in self.report_budgets.items():
            if axis not in REPORT_AXES:
                raise ConfigError(f"report_budgets: unknown axis {axis!r}; valid: {', '.join(REPORT_AXES)}")
            if not budgets or any(not isinstance(b, (int, float)) or isinstance(b, bool) or b <= 0 for b in budgets):
                raise ConfigError(f"report_budgets.{axis} must be a non-empty list of positive numbers, got {budgets!r}")

    @property
    def cell_threads(self) -> int:
        """Torch threads per cell: ``threads``, else this machine's cores shared among the ``jobs``."""
        return self.threads or max(1, (os.cpu_count() or 1) // self.jobs)


def as_budget(value: float | Budget, where: str = "budget") -> Budget:
    """A budget from a grid value: a fraction, or a :class:`Budget` (already validated by from_mapping)."""
    if isinstance(value, Budget):
        return value
    budget = Budget(fraction=float(value))
    try:
        budget.validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc} (a fraction of the paper budget, or a mapping with teacher_queries, "
                          f"seconds or student_steps)") from None
    return budget


@dataclass(frozen=True)
class Cell:
    grid: str
    dataset: str
    teacher: str
    student: str
    teacher_checkpoint: str | None
    teacher_pretrained: str | None
    teacher_recipe: dict[str, Any]
    teacher_seed: int
    method: str
    label: str
    preset: str | None
    params: dict[str, Any]
    tuning: str  # paper | tuned:<dataset>:<trials>@<cap> | oracle | default (bench.tracks)
    seed: int
    budget: dict[str, Any]  # a Budget as plain data
    amp: bool
    latency_threads: int
    validation: int | None
    teacher_outputs: str  # what an `outputs` teacher returns ("logits" | "probs"); "" for other accesses
    data_options: dict[str, Any]  # DataOptions that are set (image_size, augment, mean, std)
    checkpoint_every: float
    threads: int  # torch intra-op threads the cell runs with
    provenance: dict[str, str]  # content hashes (data, checkpoint, code) and the device type, from Provenance
    cell_id: str

    # not part of the identity: where results go, how a row is shown, how often to checkpoint
    DISPLAY = ("grid", "label", "cell_id", "checkpoint_every")

    def identity(self) -> dict[str, Any]:
        """Everything that defines the experiment and its figures."""
        return {k: v for k, v in self.__dict__.items() if k not in self.DISPLAY}

    @property
    def compute(self) -> Budget:
        return Budget(**self.budget)


class Provenance:
    """Content hashes for cell identities: data fingerprints, checkpoint files, code; cached per process.

    ``device`` is the device type the cells run on ("cpu", "cuda"): their numbers differ."""

    def __init__(self, device: str = "cpu", data_root: str | Path | None = None, download: bool = True):
        self.device = str(device).split(":")[0]
        self.data_root = data_root
        self.download = download  # False: never fetch a missing dataset (bench run --dry-run writes nothing)
        self._data: dict[tuple[str, int | None, str], str] = {}

    def data(self, dataset: str, validation: int | None, options: dict[str, Any] | None = None) -> str:
        key = (dataset, validation, json.dumps(options or {}, sort_keys=True))
        if key not in self._data:
            try:
                self._data[key] = fingerprint(task_data(dataset, self.data_root, "cpu", validation,
                                                        download=self.download, options=options))
            except DatasetMissingError:
                self._data[key] = "missing"  # the cell fails with the loader's message when it runs
        return self._data[key]

    def checkpoint(self, path: str | None) -> str:
        if path is None:
            return ""
        return file_hash(path) if Path(path).is_file() else f"missing:{path}"

    def for_cell(self, cell: "Cell") -> dict[str, str]:
        return {"data": self.data(cell.dataset, cell.validation, cell.data_options),
                "teacher_checkpoint": self.checkpoint(cell.teacher_checkpoint),
                "teacher_pretrained": self.checkpoint(cell.teacher_pretrained),
                "teacher_code": teacher_code_hash(cell.teacher) if cell.teacher_checkpoint is None
                else architecture_code(cell.teacher),
                "student_code": student_code(cell.student),
                "method_code": method_source_hash(get_method(cell.method)), "harness_code": harness_hash(),
                "device": self.device}


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


TASKS = ("classification", "translation")  # a grid's `task:` key (default classification)


def load_grid(name_or_path: str) -> Grid:
    """Parse and validate a grid; errors name the file, the key and the bad value. A grid with
    ``task: translation`` is a :class:`bench.translation.task.TranslationGrid` (docs/translation.md)."""
    path = grid_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a grid must be a mapping with keys name, datasets, pairs, methods, ...; got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    task = raw.pop("task", "classification")
    if task == "translation":  # the second task kind (docs/translation.md): its own grid type and cells
        from bench.translation.task import load_translation_grid

        return load_translation_grid(raw, str(path))
    if task != "classification":
        raise ConfigError(f"{path}: unknown task {task!r}; valid: {', '.join(TASKS)}")
    methods = raw.get("methods")
    if isinstance(methods, list):
        raw["methods"] = [{"name": m} if isinstance(m, str) else m for m in methods]
    pairs = raw.get("pairs")
    if isinstance(pairs, list):
        raw["pairs"] = [_parse_pair(p) if isinstance(p, str) else p for p in pairs]
    grid = from_mapping(Grid, raw, str(path))
    # plugin files are named relative to the grid file; keep absolute paths, so other processes can import them
    grid.plugins = [str((path.parent / p).resolve()) if p.endswith(".py") and not Path(p).is_absolute() else p
                    for p in grid.plugins]
    if grid.tuned_file and not Path(grid.tuned_file).is_absolute():
        grid.tuned_file = str((path.parent / grid.tuned_file).resolve())
    for plugin in grid.plugins:
        load_plugin(plugin)
    if grid.tune is not None:  # bench tune's development task, refused now if malformed
        from bench.tune import spec_of

        spec_of(grid, str(path)).validate()
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


def expand(grid: Grid, where: str = "grid", provenance: Provenance | None = None) -> list[Cell]:
    """Every cell of ``grid`` with its resolved config, in run order.

    With ``provenance`` the ``cell_id`` covers the content hashes too (what ``bench run`` uses); without
    it, only the configuration (enough to validate a grid and list its cells without reading data).
    A translation grid expands into its own cells (:func:`bench.translation.task.expand`)."""
    if getattr(grid, "task", "classification") == "translation":
        from bench.translation.task import expand as expand_translation

        return expand_translation(grid, where, provenance.data_root if provenance else None,
                                  with_provenance=provenance is not None)
    cells = []
    default_budget = as_budget(grid.budget, f"{where}: budget")
    for dataset in grid.datasets:
        check_dataset_name(dataset, f"{where}: datasets")
        recipe = recipe_for(dataset, grid.teacher_recipe.get(dataset), f"{where}: teacher_recipe.{dataset}")
        options = data_options(grid.dataset_options.get(dataset), f"{where}: dataset_options.{dataset}").given()
        for i, pair in enumerate(grid.pairs):
            check_name(pair.teacher, MODELS.names(), "teacher model", f"{where}: pairs[{i}].teacher", ("timm:", "torchvision:"))
            check_spec(pair.student, f"{where}: pairs[{i}].student")
            if pair.teacher_checkpoint and pair.teacher_pretrained:
                raise ConfigError(f"{where}: pairs[{i}]: give teacher_checkpoint (a trained teacher, used as it is) or "
                                  f"teacher_pretrained (weights the harness starts training from), not both")
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
                preset, config, tuning = tracks.resolve(method, dataset, entry.preset, entry.params,
                                                        f"{where}: methods[{j}] ({entry.name})", grid.tuned_file)
                budget = as_budget(entry.budget, f"{where}: methods[{j}] ({entry.name}).budget") \
                    if entry.budget is not None else default_budget
                for seed in grid.seeds:
                    cell = Cell(grid=grid.name, dataset=dataset, teacher=pair.teacher, student=pair.student,
                                teacher_checkpoint=pair.teacher_checkpoint, teacher_pretrained=pair.teacher_pretrained,
                                teacher_recipe=to_dict(recipe),
                                teacher_seed=grid.teacher_seed, method=entry.name, label=entry.label or entry.name,
                                preset=preset, params=to_dict(config), tuning=tuning, seed=seed, budget=to_dict(budget),
                                amp=entry.amp if entry.amp is not None else grid.amp,
                                latency_threads=grid.latency_threads, validation=grid.validation,
                                teacher_outputs=grid.teacher_outputs if method.teacher_access is TeacherAccess.OUTPUTS
                                else "",
                                data_options=options, checkpoint_every=grid.checkpoint_every,
                                threads=grid.cell_threads, provenance={}, cell_id="")
                    if provenance is not None:
                        cell = dataclasses.replace(cell, provenance=provenance.for_cell(cell))
                    blob = json.dumps(cell.identity(), sort_keys=True)
                    cells.append(dataclasses.replace(cell, cell_id=hashlib.sha256(blob.encode()).hexdigest()[:12]))
    ids = [c.cell_id for c in cells]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"{where}: the grid lists the same cell more than once (cell_ids {', '.join(duplicates)}); "
                          "remove the repeated pair/method/seed")
    return cells
