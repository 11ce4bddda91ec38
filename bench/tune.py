"""``bench tune``: the same search for every method, on a development task (docs/tuning.md).

A grid's ``tune:`` block names the development task (:class:`TuneSpec`); every method entry of the grid
with a search space (:mod:`bench.search_space`) gets ``trials`` trials there, at the block's compute cap.

- **A trial** is one set of values for the method's space, run as ordinary cells (the task's dataset,
  teacher -> student pair and cap, one cell per tuning seed) into the tune's results folder: the cells
  have ids, resume from their in-cell checkpoints, and fail alone, like any grid's. Its score is the
  mean *final validation* accuracy over the seeds; a trial whose cell failed (a diverging learning
  rate) is recorded without a score. The test split is never read by the search.
- **Trial 0 is the paper's values**; the others are drawn by the sampler: random search by default
  (DomainBed's), pre-drawn from ``sampler_seed`` so that trial k has the same values on every machine
  and after every resume; ``tpe`` is Optuna's TPE.
- **The study** lives in Optuna's RDB storage: a SQLite file in the results folder by default, or any
  SQLAlchemy URL (``--storage``) that several machines share. A killed tune resumes: finished trials are
  kept, a trial that was running in a process that is gone is run again (its finished cells are not).
  The study's name holds the method's code hash, so changing the code starts a new study.
- **K trials at once** (``--jobs K``): their cells run in K worker processes of cores // K threads each
  (:mod:`bench.pool`'s workers).
- **The result** goes to the tuned-presets file (default ``bench/tuned.yaml``; :mod:`bench.tracks`):
  the chosen values, every trial's values and score, the task and cap, the trial count, the code hash,
  the date and the CPU-seconds the trials took.
"""
from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import multiprocessing
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from bench import tracks
from bench.config import ConfigError, from_mapping, to_dict
from bench.grid import Grid, MethodEntry, PairSpec, Provenance, as_budget, expand
from bench.method import get_method
from bench.runner import RunOptions, Runner, base_row
from bench.search_space import Space, distributions
from bench.store import ResultsStore

SAMPLERS = ("random", "tpe")
HEADER = """\
# Tuned presets: written by `bench tune` (bench/tune.py; docs/tuning.md), read by grid entries with
# `preset: tuned` (key: the data family, bench.tracks.FAMILIES: grey32 for the grey 32-px sets) or `preset: oracle`
# (key: oracle:<dataset>). Each record holds the chosen values, every trial's values and score, the
# development task and its cap, the trial count, the method's code hash and the date.
"""


@dataclass
class TuneSpec:
    """A grid's ``tune:`` block: the development task and the search."""

    dataset: str
    teacher: str
    student: str
    budget: Any  # a fraction or caps, as a grid's budget (the cap every trial runs at: the evaluation's cap)
    seeds: list[int] = field(default_factory=lambda: [0])
    trials: int = 16
    sampler: str = "random"  # random (DomainBed's) | tpe
    sampler_seed: int = 0
    track: str = "tuned"  # tuned: a development task; oracle: the scored dataset itself (an upper bound)
    validation: int | None = None  # validation images of the task (default: the dataset's)

    def validate(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"trials must be >= 1, got {self.trials}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.track not in ("tuned", "oracle"):
            raise ConfigError(f"track must be tuned or oracle, got {self.track!r}")
        if not self.seeds:
            raise ConfigError("seeds must not be empty")
        if self.validation == 0:
            raise ConfigError("validation: 0 leaves no validation split to score trials on; give a number of images")


def spec_of(grid: Grid, where: str) -> TuneSpec:
    if not grid.tune:
        raise ConfigError(f"{where}: the grid has no tune: block (dataset, teacher, student, budget, seeds, trials, "
                          f"sampler); see examples/studies/tune_grey32.yaml")
    spec = from_mapping(TuneSpec, grid.tune, f"{where}: tune")
    _budget(spec, f"{where}: tune.budget")  # refused now, not after the first trial
    return spec


def _budget(spec: TuneSpec, where: str = "tune.budget"):
    from bench.monitor import Budget

    if isinstance(spec.budget, dict):
        return from_mapping(Budget, spec.budget, where)
    return as_budget(spec.budget, where)


def paper_trial(entry: MethodEntry, spec: TuneSpec) -> dict[str, Any]:
    """The values trial 0 runs: the method's paper values on the task (with the entry's params)."""
    method = get_method(entry.name)
    _, config = method.resolve_config(spec.dataset, None, entry.params)
    return {name: getattr(config, name) for name in method.search_space}


def plan_trials(space: Space, first: dict[str, Any], n: int, seed: int) -> list[dict[str, Any]]:
    """Random search's ``n`` trials: ``first`` (the paper's values), then draws from ``seed``."""
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    dists = distributions(space)
    return [dict(first)] + [study.ask(dists).params for _ in range(n - 1)]


def study_name(entry: MethodEntry, spec: TuneSpec, code_hash: str) -> str:
    label = entry.label or entry.name
    return (f"{label}|{spec.track}|{spec.dataset}|{spec.teacher}->{spec.student}|"
            f"{tracks.cap_text(to_dict(trial_budget(spec, entry)))}"
            f"|seeds={','.join(map(str, spec.seeds))}|{spec.sampler}:{spec.sampler_seed}|code={code_hash}")


def trial_budget(spec: TuneSpec, entry: MethodEntry):
    """The cap a trial runs at: the entry's own budget (its evaluation's, e.g. KD's converged epochs), else the block's."""
    return as_budget(entry.budget, f"methods: {entry.name}: budget") if entry.budget is not None else _budget(spec)


def trial_grid(grid: Grid, spec: TuneSpec, entry: MethodEntry, values: dict[str, Any], threads: int) -> Grid:
    """One trial as a grid: the task's dataset and pair, the entry with ``values``, its cap, the task's seeds."""
    return Grid(name=f"tune-{grid.name}", datasets=[spec.dataset], pairs=[PairSpec(spec.teacher, spec.student)],
                methods=[MethodEntry(name=entry.name, params={**entry.params, **values}, budget=trial_budget(spec, entry),
                                     label=entry.label, amp=entry.amp)],
                seeds=list(spec.seeds), teacher_seed=grid.teacher_seed,
                teacher_recipe={k: v for k, v in grid.teacher_recipe.items() if k == spec.dataset},
                dataset_options={k: v for k, v in grid.dataset_options.items() if k == spec.dataset},
                plugins=grid.plugins, amp=grid.amp, latency_threads=grid.latency_threads, validation=spec.validation,
                checkpoint_every=grid.checkpoint_every, threads=threads, teacher_outputs=grid.teacher_outputs,
                description=f"bench tune: {entry.label or entry.name} on {spec.dataset}")


class _InProcess:
    """The pool's interface, running each cell at once in this process (``--jobs 1``)."""

    def __init__(self, runner: Runner):
        self.runner = runner

    def submit(self, cell) -> futures.Future:
        future: futures.Future = futures.Future()
        try:
            future.set_result(self.runner.run_cell(cell))
        except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt included: the caller stops
            future.set_exception(exc)
        return future

    def shutdown(self) -> None:
        pass


class _Pool:
    """Cells in ``jobs`` worker processes (bench.pool's workers: spawn, their own thread count)."""

    def __init__(self, opts: RunOptions, jobs: int, threads: int, plugins: list[str]):
        from bench import pool

        self._run = pool._run_cell
        self.executor = futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=pool._init_worker, initargs=(opts, threads, plugins))

    def submit(self, cell) -> futures.Future:
        return self.executor.submit(self._run, cell)

    def shutdown(self) -> None:
        for process in list(getattr(self.executor, "_processes", {}).values()):
            process.terminate()
        self.executor.shutdown(wait=False, cancel_futures=True)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(trial) -> bool:
    """Whether a RUNNING trial's process (its ``owner``, host:pid, written at enqueue and at ask) is alive.
    A trial with no owner was asked by a process killed before it could write one; another machine's trial
    counts as alive."""
    host, _, pid = str(trial.user_attrs.get("owner", "")).rpartition(":")
    if not host or not pid.isdigit():
        return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except OSError:
        return False
    return True


@dataclass
class _Running:
    trial: Any
    cells: list
    rows: dict[str, dict[str, str]] = field(default_factory=dict)


def tune_entry(grid: Grid, spec: TuneSpec, entry: MethodEntry, *, opts: RunOptions, store: ResultsStore,
               storage: str, jobs: int, plugins: list[str], source: str, echo=print) -> dict[str, Any]:
    """Run the entry's missing trials and return its tuned record."""
    import optuna
    from optuna.trial import TrialState

    from bench import pool as pool_module
    from bench.provenance import method_source_hash

    method = get_method(entry.name)
    label = entry.label or entry.name
    space = method.search_space
    code = method_source_hash(method)
    dists = distributions(space)
    sampler = (optuna.samplers.TPESampler(seed=spec.sampler_seed) if spec.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=spec.sampler_seed))
    study = optuna.create_study(study_name=study_name(entry, spec, code), storage=storage, direction="maximize",
                                sampler=sampler, load_if_exists=True)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _alive(trial):  # its process was killed: run its values again (finished cells are kept)
            study.tell(trial.number, state=TrialState.FAIL)
    threads = grid.threads or max(1, (os.cpu_count() or 1) // jobs)
    provenance = Provenance(opts.device.type, opts.data_root)
    first = paper_trial(entry, spec)
    plan = plan_trials(space, first, spec.trials, spec.sampler_seed) if spec.sampler == "random" else None

    def finished():
        return [t for t in study.get_trials(deepcopy=False) if "outcome" in t.user_attrs
                and t.state in (TrialState.COMPLETE, TrialState.FAIL)]

    def running():  # this process's trials and those of other live processes (machines sharing the study)
        return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))

    def taken() -> list[dict[str, Any]]:  # the values of the trials finished and running now
        return [t.params for t in finished()] + [t.params for t in running()]

    def next_values() -> dict[str, Any] | None:
        taken_now = taken()
        if plan is not None:
            return next((dict(v) for v in plan if v not in taken_now), None)
        if len(taken_now) >= spec.trials:
            return None
        return dict(first) if not taken_now else {}  # {}: TPE draws

    driver = Runner(opts)
    executor = _InProcess(driver) if jobs == 1 else _Pool(opts, jobs, threads, plugins)
    in_flight: dict[int, _Running] = {}
    pending: dict[futures.Future, tuple[int, Any]] = {}
    try:
        while True:
            while len(in_flight) < jobs and len(finished()) + len(running()) < spec.trials:
                values = next_values()
                if values is None:
                    break
                if values:
                    study.enqueue_trial(values, user_attrs={"owner": _owner()}, skip_if_exists=False)
                before = taken()
                trial = study.ask(dists)  # pops the oldest waiting trial: a kill between enqueue and ask leaves one
                trial.set_user_attr("owner", _owner())
                if plan is not None and trial.params in before:  # that leftover's values already ran or run now
                    study.tell(trial, state=TrialState.FAIL)  # no "outcome": not a trial of the record
                    continue
                cells = expand(trial_grid(grid, spec, entry, trial.params, threads), provenance=provenance)
                run = in_flight[trial.number] = _Running(trial, cells)
                echo(f"  {label} trial {trial.number}: {_values_text(trial.params)}")
                if jobs > 1:
                    pool_module.prepare(driver, cells)  # teachers trained once, in this process
                for cell in cells:
                    if cell.cell_id in store.rows and store.rows[cell.cell_id].get("status") == "ok":
                        run.rows[cell.cell_id] = store.rows[cell.cell_id]  # finished before a kill: kept
                    else:
                        pending[executor.submit(cell)] = (trial.number, cell)
                _maybe_tell(study, run, echo, label)
                if len(run.rows) == len(cells):
                    in_flight.pop(trial.number)
            if not pending:
                if not in_flight:
                    break
                continue
            done, _ = futures.wait(list(pending), return_when=futures.FIRST_COMPLETED)
            for future in done:
                number, cell = pending.pop(future)
                try:
                    row = future.result()
                except futures.process.BrokenProcessPool as exc:
                    row = base_row(cell, opts.device)
                    row.update(status="failed", error=f"worker died: {exc}"[:500])
                row["tuning"] = f"trial {number} of {label}"
                store.put(row)
                run = in_flight[number]
                run.rows[cell.cell_id] = store.rows[cell.cell_id]
                if len(run.rows) == len(run.cells):
                    _maybe_tell(study, run, echo, label)
                    in_flight.pop(number)
    finally:
        executor.shutdown()
    return record_of(study, entry, spec, code, source, first)


def _values_text(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _maybe_tell(study, run: _Running, echo, label: str) -> None:
    from optuna.trial import TrialState

    if len(run.rows) < len(run.cells):
        return
    rows = [run.rows[c.cell_id] for c in run.cells]
    trial = run.trial
    trial.set_user_attr("cells", [c.cell_id for c in run.cells])
    trial.set_user_attr("distill_seconds", round(sum(float(r.get("distill_seconds") or 0) for r in rows), 3))
    trial.set_user_attr("cpu_seconds", round(sum(float(r.get("distill_seconds") or 0) * int(r.get("threads") or 1)
                                                 for r in rows), 3))
    trial.set_user_attr("teacher_queries", sum(int(float(r.get("teacher_queries") or 0)) for r in rows))
    failed = [r for r in rows if r.get("status") != "ok"]
    scores = [float(r["student_acc_val"]) for r in rows if r.get("status") == "ok" and r.get("student_acc_val") not in ("", None)]
    if failed or len(scores) < len(rows):
        why = failed[0].get("error", "") if failed else "no validation accuracy (validation: 0?)"
        trial.set_user_attr("outcome", f"cell failed: {why}"[:300])
        study.tell(trial, state=TrialState.FAIL)
        echo(f"  {label} trial {trial.number}: failed ({why[:120]})")
        return
    score = sum(scores) / len(scores)
    trial.set_user_attr("outcome", "scored")
    study.tell(trial, score)
    echo(f"  {label} trial {trial.number}: validation {score:.2f}")


def record_of(study, entry: MethodEntry, spec: TuneSpec, code: str, source: str, first: dict[str, Any]
              ) -> dict[str, Any]:
    """The tuned record of a finished study (see the module docstring)."""
    from optuna.trial import TrialState

    trials = sorted((t for t in study.get_trials(deepcopy=False) if "outcome" in t.user_attrs),
                    key=lambda t: t.number)[: spec.trials]
    scored = [t for t in trials if t.state == TrialState.COMPLETE]
    if not scored:
        raise ConfigError(f"bench tune: every trial of {entry.label or entry.name} failed; see its cells' error.txt")
    best = max(scored, key=lambda t: (t.value, -t.number))
    history = [{"trial": t.number, "values": _plain(t.params),
                "score": round(t.value, 3) if t.state == TrialState.COMPLETE else None,
                "outcome": t.user_attrs.get("outcome"), "cpu_seconds": t.user_attrs.get("cpu_seconds"),
                "teacher_queries": t.user_attrs.get("teacher_queries"), "cells": t.user_attrs.get("cells")}
               for t in trials]
    return {
        "values": _plain(best.params), "score": round(best.value, 3), "best_trial": best.number,
        "paper_score": next((h["score"] for h in history if h["values"] == _plain(first)), None),
        "task": {"dataset": spec.dataset, "teacher": spec.teacher, "student": spec.student,
                 "budget": to_dict(trial_budget(spec, entry)), "seeds": list(spec.seeds), "validation": spec.validation,
                 "objective": "mean final validation accuracy over the seeds"},
        "trials": len(trials), "sampler": spec.sampler, "sampler_seed": spec.sampler_seed, "track": spec.track,
        "grid": source, "method_entry": entry.label or entry.name, "code_hash": code,
        "date": time.strftime("%Y-%m-%d"),
        "cpu_seconds": round(sum(h["cpu_seconds"] or 0 for h in history), 1),
        "history": history,
    }


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, float) else v) for k, v in values.items()}


def write_record(path: Path, method: str, key: str, record: dict[str, Any]) -> None:
    """Put ``record`` under ``methods.<method>.<key>`` of the tuned-presets file, atomically."""
    path = Path(path)
    raw = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    methods = raw.setdefault("methods", {}) or {}
    raw["methods"] = methods
    methods.setdefault(method, {})[key] = record
    text = HEADER + yaml.safe_dump(raw, sort_keys=True, width=120)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def tune(grid: Grid, opts: RunOptions, *, source: str, entries: Iterable[MethodEntry], trials: int | None = None,
         jobs: int = 1, storage: str | None = None, tuned_file: Path | None = None, plugins: list[str] = (),
         echo=print) -> dict[str, dict[str, Any]]:
    """Tune every entry with a search space; returns ``{label: record}`` (also written to the tuned file).
    ``source`` is the grid as the user named it (the re-tune command in the record names it)."""
    spec = spec_of(grid, source)
    if trials is not None:
        spec = dataclasses.replace(spec, trials=trials)
    spec.validate()
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    opts.out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(opts.out / 'tune.db').resolve()}"
    target = Path(tuned_file) if tuned_file else (Path(grid.tuned_file) if grid.tuned_file else tracks.default_tuned_file())
    store = ResultsStore(opts.out).lock()
    records = {}
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        for entry in entries:
            method = get_method(entry.name)
            label = entry.label or entry.name
            if not method.search_space:
                echo(f"{label}: no search space declared; its paper values stand (nothing to tune)")
                continue
            echo(f"{label}: {spec.trials} trials on {spec.dataset} ({spec.teacher} -> {spec.student}, "
                 f"{trial_budget(spec, entry).describe()}, seeds {spec.seeds}, {spec.sampler} search)")
            record = tune_entry(grid, spec, entry, opts=opts, store=store, storage=storage, jobs=jobs,
                                plugins=list(plugins) + list(grid.plugins), source=source, echo=echo)
            key = tracks.record_key(spec.dataset, spec.track)
            write_record(target, method.name, key, record)
            records[label] = record
            echo(f"{label}: best trial {record['best_trial']} validation {record['score']:.2f} "
                 f"(paper values: {record['paper_score']}) -> {target} [{method.name}.{key}]")
    finally:
        store.unlock()
    return records
