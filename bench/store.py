"""The results CSV: ``<out>/runs.csv``, one row per finished or failed cell.

- Atomic: every write replaces the file through a temporary file and ``os.replace``, so a killed run
  leaves either the old or the new file, never half a row.
- One writer: a lock file (``flock``) refuses a second ``bench run`` on the same folder.
- Resumable: a cell with an ``ok`` row is done; a ``failed`` row is retried only when asked.
- A corrupt or truncated file is reported, copied aside untouched, and its good rows are kept.
"""
from __future__ import annotations

import csv
import fcntl
import io
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

# The teacher's source and the input it takes (bench distill: a user's own teacher and data). They record a
# cell's inputs, no report figure reads them, so an older runs.csv lacks them without a note.
RECORD_ONLY = ("teacher_checkpoint", "teacher_pretrained", "data_options", "input_mean", "input_std", "augment")

# Columns newer than some runs.csv files whose absence means their default (tuning "" = the paper track,
# validation_feedback "" = none): the report reads them, and an older file lacks them without a note.
DEFAULTED = ("tuning", "validation_feedback")

# The public column set (DESIGN.md "Results"); scripts and the report read these names.
COLUMNS = [
    "cell_id", "status", "error", "grid", "dataset", "teacher", "student", "method", "label", "preset", "tuning", "seed",
    "budget", "compute_cap", "validation", "data_access", "real_samples_used", "validation_feedback", "teacher_access", "teacher_outputs",
    "teacher_queries", "teacher_queries_by", "student_steps", "stopped_by", "teacher_acc", "student_acc",
    "student_acc_val", "student_acc_best", "best_protocol",
    "params", "flops", "macs", "arch_id", "num_classes", "input_shape", "teacher_params", "teacher_macs",
    "teacher_arch_id", "teacher_latency_ms", "latency_ms", "latency_iqr_ms", "latency_threads", "threads", "throughput",
    # latency per backend (bench/latency.py), milliseconds per batch on the CPU with latency_threads threads, timed
    # once per architecture after the cells: eager PyTorch batch 1 = latency_ms (median) and latency_iqr_ms (above),
    # batch 64 = latency_b64_ms; ONNX Runtime's CPU provider (where installed) batch 1 = ort_latency_ms and
    # ort_latency_iqr_ms, batch 64 = ort_latency_b64_ms; the teacher at batch 1 = teacher_latency_ms (eager, above)
    # and teacher_ort_latency_ms
    "latency_b64_ms", "ort_latency_ms", "ort_latency_iqr_ms", "ort_latency_b64_ms", "teacher_ort_latency_ms",
    "distill_seconds", "search_seconds", "iterations", "resumed", "peak_mem_mb", "device", "amp", "cpu", "torch",
    "git_commit", "git_dirty", "started", "finished", "method_params",
    *RECORD_ONLY,
]


class ResultsCorruptWarning(UserWarning):
    pass


class StoreLockedError(RuntimeError):
    pass


class ResultsStore:
    """Rows of ``<folder>/runs.csv`` keyed by cell_id (the latest row per cell wins).

    ``columns``: the column set of the task (default :data:`COLUMNS`, classification; a translation grid
    passes ``bench.translation.task.COLUMNS``)."""

    def __init__(self, folder: Path, columns: list[str] | None = None):
        self.columns = list(COLUMNS if columns is None else columns)
        self.folder = Path(folder)
        self.path = self.folder / "runs.csv"
        self.rows: dict[str, dict[str, str]] = {}
        self.problems: list[str] = []
        self._lock_file = None
        if self.path.exists():
            self._load()

    # ---- reading
    def _load(self) -> None:
        text = self.path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines(keepends=True)
        if not lines:
            return
        header = next(csv.reader([lines[0]]))
        if "cell_id" not in header or "status" not in header:
            self._corrupt([f"header {header[:5]}... lacks cell_id/status"])
            return
        bad = []
        complete = text.endswith("\n")
        for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            if number == 1:
                continue
            is_last = number == len(lines)
            if len(row) != len(header) or (is_last and not complete):
                bad.append(f"line {number}: {'truncated' if is_last and not complete else f'{len(row)} fields, expected {len(header)}'}")
                continue
            record = dict(zip(header, row))
            if not record.get("cell_id") or record.get("status") not in ("ok", "failed"):
                bad.append(f"line {number}: missing cell_id or unknown status {record.get('status')!r}")
                continue
            self.rows[record["cell_id"]] = record
        if bad:
            self._corrupt(bad)

    def _corrupt(self, bad: list[str]) -> None:
        backup = self.path.with_name(f"runs.csv.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        backup.write_bytes(self.path.read_bytes())
        message = (f"{self.path} is corrupt ({'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}); "
                   f"kept {len(self.rows)} good rows, the original is saved untouched as {backup.name}")
        self.problems.append(message)
        warnings.warn(message, ResultsCorruptWarning, stacklevel=3)

    def status(self, cell_id: str) -> str | None:
        row = self.rows.get(cell_id)
        return row["status"] if row else None

    # ---- writing
    def lock(self) -> "ResultsStore":
        """Become the only writer of this folder (released at exit)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.folder / ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(f"another `bench run` is writing {self.folder}; wait for it or use another --out") from None
        return self

    def unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def put(self, row: dict[str, Any]) -> None:
        """Add or replace the row of ``row['cell_id']`` and rewrite the file atomically."""
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"unknown result columns {sorted(unknown)}")
        self.rows[row["cell_id"]] = {c: _text(row.get(c)) for c in self.columns}
        self._write(self.rows.values())

    def _write(self, rows: Iterable[dict[str, str]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".runs.", suffix=".csv")
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow(r)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
