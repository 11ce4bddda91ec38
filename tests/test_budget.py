"""Equal compute: caps in teacher queries, seconds and student steps; anytime curves; in-cell checkpoints and resume."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bench.cli import main
from bench.monitor import Budget
from bench.training import Schedule

REPO = Path(__file__).resolve().parents[1]

CAPPED = """
name: capped
datasets: [digits]
pairs: [{teacher: lenet5, student: lenet5_half}]
methods:
  - {name: dafl, params: {batch_size: 128, gen_width: 32, samples: 0}}
  - {name: kd_noise, params: {batch_size: 128}}
seeds: [0]
budget: {teacher_queries: 30000}
teacher_recipe: {digits: {epochs: 15}}
"""


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "runs.csv", newline="") as f:
        return list(csv.DictReader(f))


def _anytime(out: Path, cell_id: str) -> list[dict]:
    return [json.loads(line) for line in (out / "cells" / cell_id / "anytime.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_teacher_query_cap_stops_each_cell_within_one_batch_and_curves_have_points(tmp_path, cache_dir):
    grid = tmp_path / "capped.yaml"
    grid.write_text(CAPPED)
    out = tmp_path / "results"
    result = CliRunner().invoke(main, ["run", "--grid", str(grid), "--out", str(out), "--cache-dir", str(cache_dir),
                                       "--no-progress", "--no-report"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    for r in rows:
        queries = int(r["teacher_queries"])
        assert 30000 - 128 < queries <= 30000, r  # within one batch of the cap, never over it
        assert r["compute_cap"] == "teacher_queries=30000" and r["stopped_by"] == "teacher_queries"
        curve = _anytime(out, r["cell_id"])
        assert len(curve) >= 5, curve
        assert [p["teacher_queries"] for p in curve] == sorted(p["teacher_queries"] for p in curve)
        assert curve[-1]["final"] == 1 and curve[-1]["val_acc"] == pytest.approx(float(r["student_acc_val"]), abs=1e-3)
        assert all(0 <= p["val_acc"] <= 100 and p["seconds"] >= 0 for p in curve)


def test_student_step_and_seconds_caps(digits, teacher, tmp_path):
    from bench.method import get_method
    from bench.models import create_model
    from tests.helpers import run_distill

    kd = get_method("kd")
    method = kd(kd.resolve_config("digits", overrides={"batch_size": 32})[1])
    capped = run_distill(method, teacher.model, create_model("lenet5_half", 10, 1, 32), digits, tmp_path / "steps",
                         budget=Budget(student_steps=7))
    assert capped.student_steps == 7 and capped.teacher_queries == 7 * 32 and capped.stopped_by == "student_steps"
    assert capped.iterations == 7  # the schedule saw the capped length in advance

    timed = run_distill(method, teacher.model, create_model("lenet5_half", 10, 1, 32), digits, tmp_path / "secs",
                        budget=Budget(seconds=0.3))
    assert timed.stopped_by == "seconds" and timed.seconds < 0.3 + 2.0  # stops at the first step boundary past it
    assert 0 < timed.student_steps < method.config.epochs * 36


def test_a_capped_schedule_scales_its_milestones():
    plan = Schedule(total=1000, iters_per_epoch=100, milestones=(500, 750))
    assert plan.capped(200) == Schedule(total=200, iters_per_epoch=100, milestones=(100, 150))
    assert plan.capped(5000) is plan


def test_budgets_parse_as_fractions_or_caps(tmp_path):
    from bench.config import ConfigError
    from bench.grid import expand, load_grid

    grid = tmp_path / "g.yaml"
    grid.write_text(CAPPED.replace("budget: {teacher_queries: 30000}", "budget: {fraction: 0.5, seconds: 20}"))
    cells = expand(load_grid(str(grid)))
    assert {c.compute for c in cells} == {Budget(fraction=0.5, seconds=20.0)}
    grid.write_text(CAPPED.replace("budget: {teacher_queries: 30000}", "budget: {teacher_queries: 0}"))
    with pytest.raises(ConfigError, match="teacher_queries must be positive"):
        load_grid(str(grid))


RESUME = """
name: resume
datasets: [digits]
pairs: [{teacher: lenet5, student: lenet5_half}]
methods: [{name: dafl, params: {batch_size: 64, gen_width: 32, samples: 0, eval_every: 40}}]
seeds: [0]
budget: {student_steps: 240}
checkpoint_every: 0.3
teacher_recipe: {digits: {epochs: 15}}
"""


def _bench(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.cli", "run", *args, "--no-progress", "--no-report"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_cell_killed_mid_way_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_run_ends(tmp_path, cache_dir):
    grid = tmp_path / "resume.yaml"
    grid.write_text(RESUME)
    # the same thread count in every run, and MKL in its reproducible mode: its sgemm otherwise rounds by
    # the buffers' memory alignment, which differs between processes (two fresh straight runs differed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"}
    common = ["--grid", str(grid), "--cache-dir", str(cache_dir), "--device", "cpu"]

    straight = tmp_path / "straight"
    proc = _bench([*common, "--out", str(straight)], env)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()

    killed = tmp_path / "killed"
    proc = _bench([*common, "--out", str(killed)], env)
    deadline, checkpoint = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        found = list(killed.glob("cells/*/checkpoint.pt"))
        if found:
            time.sleep(0.5)  # let it run on past the checkpoint, then kill it without warning
            checkpoint = found[0]
            break
        time.sleep(0.05)
    assert checkpoint is not None and proc.poll() is None, "the cell finished before a checkpoint was seen"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "runs.csv").exists() or not _rows(killed)
    saved = torch.load(checkpoint, weights_only=True)
    assert 0 < saved["step"] < 240

    proc = _bench([*common, "--out", str(killed)], env)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    (a,), (b,) = _rows(straight), _rows(killed)
    assert a["cell_id"] == b["cell_id"] and b["resumed"].startswith("phase 0 step ")
    assert b["student_acc"] == a["student_acc"] and b["student_acc_val"] == a["student_acc_val"]
    assert b["student_acc_best"] == a["student_acc_best"] and b["teacher_queries"] == a["teacher_queries"]
    assert not checkpoint.exists()  # removed once the cell is done
    # the curves continue from the checkpoint: the same steps as the uninterrupted run, once each
    steps = lambda out, row: [json.loads(line)["step"] for line in  # noqa: E731
                              (out / "cells" / row["cell_id"] / "curve.jsonl").read_text().splitlines()]
    assert steps(killed, b) == steps(straight, a)
    straight_any = [(p["teacher_queries"], p["val_acc"]) for p in _anytime(straight, a["cell_id"])]
    killed_any = [(p["teacher_queries"], p["val_acc"]) for p in _anytime(killed, b["cell_id"])]
    assert killed_any == straight_any
