"""The Ray executor (``bench run --executor ray``) on a private local Ray instance with 2 CPUs.

It must run the same cells as the local executor (same cell_ids, statuses and columns), resume
like it (a rerun does nothing), and survive a worker process killed mid-run.
"""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.grid import Provenance, expand, load_grid

pytest.importorskip("ray", reason="the Ray executor is an optional extra: pip install 'dfkd-bench[ray]'")

REPO = Path(__file__).resolve().parents[1]

TINY = """
name: tiny_ray
datasets: [digits]
pairs: [{teacher: lenet5, student: lenet5_half, methods: [kd, student_only, kd_noise]}, {teacher: lenet5, student: "pruned:l1:0.5", methods: [fskd]}]
methods: [kd, student_only, {name: kd_noise, budget: 0.01}, {name: fskd, params: {n_samples: 100}}]
seeds: [0, 1]
budget: 0.05
teacher_recipe: {digits: {epochs: 15}}
"""


def _bench(*args, cache_dir, timeout=600):
    cmd = [sys.executable, "-m", "bench.cli", "run", *args, "--cache-dir", str(cache_dir), "--no-progress", "--no-report"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _rows(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(out / "runs.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


# one method of each kind in the smoke grid: with data, generator-based data-free, BatchNorm inversion, black-box,
# few-sample on a pruned student (every smoke method would take three minutes and test nothing more of the executor)
SMOKE_PART = ("--grid", "smoke", "--only", "kd,dafl,deepinversion,dfme,fskd")


@pytest.mark.slow
def test_smoke_grid_on_ray_matches_the_local_executor_and_resumes(tmp_path, cache_dir):
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    result = _bench(*SMOKE_PART, "--out", str(local), cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr
    result = _bench(*SMOKE_PART, "--out", str(on_ray), "--executor", "ray", "--num-cpus", "2", cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr

    local_cols, local_rows = _rows(local)
    ray_cols, ray_rows = _rows(on_ray)
    assert ray_cols == local_cols
    expected = {c.cell_id for c in expand(load_grid("smoke"), provenance=Provenance("cpu"))
                if c.label in SMOKE_PART[-1].split(",")}
    assert len({r["method"] for r in ray_rows}) == 5
    assert {r["cell_id"] for r in ray_rows} == {r["cell_id"] for r in local_rows} == expected
    assert len(ray_rows) == len(expected)
    assert {r["cell_id"]: r["status"] for r in ray_rows} == {r["cell_id"]: r["status"] for r in local_rows}
    assert all(r["status"] == "ok" for r in ray_rows), [r["error"] for r in ray_rows if r["error"]]
    for r in ray_rows:  # artefacts come back from the workers
        assert (on_ray / "cells" / r["cell_id"] / "curve.jsonl").is_file() or r["method"] == "no_recovery"
        assert (on_ray / "cells" / r["cell_id"] / "config.json").is_file()

    before = (on_ray / "runs.csv").read_bytes()
    again = _bench(*SMOKE_PART, "--out", str(on_ray), "--executor", "ray", "--num-cpus", "2", cache_dir=cache_dir)
    assert again.returncode == 0, again.stderr
    assert f"0 cells run (0 failed), {len(expected)} already done" in again.stdout
    assert (on_ray / "runs.csv").read_bytes() == before


def _cell_workers() -> list[int]:
    """PIDs of Ray workers running a cell now (Ray titles a busy worker ``ray::run_cell``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(b"ray::run_cell"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray's worker processes through /proc")
def test_a_killed_worker_leaves_the_grid_complete_after_resume(tmp_path, cache_dir):
    grid = tmp_path / "tiny.yaml"
    grid.write_text(TINY)
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench.cli", "run", "--grid", str(grid), "--out", str(out), "--cache-dir", str(cache_dir),
           "--executor", "ray", "--num-cpus", "2", "--retries", "0", "--no-progress", "--no-report"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and proc.poll() is None:
        workers = _cell_workers()
        if workers:
            time.sleep(0.5)  # let it get into the cell
            try:
                os.kill(workers[0], signal.SIGKILL)
                killed = workers[0]
            except ProcessLookupError:
                continue
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=600)
    assert killed is not None, "no Ray worker running a cell was seen"
    assert proc.returncode == 0, stderr

    expected = {c.cell_id for c in expand(load_grid(str(grid)), provenance=Provenance("cpu"))}
    _, rows = _rows(out)
    assert {r["cell_id"] for r in rows} == expected  # the grid went on past the dead worker
    failed = [r for r in rows if r["status"] == "failed"]
    assert all("Worker" in r["error"] or "worker" in r["error"] for r in failed), [r["error"] for r in failed]

    resumed = _bench("--grid", str(grid), "--out", str(out), "--executor", "ray", "--num-cpus", "2", "--rerun-failed",
                     cache_dir=cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(failed)} cells run (0 failed)" in resumed.stdout
    _, rows = _rows(out)
    assert len(rows) == len(expected) and all(r["status"] == "ok" for r in rows)
