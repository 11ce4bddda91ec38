"""The report renders from small hand-written results folders: files, HTML structure, failures, gaps, CLI; and its
decision maths (anytime bands, best method per compute budget, fronts per data access, latency budgets, collapse
flags) on hand-made numbers whose answers are known.

The fixtures (tests/fixtures/runs_small.csv in the current column set, runs_old.csv as an older `bench run` wrote
it) are rendering fixtures with plausible values, not results; :func:`make_results` adds the per-cell files.
"""
from __future__ import annotations

import csv
import functools
import html
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import report
from bench.report import (ReportError, access_fronts, anytime_band, best_at_budget, budget_ladder, collapse_flags,
                          geometric_grid, latency_budget_table, pareto_front, render, step_values)

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "runs_small.csv"
OLD_FIXTURE = FIXTURES / "runs_old.csv"
COLLAPSED_CELL = "f57e1b22ba6c"  # fashion_mnist dafl seed 1: its generator collapses at step 250
# hyperparameters the fixture's rows set away from the method's preset (method_params is rebuilt from the registry)
OVERRIDES = {("digits", "dafl"): {"batch_size": 128, "gen_width": 32}}


def _method_params(method: str, dataset: str, preset: str) -> str:
    from bench.config import to_dict
    from bench.method import get_method

    _, config = get_method(method).resolve_config(dataset, preset=preset or None, overrides=OVERRIDES.get((dataset, method)))
    return json.dumps(to_dict(config), sort_keys=True)


def make_results(folder: Path, csv_path: Path = FIXTURE) -> Path:
    """A results folder: the fixture CSV, per cell a training curve and (current format) an anytime curve, a
    samples.png for dafl, an error.txt for the failed cell."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(csv_path.open()))
    if rows and "method_params" in rows[0] and "arch_id" in rows[0]:  # current format: params as this registry resolves them
        for row in rows:
            row["method_params"] = _method_params(row["method"], row["dataset"], row["preset"])
    with (folder / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "grid.json").write_text(json.dumps({"name": "fixture", "description": "rendering fixture", "cells": 27,
                                                  "report_budgets": {"seconds": [0.0123]}}))
    for row in rows:
        cell = folder / "cells" / row["cell_id"]
        cell.mkdir(parents=True, exist_ok=True)
        steps = 300 if row["method"] == "dafl" else 200
        rate = 0.02 + 0.002 * int(row["seed"])
        with (cell / "curve.jsonl").open("w") as f:
            for step in range(50, steps + 1, 50):
                record = {"step": step, "loss": 2.3 * np.exp(-rate * step) + 0.1, "lr": 1e-3}
                if row["method"] == "dafl":
                    collapsed = row["cell_id"] == COLLAPSED_CELL and step >= 250
                    record.update(loss_g=-1.0 - 0.001 * step, val_acc=60 + step / 30,
                                  sample_std=0.004 if collapsed else 0.9 * np.exp(-step / 2000))
                f.write(json.dumps(record) + "\n")
            if row["status"] == "failed":
                f.write('{"step": 35')  # a line cut by the failure
        if row["status"] == "failed":
            (cell / "error.txt").write_text("Traceback (most recent call last):\n  ...\nNonFiniteError: non-finite loss_s\n")
        elif "student_acc_val" in row:
            _write_anytime(cell, row)
        if row["method"] == "dafl" and row["status"] == "ok":
            import matplotlib.image

            matplotlib.image.imsave(cell / "samples.png", _digit_grid(), cmap="gray")
    return folder


@functools.cache
def _digit_grid() -> np.ndarray:
    """An 8 x 8 grid of real 8x8 digits, as a generator method would save its samples."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:64].reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(64, 64)
    return np.kron(images, np.ones((4, 4)))


def _write_anytime(cell: Path, row: dict) -> None:
    """Checkpoints geometric in teacher queries (steps and seconds in proportion), rising to the row's val acc."""
    queries, seconds, steps = float(row["teacher_queries"]), float(row["distill_seconds"]), int(row["student_steps"])
    final = float(row["student_acc_val"])
    fractions = [0.0] + list(np.geomspace(0.01, 1.0, 9))
    with (cell / "anytime.jsonl").open("w") as f:
        for i, frac in enumerate(fractions):
            acc = final if i == len(fractions) - 1 else 10 + (final - 10) * (1 - np.exp(-4 * frac)) / (1 - np.exp(-4))
            record = {"val_acc": round(acc, 3), "teacher_queries": int(queries * frac), "student_steps": int(steps * frac),
                      "seconds": round(0.01 + seconds * frac, 3)}
            if i == len(fractions) - 1:
                record["final"] = 1
            f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, Path]:
    results = make_results(tmp_path_factory.mktemp("results"))
    out = render(results, tmp_path_factory.mktemp("report") / "out")
    return results, out


def _section(page: str, dataset: str) -> str:
    return page.split(f'id="ds-{dataset}"')[1].split('id="failed"')[0].split('<section id="ds-')[0]


def _table_after(html_text: str, marker: str) -> list[list[str]]:
    """The cells (tags stripped) of the first table after ``marker``, header row first."""
    table = html_text.split(marker, 1)[1].split("</table>")[0]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S)
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", r, re.S)]
            for r in rows]


# ---------------------------------------------------------------------------------------------- rendering
def test_files(rendered):
    _, out = rendered
    assert (out / "index.html").stat().st_size > 10_000
    assert (out / "report.md").is_file() and (out / "summary.csv").is_file()
    names = {"fashion_mnist": ("tradeoff", "macs", "params", "data_access", "cost", "curves_fashion_mnist_lenet5_lenet5_half",
                               "curves_fashion_mnist_lenet5_pruned_l1_0.5",
                               "anytime_queries_fashion_mnist_lenet5_lenet5_half", "anytime_seconds_fashion_mnist_lenet5_pruned_l1_0.5"),
             "digits": ("tradeoff", "macs", "params", "data_access", "cost", "curves_digits_lenet5_lenet5_half",
                        "anytime_queries_digits_lenet5_lenet5_half",
                        "api_queries")}
    for dataset, plots in names.items():
        for plot in plots:
            stem = plot if plot.startswith(("anytime", "curves")) else f"{plot}_{dataset}"
            png, svg = out / "plots" / f"{stem}.png", out / "plots" / f"{stem}.svg"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
            assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()[:2000], svg
    assert len(list((out / "plots").glob("anytime_*.png"))) == 6  # (queries, seconds) x 3 pairs
    assert len(list((out / "samples").glob("*.png"))) == 2  # dafl on fashion_mnist and on digits (one seed each)
    best = pd.read_csv(out / "best_at_budget.csv")
    assert set(best["axis"]) == {"teacher_queries", "seconds"} and set(best["dataset"]) == {"fashion_mnist", "digits"}
    assert (best["val_acc_mean"].dropna() < 100).all()
    # the grid's report_budgets (here 0.0123 s, off the round ladder) are rungs of its axis's table only
    assert 0.0123 in set(best.loc[best["axis"] == "seconds", "budget"])
    assert 0.0123 not in set(best.loc[best["axis"] == "teacher_queries", "budget"])
    # kd_noise (teacher outputs, no data) serves the API-teacher user: the table has a column for it
    assert set(pd.read_csv(out / "latency_budget.csv")["user_access"]) == {"none", "alt", "few", "full", "api"}


def test_html_structure(rendered):
    _, out = rendered
    page = (out / "index.html").read_text()
    for anchor in ("ds-fashion_mnist", "ds-digits", "table-digits", "latency-fashion_mnist", "anytime-digits", "failed",
                   "environment"):
        assert f'id="{anchor}"' in page
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    # per dataset: 5 figures + the API-teacher figure + per pair its training curves and 2 anytime figures (fashion_mnist
    # 2 pairs, digits 1); 2 sample grids
    assert len(images) == (6 + 2 * 3) + (6 + 1 * 3) + 2 and all(src.startswith("data:image/png;base64,") for src in images)
    assert "src=\"plots/" not in page and "src=\"samples/" not in page  # self-contained
    section = _section(page, "fashion_mnist")
    table = _table_after(section, 'id="table-fashion_mnist"')
    header, rows = table[0], table[1:]
    col = {h: i for i, h in enumerate(header)}
    assert header[:6] == ["pair", "method", "data", "seeds ok", "final test acc %", "val acc %"]
    for needed in ("best-on-test acc % (paper protocol)", "collapsed", "budget (stopped by)", "student steps",
                   "teacher queries", "overrides (vs the method's preset)"):
        assert needed in col, needed
    # every (pair, method) once, sorted by accuracy within a pair
    methods = [(r[0], r[1]) for r in rows]
    assert sorted(methods) == sorted([("lenet5 → lenet5_half", m) for m in ("dafl", "kd", "kd_alt", "kd_noise", "student_only")]
                                     + [("lenet5 → pruned:l1:0.5", m) for m in ("fskd", "kd", "kd_noise")])
    kd = next(r for r in rows if r[:2] == ["lenet5 → lenet5_half", "kd"])
    assert kd[col["final test acc %"]] == "86.30 ± 0.25"  # mean ± sample std of 86.12 and 86.47
    assert kd[col["val acc %"]] == f"{np.mean([87.25, 86.05]):.2f} ± {np.std([87.25, 86.05], ddof=1):.2f}"
    assert kd[col["budget (stopped by)"]] == "0.1× paper" and kd[col["student steps"]] == "235"
    assert kd[col["overrides (vs the method's preset)"]] == "none"
    dafl = next(r for r in rows if r[1] == "dafl")
    assert dafl[col["best-on-test acc % (paper protocol)"]] == f"{np.mean([72.76, 69.72]):.2f} ± {np.std([72.76, 69.72], ddof=1):.2f}"
    assert dafl[col["collapsed"]] == "1/2 seeds"
    # the teacher is stated, and the environment, including the dirty tree and the resumed cell
    assert "teacher lenet5: 90.41% test accuracy, 61.7K params, 417K MACs, 0.158 ms CPU latency" in section
    env = page.split('id="environment"')[1]
    assert "2.13.0+cpu" in env and "3f2a9c1" in env and "Xeon" in env
    assert "DIRTY for 1 of 26 cells" in env and re.search(r"cells resumed after a stop</th><td[^>]*>1<", env)
    assert "teacher_queries=30000" in env and "5000" in env


def test_budgets_caps_and_overrides_in_the_table(rendered):
    _, out = rendered
    table = _table_after(_section((out / "index.html").read_text(), "digits"), 'id="table-digits"')
    col = {h: i for i, h in enumerate(table[0])}
    dafl = next(r for r in table[1:] if r[1] == "dafl")
    assert dafl[col["budget (stopped by)"]] == "cap 30K teacher queries; 1/1 seeds stopped by teacher_queries"
    assert dafl[col["teacher queries"]] == "30K" and dafl[col["student steps"]] == "234"
    assert dafl[col["overrides (vs the method's preset)"]] == "batch_size=128, gen_width=32"
    assert dafl[col["seeds ok"]] == "1/2"


def test_anytime_and_best_at_budget_sections(rendered):
    _, out = rendered
    page = (out / "index.html").read_text()
    section = _section(page, "digits")
    anytime = section.split('id="anytime-digits"')[1]
    assert "VALIDATION accuracy" in anytime and "headline result stays the final test accuracy" in anytime
    table = _table_after(anytime, "Best method at each teacher queries budget")
    assert table[0] == ["teacher queries ≤", "data-free (none)", "≤ alt (other real data)", "≤ full (any method)"]
    assert table[-1][0] == "60.2K"  # the ladder ends at the largest budget reached (kd_alt, kd_noise: 60160 queries)
    # at the largest budget every method has finished: the data-free winner is dafl (81.69 val, 1 seed: the other
    # seed failed), the full-data winner kd
    assert table[-1][1] == "dafl: 81.69 (1/1 seeds)"
    assert table[-1][-1].startswith("kd: ") and "(2/2 seeds)" in table[-1][-1]
    md = (out / "report.md").read_text()
    assert "Best method at each seconds budget" in md and "Validation accuracy vs teacher queries" in md


def test_collapse_is_flagged(rendered):
    _, out = rendered
    page = (out / "index.html").read_text()
    section = _section(page, "fashion_mnist")
    assert "dafl (lenet5 → lenet5_half, seed 1): generator collapsed at step 250 (sample_std 0.004 &lt; 0.02" in section
    assert "generator collapsed" not in _section(page, "digits")
    assert "generator collapsed at step 250" in (out / "report.md").read_text()


def test_failed_cells_section(rendered):
    _, out = rendered
    page = (out / "index.html").read_text()
    failed = page.split('id="failed"')[1].split('id="environment"')[0]
    assert "Failed cells (1)" in failed
    assert "NonFiniteError: non-finite loss_s at step 100" in failed and "Traceback" in failed
    digits = _section(page, "digits")
    assert "<td>1/2</td>" in digits  # dafl on digits: one of two seeds finished
    md = (out / "report.md").read_text()
    assert "## Failed cells (1)" in md and "NonFiniteError" in md


def test_markdown_links_exist(rendered):
    _, out = rendered
    md = (out / "report.md").read_text()
    links = re.findall(r"\]\(((?:plots|samples)/[^)]+)\)", md)
    assert len(links) >= 2 * 16 + 2  # PNG + SVG per plot, and the samples
    assert all((out / link).is_file() for link in links)
    assert re.search(r"\| \**lenet5 → lenet5_half\** \| \**kd\** \|", md)


def test_fronts_per_access_level_in_the_report(rendered):
    _, out = rendered
    section = _section((out / "index.html").read_text(), "fashion_mnist")
    fronts = _table_after(section, "Pareto fronts per user")
    by_level = {}
    for row in fronts[1:]:
        by_level.setdefault(row[0], []).append((row[1], row[2]))
    # data-free users: dafl on the fast student; kd_noise on the pruned one is slower and worse: not on the front
    assert by_level["data-free (none)"] == [("lenet5 → lenet5_half", "dafl")]
    assert by_level["≤ few samples"] == [("lenet5 → lenet5_half", "dafl"), ("lenet5 → pruned:l1:0.5", "fskd")]
    assert by_level["≤ full (any method)"] == [("lenet5 → lenet5_half", "kd"), ("lenet5 → pruned:l1:0.5", "kd")]
    assert by_level["API teacher (no data)"][0] == ("lenet5 → lenet5_half", "kd_noise")
    # the report's first table: the decision table, before the trade-off figure and the pair x method table
    assert section.index('id="latency-fashion_mnist"') < section.index("fig-tradeoff") < section.index('id="table-fashion_mnist"')
    latency = _table_after(section, 'id="latency-fashion_mnist"')
    assert latency[0] == ["latency ≤ ms", "data-free (none)", "≤ alt (other real data)", "≤ few samples",
                          "≤ full (any method)", "API teacher (no data)"]
    fast = latency[1]  # the fastest budget: only the lenet5_half rows fit
    # kd_alt (alt data) is worse than dafl on the fast student: users with alt or few data do best with dafl
    assert [cell.split(":")[0] for cell in fast[1:]] == ["lenet5_half · dafl"] * 3 + ["lenet5_half · kd", "lenet5_half · kd_noise"]
    assert fast[4].endswith("86.30 ± 0.25 (n=2)")


def test_old_format_csv_renders(tmp_path):
    """A runs.csv of an older `bench run` (no validation, caps, arch ids, anytime curves) still renders."""
    old = pd.read_csv(OLD_FIXTURE, dtype=str, keep_default_na=False)
    fashion = tmp_path / "old.csv"
    old[old["dataset"] == "fashion_mnist"].to_csv(fashion, index=False)
    out = render(make_results(tmp_path / "results", fashion), tmp_path / "out")
    page = (out / "index.html").read_text()
    assert ("runs.csv lacks the column(s) compute_cap, validation, teacher_outputs, teacher_queries_by, student_steps, "
            "stopped_by, student_acc_val") in page
    assert "No cell has an anytime.jsonl" in page
    assert not list((out / "plots").glob("anytime_*")) and not (out / "best_at_budget.csv").exists()
    table = _table_after(_section(page, "fashion_mnist"), 'id="table-fashion_mnist"')
    col = {h: i for i, h in enumerate(table[0])}
    kd = next(r for r in table[1:] if r[:2] == ["lenet5 → lenet5_half", "kd"])
    assert kd[col["final test acc %"]] == "86.30 ± 0.25" and kd[col["val acc %"]] == "–"
    assert kd[col["student steps"]] == "235"  # the iterations column where there are no student steps
    # per-cell latencies of old runs are pooled per architecture: the median of the 10 lenet5_half cells
    old = pd.read_csv(OLD_FIXTURE)
    half = old[(old["dataset"] == "fashion_mnist") & (old["student"] == "lenet5_half")]["latency_ms"]
    assert kd[col["latency ms (eager, b=1, per student arch)"]].startswith(f"{half.median():.3f} (IQR ")
    env = page.split('id="environment"')[1]
    assert re.search(r"git tree</th><td[^>]*>– \(not recorded\)", env)
    assert re.search(r"cells resumed after a stop</th><td[^>]*>– \(not recorded\)", env)
    assert (out / "plots" / "tradeoff_fashion_mnist.png").is_file() and "Pareto fronts per user" in page


def test_csv_without_optional_columns(tmp_path):
    frame = pd.read_csv(FIXTURE, dtype=str, keep_default_na=False)
    frame = frame.drop(columns=["latency_ms", "latency_iqr_ms", "ort_latency_ms", "ort_latency_iqr_ms", "macs",
                                "student_acc_best", "best_protocol", "cpu", "git_commit", "label"])
    frame = frame[(frame["status"] == "ok") & (frame["dataset"] == "digits")]
    small = tmp_path / "small.csv"
    frame.to_csv(small, index=False)
    out = render(make_results(tmp_path / "results", small), tmp_path / "out")
    page = (out / "index.html").read_text()
    assert ("runs.csv lacks the column(s) label, student_acc_best, best_protocol, macs, latency_ms, latency_iqr_ms, "
            "ort_latency_ms, ort_latency_iqr_ms, cpu, git_commit") in page
    assert ("the latency-budget table and accuracy vs latency (and its Pareto fronts): runs.csv has no latency_ms "
            "values") in page
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
    labels = [f"m{i}" for i in range(14)]
    colours, dashes = report.method_colours(labels), report.method_dashes(labels)
    assert len(set(colours.values())) == report.MAX_COLOURS == 8  # no figure relies on more than 8 colours
    assert len({(colours[m], dashes[m]) for m in labels}) == 14  # colour and line style tell all 14 apart


def test_cli_report_with_only_some_methods(tmp_path, monkeypatch):
    """`bench report` on a folder with one method of the fixture; default --out is <results>/report."""
    from click.testing import CliRunner

    from bench.cli import main

    frame = pd.read_csv(FIXTURE, dtype=str, keep_default_na=False)
    one = tmp_path / "one.csv"
    frame[(frame["method"] == "kd") & (frame["dataset"] == "fashion_mnist") & (frame["student"] == "lenet5_half")].to_csv(
        one, index=False)
    results = make_results(tmp_path / "quickish", one)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["report", str(results)])
    assert result.exit_code == 0, result.output
    out = results / "report"
    assert f"report: {out / 'index.html'}" in result.output
    page = (out / "index.html").read_text()
    assert (out / "plots" / "tradeoff_fashion_mnist.png").is_file() and "Pareto fronts" in page
    assert page.count('src="data:image/png;base64,') == 6 + 2  # 6 plots, anytime vs queries and vs seconds
    missing = CliRunner().invoke(main, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "does not exist" in missing.output and "Traceback" not in missing.output
    assert "Examples" in CliRunner().invoke(main, ["report", "--help"]).output


def test_rows_of_cells_no_longer_in_the_grid_are_left_out(tmp_path):
    digits = tmp_path / "digits.csv"
    frame = pd.read_csv(FIXTURE, dtype=str, keep_default_na=False)
    frame[frame["dataset"] == "digits"].to_csv(digits, index=False)
    results = make_results(tmp_path / "results", digits)
    rows = list(csv.DictReader(digits.open()))
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


# ---------------------------------------------------------------------------------------------- decision maths
def test_pareto_front():
    points = pd.DataFrame({"lat": [1.0, 2.0, 3.0, 1.5, 4.0], "acc": [50.0, 70.0, 65.0, 40.0, 80.0]})
    assert pareto_front(points, "lat", "acc").index.tolist() == [0, 1, 4]


def test_step_values_read_the_last_checkpoint_at_or_before_x():
    # equal x twice (queries flat while the student trains): the later checkpoint counts
    x, y = [10, 100, 100, 1000], [10.0, 50.0, 60.0, 80.0]
    got = step_values(x, y, [5, 10, 99, 100, 999, 1000, 5000])
    np.testing.assert_array_equal(got, [np.nan, 10, 10, 60, 60, 80, 80])  # NaN before the first; the final holds
    assert np.isnan(step_values([], [], [1.0])).all()
    np.testing.assert_allclose(geometric_grid(1, 1000, 4), [1, 10, 100, 1000])
    assert geometric_grid(5, 5).tolist() == [5]
    with pytest.raises(ValueError, match="0 < lo <= hi"):
        geometric_grid(0, 10)


def test_anytime_band_over_seeds():
    curves = pd.DataFrame({
        "cell_id": ["a"] * 4 + ["b"] * 3,
        "order": [0, 1, 2, 3, 0, 1, 2],
        "teacher_queries": [10, 100, 100, 1000, 200, 400, 2000],
        "val_acc": [10.0, 50.0, 60.0, 80.0, 12.0, 40.0, 90.0]})
    band = anytime_band(curves, "teacher_queries", np.array([50.0, 100.0, 300.0, 1000.0, 5000.0]))
    # seed a: 10, 60, 60, 80, 80; seed b: -, -, 12, 40, 90
    np.testing.assert_array_equal(band["n"], [1, 1, 2, 2, 2])
    np.testing.assert_allclose(band["mean"], [10, 60, 36, 60, 85])
    np.testing.assert_allclose(band["min"], [10, 60, 12, 40, 80])
    np.testing.assert_allclose(band["max"], [10, 60, 60, 80, 90])
    np.testing.assert_allclose(band["std"].iloc[2:], [np.std([60, 12], ddof=1), np.std([80, 40], ddof=1), np.std([80, 90], ddof=1)])
    assert band["std"].iloc[:2].isna().all() and (band["n_seeds"] == 2).all()


def test_budget_ladder():
    assert budget_ladder(256, 30000) == [300, 1000, 3000, 10000, 30000]
    assert budget_ladder(0.04, 39.2) == [0.1, 0.3, 1, 3, 10, 30, 39.2]
    long = budget_ladder(1, 1e9)
    assert len(long) == report.MAX_LADDER and long[-1] == 1e9 and all(math.log10(v).is_integer() for v in long)
    assert budget_ladder(7, 7) == [7]


def _anytime_rows(spec: dict) -> pd.DataFrame:
    """``{(label, access, seed): [(queries, val_acc), ...]}`` -> anytime rows of one dataset and pair."""
    rows = []
    for (label, access, seed), points in spec.items():
        for order, (q, acc) in enumerate(points):
            rows.append({"cell_id": f"{label}-{seed}", "dataset": "d", "pair": "t → s", "label": label,
                         "data_access": access, "seed": seed, "order": order, "val_acc": acc, "teacher_queries": q,
                         "seconds": q / 100, "student_steps": order, "final": order == len(points) - 1})
    return pd.DataFrame(rows)


def test_best_at_budget_picks_per_access_level_and_budget():
    anytime = _anytime_rows({
        ("fast_free", "none", 0): [(0, 10), (100, 40), (1000, 45), (10000, 46)],
        ("fast_free", "none", 1): [(0, 10), (100, 44), (1000, 47), (10000, 48)],
        ("slow_free", "none", 0): [(0, 10), (100, 15), (1000, 30), (10000, 70)],
        ("few_shot", "few", 0): [(0, 10), (100, 20), (1000, 60)],  # finished at 1000: 60 holds after
        ("full_kd", "full", 0): [(0, 10), (100, 30), (1000, 55), (10000, 90)],
        ("late", "full", 0): [(500, 99)],  # its first checkpoint comes after budget 100
    })
    table = best_at_budget(anytime, "teacher_queries", [100, 1000, 10000])
    pick = {(r["budget"], r["user_access"]): (r["label"], r["val_acc_mean"], r["n"]) for _, r in table.iterrows()}
    assert set(table["user_access"]) == {"none", "few", "full"}
    assert pick[(100, "none")] == ("fast_free", 42.0, 2)
    assert pick[(1000, "none")] == ("fast_free", 46.0, 2)
    assert pick[(10000, "none")] == ("slow_free", 70.0, 1)
    assert pick[(100, "few")] == ("fast_free", 42.0, 2)  # a few-sample user may run the data-free method
    assert pick[(1000, "few")] == ("few_shot", 60.0, 1)
    assert pick[(10000, "few")] == ("slow_free", 70.0, 1)  # few_shot keeps its final 60; slow_free reaches 70
    assert pick[(100, "full")] == ("fast_free", 42.0, 2)  # "late" has no checkpoint by then
    assert pick[(1000, "full")] == ("late", 99.0, 1)
    header, rows = report.best_at_budget_rows(table.assign(dataset="d", pair="t → s"), "teacher_queries")
    assert header == ["teacher queries ≤", "data-free (none)", "≤ few samples", "≤ full (any method)"]
    assert rows[0] == ["100", "fast_free: 42.00 (2/2 seeds)", "fast_free [none]: 42.00 (2/2 seeds)",
                       "fast_free [none]: 42.00 (2/2 seeds)"]


def test_report_ladder_adds_the_named_budgets_up_to_the_compute_reached():
    ladder = report.report_ladder(pd.Series([0.5, 20.0, 600.0]), [45, 150, 600, 1000])
    assert {45.0, 150.0, 600.0} <= set(ladder) and 1000.0 not in ladder and ladder == sorted(ladder)
    assert report.report_ladder(pd.Series([0.5, 20.0, 600.0])) == budget_ladder(0.6, 600.0)


def test_best_at_budget_reports_ties():
    anytime = _anytime_rows({("a", "none", 0): [(0, 10), (100, 50)], ("b", "none", 0): [(0, 10), (100, 50)],
                             ("c", "none", 0): [(0, 10), (100, 20)]})
    table = best_at_budget(anytime, "teacher_queries", [1, 100])
    assert table["tied"].tolist() == ["a,b,c", "a,b"]
    _, rows = report.best_at_budget_rows(table, "teacher_queries")
    assert rows == [["1", "tie of 3 methods: 10.00"], ["100", "a = b: 50.00 (1/1 seeds)"]]


def _points(rows):
    return pd.DataFrame(rows, columns=["label", "data_access", "arch_latency_ms_median", "student_acc_mean"]).assign(
        arch_latency_ms_iqr=0.001, student_acc_std=np.nan, n_ok=1, dataset="d", pair="t → s", student="s",
        params_mean=1000.0, macs_mean=2000.0)


def test_fronts_per_access_level():
    points = _points([("dafl", "none", 1.0, 60.0), ("noise", "none", 2.0, 65.0), ("alt", "alt", 1.0, 70.0),
                      ("fskd", "few", 2.0, 80.0), ("kd", "full", 1.0, 75.0), ("kd_big", "full", 3.0, 90.0),
                      ("odd", "?", 0.5, 99.0)])
    fronts = access_fronts(points, "arch_latency_ms_median", "student_acc_mean")
    assert list(fronts) == ["none", "alt", "few", "full", "?"]
    labels = {level: front["label"].tolist() for level, front in fronts.items()}
    assert labels == {"none": ["dafl", "noise"], "alt": ["alt"], "few": ["alt", "fskd"], "full": ["kd", "fskd", "kd_big"],
                      "?": ["odd"]}  # an unknown level stands alone


def test_latency_budget_table():
    points = _points([("dafl", "none", 1.0, 60.0), ("noise", "none", 2.0, 65.0), ("fskd", "few", 2.0, 80.0),
                      ("kd", "full", 1.0, 75.0), ("kd_big", "full", 3.0, 90.0)])
    table = latency_budget_table(points)
    pick = {(r["latency_budget_ms"], r["user_access"]): r["label"] for _, r in table.iterrows()}
    assert pick == {(1.0, "none"): "dafl", (1.0, "few"): "dafl", (1.0, "full"): "kd",
                    (2.0, "none"): "noise", (2.0, "few"): "fskd", (2.0, "full"): "fskd",
                    (3.0, "none"): "noise", (3.0, "few"): "fskd", (3.0, "full"): "kd_big"}
    assert table.loc[0, "params_mean"] == 1000.0 and table.loc[0, "macs_mean"] == 2000.0
    header, rows = report.latency_budget_rows(table)
    assert "params" in header and "MACs" in header and rows[0][:3] == ["1.000", "data-free (none)", "dafl"]


def test_collapse_flags():
    def curve(cell, values):
        return [{"cell_id": cell, "dataset": "d", "pair": "t → s", "label": "dafl", "seed": 0, "status": "ok",
                 "step": 50 * (i + 1), "key": "sample_std", "value": v} for i, v in enumerate(values)]

    curves = pd.DataFrame(curve("ok", [0.9, 0.5, 0.3]) + curve("dead", [0.9, 0.1, 0.01, 0.003])
                          + [{"cell_id": "other", "dataset": "d", "pair": "t → s", "label": "kd", "seed": 0, "status": "ok",
                              "step": 50, "key": "loss", "value": 0.001}])
    flags = collapse_flags(curves)
    assert flags["cell_id"].tolist() == ["dead"] and flags.loc[0, "step"] == 150
    assert flags.loc[0, "sample_std"] == 0.01 and flags.loc[0, "last_sample_std"] == 0.003
    assert "generator collapsed at step 150" in report.collapse_text(flags.iloc[0])
    assert collapse_flags(curves, threshold=0.001).empty


def test_overrides_fall_back_to_the_other_rows_for_unregistered_methods():
    df = pd.DataFrame({"method": ["my_plugin"] * 2 + ["kd"], "dataset": ["digits"] * 3, "preset": ["", "", "digits"],
                       "method_params": [json.dumps({"lr": 0.1, "width": 8}), json.dumps({"lr": 0.1, "width": 16}),
                                         _method_params("kd", "digits", "digits").replace('"lr": 0.001', '"lr": 0.5')]})
    overrides = report.method_overrides(df)
    assert overrides.tolist() == ["width=8 (vs other rows)", "width=16 (vs other rows)", "lr=0.5"]


# ---------------------------------------------------------------------------------------------- decision table
DECISION_METHODS = {"kd": ("full", "outputs"), "fskd": ("few", "features"), "dafl": ("none", "gradients"),
                    "kd_noise": ("none", "outputs"), "student_only": ("full", "none")}
USERS = {"data-free (none)": lambda a, t: a == "none", "≤ few samples": lambda a, t: a in ("none", "few"),
         "≤ full (any method)": lambda a, t: True, "API teacher (no data)": lambda a, t: a == "none" and t == "outputs"}


def _constructed_runs(folder: Path) -> pd.DataFrame:
    """A runs.csv of 5 students x 5 methods x 3 seeds with seeded random accuracies and ONNX Runtime latencies."""
    from bench.store import COLUMNS

    rng = np.random.default_rng(7)
    students = {f"s{i}": (0.01 * 2 ** i, 1000 * 3 ** i) for i in range(5)}  # name -> (ort latency ms, MACs)
    rows = []
    for student, (latency, macs) in students.items():
        for method, (data, teacher) in DECISION_METHODS.items():
            base = rng.uniform(20, 90)
            for seed in range(3):
                row = dict.fromkeys(COLUMNS, "")
                row.update(cell_id=f"{student}-{method}-{seed}", status="ok", dataset="fashion_mnist", teacher="lenet5_bn",
                           student=student, method=method, label=method, seed=seed, data_access=data,
                           teacher_access=teacher, student_acc=round(base + rng.normal(0, 2), 2), teacher_acc=90.0,
                           params=macs // 10, macs=macs, arch_id=f"arch-{student}", input_shape="[1, 32, 32]",
                           latency_ms=0.2, latency_iqr_ms=0.01, ort_latency_ms=latency, ort_latency_iqr_ms=latency / 20,
                           latency_threads=1, cpu="test CPU")
                rows.append(row)
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(folder / "runs.csv", index=False)
    return frame


def test_decision_table_cells_are_the_true_maxima_under_each_budget(tmp_path):
    frame = _constructed_runs(tmp_path / "results")
    out = render(tmp_path / "results", tmp_path / "out")
    table = _table_after(_section((out / "index.html").read_text(), "fashion_mnist"), 'id="latency-fashion_mnist"')
    header, rows = table[0], table[1:]
    assert header == ["latency ≤ ms", *USERS]
    means = frame.groupby(["student", "label", "data_access", "teacher_access"]).agg(
        acc=("student_acc", "mean"), std=("student_acc", "std"), n=("seed", "size"), latency=("ort_latency_ms", "first")
    ).reset_index()
    budgets = sorted(means["latency"].unique())
    assert [float(r[0]) for r in rows] == pytest.approx(budgets, rel=1e-3)  # ONNX Runtime latencies: the default
    for budget, row in zip(budgets, rows):
        for user, cell in zip(USERS.values(), row[1:]):
            serves = np.array([user(a, t) for a, t in zip(means["data_access"], means["teacher_access"])])
            allowed = means[(means["latency"] <= budget).to_numpy() & serves]
            best = allowed.loc[allowed["acc"].idxmax()]
            assert cell == f"{best['student']} · {best['label']}: {best['acc']:.2f} ± {best['std']:.2f} (n=3)", (budget, cell)
    page = (out / "index.html").read_text()
    assert "ONNX Runtime (CPU execution provider), batch 1, median over timed blocks, 1 thread, on test CPU" in page
    # the other backend on request: every row's eager latency is the same, so one budget row
    eager = render(tmp_path / "results", tmp_path / "eager", latency_backend="eager")
    rows = _table_after(_section((eager / "index.html").read_text(), "fashion_mnist"), 'id="latency-fashion_mnist"')[1:]
    assert len(rows) == 1 and rows[0][0] == "0.2"


def test_latency_ranking_against_macs():
    points = pd.DataFrame({"student": ["a", "b", "c"], "macs_mean": [1e3, 1e4, 1e5],
                           "arch_latency_ms_median": [0.1, 0.3, 0.2]})
    (sentence,) = report.latency_vs_macs(points)
    assert sentence.startswith("c (100K MACs, 0.2 ms) runs faster than b (10K MACs, 0.3 ms)")
    assert report.latency_vs_macs(points.assign(arch_latency_ms_median=[0.1, 0.2, 0.3])) == []
