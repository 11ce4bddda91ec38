"""Latency once per architecture, in quiet, on each latency backend.

Cells do not time their students: timed inside a cell, the same LeNet measured anywhere from 0.23 to
0.48 ms depending on what else was running. After the cells of a run (and only then, with nothing
else training on the machine), :func:`latency_pass` times each distinct architecture once per
(architecture, thread count) on the CPU, on every installed backend of :data:`BACKENDS`, at batch 1 and
batch :data:`BATCH`, with its throughput on the run's device, and writes the figures into every row of
that architecture. The figures are kept in ``<results>/latency.json`` with the machine they were taken
on, so a resumed run times only what is new.

Backends (the row's columns, all milliseconds per batch; batch 1 median and IQR, batch 64 median):

- ``eager``: eager PyTorch (``torch.utils.benchmark``): ``latency_ms``, ``latency_iqr_ms``, ``latency_b64_ms``;
  the teacher: ``teacher_latency_ms``.
- ``onnxruntime``: ONNX Runtime's CPU execution provider on the graph ``bench export --format onnx`` writes:
  ``ort_latency_ms``, ``ort_latency_iqr_ms``, ``ort_latency_b64_ms``; the teacher: ``teacher_ort_latency_ms``.
  Timed only where ``onnx`` and ``onnxruntime`` are installed (the ``export`` extra); otherwise left empty.

Why a deployment runtime: at LeNet size, eager PyTorch's batch-1 latency is mostly a fixed cost per operator
(one thread: lenet5_quarter 0.230 ms, lenet5_half 0.240 ms though their MACs differ 2.1x; on ONNX Runtime 0.019 and
0.022 ms: examples/studies/ladder_latency.py), so it ranks the framework, not the network. The report plots the backend ``bench report --latency-backend`` names (default: ONNX Runtime where the
rows carry its figures).

An architecture is identified by :func:`architecture_id`: its module types and every parameter's and
buffer's name and shape (weights do not change the dense arithmetic timed here).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bench.metrics import measure_latency, measure_onnxruntime_latency, measure_throughput, onnxruntime_missing
from bench.registry import Registry

LATENCY_FILE = "latency.json"
MIN_RUN_TIME = 1.0  # seconds of timed runs per architecture and backend at batch 1 (half that at batch BATCH)
BATCH = 64  # the second batch size timed (the ``*_b64_ms`` columns)


@dataclass(frozen=True)
class LatencyBackend:
    """How one runtime is timed and where its figures go in a row.

    ``measure(model, input_shape, threads=, min_run_time=, batch=) -> (median ms, IQR ms)``; ``missing() -> str``:
    why the backend cannot run here ('' when it can). ``columns``: the row's (batch-1 median, batch-1 IQR,
    batch-64 median) columns; ``teacher_column``: the teacher's batch-1 median."""

    name: str
    title: str  # how the report names it, e.g. "ONNX Runtime (CPU provider)"
    measure: Callable[..., tuple[float, float]]
    missing: Callable[[], str]
    columns: tuple[str, str, str]
    teacher_column: str

    @property
    def median(self) -> str:
        return self.columns[0]

    @property
    def iqr(self) -> str:
        return self.columns[1]


BACKENDS: Registry[LatencyBackend] = Registry("latency backend")
for _backend in (
        LatencyBackend("eager", "eager PyTorch", measure_latency, lambda: "",
                       ("latency_ms", "latency_iqr_ms", "latency_b64_ms"), "teacher_latency_ms"),
        LatencyBackend("onnxruntime", "ONNX Runtime (CPU execution provider)", measure_onnxruntime_latency,
                       onnxruntime_missing, ("ort_latency_ms", "ort_latency_iqr_ms", "ort_latency_b64_ms"),
                       "teacher_ort_latency_ms")):
    BACKENDS.register(_backend.name)(_backend)


def available_backends() -> list[LatencyBackend]:
    """The backends that can be timed on this machine (eager always; ONNX Runtime where installed)."""
    return [backend for _, backend in BACKENDS.items() if not backend.missing()]


def architecture_id(model: nn.Module) -> str:
    """A hash of the architecture: module types in order and every parameter/buffer name and shape."""
    parts = [type(m).__name__ for m in model.modules()]
    parts += [f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def _key(arch: str, threads: int, device: str) -> str:
    return f"{arch}|threads={threads}|{device}"


def load_table(folder: Path) -> dict[str, Any]:
    path = Path(folder) / LATENCY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_table(folder: Path, table: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".latency.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, folder / LATENCY_FILE)


def measure_architecture(model: nn.Module, input_shape: tuple[int, ...], threads: int, device: torch.device,
                         min_run_time: float = MIN_RUN_TIME,
                         backends: list[LatencyBackend] | None = None) -> dict[str, float]:
    """The figures of one architecture: per backend its batch-1 median and IQR and batch-:data:`BATCH` median
    (the backend's columns), and the eager throughput on ``device`` (``throughput``, images/s)."""
    out: dict[str, float] = {}
    for backend in available_backends() if backends is None else backends:
        median, iqr = backend.measure(model, input_shape, threads=threads, min_run_time=min_run_time)
        batch_median, _ = backend.measure(model, input_shape, threads=threads, min_run_time=min_run_time / 2, batch=BATCH)
        out.update(zip(backend.columns, (round(median, 4), round(iqr, 4), round(batch_median, 4))))
    out["throughput"] = round(measure_throughput(model, input_shape, device=device, min_run_time=min(min_run_time, 0.5)), 1)
    return out


def _student_columns(backends: list[LatencyBackend]) -> list[str]:
    return [c for b in backends for c in b.columns] + ["throughput"]


def latency_pass(rows: list[dict[str, str]], folder: Path, load_student: Callable[[dict[str, str]], nn.Module | None],
                 load_teacher: Callable[[dict[str, str]], nn.Module | None], device: torch.device, cpu: str,
                 put: Callable[[dict[str, str]], None], min_run_time: float = MIN_RUN_TIME,
                 progress: Callable[[str], None] | None = None) -> int:
    """Fill the latency columns of every available backend (see the module docstring), ``throughput`` and each
    backend's teacher column in every ok row missing them: each architecture timed once (or taken from
    ``latency.json`` when it was timed on this ``cpu`` with these backends). ``load_student(row)`` /
    ``load_teacher(row)`` rebuild a row's models. Returns how many architectures were timed."""
    table = load_table(folder)
    backends = available_backends()
    student_columns = _student_columns(backends)
    teacher_columns = [b.teacher_column for b in backends]
    timed = 0

    def figures(arch: str, threads: int, build: Callable[[], nn.Module | None], shape) -> dict[str, float] | None:
        nonlocal timed
        key = _key(arch, threads, str(device))
        entry = table.get(key)
        if entry is None or entry.get("cpu") != cpu or any(c not in entry for c in student_columns):
            model = build()
            if model is None:
                return None
            if progress is not None:
                progress(f"timing {arch} ({threads} thread{'s' * (threads > 1)}; {', '.join(b.name for b in backends)})")
            entry = {**measure_architecture(model, shape, threads, device, min_run_time, backends), "cpu": cpu}
            table[key] = entry
            _save_table(folder, table)
            timed += 1
        return entry

    for row in rows:
        if row.get("status") != "ok" or all(row.get(c) for c in student_columns + teacher_columns):
            continue
        shape = tuple(json.loads(row["input_shape"])) if row.get("input_shape") else None
        if shape is None:
            continue
        threads = int(row.get("latency_threads") or 1)
        updated = dict(row)
        if not all(row.get(c) for c in student_columns) and row.get("arch_id"):
            student = figures(row["arch_id"], threads, lambda: load_student(row), shape)
            if student is not None:
                updated.update({c: student[c] for c in student_columns})
        if not all(row.get(c) for c in teacher_columns) and row.get("teacher_arch_id"):
            teacher = figures(row["teacher_arch_id"], threads, lambda: load_teacher(row), shape)
            if teacher is not None:
                updated.update({b.teacher_column: teacher[b.median] for b in backends})
        if updated != row:
            put(updated)
    return timed
