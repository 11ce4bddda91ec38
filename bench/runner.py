"""Runs the cells of a grid on this machine: one at a time, each isolated, each one CSV row.

Each cell runs as the harness's three stages (:mod:`bench.provision`): Provision (the method's context
from its declared data access), Distill (the method's one call under the monitor: caps, anytime
curve, in-cell checkpoints) and Measure (test and validation accuracy, params/MACs, the saved
student). When every cell is done, the latency pass (:mod:`bench.latency`) times each student
architecture once, in quiet, and fills those columns of every row.

A cell that raises (or whose losses go NaN) is recorded as ``failed`` with its error, its traceback
goes to ``cells/<cell_id>/error.txt``, and the grid goes on. Rows are written as cells finish, so an
interrupted run loses at most the cell in flight, and the next run does only what is missing; a cell
killed mid-way resumes from its last in-cell checkpoint.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from bench import provision
from bench.config import ConfigError, from_mapping
from bench.data import few_sample_indices, task_data
from bench.grid import Cell, Grid, Provenance, expand
from bench.latency import architecture_id, latency_pass
from bench.lineage import StudentContext
from bench.method import DataAccess, TeacherAccess, get_method
from bench.metrics import count_flops, count_params
from bench.models import create_model
from bench.provenance import git_state
from bench.store import ResultsStore
from bench.students import build_student, check_compatible, rebuild_student
from bench.teachers import Teacher, TeacherRecipe, get_teacher, load_into, load_state_dict, resolve_cache_dir

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is an error."""
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise ConfigError(f"unknown device {name!r}; valid: {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"--device {name}: CUDA is not available ({build}, torch {torch.__version__}); use --device cpu or auto")
    return torch.device(name)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


@dataclass
class RunOptions:
    out: Path
    device: torch.device
    data_root: Path | None = None
    cache_dir: Path | None = None
    force: bool = False
    rerun_failed: bool = False
    progress: bool = True
    # seconds of timed runs per architecture and latency backend at batch 1 (bench.latency.MIN_RUN_TIME); the
    # environment variable DFKD_LATENCY_MIN_RUN_TIME lowers it where only the plumbing matters (the test suite)
    latency_min_run_time: float = field(default_factory=lambda: float(os.environ.get("DFKD_LATENCY_MIN_RUN_TIME") or 1.0))
    keep_earlier_cells: bool = False  # grid.json keeps the cells of earlier runs into this folder (bench distill)


@dataclass
class RunSummary:
    done: list[dict[str, str]] = field(default_factory=list)
    skipped: int = 0
    failed: int = 0
    interrupted: bool = False
    timed: int = 0  # architectures timed by the latency pass
    cell_ids: list[str] = field(default_factory=list)  # every cell of the grid, run or skipped


class _Progress:
    """An outer bar over cells and an inner bar over the current phase's steps."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        self.cells = tqdm(total=total, desc="cells", unit="cell", disable=not enabled, position=0, dynamic_ncols=True)
        self.inner = None

    def phase(self, name: str, total: int, done: int = 0) -> None:
        if self.inner is not None:
            self.inner.close()
        self.inner = tqdm(total=total, initial=done, desc=f"  {name}", unit="it", disable=not self.enabled,
                          position=1, leave=False, dynamic_ncols=True)

    def step(self, step: int) -> None:
        if self.inner is not None and step > self.inner.n:
            self.inner.update(step - self.inner.n)

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.inner is not None:
            self.step(step)
            self.inner.set_postfix({k: f"{v:.4g}" for k, v in list(values.items())[:4]}, refresh=False)

    def note(self, text: str) -> None:
        self.cells.set_postfix_str(text, refresh=True)

    def cell_done(self, label: str) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None
        self.cells.set_postfix_str(label, refresh=False)
        self.cells.update(1)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
        self.cells.close()


def budget_text(cell: Cell) -> str:
    """The compute caps of a cell as text (``teacher_queries=30000``), "" when it has none."""
    return ", ".join(f"{k}={v:g}" for k, v in cell.compute.caps.items())


def base_row(cell: Cell, device: torch.device | str) -> dict[str, Any]:
    """The identity columns of a cell's row (what is known before it runs)."""
    commit, dirty = git_state()
    return {
        "cell_id": cell.cell_id, "grid": cell.grid, "dataset": cell.dataset, "teacher": cell.teacher,
        "student": cell.student, "method": cell.method, "label": cell.label, "preset": cell.preset or "",
        "tuning": cell.tuning,
        "seed": cell.seed, "budget": cell.compute.fraction, "compute_cap": budget_text(cell),
        "validation": "" if cell.validation is None else cell.validation, "teacher_outputs": cell.teacher_outputs,
        "teacher_checkpoint": cell.teacher_checkpoint or "", "teacher_pretrained": cell.teacher_pretrained or "",
        "data_options": json.dumps(cell.data_options, sort_keys=True) if cell.data_options else "",
        "device": str(device), "cpu": cpu_name(), "torch": torch.__version__, "git_commit": commit,
        "git_dirty": "" if dirty is None else dirty, "latency_threads": cell.latency_threads, "threads": cell.threads,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "method_params": json.dumps(cell.params, sort_keys=True),
    }


def write_grid_json(out: Path, grid: Grid, cells: list[Cell], executor: str, keep_earlier: bool = False) -> None:
    """``grid.json``: the grid's name, description and current cell_ids (the report shows only those).

    ``keep_earlier``: add to the cell_ids already listed (``bench distill`` runs one cell at a time into
    one folder, and each call's cell stays part of its report)."""
    out.mkdir(parents=True, exist_ok=True)
    ids = [c.cell_id for c in cells]
    path = out / "grid.json"
    if keep_earlier and path.is_file():
        try:
            earlier = json.loads(path.read_text()).get("cell_ids") or []
        except (ValueError, AttributeError):
            earlier = []
        ids = [i for i in earlier if i not in ids] + ids
    path.write_text(json.dumps({"name": grid.name, "description": grid.description, "cells": len(ids),
                                "cell_ids": ids, "executor": executor, "report_budgets": grid.report_budgets}, indent=2))


def teacher_identity(cell: Cell) -> tuple:
    """What makes a cell's teacher: cells sharing it share one trained (or loaded) teacher."""
    return (cell.dataset, cell.validation, json.dumps(cell.data_options, sort_keys=True), cell.teacher,
            json.dumps(cell.teacher_recipe, sort_keys=True), cell.teacher_seed, cell.teacher_checkpoint,
            cell.teacher_pretrained)


def cells_to_run(cells: list[Cell], store: ResultsStore, opts: RunOptions) -> list[Cell]:
    """Resume logic shared by every executor: missing cells, plus failed ones with ``rerun_failed``, or all with ``force``."""
    todo = []
    for cell in cells:
        status = store.status(cell.cell_id)
        if opts.force or status is None or (status == "failed" and opts.rerun_failed):
            todo.append(cell)
    return todo


def effective_access(method_access: DataAccess, student_real_samples: int) -> DataAccess:
    """A cell's data access: the method's, raised to FEW when its student was derived with real images."""
    if student_real_samples and method_access.rank < DataAccess.FEW.rank:
        return DataAccess.FEW
    return method_access


class Runner:
    """Runs cells; caches datasets and teachers across the cells of one run."""

    def __init__(self, options: RunOptions):
        self.options = options
        self._teachers: dict[tuple, Teacher] = {}
        self.progress: _Progress | None = None

    def data(self, name: str, validation: int | None = None, options: dict[str, Any] | None = None):
        return task_data(name, root=self.options.data_root, device=self.options.device, validation=validation,
                         options=options)

    def cell_data(self, cell: Cell):
        return self.data(cell.dataset, cell.validation, cell.data_options)

    def teacher(self, cell: Cell) -> Teacher:
        key = teacher_identity(cell)
        if key not in self._teachers:
            data = self.cell_data(cell)
            recipe = from_mapping(TeacherRecipe, cell.teacher_recipe, "teacher_recipe")
            progress = self.progress
            on_train = (lambda total: progress.phase(f"teacher {cell.teacher} on {cell.dataset}", total)) if progress else None
            log = (lambda it, losses: progress.log(it, {k: float(v.detach()) for k, v in losses.items()})) if progress else (lambda it, losses: None)
            self._teachers[key] = get_teacher(cell.dataset, cell.teacher, data, self.options.device, seed=cell.teacher_seed,
                                              recipe=recipe, cache_dir=self.options.cache_dir,
                                              checkpoint=cell.teacher_checkpoint, pretrained=cell.teacher_pretrained,
                                              log=log, on_train=on_train)
        return self._teachers[key]

    def student_context(self, cell: Cell, teacher: Teacher, data) -> StudentContext:
        def real_images(n: int) -> torch.Tensor:  # a search's fitness images: a seeded draw reading no label
            idx = few_sample_indices(data.train_y.cpu(), n, seed=cell.teacher_seed, stratified=False)
            return data.train_x[idx.to(data.train_x.device)]

        return StudentContext(teacher=teacher.model, teacher_key=teacher.key, teacher_arch=cell.teacher, info=data.info,
                              cache_dir=resolve_cache_dir(self.options.cache_dir), device=self.options.device,
                              real_images=real_images, seed=cell.teacher_seed)

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        """Run one cell and return its row; never raises except on KeyboardInterrupt."""
        opts = self.options
        cell_dir = opts.out / "cells" / cell.cell_id
        cell_dir.mkdir(parents=True, exist_ok=True)
        (cell_dir / "config.json").write_text(json.dumps(cell.__dict__, indent=2, sort_keys=True))
        if not provision.has_checkpoint(cell_dir):  # a fresh start; a checkpoint resumes with its curve
            for name in ("curve.jsonl", "anytime.jsonl"):
                (cell_dir / name).unlink(missing_ok=True)
        (cell_dir / "error.txt").unlink(missing_ok=True)
        row = base_row(cell, opts.device)
        threads = torch.get_num_threads()
        torch.set_num_threads(cell.threads)
        try:
            method_cls = get_method(cell.method)
            data = self.cell_data(cell)
            teacher = self.teacher(cell)
            info = data.info
            input_shape = (info.channels, info.image_size, info.image_size)
            row.update(teacher_acc=teacher.accuracy, teacher_params=count_params(teacher.model),
                       teacher_macs=count_flops(teacher.model, input_shape)[1],
                       teacher_arch_id=architecture_id(teacher.model), input_shape=json.dumps(list(input_shape)),
                       num_classes=info.num_classes, validation=int(data.val_x.shape[0]),
                       input_mean=json.dumps(list(info.mean)), input_std=json.dumps(list(info.std)), augment=info.augment)

            provision.seed_everything(cell.seed)
            student = build_student(cell.student, self.student_context(cell, teacher, data))
            check_compatible(teacher.model, student.model, info, opts.device)
            method = method_cls(method_cls.resolve_config(cell.dataset, cell.preset, cell.params)[1])
            cost = student.lineage.cost if student.lineage else None
            search_samples = cost.real_samples if cost else 0
            # a method that selects on labelled validation accuracy reads labelled real samples (FEW at least)
            access = effective_access(method_cls.data_access, search_samples + method_cls.validation_feedback)
            teacher_access = method_cls.teacher_access
            if student.lineage is not None and teacher_access is TeacherAccess.NONE:
                teacher_access = TeacherAccess.WEIGHTS  # a derived student starts from the teacher's weights
            row.update(data_access=access.value, teacher_access=teacher_access.value,
                       validation_feedback=int(method_cls.validation_feedback))

            sealed = provision.seal(data)  # the validation and test splits, out of the method's reach
            progress = self.progress
            outcome = provision.distill(
                method, teacher.model, student, data, sealed=sealed, seed=cell.seed, device=opts.device, out_dir=cell_dir,
                budget=cell.compute, amp=cell.amp, data_root=opts.data_root, checkpoint_every=cell.checkpoint_every,
                on_log=progress.log if progress else None,
                on_phase=(lambda name, total, done: progress.phase(f"{cell.label}: {name}", total, done)) if progress else None,
                on_step=progress.step if progress else None, teacher_outputs=cell.teacher_outputs or "logits")
            measured = provision.measure(outcome.student, sealed, input_shape)
            record = {**student.record(cell.student, info), "mean": list(info.mean), "std": list(info.std)}
            provision.save_student(outcome.student, record, cell_dir)  # mean/std: the input a deployment must feed
            _write_jsonl(cell_dir / "anytime.jsonl", outcome.anytime)
            row.update(
                status="ok", error="", student_acc=round(measured.test_acc, 3),
                student_acc_val="" if measured.val_acc is None else round(measured.val_acc, 3),
                student_acc_best=round(outcome.best_test, 3) if method_cls.tracks_best and outcome.best_test is not None else "",
                best_protocol="best test-set evaluation during training (paper protocol)" if method_cls.tracks_best else "",
                real_samples_used=outcome.real_samples_used + search_samples,
                teacher_queries=outcome.teacher_queries + (cost.teacher_queries if cost else 0),
                teacher_queries_by=outcome.queries_by,
                student_steps=outcome.student_steps, stopped_by=outcome.stopped_by,
                params=measured.params, flops=measured.flops, macs=measured.macs,
                arch_id=architecture_id(outcome.student), distill_seconds=outcome.seconds,
                search_seconds=round(cost.seconds, 3) if cost and cost.seconds else "",
                iterations=outcome.iterations, amp=outcome.amp_active, peak_mem_mb=outcome.peak_mem_mb,
                resumed="" if outcome.resumed_from is None else f"phase {outcome.resumed_from[0]} step {outcome.resumed_from[1]}",
            )
            provision.discard_checkpoint(cell_dir)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a failing cell is recorded and the grid goes on
            (cell_dir / "error.txt").write_text(traceback.format_exc())
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
            provision.discard_checkpoint(cell_dir)
        finally:
            torch.set_num_threads(threads)
        row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        return row

    # ---- the latency pass (after the cells, in quiet)
    def load_student(self, row: dict[str, str]) -> nn.Module | None:
        folder = self.options.out / "cells" / row["cell_id"]
        return load_saved_student(folder)

    @staticmethod
    def load_teacher(row: dict[str, str]) -> nn.Module | None:
        shape = json.loads(row["input_shape"])
        if not row.get("num_classes"):
            return None
        return create_model(row["teacher"], int(row["num_classes"]), shape[0], shape[1])

    def time_architectures(self, store: ResultsStore) -> int:
        opts = self.options
        return latency_pass(list(store.rows.values()), opts.out, self.load_student, self.load_teacher, opts.device,
                            cpu_name(), store.put, min_run_time=opts.latency_min_run_time,
                            progress=self.progress.note if self.progress else None)

    def run(self, grid: Grid) -> RunSummary:
        opts = self.options
        cells = expand(grid, provenance=Provenance(opts.device.type, opts.data_root))
        store = ResultsStore(opts.out).lock()
        write_grid_json(opts.out, grid, cells, "local", keep_earlier=opts.keep_earlier_cells)
        todo = cells_to_run(cells, store, opts)
        summary = RunSummary(skipped=len(cells) - len(todo), cell_ids=[c.cell_id for c in cells])
        self.progress = _Progress(len(todo), opts.progress)
        try:
            for cell in todo:
                row = self.run_cell(cell)
                store.put(row)
                summary.done.append(store.rows[cell.cell_id])
                summary.failed += row["status"] == "failed"
                self.progress.cell_done(f"{cell.label} {row['status']} {row.get('student_acc', '')}")
            summary.timed = self.time_architectures(store)
            summary.done = [store.rows[r["cell_id"]] for r in summary.done]
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            self.progress.close()
            store.unlock()
        return summary


def load_saved_student(folder: Path) -> nn.Module | None:
    """A cell's saved student: its architecture rebuilt from ``student.json``, ``student.pt`` loaded with
    ``weights_only=True``, in eval mode; None if the cell saved none."""
    record_path, weights = folder / "student.json", folder / "student.pt"
    if not (record_path.is_file() and weights.is_file()):
        return None
    model = rebuild_student(json.loads(record_path.read_text()))
    load_into(model, load_state_dict(weights), f"saved student {weights}")
    return model.eval()


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def summary_table(rows: list[dict[str, str]]) -> str:
    """Mean +- std of final accuracy per (dataset, teacher->student, method) as a plain-text table."""
    groups: dict[tuple, list[dict[str, str]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], f"{r['teacher']}->{r['student']}", r["label"] or r["method"]), []).append(r)
    lines = [f"{'dataset':<14} {'pair':<28} {'method':<16} {'n':>2} {'acc % (final)':>16} {'val %':>6} {'params':>9} "
             f"{'MACs':>10} {'lat ms':>7} {'sec':>7}  failed"]

    def mean_std(values: list[float]) -> str:
        if not values:
            return "-"
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"

    for (dataset, pair, label), rs in sorted(groups.items()):
        ok = [r for r in rs if r["status"] == "ok"]
        acc = mean_std([float(r["student_acc"]) for r in ok])
        vals = [float(r["student_acc_val"]) for r in ok if r.get("student_acc_val")]
        val = f"{statistics.mean(vals):.2f}" if vals else "-"
        first = ok[0] if ok else {}
        secs = statistics.mean(float(r["distill_seconds"]) for r in ok) if ok else float("nan")
        lines.append(f"{dataset:<14} {pair:<28} {label:<16} {len(ok):>2} {acc:>16} {val:>6} {first.get('params', '-'):>9} "
                     f"{first.get('macs', '-'):>10} {first.get('latency_ms', '-') or '-':>7} {secs:>7.1f}  {len(rs) - len(ok)}")
    return "\n".join(lines)
