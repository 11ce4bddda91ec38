"""The report renders from a small hand-written results folder: files, HTML structure, failures, gaps, CLI.

The fixture (tests/fixtures/runs_small.csv) is a rendering fixture with plausible values, not a result.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import report
from bench.report import ReportError, pareto_front, render

FIXTURE = Path(__file__).parent / "fixtures" / "runs_small.csv"


def make_results(folder: Path, csv_path: Path = FIXTURE) -> Path:
    """A results folder: the fixture CSV, a training curve per cell, a samples.png for dafl, an error.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(csv_path, folder / "runs.csv")
    (folder / "grid.json").write_text(json.dumps({"name": "fixture", "description": "rendering fixture", "cells": 27}))
    for row in csv.DictReader(csv_path.open()):
        cell = folder / "cells" / row["cell_id"]
        cell.mkdir(parents=True, exist_ok=True)
        steps = 300 if row["method"] == "dafl" else 200
        rate = 0.02 + 0.002 * int(row["seed"])
        with (cell / "curve.jsonl").open("w") as f:
            for step in range(50, steps + 1, 50):
                record = {"step": step, "loss": 2.3 * np.exp(-rate * step) + 0.1, "lr": 1e-3}
                if row["method"] == "dafl":
                    record.update(loss_g=-1.0 - 0.001 * step, test_acc=60 + step / 30)
                f.write(json.dumps(record) + "\n")
            if row["status"] == "failed":
                f.write('{"step": 35')  # a line cut by the failure
        if row["status"] == "failed":
            (cell / "error.txt").write_text("Traceback (most recent call last):\n  ...\nNonFiniteError: non-finite loss_s\n")
        if row["method"] == "dafl" and row["status"] == "ok":
            import matplotlib.image
            from sklearn.datasets import load_digits

            # an 8 x 8 grid of real 8x8 digits, as a generator method would save its samples
            images = load_digits().images[:64].reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(64, 64)
            matplotlib.image.imsave(cell / "samples.png", np.kron(images, np.ones((4, 4))), cmap="gray")
    return folder


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, Path]:
    results = make_results(tmp_path_factory.mktemp("results"))
    out = render(results, tmp_path_factory.mktemp("report") / "out")
    return results, out


def test_files(rendered):
    _, out = rendered
    assert (out / "index.html").stat().st_size > 10_000
    assert (out / "report.md").is_file() and (out / "summary.csv").is_file()
    for dataset in ("fashion_mnist", "digits"):
        for plot in ("tradeoff", "macs", "params", "data_access", "cost", "curves"):
            png, svg = out / "plots" / f"{plot}_{dataset}.png", out / "plots" / f"{plot}_{dataset}.svg"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
            assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()[:2000], svg
    assert len(list((out / "samples").glob("*.png"))) == 2  # dafl on fashion_mnist and on digits (one seed each)


def test_html_structure(rendered):
    _, out = rendered
    page = (out / "index.html").read_text()
    for anchor in ("ds-fashion_mnist", "ds-digits", "failed", "environment"):
        assert f'id="{anchor}"' in page
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == 2 * 6 + 2 and all(src.startswith("data:image/png;base64,") for src in images)
    assert "src=\"plots/" not in page and "src=\"samples/" not in page  # self-contained
    # the fashion_mnist table: every (pair, method) once, sorted by accuracy within a pair
    section = page.split('id="ds-fashion_mnist"')[1].split('id="failed"')[0]
    table = section.split('id="table-fashion_mnist"')[1].split("</table>")[0]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S)[1:]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r, re.S) for r in rows]
    methods = [(c[0], re.sub(r"<[^>]+>", "", c[1])) for c in cells]
    assert sorted(methods) == sorted([("lenet5 → lenet5_half", m) for m in ("dafl", "kd", "kd_alt", "kd_noise", "student_only")]
                                     + [("lenet5 → pruned:l1:0.5", m) for m in ("fskd", "kd", "kd_noise")])
    kd = next(c for c in cells if c[0] == "lenet5 → lenet5_half" and c[1].endswith("kd"))
    assert kd[4] == "86.30 ± 0.25"  # mean ± sample std of 86.12 and 86.47
    assert "best-on-test acc % (paper protocol)" in table
    dafl = next(c for c in cells if c[1].endswith("dafl"))
    assert dafl[5] == f"{np.mean([72.76, 69.72]):.2f} ± {np.std([72.76, 69.72], ddof=1):.2f}"
    assert "Pareto front" in section
    # the teacher is stated, and the environment is
    assert "teacher lenet5: 90.41% test accuracy, 61.7K params, 417K MACs, 0.158 ms CPU latency" in section
    env = page.split('id="environment"')[1]
    assert "2.13.0+cpu" in env and "3f2a9c1" in env and "Xeon" in env


def test_failed_cells_section(rendered):
    _, out = rendered
    page = (out / "index.html").read_text()
    failed = page.split('id="failed"')[1].split('id="environment"')[0]
    assert "Failed cells (1)" in failed
    assert "NonFiniteError: non-finite loss_s at step 100" in failed and "Traceback" in failed
    digits = page.split('id="ds-digits"')[1].split('id="failed"')[0]
    assert "<td>1/2</td>" in digits  # dafl on digits: one of two seeds finished
    md = (out / "report.md").read_text()
    assert "## Failed cells (1)" in md and "NonFiniteError" in md


def test_markdown_links_exist(rendered):
    _, out = rendered
    md = (out / "report.md").read_text()
    links = re.findall(r"\]\(((?:plots|samples)/[^)]+)\)", md)
    assert len(links) >= 2 * 6 * 2  # PNG + SVG per plot
    assert all((out / link).is_file() for link in links)
    assert "| lenet5 → lenet5_half | kd |" in md or "| **lenet5 → lenet5_half** | **kd** |" in md


def test_pareto_front():
    points = pd.DataFrame({"lat": [1.0, 2.0, 3.0, 1.5, 4.0], "acc": [50.0, 70.0, 65.0, 40.0, 80.0]})
    assert pareto_front(points, "lat", "acc").index.tolist() == [0, 1, 4]


def test_csv_without_optional_columns(tmp_path):
    frame = pd.read_csv(FIXTURE, dtype=str, keep_default_na=False)
    frame = frame.drop(columns=["latency_ms", "latency_iqr_ms", "macs", "student_acc_best", "best_protocol", "cpu",
                                "git_commit", "label"])
    frame = frame[(frame["status"] == "ok") & (frame["dataset"] == "digits")]
    small = tmp_path / "small.csv"
    frame.to_csv(small, index=False)
    out = render(make_results(tmp_path / "results", small), tmp_path / "out")
    page = (out / "index.html").read_text()
    assert "runs.csv lacks the column(s) label, student_acc_best, best_protocol, macs, latency_ms, latency_iqr_ms, cpu, git_commit" in page
    assert "accuracy vs CPU latency (and its Pareto front): runs.csv has no latency_ms values" in page
    assert "accuracy vs MACs: runs.csv has no macs values" in page
    assert "best-on-test" not in page.split('id="table-digits"')[1]
    assert not (out / "plots" / "tradeoff_digits.png").exists() and (out / "plots" / "params_digits.png").exists()
    assert "Failed cells (0)" in page and "Environment" in page


@pytest.mark.parametrize("content, needle", [
    (None, "runs.csv does not exist"),
    ("", "is empty"),
    (",".join(report.COLUMNS) + "\n", "has a header but no rows"),
    ("cell_id,status\nabc,ok\n", "lacks the required column(s) ['dataset', 'teacher', 'student', 'method', 'student_acc']"),
])
def test_unusable_results_are_clear_errors(tmp_path, content, needle):
    if content is not None:
        (tmp_path / "runs.csv").write_text(content)
    with pytest.raises(ReportError, match=re.escape(needle)):
        render(tmp_path, tmp_path / "out")


def test_method_colours_are_stable():
    assert report.method_colours(["kd", "dafl"]) == report.method_colours(["dafl", "kd", "kd"])
    assert len(set(report.method_colours([f"m{i}" for i in range(14)]).values())) == 14


def test_cli_report_with_only_some_methods(tmp_path, monkeypatch):
    """`bench report` on a folder with one method of the fixture; default --out is <results>/report."""
    from click.testing import CliRunner

    from bench.cli import main

    frame = pd.read_csv(FIXTURE, dtype=str, keep_default_na=False)
    one = tmp_path / "one.csv"
    frame[(frame["method"] == "kd") & (frame["dataset"] == "fashion_mnist")].to_csv(one, index=False)
    results = make_results(tmp_path / "quickish", one)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["report", str(results)])
    assert result.exit_code == 0, result.output
    out = results / "report"
    assert f"report: {out / 'index.html'}" in result.output
    page = (out / "index.html").read_text()
    assert (out / "plots" / "tradeoff_fashion_mnist.png").is_file() and "Pareto front" in page
    assert page.count('src="data:image/png;base64,') == 6
    missing = CliRunner().invoke(main, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "does not exist" in missing.output and "Traceback" not in missing.output
    assert "Examples" in CliRunner().invoke(main, ["report", "--help"]).output


def test_rows_of_cells_no_longer_in_the_grid_are_left_out(tmp_path):
    results = make_results(tmp_path / "results")
    rows = list(csv.DictReader(FIXTURE.open()))
    dropped = rows[0]
    kept_ids = [r["cell_id"] for r in rows if r["cell_id"] != dropped["cell_id"]]
    (results / "grid.json").write_text(json.dumps({"name": "fixture", "cells": len(kept_ids), "cell_ids": kept_ids}))
    out = render(results, tmp_path / "out")
    page = (out / "index.html").read_text()
    assert "1 row(s) of runs.csv belong to cells that are no longer in the grid" in page
    summary = pd.read_csv(out / "summary.csv")
    assert summary["n_total"].sum() == len(kept_ids)
    (results / "grid.json").write_text(json.dumps({"name": "fixture", "cell_ids": ["nothing-here"]}))
    with pytest.raises(ReportError, match="no row of .* belongs to the grid's current cells"):
        render(results, tmp_path / "out2")
