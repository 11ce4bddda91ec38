"""The ``bench`` command line."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from bench.config import ConfigError


class BenchError(click.ClickException):
    """A user-facing error: printed as one clear line, exit status 2."""

    exit_code = 2


def _fail_cleanly(fn):
    """Turn the harness's expected errors into one-line messages instead of tracebacks."""
    import functools

    from bench.data import DatasetMissingError
    from bench.method import PluginError
    from bench.store import StoreLockedError
    from bench.teachers import CheckpointError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, PluginError, DatasetMissingError, StoreLockedError, CheckpointError) as exc:
            raise BenchError(str(exc)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """dfkd-bench: a benchmark harness for data-free and few-sample knowledge distillation.

    \b
    Typical use:
      bench run --grid quick              # Fashion-MNIST, every method, 2 seeds (<= 30 min on 2 CPU cores)
      bench report results/quick          # the accuracy-vs-latency report
      bench list methods                  # what can be run
      bench run --grid examples/my_grid.yaml --plugin examples/my_method.py
    """


def _common_paths(fn):
    fn = click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), envvar="DFKD_DATA_ROOT",
                      help="Folder where official dataset files are looked up (env DFKD_DATA_ROOT; "
                           "default ~/.cache/dfkd-bench/data).")(fn)
    fn = click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="DFKD_CACHE_DIR",
                      help="Teacher and student cache (env DFKD_CACHE_DIR; default ~/.cache/dfkd-bench).")(fn)
    fn = click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")(fn)
    return fn


@main.command()
@click.option("--grid", "grid_name", default="quick", show_default=True,
              help="A built-in grid (smoke, quick, full, ...; see `bench list grids`) or a path to a grid YAML.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Results folder [default: results/<grid name>].")
@click.option("--plugin", "plugins", multiple=True,
              help="A Python file or module defining extra methods (repeatable). Only code you name is run.")
@click.option("--force", is_flag=True, help="Re-run every cell, even finished ones.")
@click.option("--rerun-failed", is_flag=True, help="Re-run cells recorded as failed.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs stay quiet).")
@click.option("--report/--no-report", default=True, show_default=True, help="Render the report when the grid finishes.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: cells on this machine (one after another, or --jobs at once); ray: cells as Ray tasks "
                   "(pip install 'dfkd-bench[ray]').")
@click.option("--jobs", type=int, default=None,
              help="Local only: cells run at once, each in its own process with cores // jobs torch threads "
                   "[default: the grid's `jobs`, else 1].")
@click.option("--address", default=None,
              help="Ray only: 'auto' or a ray:// address to join a running cluster [default: start a private local instance].")
@click.option("--num-cpus", type=int, default=None, help="Ray only: CPUs of the private local instance [default: all].")
@click.option("--cpus-per-cell", type=float, default=1.0, show_default=True, help="Ray only: CPUs each cell task reserves.")
@click.option("--gpus-per-cell", type=float, default=0.0, show_default=True, help="Ray only: GPUs each cell task reserves.")
@click.option("--retries", type=int, default=1, show_default=True,
              help="Ray only: re-runs of a cell whose worker died before it is recorded as failed.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Override a method field (lr=0.01, for every entry that has it), a cell setting (budget=0.1, "
                   "budget.seconds=60, amp=true, validation=0, latency_threads=1), a data option (image_size=48, "
                   "augment=crop_flip, mean=[...] std=[...]) or teacher_recipe.<field>; values are YAML; repeatable.")
@click.option("--seeds", default=None, help="Comma-separated seeds replacing the grid's, e.g. 0,1,2.")
@click.option("--budget", "budget_text", default=None,
              help="Budget of every cell: a fraction of the paper budget (0.5) or caps (seconds=60, teacher_queries=N, "
                   "student_steps=N, fraction=F; comma-separated).")
@click.option("--only", default=None, help="Run only these method entries (comma-separated labels, e.g. kd,dafl).")
@click.option("--dry-run", is_flag=True,
              help="List the cells, what is cached (teachers, pruned students, finished rows) and an estimate of their "
                   "cost from earlier rows; runs nothing, writes nothing.")
@_common_paths
@_fail_cleanly
def run(grid_name, out, plugins, force, rerun_failed, no_progress, report, executor, jobs, address, num_cpus,
        cpus_per_cell, gpus_per_cell, retries, assignments, seeds, budget_text, only, dry_run, device, data_root,
        cache_dir):
    """Run a grid of (dataset x teacher/student pair x method x seed) cells.

    Writes one row per cell to OUT/runs.csv as cells finish, and the report to OUT/report/. Re-running the
    same command resumes: finished cells are skipped, and a change to any hyperparameter makes a new cell.

    \b
    Examples:
      bench run --grid smoke                       # seconds: digits, tiny models, every method
      bench run --grid quick --device auto         # Fashion-MNIST, <= 30 min on 2 CPU cores
      bench run --grid quick --dry-run             # the cells, what is cached, estimated seconds
      bench run --grid quick --only dafl --seeds 0,1,2 --budget seconds=60
      bench run --grid smoke --set lr=0.01 --set budget.seconds=5 --out results/smoke-lr
      bench run --grid my_grid.yaml --out results/mine --rerun-failed
      bench run --grid quick --jobs 2                # two cells at once, one thread each (2 cores)
      bench run --grid examples/my_grid.yaml --plugin examples/my_method.py
      bench run --grid full --executor ray --address auto --gpus-per-cell 1   # on a Ray cluster
    """
    import dataclasses
    import os

    from bench import overrides
    from bench.grid import load_grid
    from bench.method import load_plugin
    from bench.runner import Runner, RunOptions, resolve_device, summary_table
    from bench.store import ResultsStore

    for plugin in plugins:
        load_plugin(plugin)
    grid = load_grid(grid_name)
    if getattr(grid, "task", "classification") == "translation":
        unsupported = [name for name, given in (("--set", assignments), ("--budget", budget_text), ("--jobs", jobs),
                                                ("--executor ray", executor == "ray")) if given]
        if unsupported:
            raise BenchError(f"{', '.join(unsupported)}: not supported by a translation grid ({grid_name}); it takes "
                             f"--out, --seeds, --only, --force, --rerun-failed, --dry-run and --report")
        _run_translation(grid, out, only, seeds, force, rerun_failed, report, dry_run, data_root, cache_dir)
        return
    if only:
        grid = overrides.only(grid, [x.strip() for x in only.split(",") if x.strip()])
    if seeds:
        grid = dataclasses.replace(grid, seeds=overrides.parse_seeds(seeds))
    pairs = overrides.parse_assignments(assignments)
    if budget_text:
        pairs.append(("budget", overrides.parse_budget(budget_text)))
    grid = overrides.apply(grid, pairs)
    if jobs is not None:
        if jobs < 1:
            raise BenchError(f"--jobs must be >= 1, got {jobs}")
        grid = dataclasses.replace(grid, jobs=jobs)
    options = RunOptions(out=out or Path("results") / grid.name, device=resolve_device(device), data_root=data_root,
                         cache_dir=cache_dir, force=force, rerun_failed=rerun_failed, progress=not no_progress)
    if grid.latency_min_run_time is not None and not os.environ.get("DFKD_LATENCY_MIN_RUN_TIME"):
        options = dataclasses.replace(options, latency_min_run_time=grid.latency_min_run_time)
    if dry_run:
        from bench.dryrun import plan

        click.echo(f"grid {grid.name!r} -> {options.out}/runs.csv on {options.device}")
        click.echo(plan(grid, options))
        return
    click.echo(f"grid {grid.name!r} -> {options.out}/runs.csv on {options.device}")
    if executor == "ray":
        from bench.ray_executor import RayOptions, run_grid

        ray_options = RayOptions(address=address, num_cpus=num_cpus, cpus_per_cell=cpus_per_cell,
                                 gpus_per_cell=gpus_per_cell, retries=retries)
        summary = run_grid(grid, options, ray_options, device=device, plugins=list(plugins))
    elif grid.jobs > 1:
        from bench.pool import run_pool

        summary = run_pool(grid, options, grid.jobs, plugins=[*plugins, *grid.plugins])
    else:
        summary = Runner(options).run(grid)
    rows = list(ResultsStore(options.out).rows.values())
    click.echo(summary_table(rows))
    click.echo(f"{len(summary.done)} cells run ({summary.failed} failed), {summary.skipped} already done; "
               f"results in {options.out / 'runs.csv'}")
    if summary.interrupted:
        click.echo("interrupted: run the same command again to finish the missing cells", err=True)
        sys.exit(130)
    if report and rows:
        _render_report(options.out, None)


def _run_translation(grid, out, only, seeds, force, rerun_failed, report, dry_run, data_root, cache_dir) -> None:
    """`bench run` of a `task: translation` grid (bench.translation.task; docs/translation.md)."""
    import dataclasses

    from bench import overrides
    from bench.translation.task import expand, run_translation_grid

    if only:
        grid = dataclasses.replace(grid, methods=overrides.select_methods(
            grid.methods, [x.strip() for x in only.split(",") if x.strip()]))
    if seeds:
        grid = dataclasses.replace(grid, seeds=overrides.parse_seeds(seeds))
    out = out or Path("results") / grid.name
    click.echo(f"translation grid {grid.name!r} -> {out}/runs.csv on cpu")
    if dry_run:
        from bench.store import ResultsStore
        from bench.translation.task import COLUMNS

        store = ResultsStore(out, columns=COLUMNS) if (out / "runs.csv").is_file() else None
        for cell in expand(grid, grid.name, data_root, with_provenance=True):
            done = store.status(cell.cell_id) if store else None
            click.echo(f"{cell.cell_id}  {cell.domain_a}<->{cell.domain_b}  {cell.generator}  {cell.label}  "
                       f"ratio={cell.ratio}  seed={cell.seed}  {done or 'to run'}")
        return
    summary = run_translation_grid(grid, out, data_root=data_root, cache_dir=cache_dir, force=force,
                                   rerun_failed=rerun_failed, log=click.echo)
    click.echo(f"{len(summary.done)} cells run ({summary.failed} failed), {summary.skipped} already done; "
               f"results in {out / 'runs.csv'}")
    if report:
        _render_report(out, None)


def _render_report(results: Path, out: Path | None) -> None:
    """The report of ``results``, by default into ``results/report`` (beside its runs.csv, git-ignored)."""
    try:
        from bench import report as report_module
    except ImportError:  # the report module arrives with the report issue
        return
    target = report_module.render(results, out)
    click.echo(f"report: {target / 'index.html'}")


@main.command()
@click.option("--grid", "grid_name", required=True,
              help="A grid with a tune: block (the development task), e.g. examples/studies/tune_grey32.yaml.")
@click.option("--trials", type=int, default=None, help="Trials per method [default: the tune block's `trials`].")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="Trials at once, each cell in its own process with cores // jobs torch threads.")
@click.option("--only", default=None, help="Tune only these method entries (comma-separated labels).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Results folder of the trials' cells and the study [default: results/tune-<grid name>].")
@click.option("--storage", default=None,
              help="Optuna storage: an SQLAlchemy URL several machines can share [default: sqlite in OUT/tune.db].")
@click.option("--tuned-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where the tuned presets go [default: the grid's tuned_file, else bench/tuned.yaml].")
@click.option("--plugin", "plugins", multiple=True, help="A Python file or module defining extra methods (repeatable).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@_common_paths
@_fail_cleanly
def tune(grid_name, trials, jobs, only, out, storage, tuned_file, plugins, no_progress, device, data_root, cache_dir):
    """Tune every method of a grid on its development task: the same search for each (docs/tuning.md).

    Each method entry with a search space (`bench list methods`) gets the same number of trials on the grid's
    tune: task, at its compute cap; the score is the mean final validation accuracy over the tune seeds (the
    test split is never read). Trial 0 is the paper's values. The chosen values, every trial and the code
    hash go to the tuned-presets file, which `preset: tuned` (or `oracle`) entries read. A killed tune
    resumes: run the same command again.

    \b
    Examples:
      bench tune --grid examples/studies/tune_grey32.yaml                  # 16 trials per method on MNIST
      bench tune --grid examples/studies/tune_grey32.yaml --only dafl,zskt --jobs 2
      bench tune --grid examples/studies/tune_oracle_fmnist.yaml           # the oracle: Fashion-MNIST itself
    """
    from bench import overrides
    from bench.grid import load_grid
    from bench.method import load_plugin
    from bench.runner import RunOptions, resolve_device
    from bench.tune import tune as run_tune

    for plugin in plugins:
        load_plugin(plugin)
    grid = load_grid(grid_name)
    if getattr(grid, "task", "classification") != "classification":
        raise BenchError(f"{grid_name}: bench tune tunes classification grids")
    entries = grid.methods
    if only:
        entries = overrides.select_methods(grid.methods, [x.strip() for x in only.split(",") if x.strip()])
    options = RunOptions(out=out or Path("results") / f"tune-{grid.name}", device=resolve_device(device),
                         data_root=data_root, cache_dir=cache_dir, progress=not no_progress)
    click.echo(f"tuning grid {grid.name!r}: trials in {options.out} on {options.device}")
    try:
        records = run_tune(grid, options, source=grid_name, entries=entries, trials=trials, jobs=jobs, storage=storage,
                           tuned_file=tuned_file, plugins=list(plugins), echo=click.echo)
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to resume (finished trials are kept)", err=True)
        sys.exit(130)
    click.echo(f"{len(records)} method(s) tuned")


@main.command("list")
@click.argument("what", type=click.Choice(["methods", "models", "datasets", "grids"]))
@click.option("--plugin", "plugins", multiple=True, help="Also list methods from this plugin file/module.")
@_fail_cleanly
def list_(what, plugins):
    """List registered methods, models, datasets or built-in grids.

    \b
    Examples:
      bench list methods
      bench list methods --plugin examples/my_method.py
      bench list grids
    """
    if what == "methods":
        from bench.method import list_methods, load_plugin

        for plugin in plugins:
            load_plugin(plugin)
        from bench.search_space import describe

        for name, cls in list_methods().items():
            doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
            click.echo(f"{name:<16} data={cls.data_access.value:<5} teacher={cls.teacher_access.value:<10} "
                       f"{doc[0] if doc else ''}")
            space = describe(cls.search_space) if cls.search_space else "(no search space: nothing to tune)"
            click.echo("\n".join(f"{'':<18}{line}" for line in (["search space:"] + space.splitlines())))
    elif what == "models":
        from bench.models import list_models, model_card

        click.echo(f"{'model':<16} {'params':>10} {'MACs':>14} {'BN':<3}  (at 1x32x32, 10 classes)")
        for name in list_models():
            card = model_card(name)
            click.echo(f"{name:<16} {card.params:>10,} {card.macs:>14,} {'yes' if card.batch_norm else 'no':<3}  "
                       f"{card.summary}")
        click.echo("timm:<name>, torchvision:<name>: third-party architectures (see bench/models.py)")
    elif what == "datasets":
        from bench.data import list_datasets

        click.echo("\n".join(list_datasets()))
    else:
        from bench.grid import builtin_grids_dir, list_grids

        import yaml

        for name in list_grids():
            raw = yaml.safe_load((builtin_grids_dir() / f"{name}.yaml").read_text())
            click.echo(f"{name:<12} {raw.get('description', '')}")


@main.group()
def teachers():
    """Train or inspect cached teachers.

    \b
    Examples:
      bench teachers list
      bench teachers train --dataset fashion_mnist --arch lenet5
    """


@teachers.command("list")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="DFKD_CACHE_DIR")
def teachers_list(cache_dir):
    """List cached teachers with their test accuracy."""
    from bench.teachers import list_cached, resolve_cache_dir

    rows = list_cached(cache_dir)
    if not rows:
        click.echo(f"no cached teachers in {resolve_cache_dir(cache_dir) / 'teachers'}")
    for r in rows:
        val = f" val={r['val_accuracy']:.2f}%" if r.get("val_accuracy") is not None else ""
        click.echo(f"{r['key']}  {r['dataset']:<14} {r['arch']:<12} seed={r['seed']} test={r['accuracy']:.2f}%{val} "
                   f"({r['train_seconds']} s on {r['device']}, {r['created']})")


@teachers.command("train")
@click.option("--dataset", required=True, help="Dataset name (see `bench list datasets`).")
@click.option("--arch", required=True, help="Model name (see `bench list models`).")
@click.option("--seed", default=0, show_default=True)
@_common_paths
@_fail_cleanly
def teachers_train(dataset, arch, seed, device, data_root, cache_dir):
    """Train (or load from the cache) the teacher for DATASET x ARCH with its documented recipe."""
    from bench.data import check_dataset_name, task_data
    from bench.grid import check_name
    from bench.models import list_models
    from bench.runner import resolve_device
    from bench.teachers import get_teacher, recipe_for

    check_dataset_name(dataset, "--dataset")
    check_name(arch, list_models(), "model", "--arch", ("timm:", "torchvision:"))
    dev = resolve_device(device)
    data = task_data(dataset, root=data_root, device=dev)  # the validation split is held out, as in bench run
    teacher = get_teacher(dataset, arch, data, dev, seed=seed, recipe=recipe_for(dataset), cache_dir=cache_dir,
                          log=lambda it, losses: click.echo(f"  it {it}: loss {float(losses['loss'].detach()):.4f}") if it % 500 == 0 else None)
    val = teacher.meta.get("val_accuracy")
    click.echo(f"teacher {arch} on {dataset}: {teacher.accuracy:.2f}% test accuracy"
               + (f", {val:.2f}% validation accuracy" if val is not None else "") + f" (key {teacher.key})")


@main.command()
@click.argument("cell_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@_common_paths
@_fail_cleanly
def evaluate(cell_dir, device, data_root, cache_dir):
    """Rebuild the student a cell saved and print its test (and validation) accuracy.

    CELL_DIR is a cell's folder, results/<grid>/cells/<cell_id>: its student.json says how to rebuild the
    architecture (a zoo model, or a pruned teacher replayed from its pruning history), student.pt holds
    the weights (loaded with weights_only=True). The accuracy equals the row's student_acc.

    \b
    Examples:
      bench evaluate results/quick/cells/1f2e3d4c5b6a
    """
    import json

    from bench.data import task_data
    from bench.metrics import evaluate_accuracy
    from bench.runner import load_saved_student, resolve_device
    from bench.store import ResultsStore
    from bench.transforms import to_float

    config_path = cell_dir / "config.json"
    if not config_path.is_file():
        raise BenchError(f"{cell_dir} is not a cell folder of `bench run` (no config.json); give "
                         f"results/<grid>/cells/<cell_id>")
    config = json.loads(config_path.read_text())
    model = load_saved_student(cell_dir)
    if model is None:
        raise BenchError(f"{cell_dir} holds no saved student (student.pt + student.json): the cell failed, or was run "
                         f"by a version of dfkd-bench that did not save students; re-run it with `bench run --force`")
    dev = resolve_device(device)
    data = task_data(config["dataset"], root=data_root, device=dev, validation=config.get("validation"),
                     options=config.get("data_options"))  # the image size and normalisation the cell ran at
    model = model.to(dev)
    accuracy = lambda x, y: evaluate_accuracy(model, x, y, lambda xb: to_float(xb, data.info))  # noqa: E731
    test = accuracy(data.test_x, data.test_y)
    val = accuracy(data.val_x, data.val_y) if data.val_x is not None and data.val_x.shape[0] else None
    row = ResultsStore(cell_dir.parent.parent).rows.get(cell_dir.name, {}) if (cell_dir.parent.parent / "runs.csv").is_file() else {}
    click.echo(f"cell {cell_dir.name}: {config['method']} on {config['dataset']}, {config['teacher']} -> {config['student']}, "
               f"seed {config['seed']}")
    click.echo(f"test accuracy {test:.3f}%" + (f", validation accuracy {val:.3f}%" if val is not None else "")
               + (f" (runs.csv: {row['student_acc']}%)" if row.get("student_acc") else ""))


@main.command()
@click.argument("results_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder [default: RESULTS_DIR/report].")
@click.option("--latency-backend", type=click.Choice(["eager", "onnxruntime"]), default=None,
              help="Whose latencies the trade-off figure and the decision tables use: eager PyTorch or ONNX Runtime's "
                   "CPU provider [default: onnxruntime where runs.csv has its figures, else eager].")
def report(results_dir, out, latency_backend):
    """Render the accuracy-vs-latency report of a results folder (RESULTS_DIR/runs.csv).

    Writes OUT/index.html (self-contained), OUT/report.md, OUT/summary.csv, best_at_budget.csv,
    latency_budget.csv and every plot as OUT/plots/*.png and *.svg: per dataset first the best student and
    method under each latency budget for each user (data-free, few samples, full data, API teacher), then
    accuracy vs latency with one panel and Pareto front per user, the pair x
    method table (test and validation accuracy, budget/cap, steps, queries, overrides), vs MACs, params,
    real data and seconds; per pair validation accuracy vs teacher queries and vs seconds with the best
    method at each budget; training curves with generator-collapse flags; sample grids; failed cells;
    the environment.

    \b
    Examples:
      bench report results/quick                   # -> results/quick/report/index.html
      bench report results/mine --out /tmp/mine-report
      bench report results/quick --latency-backend eager   # the trade-off on eager-PyTorch latencies
    """
    from bench.report import ReportError, render

    try:
        target = render(results_dir, out, latency_backend=latency_backend)
    except ReportError as exc:
        raise BenchError(str(exc)) from None
    click.echo(f"report: {target / 'index.html'}")


@main.command()
@click.option("--dataset", required=True, help="A dataset name (bench list datasets) or imagefolder:<path>.")
@click.option("--teacher", "teacher_arch", required=True,
              help="The teacher's architecture: a zoo name, timm:<name> or torchvision:<name>.")
@click.option("--teacher-checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Your trained teacher: a state dict (torch.save(model.state_dict())) from this harness, timm, "
                   "torchvision or DataParallel ('module.'); loaded with weights_only=True. Default: train and cache one.")
@click.option("--teacher-pretrained", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Local weights (e.g. a timm model's ImageNet state dict) the harness starts training the teacher from; "
                   "the classifier is re-initialised for the dataset's classes.")
@click.option("--student", required=True, help="The student: a model name, timm:<name>, torchvision:<name> or pruned:l1:<ratio>.")
@click.option("--method", required=True, help="A method name (bench list methods).")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="A method field (lr=0.01), a cell setting (budget=0.1, budget.seconds=60, amp=true, validation=0, "
                   "latency_threads=1), a data option (image_size=48, augment=crop_flip, mean=[...] std=[...]) or "
                   "teacher_recipe.<field>; values are YAML; repeatable.")
@click.option("--seed", default=0, show_default=True, help="The cell's seed.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("results") / "distill",
              show_default=True, help="Results folder (runs.csv, cells/<cell_id>/student.pt); shared by distill calls.")
@click.option("--plugin", "plugins", multiple=True, help="A Python file or module defining extra methods (repeatable).")
@click.option("--force", is_flag=True, help="Run the cell again even if it is finished.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@_common_paths
@_fail_cleanly
def distill(dataset, teacher_arch, teacher_checkpoint, teacher_pretrained, student, method, assignments, seed, out,
            plugins, force, no_progress, device, data_root, cache_dir):
    """Distil one teacher into one student with one method: one cell, as `bench run` runs it.

    Same row (OUT/runs.csv), same artefacts (OUT/cells/<cell_id>/: student.pt + student.json, curve,
    samples), same resume: calling it again with the same arguments finds the finished cell and runs
    nothing (a failed cell is run again). The budget is the method's paper budget unless --set
    budget=... says otherwise.

    \b
    Examples:
      bench distill --dataset digits --teacher lenet5 --student lenet5_half --method kd --set budget=0.05
      bench distill --dataset imagefolder:data/flowers --set image_size=48 \\
          --teacher timm:resnet18 --teacher-checkpoint resnet18_flowers.pth \\
          --student lenet5_half --method dafl --set "budget.seconds=600 mean=[0.485,0.456,0.406] std=[0.229,0.224,0.225]"
      bench evaluate results/distill/cells/<cell_id>      # rebuild the student, print its accuracy
      bench export results/distill/cells/<cell_id> --format torchscript
    """
    from bench import overrides
    from bench.method import load_plugin
    from bench.runner import Runner, RunOptions, resolve_device
    from bench.store import ResultsStore

    for plugin in plugins:
        load_plugin(plugin)
    from bench.teachers import load_state_dict

    for flag, path in (("--teacher-checkpoint", teacher_checkpoint), ("--teacher-pretrained", teacher_pretrained)):
        if path is not None and not path.is_file():
            raise BenchError(f"{flag} {str(path)!r} does not exist")
        if path is not None:
            load_state_dict(path)  # a pickled module or a damaged file: one clear error before any work
    grid = overrides.single_cell_grid(dataset, teacher_arch, student, method, seed=seed,
                                      checkpoint=str(teacher_checkpoint.resolve()) if teacher_checkpoint else None,
                                      pretrained=str(teacher_pretrained.resolve()) if teacher_pretrained else None,
                                      assignments=overrides.parse_assignments(assignments))
    options = RunOptions(out=out, device=resolve_device(device), data_root=data_root, cache_dir=cache_dir, force=force,
                         rerun_failed=True, progress=not no_progress, keep_earlier_cells=True)
    summary = Runner(options).run(grid)
    if summary.interrupted:
        click.echo("interrupted: run the same command again to resume the cell", err=True)
        sys.exit(130)
    row = ResultsStore(out).rows[summary.cell_ids[0]]
    cell_dir = out / "cells" / row["cell_id"]
    state = "ran" if summary.done else "already finished: nothing re-run (--force runs it again)"
    click.echo(f"cell {row['cell_id']} ({state}): {row['method']} on {row['dataset']}, {row['teacher']} -> {row['student']}, "
               f"seed {row['seed']}, budget {row['compute_cap'] or row['budget']}")
    if row["status"] != "ok":
        raise BenchError(f"the cell failed: {row['error']} (traceback: {cell_dir / 'error.txt'})")
    val = f", validation {row['student_acc_val']}%" if row.get("student_acc_val") else ""
    click.echo(f"student accuracy {row['student_acc']}% (test, final){val}; teacher {float(row['teacher_acc']):.2f}%; "
               f"{row['params']} params, {row['distill_seconds']} s, {row['teacher_queries']} teacher queries")
    if row.get("stopped_by") and str(row.get("student_steps")) == "0":
        click.echo(f"warning: the {row['stopped_by']} cap ended the cell before the student's first step (the method "
                   "spent it all on synthesis): the student is its initialisation. Raise the budget.", err=True)
    click.echo(f"student: {cell_dir / 'student.pt'} (architecture: {cell_dir / 'student.json'}); row: {out / 'runs.csv'}")
    click.echo(f"next: bench evaluate {cell_dir} | bench export {cell_dir} --format torchscript")


@main.command()
@click.option("--results", "results_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="A results folder (with runs.csv) to take our numbers from; repeatable [default: every results/*/].")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), envvar="DFKD_DATA_ROOT",
              help="Where official dataset files are looked up, to say which are missing (env DFKD_DATA_ROOT).")
@click.option("--plugin", "plugins", multiple=True, help="Also count methods from this plugin file/module as registered.")
@_fail_cleanly
def reproduce(results_dirs, data_root, plugins):
    """The papers' tables (DAFL, the DataFree library, ...) with the paper's number beside ours.

    Paper numbers and their sources are in bench/papers.yaml. Ours: final accuracy mean +- std over the
    seeds found (and best-on-test where the paper's protocol was the best epoch); a row without results
    says "not run" and what is missing: the method, the dataset's files and where to put them, or the
    command that runs the cell.

    \b
    Examples:
      bench reproduce                                  # every results/*/ folder
      bench reproduce --results results/full --results results/distill
    """
    from bench.method import load_plugin
    from bench.reproduce import default_results, load_papers, load_rows, render

    for plugin in plugins:
        load_plugin(plugin)
    folders = list(results_dirs) or default_results()
    click.echo(render(load_papers(), load_rows(folders), folders, data_root))


@main.command()
@click.argument("cell_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["torchscript", "onnx"]), default="torchscript", show_default=True,
              help="torchscript (needs nothing more) or onnx (needs: pip install onnx onnxruntime).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file [default: CELL_DIR/student.ts or student.onnx].")
@_fail_cleanly
def export(cell_dir, fmt, out):
    """Export a cell's student as a deployable file and check it gives the student's logits.

    Writes the file and FILE.json (input shape, classes, the normalisation to apply to images); prints
    the largest absolute logit difference between the export and the student on a batch of inputs,
    and fails if it exceeds the tolerance.

    \b
    Examples:
      bench export results/distill/cells/1f2e3d4c5b6a                 # -> .../student.ts
      bench export results/quick/cells/1f2e3d4c5b6a --format onnx --out student.onnx
    """
    from bench.export import export_student

    result = export_student(cell_dir, fmt, out)
    click.echo(f"{fmt}: {result.path} (+ {result.path.name}.json: input {result.meta['input_shape']}, "
               f"mean {result.meta['mean']}, std {result.meta['std']})")
    click.echo(f"check against the student: max abs logit diff {result.max_abs_diff:.3g} "
               f"(tolerance {result.tolerance:.3g}) -> {'ok' if result.ok else 'MISMATCH'}")
    if not result.ok:
        raise BenchError(f"the {fmt} export does not reproduce the student's logits (max abs diff {result.max_abs_diff:.3g} "
                         f"> {result.tolerance:.3g}); please report this with the cell's student.json")


if __name__ == "__main__":
    main()
