"""Runs the cells of a grid on this machine: one at a time, each isolated, each one CSV row.

A cell that raises (or whose losses go NaN) is recorded as ``failed`` with its error, its traceback
goes to ``cells/<cell_id>/error.txt``, and the grid goes on. Rows are written as cells finish, so an
interrupted run loses at most the cell in flight, and the next run does only what is missing.
"""
from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.config import ConfigError
from bench.data import load_dataset, to_float
from bench.grid import Cell, Grid, expand
from bench.method import CountingTeacher, DataAccess, DistillContext, get_method
from bench.metrics import count_flops, count_params, evaluate_accuracy, measure_latency, measure_throughput, peak_memory_mb, reset_peak_memory
from bench.store import ResultsStore
from bench.students import StudentContext, build_student, check_compatible
from bench.teachers import Teacher, get_teacher, resolve_cache_dir
from bench.config import from_mapping
from bench.teachers import TeacherRecipe

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


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
    latency_min_run_time: float = 0.3


@dataclass
class RunSummary:
    done: list[dict[str, str]] = field(default_factory=list)
    skipped: int = 0
    failed: int = 0
    interrupted: bool = False


class _Progress:
    """An outer bar over cells and an inner bar over the current phase's steps."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        self.cells = tqdm(total=total, desc="cells", unit="cell", disable=not enabled, position=0, dynamic_ncols=True)
        self.inner = None

    def phase(self, name: str, total: int) -> None:
        if self.inner is not None:
            self.inner.close()
        self.inner = tqdm(total=total, desc=f"  {name}", unit="it", disable=not self.enabled, position=1, leave=False,
                          dynamic_ncols=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.inner is not None:
            self.inner.update(step - self.inner.n)
            self.inner.set_postfix({k: f"{v:.4g}" for k, v in list(values.items())[:4]}, refresh=False)

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


def base_row(cell: Cell, device: torch.device | str) -> dict[str, Any]:
    """The identity columns of a cell's row (what is known before it runs)."""
    return {
        "cell_id": cell.cell_id, "grid": cell.grid, "dataset": cell.dataset, "teacher": cell.teacher,
        "student": cell.student, "method": cell.method, "label": cell.label, "preset": cell.preset or "",
        "seed": cell.seed, "budget": cell.budget, "device": str(device), "cpu": cpu_name(),
        "torch": torch.__version__, "git_commit": git_commit(), "latency_threads": cell.latency_threads,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "method_params": json.dumps(cell.params, sort_keys=True),
    }


def write_grid_json(out: Path, grid: Grid, cells: list[Cell], executor: str) -> None:
    """``grid.json``: the grid's name, description and current cell_ids (the report shows only those)."""
    (out / "grid.json").write_text(json.dumps({"name": grid.name, "description": grid.description, "cells": len(cells),
                                               "cell_ids": [c.cell_id for c in cells], "executor": executor}, indent=2))


def teacher_identity(cell: Cell) -> tuple:
    """What makes a cell's teacher: cells sharing it share one trained (or loaded) teacher."""
    return (cell.dataset, cell.teacher, json.dumps(cell.teacher_recipe, sort_keys=True), cell.teacher_seed,
            cell.teacher_checkpoint)


def cells_to_run(cells: list[Cell], store: ResultsStore, opts: RunOptions) -> list[Cell]:
    """Resume logic shared by every executor: missing cells, plus failed ones with ``rerun_failed``, or all with ``force``."""
    todo = []
    for cell in cells:
        status = store.status(cell.cell_id)
        if opts.force or status is None or (status == "failed" and opts.rerun_failed):
            todo.append(cell)
    return todo


class Runner:
    """Runs cells; caches datasets and teachers across the cells of one run."""

    def __init__(self, options: RunOptions):
        self.options = options
        self._teachers: dict[tuple, Teacher] = {}
        self._teacher_latency: dict[tuple, float] = {}
        self.progress: _Progress | None = None

    def data(self, name: str):
        return load_dataset(name, root=self.options.data_root, device=self.options.device)

    def teacher(self, cell: Cell) -> Teacher:
        key = teacher_identity(cell)
        if key not in self._teachers:
            data = self.data(cell.dataset)
            recipe = from_mapping(TeacherRecipe, cell.teacher_recipe, "teacher_recipe")
            progress = self.progress
            on_train = (lambda total: progress.phase(f"teacher {cell.teacher} on {cell.dataset}", total)) if progress else None
            log = (lambda it, losses: progress.log(it, {k: float(v.detach()) for k, v in losses.items()})) if progress else (lambda it, losses: None)
            self._teachers[key] = get_teacher(cell.dataset, cell.teacher, data, self.options.device, seed=cell.teacher_seed,
                                              recipe=recipe, cache_dir=self.options.cache_dir,
                                              checkpoint=cell.teacher_checkpoint, log=log, on_train=on_train)
        return self._teachers[key]

    def teacher_latency(self, teacher: Teacher, input_shape: tuple[int, ...], threads: int) -> float:
        """The teacher's CPU batch-1 latency (ms, median), measured once per run: the report's reference point."""
        key = (teacher.key, input_shape, threads)
        if key not in self._teacher_latency:
            self._teacher_latency[key] = round(measure_latency(teacher.model, input_shape, threads=threads,
                                                               min_run_time=self.options.latency_min_run_time)[0], 4)
        return self._teacher_latency[key]

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        """Run one cell and return its row; never raises except on KeyboardInterrupt."""
        opts = self.options
        cell_dir = opts.out / "cells" / cell.cell_id
        cell_dir.mkdir(parents=True, exist_ok=True)
        (cell_dir / "config.json").write_text(json.dumps(cell.__dict__, indent=2, sort_keys=True))
        (cell_dir / "curve.jsonl").unlink(missing_ok=True)
        (cell_dir / "error.txt").unlink(missing_ok=True)
        method_cls = None
        row = base_row(cell, opts.device)
        ctx = None
        try:
            method_cls = get_method(cell.method)
            row.update(data_access=method_cls.data_access.value, teacher_access=method_cls.teacher_access.value)
            data = self.data(cell.dataset)
            teacher = self.teacher(cell)
            info = data.info
            input_shape = (info.channels, info.image_size, info.image_size)
            row.update(teacher_acc=teacher.accuracy, teacher_params=count_params(teacher.model),
                       teacher_macs=count_flops(teacher.model, input_shape)[1],
                       teacher_latency_ms=self.teacher_latency(teacher, input_shape, cell.latency_threads))

            seed_everything(cell.seed)
            student = build_student(cell.student, StudentContext(teacher=teacher.model, teacher_key=teacher.key, info=info,
                                                                 cache_dir=resolve_cache_dir(opts.cache_dir), device=opts.device))
            check_compatible(teacher.model, student, info, opts.device)
            method = method_cls(method_cls.resolve_config(cell.dataset, cell.preset, cell.params)[1])
            counted = CountingTeacher(teacher.model)
            iterations = []
            progress = self.progress

            def on_phase(name: str, total: int) -> None:
                iterations.append(total)
                if progress:
                    progress.phase(f"{cell.label}: {name}", total)

            ctx = DistillContext(data=data, data_access=method_cls.data_access, device=opts.device, budget=cell.budget,
                                 seed=cell.seed, out_dir=cell_dir, amp=cell.amp,
                                 few_limit=method.real_samples_limit(info) if method_cls.data_access is DataAccess.FEW else None,
                                 data_root=opts.data_root, on_log=progress.log if progress else None, on_phase=on_phase)
            reset_peak_memory(opts.device)
            _sync(opts.device)
            started = time.perf_counter()
            student = method.distill(counted, student, ctx)
            _sync(opts.device)
            row["distill_seconds"] = round(time.perf_counter() - started, 3)
            row["peak_mem_mb"] = round(peak_memory_mb(opts.device), 1)
            student.eval()
            acc = evaluate_accuracy(student, data.test_x, data.test_y, lambda xb: to_float(xb, info))
            if not math.isfinite(acc):
                raise FloatingPointError(f"student accuracy is {acc}")
            flops, macs = count_flops(student, input_shape)
            latency, iqr = measure_latency(student, input_shape, threads=cell.latency_threads,
                                           min_run_time=opts.latency_min_run_time)
            row.update(
                status="ok", error="", student_acc=round(acc, 3),
                student_acc_best=round(ctx.best_acc, 3) if method_cls.tracks_best and ctx.best_acc is not None else "",
                best_protocol="best test-set evaluation during training (paper protocol)" if method_cls.tracks_best else "",
                real_samples_used=ctx.real_samples_used, teacher_queries=counted.queries, params=count_params(student),
                flops=flops, macs=macs, latency_ms=round(latency, 4), latency_iqr_ms=round(iqr, 4),
                throughput=round(measure_throughput(student, input_shape, device=opts.device,
                                                    min_run_time=opts.latency_min_run_time), 1),
                iterations=sum(iterations), amp=ctx.amp_active,
            )
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a failing cell is recorded and the grid goes on
            (cell_dir / "error.txt").write_text(traceback.format_exc())
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
            if ctx is not None:
                row.update(real_samples_used=ctx.real_samples_used)
        finally:
            if ctx is not None:
                ctx.close()
        row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        return row

    def run(self, grid: Grid) -> RunSummary:
        opts = self.options
        cells = expand(grid)
        store = ResultsStore(opts.out).lock()
        write_grid_json(opts.out, grid, cells, "local")
        todo = cells_to_run(cells, store, opts)
        summary = RunSummary(skipped=len(cells) - len(todo))
        self.progress = _Progress(len(todo), opts.progress)
        try:
            for cell in todo:
                row = self.run_cell(cell)
                store.put(row)
                summary.done.append(store.rows[cell.cell_id])
                summary.failed += row["status"] == "failed"
                self.progress.cell_done(f"{cell.label} {row['status']} {row.get('student_acc', '')}")
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            self.progress.close()
            store.unlock()
        return summary


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary_table(rows: list[dict[str, str]]) -> str:
    """Mean +- std of final accuracy per (dataset, teacher->student, method) as a plain-text table."""
    groups: dict[tuple, list[dict[str, str]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], f"{r['teacher']}->{r['student']}", r["label"] or r["method"]), []).append(r)
    lines = [f"{'dataset':<14} {'pair':<28} {'method':<16} {'n':>2} {'acc % (final)':>16} {'params':>9} {'MACs':>10} {'lat ms':>7} {'sec':>7}  failed"]
    for (dataset, pair, label), rs in sorted(groups.items()):
        ok = [r for r in rs if r["status"] == "ok"]
        accs = [float(r["student_acc"]) for r in ok]
        acc = (f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}" if len(accs) > 1
               else f"{accs[0]:.2f}" if accs else "-")
        first = ok[0] if ok else {}
        secs = statistics.mean(float(r["distill_seconds"]) for r in ok) if ok else float("nan")
        lines.append(f"{dataset:<14} {pair:<28} {label:<16} {len(ok):>2} {acc:>16} {first.get('params', '-'):>9} "
                     f"{first.get('macs', '-'):>10} {first.get('latency_ms', '-'):>7} {secs:>7.1f}  {len(rs) - len(ok)}")
    return "\n".join(lines)
