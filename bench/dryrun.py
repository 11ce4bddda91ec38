"""``bench run --dry-run``: what a run would do, without doing or writing anything.

Lists the grid's cells with what is already there: a finished row in the results folder, the cell's
teacher in the cache (or the user's checkpoint), a derived (pruned) student in the cache. For each
cell still to run it estimates the distillation seconds from earlier ``ok`` rows of the same method,
dataset, teacher and student (in the results folder and its sibling folders), scaled by the budget
fraction when the earlier rows ran another fraction and capped by a ``seconds`` cap; cells without
such rows say so. Nothing is trained, downloaded, locked or written.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from types import SimpleNamespace

from bench.config import from_mapping
from bench.data import DatasetMissingError, fingerprint, task_data
from bench.grid import Cell, Grid, Provenance, expand
from bench.runner import RunOptions, budget_text, cells_to_run
from bench.store import ResultsStore
from bench.students import is_derived
from bench.teachers import TeacherRecipe, resolve_cache_dir, teacher_key
from bench.provenance import file_hash


def _earlier_rows(out: Path) -> list[dict[str, str]]:
    """ok rows of the results folder and of its sibling folders (read only)."""
    rows: list[dict[str, str]] = []
    folders = [out] + ([p for p in out.parent.iterdir() if p.is_dir() and p != out] if out.parent.is_dir() else [])
    for folder in folders:
        if (folder / "runs.csv").is_file():
            rows += [r for r in ResultsStore(folder).rows.values() if r["status"] == "ok"]
    return rows


def estimate_seconds(cell: Cell, rows: list[dict[str, str]]) -> tuple[float | None, str]:
    """(seconds, how it was estimated) from earlier rows like ``cell``; (None, why not) without any."""
    like = [r for r in rows if (r["method"], r["dataset"], r["teacher"], r["student"]) ==
            (cell.method, cell.dataset, cell.teacher, cell.student) and r.get("distill_seconds")]
    if not like:
        return None, "no earlier row of this method/dataset/pair"
    fraction = float(cell.budget.get("fraction", 1.0))
    caps = budget_text(cell)
    same = [r for r in like if float(r["budget"] or 1) == fraction and (r.get("compute_cap") or "") == caps]
    cap = cell.budget.get("seconds")
    stopped = [r for r in like if r.get("stopped_by") == "seconds"]
    if same:
        seconds, how = statistics.median(float(r["distill_seconds"]) for r in same), f"median of {len(same)} earlier row(s)"
    elif cap is not None and len(stopped) * 2 >= len(like):
        # most earlier rows ended at their own seconds cap: they say nothing of how long the method runs
        # without it, so this cell's cap is the estimate (an upper bound)
        seconds, how = float(cap), f"{len(stopped)} earlier row(s) stopped at their seconds cap; up to this cell's"
    else:
        scaled = [float(r["distill_seconds"]) * fraction / float(r["budget"] or 1) for r in like]
        seconds, how = statistics.median(scaled), f"{len(like)} earlier row(s) at another budget, scaled by the fraction"
    if cap is not None and seconds > cap:
        seconds, how = float(cap), how + f", capped at {cap:g} s"
    return seconds, how


def teacher_state(cell: Cell, options: RunOptions) -> str:
    if cell.teacher_checkpoint:
        return f"user checkpoint {cell.teacher_checkpoint}" + ("" if Path(cell.teacher_checkpoint).is_file() else " (MISSING)")
    try:
        data = task_data(cell.dataset, options.data_root, "cpu", cell.validation, download=False, options=cell.data_options)
    except DatasetMissingError:
        return "dataset files missing"
    recipe = from_mapping(TeacherRecipe, cell.teacher_recipe, "teacher_recipe")
    pretrained = file_hash(cell.teacher_pretrained) if cell.teacher_pretrained and Path(cell.teacher_pretrained).is_file() else ""
    key = teacher_key(cell.dataset, cell.teacher, recipe, cell.teacher_seed, fingerprint(data), pretrained)
    folder = resolve_cache_dir(options.cache_dir) / "teachers" / key
    return f"cached ({key})" if (folder / "meta.json").is_file() else f"to train ({key})"


def student_state(cell: Cell, teacher: str, options: RunOptions) -> str:
    if not is_derived(cell.student):
        return "built fresh"
    if not teacher.startswith("cached"):
        return "to derive"
    try:
        from bench.pruning import cache_folder

        key = teacher.split("(", 1)[1].rstrip(")")
        folder = cache_folder(SimpleNamespace(cache_dir=resolve_cache_dir(options.cache_dir), teacher_key=key,
                                              seed=cell.teacher_seed), cell.student)  # as the runner's StudentContext
    except (ImportError, ValueError, KeyError):
        return "derived (cache not inspected)"
    return "cached" if (folder / "arch.json").is_file() else "to derive"


def plan(grid: Grid, options: RunOptions) -> str:
    """The dry run's text (see the module docstring)."""
    cells = expand(grid, provenance=Provenance(options.device.type, options.data_root, download=False))
    store = ResultsStore(options.out) if (options.out / "runs.csv").is_file() else None
    todo = {c.cell_id for c in cells_to_run(cells, store, options)} if store else {c.cell_id for c in cells}
    rows = _earlier_rows(options.out)
    teachers: dict[tuple, str] = {}
    lines = [f"{'cell_id':<12}  {'dataset':<14} {'pair':<26} {'method':<14} {'seed':>4}  {'budget':<18} "
             f"{'row':<7} {'teacher':<34} {'student':<12} estimate"]
    total, unknown = 0.0, 0
    for cell in cells:
        tkey = (cell.dataset, cell.validation, str(cell.data_options), cell.teacher, str(cell.teacher_recipe),
                cell.teacher_seed, cell.teacher_checkpoint, cell.teacher_pretrained)
        if tkey not in teachers:
            teachers[tkey] = teacher_state(cell, options)
        teacher = teachers[tkey]
        status = store.status(cell.cell_id) if store else None
        row = status or "-"
        if cell.cell_id in todo:
            seconds, how = estimate_seconds(cell, rows)
            if seconds is None:
                unknown += 1
                estimate = "? (" + how + ")"
            else:
                total += seconds
                estimate = f"~{seconds:.0f} s ({how})"
        else:
            estimate = "done, skipped"
        budget = budget_text(cell) or f"{cell.budget.get('fraction', 1.0):g} of paper"
        lines.append(f"{cell.cell_id:<12}  {cell.dataset[:14]:<14} {(cell.teacher + '->' + cell.student)[:26]:<26} "
                     f"{cell.label[:14]:<14} {cell.seed:>4}  {budget[:18]:<18} {row:<7} {teacher[:34]:<34} "
                     f"{student_state(cell, teacher, options)[:12]:<12} {estimate}")
    to_train = sum(1 for t in teachers.values() if t.startswith("to train"))
    summary = (f"{len(cells)} cells: {len(cells) - len(todo)} done, {len(todo)} to run; {len(teachers)} teacher(s), "
               f"{to_train} to train; estimated distillation time of the cells to run: ~{total:.0f} s"
               + (f" + {unknown} cell(s) without an estimate" if unknown else "")
               + (" (teacher training, latency timing and evaluation not included)" if todo else ""))
    return "\n".join(lines + ["", summary, f"dry run: nothing was run or written (results folder {options.out})"])
