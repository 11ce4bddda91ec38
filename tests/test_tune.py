"""bench tune and the tracks (docs/tuning.md): real tiny searches on digits, under student-step caps."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench.config import ConfigError
from bench.grid import expand, load_grid
from bench.method import DataAccess, Method, MethodConfig, register
from bench.runner import RunOptions
from bench.search_space import Choice, Float, Int, check_space

REPO = Path(__file__).resolve().parents[1]

TINY = """
name: tune_tiny
datasets: [digits]
pairs: [{{teacher: lenet5, student: lenet5_half}}]
teacher_recipe: {{digits: {{epochs: 15}}}}
tuned_file: tuned.yaml
tune: {{dataset: digits, teacher: lenet5, student: lenet5_half, budget: {{student_steps: {steps}}}, seeds: [0],
        trials: {trials}}}
methods: {methods}
checkpoint_every: 0
"""


def _grid(tmp_path: Path, methods="[kd_noise, kd]", trials=3, steps=20) -> Path:
    path = tmp_path / "tune_tiny.yaml"
    path.write_text(TINY.format(methods=methods, trials=trials, steps=steps))
    return path


def _tune(grid_path: Path, out: Path, cache_dir: Path, **kw):
    import torch

    from bench.tune import tune

    grid = load_grid(str(grid_path))
    opts = RunOptions(out=out, device=torch.device("cpu"), cache_dir=cache_dir, progress=False)
    return tune(grid, opts, source=str(grid_path), entries=grid.methods, echo=lambda *_: None, **kw)


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "runs.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_tiny_tune_writes_the_tuned_file_and_its_trials_and_a_rerun_runs_nothing_new(tmp_path, cache_dir, one_thread):
    grid = _grid(tmp_path)
    out = tmp_path / "out"
    records = _tune(grid, out, cache_dir)
    assert set(records) == {"kd_noise", "kd"}
    tuned = yaml.safe_load((tmp_path / "tuned.yaml").read_text())["methods"]
    from bench.method import get_method
    from bench.provenance import method_source_hash

    for name in ("kd_noise", "kd"):
        (key, record), = tuned[name].items()
        assert key == "grey32"  # the data family
        assert record["trials"] == 3 and len(record["history"]) == 3
        assert record["code_hash"] == method_source_hash(get_method(name))
        assert record["task"]["dataset"] == "digits" and record["task"]["budget"]["student_steps"] == 20
        assert record["date"] == time.strftime("%Y-%m-%d") and record["grid"] == str(grid)
        scores = [h["score"] for h in record["history"]]
        assert all(0 <= s <= 100 for s in scores) and record["score"] == max(scores)
        assert record["values"] == record["history"][record["best_trial"]]["values"]
        assert set(record["values"]) == set(get_method(name).search_space)
        # trial 0 is the paper's values
        _, paper = get_method(name).resolve_config("digits")
        assert record["history"][0]["values"] == {k: getattr(paper, k) for k in record["values"]}
        assert record["cpu_seconds"] > 0
    rows = _rows(out)
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    # the same command again: every trial is finished, no cell runs
    again = _tune(grid, out, cache_dir)
    assert _rows(out) == rows
    assert {k: v["history"] for k, v in again.items()} == {k: v["history"] for k, v in records.items()}


def test_random_search_draws_the_same_trials_everywhere():
    from bench.tune import plan_trials

    space = {"lr": Float(1e-4, 1e-1, log=True), "batch_size": Choice(64, 128), "steps": Int(1, 10)}
    first = {"lr": 1e-3, "batch_size": 64, "steps": 5}
    a, b = plan_trials(space, first, 6, seed=0), plan_trials(space, first, 6, seed=0)
    assert a == b and a[0] == first and len({str(t) for t in a}) == 6
    assert plan_trials(space, first, 6, seed=1)[1:] != a[1:]


def test_a_tune_killed_with_sigkill_mid_trial_resumes_and_keeps_every_finished_trial(tmp_path, cache_dir):
    grid = _grid(tmp_path, methods="[kd]", trials=4, steps=400)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "bench.cli", "tune", "--grid", str(grid), "--out", str(out), "--cache-dir",
               str(cache_dir), "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "runs.csv").exists() and len(_rows(out)) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the tune ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)  # mid-trial: the third trial's cell is running
    proc.wait()
    before = {r["cell_id"]: r for r in _rows(out)}
    assert 2 <= len(before) < 4

    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    after = {r["cell_id"]: r for r in _rows(out)}
    assert len(after) == 4
    for cell_id, row in before.items():  # finished before the kill: kept, not run again
        assert after[cell_id]["finished"] == row["finished"] and after[cell_id]["student_acc_val"] == row["student_acc_val"]
    (record,) = yaml.safe_load((tmp_path / "tuned.yaml").read_text())["methods"]["kd"].values()
    assert len(record["history"]) == 4 and all(h["outcome"] == "scored" for h in record["history"])
    from bench.method import get_method
    from bench.tune import paper_trial, plan_trials

    grid_ = load_grid(str(grid))
    spec_values = plan_trials(get_method("kd").search_space, paper_trial(grid_.methods[0], _spec(grid_)), 4, 0)
    assert [h["values"] for h in record["history"]] == spec_values  # the planned trials, each once, in order


def test_a_resumed_tune_runs_every_planned_trial_once_whatever_a_kill_left_in_the_study(tmp_path, cache_dir, one_thread):
    """The kill windows a SIGKILL can hit, made on purpose: a trial asked by a process now dead, a trial asked
    before its owner was written, and a trial enqueued but never asked. The resumed tune runs each planned trial
    exactly once (CI once caught a kill between enqueue and ask, which ran a trial twice and one never)."""
    import optuna

    from bench.method import get_method
    from bench.provenance import method_source_hash
    from bench.search_space import distributions
    from bench.tune import paper_trial, plan_trials, study_name

    grid_path = _grid(tmp_path, methods="[kd]", trials=3)
    out = tmp_path / "out"
    _tune(grid_path, out, cache_dir, trials=1)  # trial 0, the paper's values, finished
    grid = load_grid(str(grid_path))
    entry, spec = grid.methods[0], _spec(grid)
    method = get_method("kd")
    plan = plan_trials(method.search_space, paper_trial(entry, spec), 3, spec.sampler_seed)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = {"owner": f"{__import__('socket').gethostname()}:{dead.stdout.strip()}"}
    study = optuna.load_study(study_name=study_name(entry, spec, method_source_hash(method)),
                              storage=f"sqlite:///{out / 'tune.db'}")
    dists = distributions(method.search_space)
    study.enqueue_trial(plan[1], user_attrs=owner)
    study.ask(dists)  # asked by a process now dead
    study.ask(dists)  # asked, then killed before the owner was written
    study.enqueue_trial(plan[1], user_attrs=owner)  # enqueued, then killed before the ask

    records = _tune(grid_path, out, cache_dir)
    history = records["kd"]["history"]
    assert sorted(map(str, (h["values"] for h in history))) == sorted(map(str, plan))
    assert all(h["outcome"] == "scored" for h in history)
    assert len({r["cell_id"] for r in _rows(out)}) == 3


def _spec(grid):
    from bench.tune import spec_of

    return spec_of(grid, "test")


def _tuned_grid(tmp_path: Path, preset: str, method: str = "kd_noise", dataset: str = "digits") -> Path:
    path = tmp_path / f"grid_{preset}.yaml"
    path.write_text(f"""
name: on_{preset}
datasets: [{dataset}]
pairs: [{{teacher: lenet5, student: lenet5_half}}]
teacher_recipe: {{digits: {{epochs: 15}}}}
tuned_file: tuned.yaml
methods: [{{name: {method}, preset: {preset}, budget: {{student_steps: 10}}}}]
checkpoint_every: 0
""")
    return path


def _record(method: str, code_hash: str, values: dict, dataset="digits") -> dict:
    return {"values": values, "score": 50.0, "best_trial": 1, "trials": 3, "code_hash": code_hash, "date": "2026-12-07",
            "grid": "examples/studies/tune_grey32.yaml", "track": "tuned",
            "task": {"dataset": dataset, "teacher": "lenet5", "student": "lenet5_half",
                     "budget": {"fraction": 1.0, "seconds": 45}, "seeds": [0]}, "history": []}


def test_a_grid_on_the_tuned_track_records_tuning_and_runs_the_tuned_values(tmp_path, cache_dir, one_thread):
    import torch

    from bench.method import get_method
    from bench.provenance import method_source_hash
    from bench.runner import Runner
    from bench.tune import write_record

    method = get_method("kd_noise")
    write_record(tmp_path / "tuned.yaml", "kd_noise", "grey32",
                 _record("kd_noise", method_source_hash(method), {"lr": 0.01, "batch_size": 64, "temperature": 2.0},
                         dataset="mnist"))
    grid = load_grid(str(_tuned_grid(tmp_path, "tuned")))
    (cell,) = expand(grid)
    assert cell.tuning == "tuned:mnist:3@45s"
    assert (cell.params["lr"], cell.params["batch_size"], cell.params["temperature"]) == (0.01, 64, 2.0)
    Runner(RunOptions(out=tmp_path / "out", device=torch.device("cpu"), cache_dir=cache_dir, progress=False)).run(grid)
    (row,) = _rows(tmp_path / "out")
    assert row["status"] == "ok" and row["tuning"] == "tuned:mnist:3@45s"
    # the paper track and a hand-set field are labelled too
    paper = load_grid(str(_tuned_grid(tmp_path, "paper")))
    assert [c.tuning for c in expand(paper)] == ["paper"]


def test_tuned_refuses_without_an_entry_and_after_the_method_code_changed_naming_the_retune_command(tmp_path):
    from bench.tune import write_record

    with pytest.raises(ConfigError, match=r"has no entry for method 'kd_noise' on data family 'grey32'.*"
                                          r"bench tune --grid examples/studies/tune_grey32.yaml --only kd_noise"):
        load_grid(str(_tuned_grid(tmp_path, "tuned")))
    with pytest.raises(ConfigError, match=r"no entry for method 'kd_noise' on the digits validation split \(oracle\)"):
        load_grid(str(_tuned_grid(tmp_path, "oracle")))
    # a plugin method, tuned, then edited
    plugin = tmp_path / "edited_method.py"
    source = '''
from dataclasses import dataclass
from bench.method import DataAccess, Method, MethodConfig, register
from bench.search_space import Float


@dataclass
class EditedConfig(MethodConfig):
    lr: float = 0.01


@register("edited_method")
class Edited(Method):
    data_access = DataAccess.NONE
    Config = EditedConfig
    search_space = {"lr": Float(1e-3, 1e-1, log=True)}

    def distill(self, teacher, student, ctx):
        return student
'''
    plugin.write_text(source)
    from bench.method import get_method, load_plugin
    from bench.provenance import method_source_hash

    load_plugin(str(plugin))
    write_record(tmp_path / "tuned.yaml", "edited_method", "grey32",
                 _record("edited_method", method_source_hash(get_method("edited_method")), {"lr": 0.02}))
    grid_path = _tuned_grid(tmp_path, "tuned", method="edited_method")
    text = grid_path.read_text().replace("checkpoint_every: 0", f"checkpoint_every: 0\nplugins: [{plugin}]")
    grid_path.write_text(text)
    (cell,) = expand(load_grid(str(grid_path)))
    assert cell.params["lr"] == 0.02
    time.sleep(0.01)
    plugin.write_text(source.replace("return student", "student.eval()\n        return student"))
    with pytest.raises(ConfigError, match=r"was tuned \(grey32\) on code \w+, and its code is now \w+.*"
                                          r"Re-tune: bench tune --grid examples/studies/tune_grey32.yaml "
                                          r"--only edited_method"):
        load_grid(str(grid_path))


def test_a_search_space_without_the_papers_value_is_refused_at_load():
    from dataclasses import dataclass

    @dataclass
    class Cfg(MethodConfig):
        lr: float = 0.1
        width: int = 64

    def define(space):
        class Spaced(Method):
            data_access = DataAccess.NONE
            Config = Cfg
            search_space = space

        return Spaced

    with pytest.raises(ConfigError, match=r"search_space\['lr'\] = log-uniform \[0.0001, 0.01\] does not contain the "
                                          r"paper's value 0.1"):
        register("spaced_bad_lr")(define({"lr": Float(1e-4, 1e-2, log=True)}))
    with pytest.raises(ConfigError, match=r"search_space\['width'\] = one of 16, 32 does not contain"):
        register("spaced_bad_width")(define({"width": Choice(16, 32)}))
    with pytest.raises(ConfigError, match=r"names 'depth', which is not a field of Cfg; valid fields: lr, width"):
        register("spaced_bad_field")(define({"depth": Int(1, 4)}))
    check_space(define({"lr": Float(1e-3, 1.0, log=True), "width": Int(16, 128)}))  # contains both: accepted
    with pytest.raises(ConfigError, match="a log scale needs low > 0"):
        Float(0.0, 1.0, log=True)


def test_every_builtin_data_free_method_and_kd_declares_a_space_and_bench_list_shows_it():
    from click.testing import CliRunner

    from bench.cli import main
    from bench.method import list_methods

    methods = list_methods()
    data_free = [n for n, c in methods.items() if c.data_access is DataAccess.NONE and n != "no_recovery"
                 and c.__module__.startswith("methods.")]  # the built-ins (other tests register plugins)
    assert all(methods[n].search_space for n in [*data_free, "kd", "student_only"]), data_free
    result = CliRunner().invoke(main, ["list", "methods"])
    assert result.exit_code == 0
    assert "search space:" in result.output and "lr_G: log-uniform [0.001, 1]" in result.output  # DAFL's


def test_oracle_rows_are_labelled_in_the_report(tmp_path):
    from bench.report import load_runs, tuning_note

    out = tmp_path / "res"
    out.mkdir()
    from bench.store import COLUMNS

    base = {c: "" for c in COLUMNS}
    rows = [dict(base, cell_id=f"c{i}", status="ok", dataset="fashion_mnist", teacher="lenet5_bn", student="lenet5_half",
                 method="dafl", label="dafl", seed="0", data_access="none", student_acc="50", tuning=t)
            for i, t in enumerate(["paper", "tuned:mnist:16@45s", "oracle"])]
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    df, _ = load_runs(out)
    assert list(df["label"]) == ["dafl", "dafl [tuned]", "dafl [oracle]"]
    assert "oracle" in tuning_note(df) and "upper bound" in tuning_note(df)
