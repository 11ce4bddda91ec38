"""Run a grid on Ray (``bench run --executor ray``): cells as Ray tasks, the driver the single writer.

Ray (https://docs.ray.io) is an optional extra (``pip install 'dfkd-bench[ray]'``), imported only
here and only when asked for. The plan, per run:

1. The driver expands the grid and picks the cells to run exactly as the local executor does
   (:func:`bench.runner.cells_to_run`: resume, ``--force``, ``--rerun-failed``).
2. One *prepare* task per teacher (dataset, architecture, recipe, seed, checkpoint) trains it or
   loads it from the cache; one per derived student (``pruned:...``) of that teacher builds and
   caches it, after its teacher. Cells take those tasks' results as arguments, so Ray starts a cell
   only when its teacher (and student) exist, and no two workers ever train the same teacher. The
   cache (``--cache-dir``) must be a path every node sees (a shared filesystem); on one machine it is.
3. Each cell is a task with declared resources (``--cpus-per-cell``, ``--gpus-per-cell``; Ray then
   sets ``OMP_NUM_THREADS`` and ``CUDA_VISIBLE_DEVICES`` for it). It runs
   :meth:`bench.runner.Runner.run_cell` into a scratch folder on the worker and returns its row
   *and* its artefacts (config, training and anytime curves, sample images, the saved student,
   error.txt) as bytes; the driver writes the artefacts under ``<out>/cells/<cell_id>/`` and the row
   to runs.csv. Results therefore need no shared filesystem, and runs.csv has one writer. In-cell
   checkpoints live in the worker's scratch folder: a retried task starts its cell afresh.
4. When every task has finished, the driver runs the latency pass (:mod:`bench.latency`) itself, with
   no cell training anywhere: each student architecture is timed once, in quiet.
5. A worker that dies (killed process, lost node) makes Ray retry its task up to ``--retries``
   times; past that the cell is recorded as failed with Ray's error, and the grid goes on. Ctrl-C
   cancels the outstanding tasks; rows already written stay, and the next run resumes.

Plugins named with ``--plugin`` or in the grid are re-imported in every worker (paths made absolute).
"""
from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bench.config import ConfigError
from bench.grid import Cell, Grid, Provenance, expand
from bench.runner import RunOptions, RunSummary, Runner, base_row, cells_to_run, resolve_device, teacher_identity, write_grid_json
from bench.store import ResultsStore


@dataclass
class RayOptions:
    address: str | None = None  # None: start a private local Ray instance; "auto" or "ray://...": join a cluster
    num_cpus: int | None = None  # CPUs of the private local instance (default: all)
    cpus_per_cell: float = 1.0
    gpus_per_cell: float = 0.0
    retries: int = 1  # re-runs of a task whose worker died

    def validate(self) -> None:
        if self.cpus_per_cell <= 0:
            raise ConfigError(f"--cpus-per-cell must be > 0, got {self.cpus_per_cell}")
        if self.gpus_per_cell < 0:
            raise ConfigError(f"--gpus-per-cell must be >= 0, got {self.gpus_per_cell}")
        if self.retries < 0:
            raise ConfigError(f"--retries must be >= 0, got {self.retries}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"--num-cpus must be >= 1, got {self.num_cpus}")


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray, an optional extra: pip install 'dfkd-bench[ray]' "
                          "(or pip install ray); the default --executor local needs nothing") from None
    return ray


# ---------------------------------------------------------------------------------------------
# what runs on the workers (plain functions, wrapped by ray.remote in run_grid)

_LOADED_PLUGINS: set[str] = set()


def _load_plugins(plugins: list[str]) -> None:
    from bench.method import load_plugin

    for plugin in plugins:
        if plugin not in _LOADED_PLUGINS:
            load_plugin(plugin)
            _LOADED_PLUGINS.add(plugin)


def _worker_options(opts: RunOptions, device: str, out: Path) -> RunOptions:
    return replace(opts, device=resolve_device(device), out=out, progress=False)


def prepare_teacher(opts: RunOptions, device: str, cell: Cell) -> str:
    """Train the cell's teacher into the shared cache (or find it there); returns its cache key."""
    runner = Runner(_worker_options(opts, device, opts.out))
    return runner.teacher(cell).key


def prepare_student(opts: RunOptions, device: str, cell: Cell, teacher_key: str) -> str:
    """Build the cell's derived student (e.g. a pruned teacher) into the shared cache."""
    from bench.students import build_student

    runner = Runner(_worker_options(opts, device, opts.out))
    teacher = runner.teacher(cell)
    build_student(cell.student, runner.student_context(cell, teacher, runner.cell_data(cell)))
    return teacher_key


def run_cell(opts: RunOptions, device: str, plugins: list[str], cell: Cell, *ready: str) -> tuple[dict[str, Any], bytes]:
    """One cell in a scratch folder; returns its row and its artefacts as a tar archive."""
    _load_plugins(plugins)
    scratch = Path(tempfile.mkdtemp(prefix=f"dfkd-cell-{cell.cell_id}-"))
    try:
        row = Runner(_worker_options(opts, device, scratch)).run_cell(cell)
        row["worker"] = f"{os.uname().nodename}:{os.getpid()}"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(scratch / "cells" / cell.cell_id, arcname=".")
        return row, buffer.getvalue()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _unpack(archive: bytes, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r") as tar:
        tar.extractall(folder, filter="data")  # the "data" filter refuses absolute paths and links out


# ---------------------------------------------------------------------------------------------
# the driver


def run_grid(grid: Grid, opts: RunOptions, ray_opts: RayOptions, device: str = "auto",
             plugins: list[str] = ()) -> RunSummary:
    """Run ``grid`` on Ray; same resume semantics and results as :meth:`bench.runner.Runner.run`."""
    from bench.students import is_derived

    ray_opts.validate()
    ray = import_ray()
    plugins = [str(Path(p).resolve()) if p.endswith(".py") or Path(p).exists() else p
               for p in [*plugins, *grid.plugins]]
    cells = expand(grid, provenance=Provenance(resolve_device(device).type, opts.data_root))
    store = ResultsStore(opts.out).lock()
    write_grid_json(opts.out, grid, cells, "ray")
    todo = cells_to_run(cells, store, opts)
    summary = RunSummary(skipped=len(cells) - len(todo))
    if not todo:
        summary.timed = Runner(replace(opts, progress=False)).time_architectures(store)
        store.unlock()
        return summary
    opts = replace(opts, cache_dir=Path(opts.cache_dir).resolve() if opts.cache_dir else None,
                   data_root=Path(opts.data_root).resolve() if opts.data_root else None)

    started_here = not ray.is_initialized()
    if started_here:
        env = {"env_vars": {k: v for k, v in os.environ.items() if k.startswith("DFKD_")}}
        try:
            ray.init(address=ray_opts.address, num_cpus=ray_opts.num_cpus if ray_opts.address is None else None,
                     include_dashboard=False, log_to_driver=False, runtime_env=env, configure_logging=False)
        except Exception as exc:  # no cluster at --address, a bad address, Ray failing to start
            store.unlock()
            where = f"join the Ray cluster at --address {ray_opts.address!r}" if ray_opts.address else "start a local Ray instance"
            raise ConfigError(f"cannot {where}: {type(exc).__name__}: {exc}") from None
    resources = dict(num_cpus=ray_opts.cpus_per_cell, num_gpus=ray_opts.gpus_per_cell, max_retries=ray_opts.retries)
    teacher_task = ray.remote(prepare_teacher).options(**resources)
    student_task = ray.remote(prepare_student).options(**resources)
    cell_task = ray.remote(run_cell).options(**resources)

    teachers: dict[tuple, Any] = {}
    students: dict[tuple, Any] = {}
    pending: dict[Any, Cell] = {}
    for cell in todo:
        tkey = teacher_identity(cell)
        if tkey not in teachers:
            teachers[tkey] = teacher_task.remote(opts, device, cell)
        ready = [teachers[tkey]]
        if is_derived(cell.student):
            skey = (tkey, cell.student)
            if skey not in students:
                students[skey] = student_task.remote(opts, device, cell, teachers[tkey])
            ready.append(students[skey])
        pending[cell_task.remote(opts, device, plugins, cell, *ready)] = cell

    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // ray_opts.cpus_per_cell))
    bar = tqdm(total=len(todo), desc="cells (ray)", unit="cell", disable=not opts.progress, dynamic_ncols=True)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
            for ref in done:
                cell = pending.pop(ref)
                try:
                    row, archive = ray.get(ref)
                    _unpack(archive, opts.out / "cells" / cell.cell_id)
                except ray.exceptions.RayError as exc:  # the worker died past its retries, or a prepare task failed
                    row = base_row(cell, device)
                    row.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500],
                               finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
                    folder = opts.out / "cells" / cell.cell_id
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / "error.txt").write_text(str(exc))
                row.pop("worker", None)
                store.put(row)
                summary.done.append(store.rows[cell.cell_id])
                summary.failed += row["status"] == "failed"
                bar.update(1)
            running = min(len(pending), slots)
            bar.set_postfix_str(f"queued {len(pending) - running}, running {running}, done {len(summary.done)}, "
                                f"failed {summary.failed}", refresh=True)
        summary.timed = Runner(replace(opts, progress=False)).time_architectures(store)  # every task done: quiet
        summary.done = [store.rows[r["cell_id"]] for r in summary.done]
    except KeyboardInterrupt:
        summary.interrupted = True
        for ref in pending:
            ray.cancel(ref, force=True)
    finally:
        bar.close()
        store.unlock()
        if started_here:
            ray.shutdown()
    return summary
