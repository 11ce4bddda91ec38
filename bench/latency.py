"""Latency once per architecture, in quiet.

Cells do not time their students: timed inside a cell, the same LeNet measured anywhere from 0.23 to
0.48 ms depending on what else was running. After the cells of a run (and only then, with nothing
else training on the machine), :func:`latency_pass` times each distinct architecture once per
(architecture, thread count) on the CPU at batch 1, with its throughput on the run's device, and writes
the figures into every row of that architecture. The figures are kept in ``<results>/latency.json``
with the machine they were taken on, so a resumed run times only what is new.

An architecture is identified by :func:`architecture_id`: its module types and every parameter's and
buffer's name and shape (weights do not change the dense arithmetic timed here).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bench.metrics import measure_latency, measure_throughput

LATENCY_FILE = "latency.json"
MIN_RUN_TIME = 1.0  # seconds of timed runs per architecture (torch.utils.benchmark blocked_autorange)


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
                         min_run_time: float = MIN_RUN_TIME) -> dict[str, float]:
    latency, iqr = measure_latency(model, input_shape, threads=threads, min_run_time=min_run_time)
    throughput = measure_throughput(model, input_shape, device=device, min_run_time=min(min_run_time, 0.5))
    return {"latency_ms": round(latency, 4), "latency_iqr_ms": round(iqr, 4), "throughput": round(throughput, 1)}


def latency_pass(rows: list[dict[str, str]], folder: Path, load_student: Callable[[dict[str, str]], nn.Module | None],
                 load_teacher: Callable[[dict[str, str]], nn.Module | None], device: torch.device, cpu: str,
                 put: Callable[[dict[str, str]], None], min_run_time: float = MIN_RUN_TIME,
                 progress: Callable[[str], None] | None = None) -> int:
    """Fill ``latency_ms``, ``latency_iqr_ms``, ``throughput`` and ``teacher_latency_ms`` of every ok row missing
    them: each architecture timed once (or taken from ``latency.json`` when it was timed on this ``cpu``).
    ``load_student(row)`` / ``load_teacher(row)`` rebuild a row's models. Returns how many architectures were timed."""
    table = load_table(folder)
    timed = 0

    def figures(arch: str, threads: int, build: Callable[[], nn.Module | None], shape) -> dict[str, float] | None:
        nonlocal timed
        key = _key(arch, threads, str(device))
        entry = table.get(key)
        if entry is None or entry.get("cpu") != cpu:
            model = build()
            if model is None:
                return None
            if progress is not None:
                progress(f"timing {arch} ({threads} thread{'s' * (threads > 1)})")
            entry = {**measure_architecture(model, shape, threads, device, min_run_time), "cpu": cpu}
            table[key] = entry
            _save_table(folder, table)
            timed += 1
        return entry

    for row in rows:
        if row.get("status") != "ok" or (row.get("latency_ms") and row.get("teacher_latency_ms")):
            continue
        shape = tuple(json.loads(row["input_shape"])) if row.get("input_shape") else None
        if shape is None:
            continue
        threads = int(row.get("latency_threads") or 1)
        updated = dict(row)
        if not row.get("latency_ms") and row.get("arch_id"):
            student = figures(row["arch_id"], threads, lambda: load_student(row), shape)
            if student is not None:
                updated.update(latency_ms=student["latency_ms"], latency_iqr_ms=student["latency_iqr_ms"],
                               throughput=student["throughput"])
        if not row.get("teacher_latency_ms") and row.get("teacher_arch_id"):
            teacher = figures(row["teacher_arch_id"], threads, lambda: load_teacher(row), shape)
            if teacher is not None:
                updated.update(teacher_latency_ms=teacher["latency_ms"])
        if updated != row:
            put(updated)
    return timed
