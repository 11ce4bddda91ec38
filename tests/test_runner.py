"""End-to-end runs of small grids through the CLI: rows, resume, SIGKILL, plugins, failures."""
import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bench.cli import main
from bench.latency import BACKENDS, available_backends
from bench.store import COLUMNS, ResultsStore

REPO = Path(__file__).resolve().parents[1]

GRID = """
name: tiny
datasets: [digits]
pairs: [{teacher: lenet5, student: lenet5_half}]
methods: [kd, {name: kd_noise, budget: 0.002}, kd_alt, student_only]
seeds: [0, 1]
budget: 0.02
teacher_recipe: {digits: {epochs: 15}}
"""

FAILING_PLUGIN = '''
from dataclasses import dataclass
import torch
from bench.method import DataAccess, Method, MethodConfig, register

@register("explodes")
class Explodes(Method):
    data_access = DataAccess.NONE
    def distill(self, teacher, student, ctx):
        raise RuntimeError("deliberate failure")

@register("goes_nan")
class GoesNaN(Method):
    data_access = DataAccess.NONE
    def distill(self, teacher, student, ctx):
        ctx.log(1, loss=torch.tensor(float("nan")))
        return student

@register("sneaky")
class Sneaky(Method):
    """A 'data-free' method that tries to read the training set."""
    data_access = DataAccess.NONE
    def distill(self, teacher, student, ctx):
        ctx.train_data()
        return student
'''


def _grid_with(old: str, new: str) -> str:
    assert old in GRID, f"{old!r} is not in the test grid"
    return GRID.replace(old, new)


def _run(args, env=None):
    result = CliRunner().invoke(main, args, catch_exceptions=False, env=env)
    return result


@pytest.fixture()
def grid_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(GRID)
    return path


def _rows(out):
    with open(out / "runs.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_grid_runs_resumes_and_reruns(tmp_path, grid_file, cache_dir):
    out = tmp_path / "results"
    args = ["run", "--grid", str(grid_file), "--out", str(out), "--cache-dir", str(cache_dir), "--device", "cpu",
            "--no-progress", "--no-report"]
    result = _run(args)
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    # empty by design here: no failure, no best-on-test protocol, no caps, no derived student, no resume,
    # no user checkpoint or pretrained weights, no data options, no query tagged by purpose, and no API
    # setting for the methods whose teacher access is not `outputs`
    required = set(COLUMNS) - {"error", "student_acc_best", "best_protocol", "preset", "compute_cap", "stopped_by",
                               "search_seconds", "resumed", "teacher_checkpoint", "teacher_pretrained", "data_options",
                               "teacher_queries_by", "teacher_outputs"}
    # the latency columns of a backend not installed here (ONNX Runtime without the export extra) stay empty
    timed = {c for b in available_backends() for c in (*b.columns, b.teacher_column)}
    required -= {c for _, b in BACKENDS.items() for c in (*b.columns, b.teacher_column)} - timed
    assert {"latency_ms", "latency_b64_ms", "teacher_latency_ms"} <= timed
    for r in rows:
        assert not [c for c in required if r[c] == ""], r
        assert r["teacher_outputs"] == ("logits" if r["teacher_access"] == "outputs" else ""), r
        # every timed backend's figures, in every row: finite, positive, batch 64 slower than batch 1
        for b in available_backends():
            median, iqr, b64 = (float(r[c]) for c in b.columns)
            assert 0 < median < b64 < 1e4 and 0 <= iqr < 1e4 and float(r[b.teacher_column]) > 0, (b.name, r)
        assert (out / "cells" / r["cell_id"] / "config.json").is_file()
        assert (out / "cells" / r["cell_id"] / "curve.jsonl").is_file()
    by = {(r["method"], r["seed"]): r for r in rows}
    assert by[("kd_noise", "0")]["data_access"] == "none" and by[("kd_noise", "0")]["real_samples_used"] == "0"
    assert by[("kd_alt", "0")]["real_samples_used"] == "0"
    assert by[("kd", "0")]["real_samples_used"] == "1150"  # 1,437 digits training images less the 287 carved out for validation
    assert int(by[("kd", "0")]["teacher_queries"]) > 0 and by[("student_only", "0")]["teacher_queries"] == "0"
    assert by[("kd", "0")]["params"] == "15738" and by[("kd", "0")]["teacher_params"] == "61706"
    assert float(by[("kd", "0")]["teacher_acc"]) > 80
    assert "kd_noise" in result.output and "±" in result.output  # the summary table

    before = (out / "runs.csv").read_bytes()
    again = _run(args)
    assert "0 cells run (0 failed), 8 already done" in again.output
    assert (out / "runs.csv").read_bytes() == before

    forced = _run(args + ["--force"])
    assert "8 cells run" in forced.output and len(_rows(out)) == 8


@pytest.mark.slow
def test_failures_are_recorded_and_the_grid_goes_on(tmp_path, cache_dir):
    plugin = tmp_path / "failing.py"
    plugin.write_text(FAILING_PLUGIN)
    grid = tmp_path / "fail.yaml"
    grid.write_text(_grid_with("methods: [kd, {name: kd_noise, budget: 0.002}, kd_alt, student_only]", "methods: [explodes, goes_nan, sneaky, {name: kd_noise, budget: 0.002}]")
                    .replace("seeds: [0, 1]", "seeds: [0]") + f"plugins: [{plugin}]\n")
    out = tmp_path / "results"
    args = ["run", "--grid", str(grid), "--out", str(out), "--cache-dir", str(cache_dir), "--no-progress", "--no-report"]
    result = _run(args)
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in _rows(out)}
    assert rows["explodes"]["status"] == "failed" and "RuntimeError: deliberate failure" in rows["explodes"]["error"]
    assert rows["goes_nan"]["status"] == "failed" and "NonFiniteError" in rows["goes_nan"]["error"]
    assert rows["sneaky"]["status"] == "failed" and "DataAccessError" in rows["sneaky"]["error"]
    assert rows["kd_noise"]["status"] == "ok"
    assert "deliberate failure" in (out / "cells" / rows["explodes"]["cell_id"] / "error.txt").read_text()
    # failed cells are skipped on resume unless asked for
    assert "0 cells run" in _run(args).output
    assert "3 cells run (3 failed)" in _run(args + ["--rerun-failed"]).output


@pytest.mark.slow
def test_sigkill_mid_grid_then_resume_completes_only_missing_cells(tmp_path, grid_file, cache_dir):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench.cli", "run", "--grid", str(grid_file), "--out", str(out),
           "--cache-dir", str(cache_dir), "--no-progress", "--no-report"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until some but not all cells are written
        if (out / "runs.csv").exists() and 2 <= len(ResultsStore(out).rows) < 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = dict(ResultsStore(out).rows)
    assert 2 <= len(done_before) < 8
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{8 - len(done_before)} cells run (0 failed), {len(done_before)} already done" in result.stdout
    rows = _rows(out)
    assert len(rows) == 8 and len({r["cell_id"] for r in rows}) == 8
    after = {r["cell_id"]: r for r in rows}
    quiet = {c for _, b in BACKENDS.items() for c in (*b.columns, b.teacher_column)} | {"throughput"}  # latency pass
    for cid, row in done_before.items():
        assert {k: v for k, v in after[cid].items() if k not in quiet} == {k: v for k, v in row.items() if k not in quiet}


def test_plugin_method_shows_up_in_the_csv(tmp_path, cache_dir):
    grid = tmp_path / "plugin.yaml"
    grid.write_text(_grid_with("methods: [kd, {name: kd_noise, budget: 0.002}, kd_alt, student_only]", "methods: [uniform_kd]")
                    .replace("seeds: [0, 1]", "seeds: [0]"))
    out = tmp_path / "results"
    result = _run(["run", "--grid", str(grid), "--out", str(out), "--cache-dir", str(cache_dir), "--no-progress",
                   "--no-report", "--plugin", str(REPO / "examples" / "my_method.py")])
    assert result.exit_code == 0, result.output
    (row,) = _rows(out)
    assert row["method"] == "uniform_kd" and row["status"] == "ok" and row["data_access"] == "none"


def test_teacher_checkpoint_errors(tmp_path, cache_dir):
    not_state_dict = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), not_state_dict)  # a pickled module, not a state dict
    wrong_classes = tmp_path / "wrong.pt"
    from bench.models import create_model
    torch.save(create_model("lenet5", 100, 1, 32).state_dict(), wrong_classes)
    for ckpt, needle in ((not_state_dict, "weights_only=True"), (wrong_classes, "shape mismatch")):
        grid = tmp_path / "ckpt.yaml"
        grid.write_text(_grid_with("methods: [kd, {name: kd_noise, budget: 0.002}, kd_alt, student_only]",
                                   "methods: [{name: kd_noise, budget: 0.002}]")
                        .replace("{teacher: lenet5, student: lenet5_half}",
                                 f"{{teacher: lenet5, student: lenet5_half, teacher_checkpoint: {ckpt}}}")
                        .replace("seeds: [0, 1]", "seeds: [0]"))
        out = tmp_path / f"results-{ckpt.stem}"
        result = _run(["run", "--grid", str(grid), "--out", str(out), "--cache-dir", str(cache_dir), "--no-progress", "--no-report"])
        assert result.exit_code == 0, result.output  # a failing cell is recorded, not a failing run
        (row,) = _rows(out)
        assert row["status"] == "failed" and needle in row["error"], row["error"]


def test_student_with_other_class_count_is_refused(tmp_path):
    from bench.config import ConfigError
    from bench.data import load_dataset
    from bench.models import create_model
    from bench.students import check_compatible

    info = load_dataset("digits").info
    with pytest.raises(ConfigError, match="student outputs 100 classes but the teacher 10"):
        check_compatible(create_model("lenet5", 10, 1, 32).eval(), create_model("lenet5_half", 100, 1, 32), info,
                         torch.device("cpu"))


@pytest.mark.slow
def test_hintonnet_pair_trains_and_distils(tmp_path, cache_dir):
    """DAFL's MNIST pair, HintonNet-1200 -> HintonNet-800 (784-1200-1200-10 -> 784-800-800-10), in a seconds-long cell:
    the harness trains the MLP teacher on digits and Hinton KD distils it into the smaller MLP."""
    grid = tmp_path / "mlp.yaml"
    grid.write_text(GRID.replace("pairs: [{teacher: lenet5, student: lenet5_half}]", "pairs: [{teacher: mlp_1200, student: mlp_800}]")
                    .replace("methods: [kd, {name: kd_noise, budget: 0.002}, kd_alt, student_only]", "methods: [kd]")
                    .replace("seeds: [0, 1]", "seeds: [0]").replace("budget: 0.02", "budget: 0.3"))
    out = tmp_path / "results"
    result = _run(["run", "--grid", str(grid), "--out", str(out), "--cache-dir", str(cache_dir), "--device", "cpu",
                   "--no-progress", "--no-report"])
    assert result.exit_code == 0, result.output
    (row,) = _rows(out)
    assert row["status"] == "ok", row["error"]
    assert row["teacher_params"] == "2395210" and row["params"] == "1276810" and row["macs"] == "1275200"
    assert float(row["teacher_acc"]) > 85 and float(row["student_acc"]) > 80  # both learnt the 10 digits
    assert float(row["latency_ms"]) > 0 and float(row["teacher_latency_ms"]) > 0
