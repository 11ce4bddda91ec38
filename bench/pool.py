"""Several cells at once on this machine: ``bench run --jobs N`` (or ``jobs: N`` in a grid).

Small models gain little from a second intra-op thread, so on a machine with C cores N processes of
C // N threads each finish a grid sooner than one process with C threads (two LeNet cells on 2 cores,
one thread each, run ~1.6x the cells per hour of one cell with two threads). The plan:

1. The driver (the ``bench run`` process) trains or loads every teacher and builds every derived student
   first, one after another, with all the cores: the workers then find them in the cache and no two
   processes ever train the same teacher.
2. A pool of N worker processes (``spawn``; each sets its torch thread count to the cells' ``threads``
   and imports the plugins) runs the cells; each writes its own cell folder, as the local executor does
   (checkpoints included, so a killed run resumes its cells).
3. The driver is the only writer of runs.csv (rows arrive as cells finish); when every cell is done it
   runs the latency pass itself, in quiet.

A cell's ``threads`` is part of its identity (its numbers, and what a seconds cap buys, depend on it).
"""
from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from bench.grid import Cell, Grid, Provenance, expand
from bench.runner import RunOptions, RunSummary, Runner, base_row, cells_to_run, write_grid_json
from bench.store import ResultsStore

_WORKER: Runner | None = None


def _init_worker(options: RunOptions, threads: int, plugins: list[str]) -> None:
    import torch

    from bench.method import load_plugin

    global _WORKER
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    for plugin in plugins:
        load_plugin(plugin)
    _WORKER = Runner(replace(options, progress=False))


def _run_cell(cell: Cell) -> dict[str, Any]:
    assert _WORKER is not None
    return _WORKER.run_cell(cell)


def prepare(runner: Runner, cells: list[Cell]) -> None:
    """Train/load every teacher and build every derived student of ``cells`` into the cache, in this process.
    A failure here is left for the cell to record (it fails the same way, with its own row)."""
    from bench.students import build_student, is_derived

    done: set[tuple] = set()
    for cell in cells:
        key = (cell.dataset, cell.validation, cell.teacher, cell.teacher_checkpoint, cell.teacher_seed,
               cell.student if is_derived(cell.student) else "")
        if key in done:
            continue
        done.add(key)
        try:
            teacher = runner.teacher(cell)
            if is_derived(cell.student):
                build_student(cell.student, runner.student_context(cell, teacher, runner.data(cell.dataset, cell.validation)))
        except Exception:  # noqa: BLE001 - recorded by the cell itself when it runs
            continue


def run_pool(grid: Grid, opts: RunOptions, jobs: int, plugins: list[str]) -> RunSummary:
    """Run ``grid`` with ``jobs`` worker processes; same resume semantics and rows as :meth:`Runner.run`."""
    cells = expand(grid, provenance=Provenance(opts.device.type, opts.data_root))
    store = ResultsStore(opts.out).lock()
    write_grid_json(opts.out, grid, cells, f"local, {jobs} jobs")
    todo = cells_to_run(cells, store, opts)
    summary = RunSummary(skipped=len(cells) - len(todo))
    driver = Runner(opts)
    bar = tqdm(total=len(todo), desc=f"cells ({jobs} jobs)", unit="cell", disable=not opts.progress, dynamic_ncols=True)
    pool = None
    try:
        if todo:
            bar.set_postfix_str("teachers and derived students", refresh=True)
            prepare(driver, todo)
            threads = todo[0].threads
            pool = futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                               initializer=_init_worker, initargs=(opts, threads, plugins))
            pending = {pool.submit(_run_cell, cell): cell for cell in todo}
            for future in futures.as_completed(pending):
                cell = pending[future]
                try:
                    row = future.result()
                except futures.process.BrokenProcessPool as exc:  # a worker died (killed, out of memory)
                    row = base_row(cell, opts.device)
                    row.update(status="failed", error=f"worker died: {exc}"[:500])
                store.put(row)
                summary.done.append(store.rows[cell.cell_id])
                summary.failed += row["status"] == "failed"
                bar.set_postfix_str(f"{cell.label} {row['status']} {row.get('student_acc', '')}", refresh=False)
                bar.update(1)
            pool.shutdown()
            pool = None
        bar.set_postfix_str("timing architectures", refresh=True)
        summary.timed = driver.time_architectures(store)  # every cell done: quiet
        summary.done = [store.rows[r["cell_id"]] for r in summary.done]
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        if pool is not None:
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        store.unlock()
    return summary
