"""The translation task through the harness: a grid with ``task: translation`` -> cells -> one row each.

A translation grid names domain pairs (``a``, ``b``: registered datasets whose classes correspond),
generator architectures (``width``, ``blocks``), compression methods (registered in
:data:`TRANSLATION_METHODS` by ``methods/gan_*.py``) and ``ratios`` (fractions of each generator's filters
kept). It expands into :class:`TranslationCell` s with stable ``cell_id`` s (a hash of everything that
changes a figure: the configuration, the data fingerprints and the code), which
:func:`run_translation_grid` runs one at a time, skipping finished cells, recording a cell that raises as
``failed`` (its traceback in ``cells/<cell_id>/error.txt``) and going on. The CycleGAN teacher of a
(domains, architecture) and the target-domain classifiers are trained once and cached; rows carry the
columns of :data:`COLUMNS`; latency is measured once per generator architecture after the cells.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from bench.config import ConfigError, from_mapping, to_dict
from bench.data import check_dataset_name, fingerprint, task_data
from bench.metrics import count_flops, count_params, measure_latency
from bench.provenance import git_state, method_source_hash, modules_hash
from bench.registry import Registry
from bench.store import ResultsStore
from bench.teachers import resolve_cache_dir
from bench.translation import cyclegan as cg
from bench.translation.scores import ClassifierConfig, get_classifier, score_pair

TASK = "translation"
INPUT_SHAPE = (1, 32, 32)

# The public columns of a translation row (docs/translation.md "Results").
COLUMNS = [
    "cell_id", "status", "error", "task", "grid", "domain_a", "domain_b", "generator", "method", "label", "ratio",
    "seed", "teacher_seed",
    "class_pres_ab", "class_pres_ba", "frechet_ab", "frechet_ba", "cycle_l1_a", "cycle_l1_b",
    "teacher_class_pres_ab", "teacher_class_pres_ba", "teacher_frechet_ab", "teacher_frechet_ba",
    "teacher_cycle_l1_a", "teacher_cycle_l1_b", "classifier_acc_a", "classifier_acc_b", "eval_images_a", "eval_images_b",
    "params", "macs", "teacher_params", "teacher_macs", "widths_ab", "widths_ba", "blocks",
    "latency_ab_ms", "latency_ba_ms", "latency_ms", "teacher_latency_ms", "latency_threads",
    "search_seconds", "generator_queries", "discriminator_queries", "finetune_steps", "finetune_seconds",
    "teacher_steps", "teacher_seconds", "threads", "cpu", "torch", "git_commit", "git_dirty", "started", "finished",
    "method_params",
]

TRANSLATION_METHODS: Registry[type["TranslationMethod"]] = Registry("translation method")


@dataclass
class Compressed:
    """What a method hands back: the two generators and the cost of finding them."""

    g_ab: cg.Generator
    g_ba: cg.Generator
    search_seconds: float = 0.0
    generator_queries: int = 0
    discriminator_queries: int = 0
    finetune_steps: int = 0
    finetune_seconds: float = 0.0
    log: dict = field(default_factory=dict)


@dataclass
class TranslationContext:
    """A method's inputs besides the teacher: the cell's seed and ratio, the training images of each domain
    (uint8, for fine-tuning), their validation images (for a search's fitness) and the teacher's settings."""

    seed: int
    ratio: float | None
    train_a: torch.Tensor
    train_b: torch.Tensor
    val_a: torch.Tensor
    val_b: torch.Tensor
    cyclegan: cg.CycleGANConfig


class TranslationMethod:
    """A compression method of the translation task: one call, ``compress(teacher, ctx) -> Compressed``."""

    Config: ClassVar[type] = None  # a dataclass of hyperparameters (paper presets)
    compresses: ClassVar[bool] = True  # False: no ratio, one cell (the uncompressed CycleGAN)

    def __init__(self, config):
        self.config = config

    def compress(self, teacher: cg.CycleGAN, ctx: TranslationContext) -> Compressed:
        raise NotImplementedError


def register_translation(name: str):
    """Class decorator: register a :class:`TranslationMethod` under ``name``."""

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, TranslationMethod)):
            raise TypeError(f"@register_translation({name!r}) must decorate a TranslationMethod subclass, got {cls!r}")
        return TRANSLATION_METHODS.register(name, replace=True)(cls)

    return decorator


def get_translation_method(name: str) -> type[TranslationMethod]:
    import methods  # noqa: F401  (the built-ins register themselves)

    return TRANSLATION_METHODS.get(name)


def finetune(teacher: cg.CycleGAN, g_ab: cg.Generator, g_ba: cg.Generator, ctx: TranslationContext, steps: int,
             batch_size: int) -> tuple[cg.CycleGAN, float]:
    """Fine-tune pruned generators with the CycleGAN objective against copies of the teacher's discriminators
    (the official finetune.py: the full loss, Adam 2e-4, lr constant then linearly decayed). Returns the
    trained pair and its seconds."""
    model = cg.CycleGAN(g_ab, g_ba, copy.deepcopy(teacher.d_a), copy.deepcopy(teacher.d_b))
    config = dataclasses.replace(ctx.cyclegan, batch_size=batch_size)
    started = time.perf_counter()
    if steps > 0:
        cg.train(model, ctx.train_a, ctx.train_b, config, seed=ctx.seed + 1, steps=steps)
    return model, time.perf_counter() - started


# --------------------------------------------------------------------------------------------- the grid


@dataclass
class DomainPair:
    a: str
    b: str


@dataclass
class GeneratorSpec:
    width: int = 16
    blocks: int = 3

    @property
    def name(self) -> str:
        return f"resnet_w{self.width}_b{self.blocks}"


@dataclass
class TranslationEntry:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str | None = None


@dataclass
class TranslationGrid:
    name: str
    domains: list[DomainPair]
    generators: list[GeneratorSpec]
    methods: list[TranslationEntry]
    task: str = TASK
    ratios: list[float] = field(default_factory=lambda: [0.5, 0.25])  # fractions of filters kept
    seeds: list[int] = field(default_factory=lambda: [0])
    teacher_seed: int = 0
    cyclegan: dict[str, Any] = field(default_factory=dict)  # CycleGANConfig overrides (not width/blocks)
    classifier: dict[str, Any] = field(default_factory=dict)  # ClassifierConfig overrides
    eval_images: int | None = None  # test images scored per domain (None: the whole test split)
    latency_threads: int = 1
    description: str = ""

    def validate(self) -> None:
        for key in ("domains", "generators", "methods", "seeds"):
            if not getattr(self, key):
                raise ConfigError(f"{key} must not be empty")
        if self.task != TASK:
            raise ConfigError(f"task must be {TASK!r} for a translation grid, got {self.task!r}")
        bad = [r for r in self.ratios if not 0 < r < 1]
        if bad:
            raise ConfigError(f"ratios must be fractions of filters kept in (0, 1), got {bad}")
        if self.eval_images is not None and self.eval_images < 2:
            raise ConfigError(f"eval_images must be >= 2 (a Frechet distance needs a covariance), got {self.eval_images}")
        if "width" in self.cyclegan or "blocks" in self.cyclegan:
            raise ConfigError("cyclegan: width and blocks are set per architecture under generators, not here")


def load_translation_grid(raw: dict, where: str) -> TranslationGrid:
    """A validated translation grid from a YAML mapping; every name and setting is checked now."""
    methods = raw.get("methods")
    if isinstance(methods, list):
        raw = {**raw, "methods": [{"name": m} if isinstance(m, str) else m for m in methods]}
    grid = from_mapping(TranslationGrid, raw, where)
    expand(grid, where)
    return grid


@dataclass(frozen=True)
class TranslationCell:
    grid: str
    domain_a: str
    domain_b: str
    width: int
    blocks: int
    method: str
    label: str
    ratio: float | None
    params: dict[str, Any]
    seed: int
    teacher_seed: int
    cyclegan: dict[str, Any]
    classifier: dict[str, Any]
    eval_images: int | None
    latency_threads: int
    provenance: dict[str, str]
    cell_id: str

    DISPLAY = ("grid", "label", "cell_id")

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self.DISPLAY}

    @property
    def generator(self) -> str:
        return GeneratorSpec(self.width, self.blocks).name


def cyclegan_config(grid_overrides: dict, spec: GeneratorSpec, where: str) -> cg.CycleGANConfig:
    try:
        return from_mapping(cg.CycleGANConfig, {**grid_overrides, "width": spec.width, "blocks": spec.blocks}, where)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _config(cls, values: dict, where: str):
    try:
        return from_mapping(cls, values, where)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def expand(grid: TranslationGrid, where: str = "grid", data_root=None, with_provenance: bool = False
           ) -> list[TranslationCell]:
    """Every cell of ``grid``; with ``with_provenance`` the ids cover the data fingerprints and code too."""
    cells = []
    classifier = to_dict(_config(ClassifierConfig, grid.classifier, f"{where}: classifier"))
    for i, pair in enumerate(grid.domains):
        for name in (pair.a, pair.b):
            check_dataset_name(name, f"{where}: domains[{i}]")
        data = {}
        if with_provenance:
            data = {"data_a": fingerprint(task_data(pair.a, data_root)), "data_b": fingerprint(task_data(pair.b, data_root))}
        for spec in grid.generators:
            config = to_dict(cyclegan_config(grid.cyclegan, spec, f"{where}: cyclegan ({spec.name})"))
            for j, entry in enumerate(grid.methods):
                method = _lookup(entry.name, f"{where}: methods[{j}]")
                params = to_dict(_config(method.Config, entry.params, f"{where}: methods[{j}] ({entry.name}).params"))
                code = {"method_code": method_source_hash(method),
                        "task_code": modules_hash([f"bench.translation.{m}" for m in
                                                   ("task", "cyclegan", "prune", "coevolution", "scores")])}
                ratios = grid.ratios if method.compresses else [None]
                seeds = grid.seeds if method.compresses else grid.seeds[:1]
                for ratio in ratios:
                    for seed in seeds:
                        cell = TranslationCell(grid.name, pair.a, pair.b, spec.width, spec.blocks, entry.name,
                                               entry.label or entry.name, ratio, params, seed, grid.teacher_seed,
                                               config, classifier, grid.eval_images, grid.latency_threads,
                                               {**data, **code}, "")
                        blob = json.dumps(cell.identity(), sort_keys=True)
                        cells.append(dataclasses.replace(cell, cell_id=hashlib.sha256(blob.encode()).hexdigest()[:12]))
    cells.sort(key=lambda c: grid.seeds.index(c.seed))  # seed by seed (stable): a partial run has whole seeds
    ids = [c.cell_id for c in cells]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ConfigError(f"{where}: the grid lists the same cell more than once (cell_ids {', '.join(repeated)})")
    return cells


def _lookup(name: str, where: str) -> type[TranslationMethod]:
    try:
        return get_translation_method(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------------------------- running


def teacher_key(cell: TranslationCell) -> str:
    blob = json.dumps({"a": cell.domain_a, "b": cell.domain_b, "config": cell.cyclegan, "seed": cell.teacher_seed,
                       "data": [cell.provenance.get("data_a"), cell.provenance.get("data_b")],
                       "code": modules_hash(["bench.translation.cyclegan"])}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def get_cyclegan(cell: TranslationCell, a, b, cache_dir: Path, log=print) -> tuple[cg.CycleGAN, dict]:
    """The CycleGAN teacher of ``cell``: trained on first use, then loaded from the cache."""
    config = from_mapping(cg.CycleGANConfig, cell.cyclegan, "cyclegan")
    folder = Path(cache_dir) / "translation" / "cyclegan"
    stem = f"{cell.domain_a}-{cell.domain_b}-{cell.generator}-{teacher_key(cell)}"
    path, meta_path = folder / f"{stem}.pt", folder / f"{stem}.json"
    model = cg.build(config)
    if path.is_file() and meta_path.is_file():
        state = torch.load(path, weights_only=True)
        for k in ("g_ab", "g_ba", "d_a", "d_b"):
            getattr(model, k).load_state_dict(state[k])
        for m in (model.g_ab, model.g_ba, model.d_a, model.d_b):
            m.eval()
        return model, json.loads(meta_path.read_text())
    log(f"training the CycleGAN teacher {stem} ({config.steps} steps)")
    torch.manual_seed(cell.teacher_seed)
    gen = torch.Generator().manual_seed(cell.teacher_seed)
    for m in (model.g_ab, model.g_ba, model.d_a, model.d_b):
        cg.init_weights(m, gen)
    started = time.perf_counter()
    history = cg.train(model, a.train_x, b.train_x, config, cell.teacher_seed)
    meta = {"seconds": time.perf_counter() - started, "steps": config.steps, "history": history}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    meta_path.write_text(json.dumps(meta))
    return model, meta


def _eval_split(data, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    k = data.test_x.shape[0] if n is None else min(n, data.test_x.shape[0])
    return data.test_x[:k], data.test_y[:k]


def _size(g: cg.Generator) -> tuple[int, int]:
    return count_params(g), count_flops(g, INPUT_SHAPE)[1]


def run_cell(cell: TranslationCell, cache_dir: Path, data_root, cell_dir: Path, log=print) -> dict[str, Any]:
    """One cell: teacher and classifiers (cached), the method's compression, the scores. Returns its row."""
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    a, b = task_data(cell.domain_a, data_root), task_data(cell.domain_b, data_root)
    teacher, meta = get_cyclegan(cell, a, b, cache_dir, log)
    classifier = from_mapping(ClassifierConfig, cell.classifier, "classifier")
    clf_a, acc_a = get_classifier(cell.domain_a, classifier, cache_dir, data_root, cell.teacher_seed)
    clf_b, acc_b = get_classifier(cell.domain_b, classifier, cache_dir, data_root, cell.teacher_seed)
    test_a, test_b = _eval_split(a, cell.eval_images), _eval_split(b, cell.eval_images)
    reference = score_pair(teacher.g_ab, teacher.g_ba, test_a, test_b, clf_a, clf_b)
    method_cls = get_translation_method(cell.method)
    method = method_cls(from_mapping(method_cls.Config, cell.params, f"{cell.method}.params"))
    ctx = TranslationContext(cell.seed, cell.ratio, a.train_x, b.train_x, a.val_x, b.val_x,
                             from_mapping(cg.CycleGANConfig, cell.cyclegan, "cyclegan"))
    torch.manual_seed(cell.seed)
    out = method.compress(cg.copy_model(teacher), ctx)
    scores = score_pair(out.g_ab, out.g_ba, test_a, test_b, clf_a, clf_b)
    (p_ab, m_ab), (p_ba, m_ba) = _size(out.g_ab), _size(out.g_ba)
    (tp_ab, tm_ab), (tp_ba, tm_ba) = _size(teacher.g_ab), _size(teacher.g_ba)
    cell_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"g_ab": out.g_ab.state_dict(), "g_ba": out.g_ba.state_dict()}, cell_dir / "generators.pt")
    _save_samples(out, test_a, test_b, cell_dir / "samples.pt")
    (cell_dir / "cell.json").write_text(json.dumps({"cell": cell.identity(), "log": out.log}, default=str))
    commit, dirty = git_state()
    row = {
        "cell_id": cell.cell_id, "status": "ok", "task": TASK, "grid": cell.grid, "domain_a": cell.domain_a,
        "domain_b": cell.domain_b, "generator": cell.generator, "method": cell.method, "label": cell.label,
        "ratio": "" if cell.ratio is None else cell.ratio, "seed": cell.seed, "teacher_seed": cell.teacher_seed,
        **scores, **{f"teacher_{k}": v for k, v in reference.items()},
        "classifier_acc_a": acc_a, "classifier_acc_b": acc_b,
        "eval_images_a": int(test_a[1].numel()), "eval_images_b": int(test_b[1].numel()),
        "params": p_ab + p_ba, "macs": m_ab + m_ba, "teacher_params": tp_ab + tp_ba, "teacher_macs": tm_ab + tm_ba,
        "widths_ab": json.dumps(list(out.g_ab.widths)), "widths_ba": json.dumps(list(out.g_ba.widths)),
        "blocks": cell.blocks, "latency_threads": cell.latency_threads,
        "search_seconds": out.search_seconds, "generator_queries": out.generator_queries,
        "discriminator_queries": out.discriminator_queries, "finetune_steps": out.finetune_steps,
        "finetune_seconds": out.finetune_seconds, "teacher_steps": meta["steps"], "teacher_seconds": meta["seconds"],
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "git_commit": commit, "git_dirty": dirty, "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "method_params": json.dumps(cell.params, sort_keys=True),
    }
    return row


SAMPLES = 8  # test images per direction kept for the report's side-by-side figure


def _save_samples(out: Compressed, test_a, test_b, path: Path) -> None:
    from bench.translation.scores import translate

    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    # clones: torch.save of a slice writes the whole test tensor it views (10 MB a cell instead of kilobytes)
    src_a, src_b = test_a[0][:SAMPLES].clone(), test_b[0][:SAMPLES].clone()
    torch.save({"src_a": src_a, "fake_b": to_uint8(translate(out.g_ab, cg.to_unit(src_a))),
                "src_b": src_b, "fake_a": to_uint8(translate(out.g_ba, cg.to_unit(src_b)))}, path)


def _failed_row(cell: TranslationCell, exc: BaseException) -> dict[str, Any]:
    return {"cell_id": cell.cell_id, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500], "task": TASK,
            "grid": cell.grid, "domain_a": cell.domain_a, "domain_b": cell.domain_b, "generator": cell.generator,
            "method": cell.method, "label": cell.label, "ratio": "" if cell.ratio is None else cell.ratio,
            "seed": cell.seed, "teacher_seed": cell.teacher_seed, "method_params": json.dumps(cell.params, sort_keys=True)}


def latency_pass(store: ResultsStore, min_run_time: float = 1.0, log=print) -> int:
    """Time each generator architecture once (eager PyTorch, batch 1, the row's threads, in quiet, after the
    cells) and fill ``latency_ab_ms``, ``latency_ba_ms``, ``latency_ms`` (their sum: one image translated
    both ways) and ``teacher_latency_ms`` of every ok row lacking them. Returns how many were timed."""
    table_path = store.folder / "latency_translation.json"
    table = json.loads(table_path.read_text()) if table_path.is_file() else {}
    timed = 0

    def ms(widths: list[int], blocks: int, threads: int) -> float:
        nonlocal timed
        key = f"{widths}|{blocks}|{threads}"
        if key not in table:
            log(f"timing generator widths {widths}, {blocks} blocks ({threads} thread(s))")
            table[key] = round(measure_latency(cg.Generator(tuple(widths), blocks), INPUT_SHAPE, threads=threads,
                                               min_run_time=min_run_time)[0], 4)
            table_path.write_text(json.dumps(table, indent=1, sort_keys=True))
            timed += 1
        return table[key]

    for row in list(store.rows.values()):
        if row["status"] != "ok" or row.get("latency_ms"):
            continue
        blocks, threads = int(row["blocks"]), int(row["latency_threads"] or 1)
        ab = ms(json.loads(row["widths_ab"]), blocks, threads)
        ba = ms(json.loads(row["widths_ba"]), blocks, threads)
        width = int(row["generator"].split("_w")[1].split("_")[0])
        teacher = 2 * ms(list(cg.base_widths(width)), blocks, threads)
        store.put({**row, "latency_ab_ms": ab, "latency_ba_ms": ba, "latency_ms": ab + ba, "teacher_latency_ms": teacher})
    return timed


@dataclass
class TranslationSummary:
    done: list[str] = field(default_factory=list)
    failed: int = 0
    skipped: int = 0


def run_translation_grid(grid: TranslationGrid, out: Path, *, data_root=None, cache_dir=None, force: bool = False,
                         rerun_failed: bool = False, latency_min_run_time: float = 1.0, log=print) -> TranslationSummary:
    """Run every missing cell of ``grid`` into ``out/runs.csv`` (resume: finished cells are skipped)."""
    cache_dir = resolve_cache_dir(cache_dir)
    cells = expand(grid, grid.name, data_root, with_provenance=True)
    store = ResultsStore(out, columns=COLUMNS).lock()
    summary = TranslationSummary()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "grid.json").write_text(json.dumps({"name": grid.name, "task": TASK, "description": grid.description,
                                                   "cell_ids": [c.cell_id for c in cells]}, indent=1))
        for i, cell in enumerate(cells):
            status = store.status(cell.cell_id)
            if not force and (status == "ok" or (status == "failed" and not rerun_failed)):
                summary.skipped += 1
                continue
            log(f"[{i + 1}/{len(cells)}] {cell.cell_id} {cell.domain_a}<->{cell.domain_b} {cell.generator} {cell.label} "
                f"ratio={cell.ratio} seed={cell.seed}")
            cell_dir = out / "cells" / cell.cell_id
            try:
                row = run_cell(cell, cache_dir, data_root, cell_dir, log)
            except Exception as exc:  # failure isolation: the row says why, the grid goes on
                cell_dir.mkdir(parents=True, exist_ok=True)
                (cell_dir / "error.txt").write_text(traceback.format_exc())
                row = _failed_row(cell, exc)
                summary.failed += 1
                log(f"  failed: {row['error']}")
            store.put(row)
            summary.done.append(cell.cell_id)
        latency_pass(store, latency_min_run_time, log)
    finally:
        store.unlock()
    return summary
