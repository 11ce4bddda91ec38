"""The comparison report: ``bench report RESULTS_DIR`` -> ``index.html``, ``report.md`` and every plot.

Input (written by ``bench run``):

- ``RESULTS_DIR/runs.csv``: one row per cell, columns :data:`bench.store.COLUMNS`;
- ``RESULTS_DIR/cells/<cell_id>/curve.jsonl``: the training curve (JSON lines ``{"step": ..., <scalar>: ...}``);
- ``RESULTS_DIR/cells/<cell_id>/samples.png``: generated/synthesised images (optional);
- ``RESULTS_DIR/cells/<cell_id>/error.txt``: the traceback of a failed cell (optional);
- ``RESULTS_DIR/grid.json``: the grid's name and description (optional).

Output (default ``<results dir>/report``, beside its runs.csv): ``index.html`` (self-contained: every plot inline as a
base64 PNG), ``report.md`` (plots linked from ``plots/``), ``summary.csv`` (the aggregated table) and
every plot as ``plots/<name>.png`` and ``plots/<name>.svg``.

Per dataset: accuracy vs CPU latency with its Pareto front, accuracy vs MACs and vs params, accuracy vs
real data used (the data-access axis), accuracy vs distillation cost, the pair x method table, training
curves and sample grids; then failed cells and the environment. Accuracy is the final student's top-1
test accuracy, mean +- std over seeds; best-on-test appears only in the table, labelled as the paper
protocol. Each method keeps one colour (from its sorted label) in every figure; each student one marker.
Only pandas, matplotlib and seaborn are used: nothing here runs a model.
"""
from __future__ import annotations

import base64
import contextlib
import html
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from bench.store import COLUMNS, RECORD_ONLY

# Without these the rows cannot be placed in a table at all.
REQUIRED_COLUMNS = ("dataset", "teacher", "student", "method", "student_acc")
NUMERIC_COLUMNS = ("seed", "budget", "real_samples_used", "teacher_queries", "teacher_acc", "student_acc",
                   "student_acc_best", "params", "flops", "macs", "teacher_params", "teacher_macs", "latency_ms",
                   "latency_iqr_ms", "latency_threads", "throughput", "distill_seconds", "iterations", "peak_mem_mb",
                   "teacher_latency_ms")
DATA_ACCESS_ORDER = ("none", "alt", "few", "full")
DATA_ACCESS_TEXT = {"none": "none\n(data-free)", "alt": "alt\n(other real data)", "few": "few\nsamples",
                    "full": "full\ntraining set"}

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "8")
LINESTYLES = ("-", "--", ":", "-.")
TEACHER_MARKER = "*"
MAX_CURVE_PANELS = 9
STAT_COLUMNS = ("student_acc", "student_acc_best", "params", "macs", "flops", "latency_ms", "latency_iqr_ms",
                "distill_seconds", "real_samples_used", "teacher_queries", "throughput", "iterations")


class ReportError(ValueError):
    """The results folder cannot be turned into a report (missing or empty runs.csv, unusable columns)."""


# ---------------------------------------------------------------------------------------------- loading
def load_runs(results_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """``runs.csv`` as a DataFrame (numbers parsed, one row per cell) and notes about what it lacks."""
    results_dir = Path(results_dir)
    path = results_dir / "runs.csv"
    if not results_dir.is_dir():
        raise ReportError(f"results folder {str(results_dir)!r} does not exist; give the --out folder of a `bench run`")
    if not path.is_file():
        raise ReportError(f"{path} does not exist: {str(results_dir)!r} is not a results folder of `bench run` "
                          f"(it holds {', '.join(sorted(p.name for p in results_dir.iterdir())[:8]) or 'nothing'})")
    if path.stat().st_size == 0:
        raise ReportError(f"{path} is empty: no cell has finished yet")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, on_bad_lines="skip")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} is not a readable CSV: {exc}") from None
    if df.empty:
        raise ReportError(f"{path} has a header but no rows: no cell has finished yet")
    missing_required = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing_required:
        raise ReportError(f"{path} lacks the required column(s) {missing_required}; its columns are "
                          f"{list(df.columns)}; expected the columns of bench.store.COLUMNS")
    notes = []
    missing = [c for c in COLUMNS if c not in df.columns and c not in RECORD_ONLY]
    if missing:
        notes.append(f"runs.csv lacks the column(s) {', '.join(missing)}: what needs them is left out or shown as '–'.")
    unknown = [c for c in df.columns if c not in COLUMNS]
    if unknown:
        notes.append(f"runs.csv has column(s) this report does not know and ignores: {', '.join(unknown)}.")
    for column in COLUMNS:
        if column not in df.columns:
            df[column] = ""
    if "cell_id" in df.columns and (df["cell_id"] != "").all():
        df = df.drop_duplicates("cell_id", keep="last")  # the latest row per cell wins, as in the store
    for column in NUMERIC_COLUMNS:
        if column in df.columns:
            df[column] = pd.to_numeric(df[column], errors="coerce")
    if "status" in missing:
        df["status"] = np.where(df["student_acc"].notna(), "ok", "failed")
    df["status"] = df["status"].replace("", "failed")
    df.loc[(df["status"] == "ok") & df["student_acc"].isna(), "status"] = "failed"
    df["label"] = df["label"].where(df["label"] != "", df["method"])
    for column in ("dataset", "teacher", "student", "label", "data_access"):
        df[column] = df[column].replace("", "?")
    df["pair"] = df["teacher"] + " → " + df["student"]
    return df.reset_index(drop=True), notes


def method_colours(labels: Iterable[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per method label, stable: assigned in sorted label order."""
    import seaborn as sns

    names = sorted(set(labels))
    palette = sns.color_palette("colorblind" if len(names) <= 10 else "husl", max(len(names), 1))
    return {name: tuple(palette[i]) for i, name in enumerate(names)}


def student_markers(students: Iterable[str]) -> dict[str, str]:
    return {name: MARKERS[i % len(MARKERS)] for i, name in enumerate(sorted(set(students)))}


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, teacher, student, method label): mean and std over the finished seeds.

    ``arch_latency_ms_median/iqr`` pool the latency of every finished cell of the dataset with the same
    student architecture (student spec, params, MACs): latency belongs to the architecture, not to the
    method that trained its weights, so per-method differences are timing noise and must not decide
    the Pareto front. Median and interquartile range, because one cell timed while the machine was
    busy must not move the point or widen its error bar across the whole plot.
    """
    keys = ["dataset", "teacher", "student", "pair", "label"]
    ok_all = df[df["status"] == "ok"]
    arch_keys = ["dataset", "student", "params", "macs"]
    pooled = {key: group["latency_ms"].dropna() for key, group in ok_all.groupby(arch_keys, dropna=False)}
    rows = []
    for key, group in df.groupby(keys, sort=True):
        ok = group[group["status"] == "ok"]
        row = dict(zip(keys, key))
        row.update(method=group["method"].iloc[0], data_access=_first(group["data_access"]),
                   teacher_access=_first(group["teacher_access"]), best_protocol=_first(ok["best_protocol"]),
                   n_ok=len(ok), n_total=len(group))
        for column in STAT_COLUMNS:
            values = ok[column].dropna()
            row[f"{column}_mean"] = values.mean() if len(values) else math.nan
            row[f"{column}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
        arch = pooled.get(tuple(ok[arch_keys].iloc[0]), pd.Series(dtype=float)) if len(ok) else pd.Series(dtype=float)
        row["arch_latency_ms_median"] = arch.median() if len(arch) else math.nan
        row["arch_latency_ms_iqr"] = arch.quantile(0.75) - arch.quantile(0.25) if len(arch) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def teachers_of(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, teacher arch): its accuracy, params, MACs (and latency when recorded)."""
    rows = []
    for (dataset, teacher), group in df.groupby(["dataset", "teacher"], sort=True):
        rows.append({"dataset": dataset, "teacher": teacher,
                     **{c: group[c].mean() for c in ("teacher_acc", "teacher_params", "teacher_macs", "teacher_latency_ms")
                        if c in group}})
    return pd.DataFrame(rows)


def pareto_front(points: pd.DataFrame, cost: str, gain: str) -> pd.DataFrame:
    """The rows no other row beats on both axes (lower ``cost``, higher ``gain``), by increasing cost."""
    usable = points.dropna(subset=[cost, gain]).sort_values([cost, gain], ascending=[True, False])
    front, best = [], -math.inf
    for index, row in usable.iterrows():
        if row[gain] > best:
            front.append(index)
            best = row[gain]
    return usable.loc[front]


def _first(values: pd.Series) -> str:
    values = [v for v in values if isinstance(v, str) and v]
    return values[0] if values else ""


# ---------------------------------------------------------------------------------------------- plotting
@dataclass
class Plot:
    name: str  # file stem under plots/
    title: str
    caption: str
    png: bytes = b""


@dataclass
class Section:
    dataset: str
    table: pd.DataFrame
    teachers: pd.DataFrame
    plots: list[Plot] = field(default_factory=list)
    front: pd.DataFrame | None = None
    samples: list[tuple[str, str]] = field(default_factory=list)  # (caption, relative path)
    skipped: list[str] = field(default_factory=list)  # plots not drawn, and why


@contextlib.contextmanager
def _style():
    import matplotlib
    import seaborn as sns

    # svg.hashsalt + no date: re-rendering the same results gives byte-identical SVGs (diff-able in git)
    with matplotlib.rc_context({"svg.hashsalt": "dfkd-bench", "svg.fonttype": "path"}), \
            sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        yield


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg via savefig

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, folder: Path, plot: Plot) -> None:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130, metadata={"Software": None})
    plot.png = buffer.getvalue()
    fig.set_layout_engine("none")  # keep the layout just computed: the SVG gets the same one, ~30% faster
    (folder / f"{plot.name}.png").write_bytes(plot.png)
    fig.savefig(folder / f"{plot.name}.svg", format="svg", metadata={"Date": None})


def _log_if_wide(ax, values: Iterable[float], axis: str = "x", ratio: float = 20.0) -> bool:
    values = [v for v in values if v is not None and np.isfinite(v) and v > 0]
    if values and max(values) / min(values) >= ratio:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        return True
    return False


def _legend(fig, colours, markers, labels_present, students_present, extra=()):
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[m], marker="o", linestyle="none", markersize=8, label=m)
               for m in sorted(set(labels_present))]
    if len(set(students_present)):
        handles.append(Line2D([], [], linestyle="none", label=""))
        handles += [Line2D([], [], color="0.35", marker=markers[s], linestyle="none", markersize=8, label=f"student: {s}")
                    for s in sorted(set(students_present))]
    handles += list(extra)
    fig.legend(handles=handles, loc="outside right upper", frameon=False, title="method (colour)", alignment="left")


def _centre(x: str) -> str:
    """The aggregated column plotted for ``x``: the pooled latency's median, else the mean over seeds."""
    return f"{x}_median" if x == "arch_latency_ms" else f"{x}_mean"


def _spread(row: pd.Series, x: str) -> float:
    """Half-width of the x error bar: half the IQR for the pooled latency, else the std over seeds."""
    return row[f"{x}_iqr"] / 2 if x == "arch_latency_ms" else row[f"{x}_std"]


def _points(ax, agg: pd.DataFrame, x: str, colours, markers, *, xerr: bool = True) -> None:
    for _, row in agg.iterrows():
        xv, yv = row[_centre(x)], row["student_acc_mean"]
        if not (np.isfinite(xv) and np.isfinite(yv)):
            continue
        ax.errorbar(xv, yv, yerr=_nan0(row["student_acc_std"]), xerr=_nan0(_spread(row, x)) if xerr else None,
                    fmt=markers[row["student"]], color=colours[row["label"]], markersize=8, capsize=3, elinewidth=1.2,
                    markeredgecolor="white", markeredgewidth=0.6, zorder=3)


def _nan0(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else value


def _teacher_handles(teachers: pd.DataFrame, as_line: bool):
    from matplotlib.lines import Line2D

    out = []
    for i, (_, t) in enumerate(teachers.iterrows()):
        label = f"teacher {t['teacher']}: {t['teacher_acc']:.2f}%" if np.isfinite(t.get("teacher_acc", np.nan)) else f"teacher {t['teacher']}"
        if as_line:
            out.append(Line2D([], [], color="0.15", linestyle=LINESTYLES[(i + 1) % len(LINESTYLES)], label=label))
        else:
            out.append(Line2D([], [], color="0.15", marker=TEACHER_MARKER, markersize=13, linestyle="none", label=label))
    return out


def _accuracy_vs(agg, teachers, x, xlabel, title, colours, markers, *, teacher_x=None, front=None):
    """Accuracy (mean +- std over seeds) against ``x``; the teacher as a point (or a line without ``teacher_x``)."""
    fig, axes = _figure(8.6, 4.6)
    ax = axes[0, 0]
    _points(ax, agg, x, colours, markers)
    extra = []
    shown_teachers = teachers.dropna(subset=["teacher_acc"]) if "teacher_acc" in teachers else teachers.iloc[0:0]
    xs = list(agg[_centre(x)])
    if len(shown_teachers):
        with_x = teacher_x is not None and teacher_x in shown_teachers and shown_teachers[teacher_x].notna().any()
        if with_x:
            for _, t in shown_teachers.iterrows():
                ax.plot(t[teacher_x], t["teacher_acc"], marker=TEACHER_MARKER, color="0.15", markersize=15,
                        linestyle="none", zorder=4)
                xs.append(t[teacher_x])
        else:
            for i, (_, t) in enumerate(shown_teachers.iterrows()):
                ax.axhline(t["teacher_acc"], color="0.15", linewidth=1, linestyle=LINESTYLES[(i + 1) % len(LINESTYLES)], zorder=1)
        extra += _teacher_handles(shown_teachers, as_line=not with_x)
    if front is not None and len(front):
        from matplotlib.lines import Line2D

        fx, fy = front[_centre(x)].to_numpy(), front["student_acc_mean"].to_numpy()
        ax.step(fx, fy, where="post", color="0.45", linestyle="--", linewidth=1.2, zorder=2)
        ax.scatter(fx, fy, s=260, facecolors="none", edgecolors="0.3", linewidths=1.2, zorder=2)
        extra.append(Line2D([], [], color="0.45", linestyle="--", marker="o", markerfacecolor="none", markersize=12,
                            label="Pareto front"))
    _log_if_wide(ax, xs)
    ax.margins(0.08)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%, final, mean ± std over seeds)")
    ax.set_title(title, loc="left", fontsize="medium")
    _legend(fig, colours, markers, agg["label"], agg["student"], extra)
    return fig


def _data_access_figure(agg, teachers, title, colours, markers):
    fig, axes = _figure(11.5, 4.6, ncols=2)
    ax, ax2 = axes[0]
    present = [a for a in DATA_ACCESS_ORDER if a in set(agg["data_access"])] + \
              sorted(set(agg["data_access"]) - set(DATA_ACCESS_ORDER))
    for ci, access in enumerate(present):
        group = agg[agg["data_access"] == access].sort_values(["label", "student"])
        offsets = np.linspace(-0.3, 0.3, len(group)) if len(group) > 1 else [0.0]
        for off, (_, row) in zip(offsets, group.iterrows()):
            if np.isfinite(row["student_acc_mean"]):
                ax.errorbar(ci + off, row["student_acc_mean"], yerr=_nan0(row["student_acc_std"]), fmt=markers[row["student"]],
                            color=colours[row["label"]], markersize=8, capsize=3, markeredgecolor="white", zorder=3)
    for ci in range(len(present) - 1):
        ax.axvline(ci + 0.5, color="0.85", linewidth=0.8)
    ax.set_xticks(range(len(present)), [DATA_ACCESS_TEXT.get(a, a) for a in present])
    ax.set_xlim(-0.6, len(present) - 0.4)
    ax.grid(axis="x", visible=False)
    ax.set_xlabel("real data the method may read (data_access)")
    ax.set_ylabel("test accuracy (%, final, mean ± std over seeds)")
    ax.set_title(f"{title}: by data access", loc="left", fontsize="medium")
    has_counts = agg["real_samples_used_mean"].notna().any()
    if has_counts:
        _points(ax2, agg, "real_samples_used", colours, markers, xerr=False)
        ax2.set_xscale("symlog", linthresh=1)
        ax2.set_xlim(left=-0.5)
        ax2.set_xlabel("real training images of this dataset read (count, symlog)")
        ax2.set_title("by number of real samples used", loc="left", fontsize="medium")
        ax2.sharey(ax)
    else:
        ax2.set_axis_off()
        ax2.text(0.5, 0.5, "runs.csv has no real_samples_used values", ha="center", va="center", transform=ax2.transAxes)
    extra = []
    if "teacher_acc" in teachers and teachers["teacher_acc"].notna().any():
        for i, (_, t) in enumerate(teachers.dropna(subset=["teacher_acc"]).iterrows()):
            for a in (ax, ax2) if has_counts else (ax,):
                a.axhline(t["teacher_acc"], color="0.15", linewidth=1, linestyle=LINESTYLES[(i + 1) % len(LINESTYLES)], zorder=1)
        extra = _teacher_handles(teachers.dropna(subset=["teacher_acc"]), as_line=True)
    _legend(fig, colours, markers, agg["label"], agg["student"], extra)
    return fig


def load_curves(df: pd.DataFrame, results_dir: Path) -> pd.DataFrame:
    """Every cell's curve.jsonl as long rows (dataset, label, pair, seed, step, key, value)."""
    frames = []
    for _, row in df.iterrows():
        path = results_dir / "cells" / str(row["cell_id"]) / "curve.jsonl"
        if not row["cell_id"] or not path.is_file():
            continue
        records = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a killed run
            if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
                records.append(record)
        if not records:
            continue
        wide = pd.DataFrame(records)
        long = wide.melt(id_vars="step", var_name="key", value_name="value")
        long["value"] = pd.to_numeric(long["value"], errors="coerce")
        long = long.dropna(subset=["value"])
        long = long.assign(dataset=row["dataset"], label=row["label"], pair=row["pair"], seed=row["seed"],
                           status=row["status"])
        frames.append(long)
    if not frames:
        return pd.DataFrame(columns=["step", "key", "value", "dataset", "label", "pair", "seed", "status"])
    return pd.concat(frames, ignore_index=True)


def _curve_keys(curves: pd.DataFrame) -> list[str]:
    keys = [k for k in curves["key"].unique() if k != "lr"]
    spread = curves.groupby("key")["label"].nunique()
    return sorted(keys, key=lambda k: (k != "loss", k != "test_acc", -spread[k], k))


def _curves_figure(curves, title, colours):
    from matplotlib.lines import Line2D

    keys = _curve_keys(curves)
    shown = keys[:MAX_CURVE_PANELS]
    ncols = min(3, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig, axes = _figure(3.2 * ncols + 2.4, 2.7 * nrows + 0.4, ncols=ncols, nrows=nrows)
    pairs = sorted(curves["pair"].unique())
    styles = {p: LINESTYLES[i % len(LINESTYLES)] for i, p in enumerate(pairs)}
    for ax, key in zip(axes.flat, shown):
        part = curves[curves["key"] == key]
        for (label, pair), group in part.groupby(["label", "pair"], sort=True):
            stats = group.groupby("step")["value"].agg(["mean", "min", "max"]).sort_index()
            ax.plot(stats.index, stats["mean"], color=colours[label], linestyle=styles[pair], linewidth=1.5)
            if group["seed"].nunique() > 1:
                ax.fill_between(stats.index, stats["min"], stats["max"], color=colours[label], alpha=0.15, linewidth=0)
        if key != "test_acc":
            _log_if_wide(ax, part["value"], axis="y", ratio=100)
        ax.set_title(key, loc="left", fontsize="medium")
        ax.set_xlabel("iteration")
        ax.set_ylabel("test accuracy (%)" if key == "test_acc" else f"{key} (value)")
    for ax in list(axes.flat)[len(shown):]:
        ax.set_axis_off()
    handles = [Line2D([], [], color=colours[m], label=m) for m in sorted(curves["label"].unique())]
    if pairs:
        handles.append(Line2D([], [], linestyle="none", label=""))
        handles += [Line2D([], [], color="0.35", linestyle=styles[p], label=p) for p in pairs]
    fig.legend(handles=handles, loc="outside right upper", frameon=False, title="method (colour)", alignment="left")
    fig.suptitle(f"{title}: training curves (mean over seeds; band = min–max)", x=0.01, ha="left", fontsize="medium")
    return fig, keys[MAX_CURVE_PANELS:]


# ---------------------------------------------------------------------------------------------- formatting
def _si(value: float, digits: int = 3) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g}{suffix}"
    return f"{value:.{digits}g}" if value != int(value) else f"{int(value)}"


def _pm(mean: float, std: float, fmt: str = ".2f") -> str:
    if mean is None or not np.isfinite(mean):
        return "–"
    return f"{mean:{fmt}} ± {std:{fmt}}" if std is not None and np.isfinite(std) else f"{mean:{fmt}}"


def _median_iqr(median: float, iqr: float) -> str:
    if not np.isfinite(median):
        return "–"
    return f"{median:.3f} (IQR {iqr:.3f})" if np.isfinite(iqr) else f"{median:.3f}"


def _seconds(value: float) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    return f"{value:.1f}" if value < 600 else f"{value / 60:.1f} min"


def table_rows(agg: pd.DataFrame, show_best: bool) -> tuple[list[str], list[list[str]], list[bool]]:
    """Header, formatted rows and which rows hold the best final accuracy of their pair."""
    header = ["pair", "method", "data", "seeds ok", "final acc %"]
    if show_best:
        header.append("best-on-test acc % (paper protocol)")
    header += ["params", "MACs", "latency ms (CPU, b=1, median per student arch)", "distill s", "real samples",
               "teacher queries"]
    agg = agg.sort_values(["pair", "student_acc_mean", "label"], ascending=[True, False, True], na_position="last")
    best = agg.groupby("pair")["student_acc_mean"].transform("max")
    rows, flags = [], []
    for (_, row), top in zip(agg.iterrows(), best):
        acc = _pm(row["student_acc_mean"], row["student_acc_std"]) if row["n_ok"] else "failed"
        cells = [row["pair"], row["label"], row["data_access"], f"{row['n_ok']}/{row['n_total']}", acc]
        if show_best:
            cells.append(_pm(row["student_acc_best_mean"], row["student_acc_best_std"]))
        cells += [_si(row["params_mean"]), _si(row["macs_mean"]), _median_iqr(row["arch_latency_ms_median"], row["arch_latency_ms_iqr"]),
                  _seconds(row["distill_seconds_mean"]), _si(row["real_samples_used_mean"]),
                  _si(row["teacher_queries_mean"])]
        rows.append(cells)
        flags.append(bool(np.isfinite(row["student_acc_mean"]) and row["student_acc_mean"] == top))
    return header, rows, flags


def _teacher_line(t: pd.Series) -> str:
    parts = []
    if np.isfinite(t.get("teacher_acc", np.nan)):
        parts.append(f"{t['teacher_acc']:.2f}% test accuracy")
    if np.isfinite(t.get("teacher_params", np.nan)):
        parts.append(f"{_si(t['teacher_params'])} params")
    if np.isfinite(t.get("teacher_macs", np.nan)):
        parts.append(f"{_si(t['teacher_macs'])} MACs")
    if np.isfinite(t.get("teacher_latency_ms", np.nan)):
        parts.append(f"{t['teacher_latency_ms']:.3f} ms CPU latency")
    return f"teacher {t['teacher']}: " + (", ".join(parts) or "no metrics recorded")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


# ---------------------------------------------------------------------------------------------- render
def render(results_dir: Path, out: Path | None = None) -> Path:
    """Write the report of ``results_dir`` into ``out`` (default ``<results_dir>/report``); return ``out``."""
    results_dir = Path(results_dir)
    df, notes = load_runs(results_dir)
    grid = _grid_info(results_dir)
    current = set(grid.get("cell_ids") or [])
    if current and (~df["cell_id"].isin(current)).any():
        stale = int((~df["cell_id"].isin(current)).sum())
        notes.append(f"{stale} row(s) of runs.csv belong to cells that are no longer in the grid (an earlier version of "
                     "its YAML): not shown here; they stay in runs.csv.")
        df = df[df["cell_id"].isin(current)].reset_index(drop=True)
        if df.empty:
            raise ReportError(f"no row of {results_dir / 'runs.csv'} belongs to the grid's current cells")
    out = Path(out) if out is not None else results_dir / "report"
    plots_dir, samples_dir = out / "plots", out / "samples"
    for folder in (plots_dir, samples_dir):
        if folder.is_dir():  # drop what an earlier render left (a dataset or method may have gone)
            for stale in folder.iterdir():
                if stale.suffix in (".png", ".svg") and stale.is_file():
                    stale.unlink()
        folder.mkdir(parents=True, exist_ok=True)

    agg = aggregate(df)
    teachers = teachers_of(df)
    colours = method_colours(df["label"])
    markers = student_markers(df["student"])
    curves = load_curves(df, results_dir)
    sections = []
    with _style():
        for dataset in sorted(df["dataset"].unique()):
            sections.append(_dataset_section(dataset, df, agg, teachers, curves, colours, markers, results_dir,
                                             plots_dir, samples_dir))
    summary = agg.copy()
    summary.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    context = dict(results_dir=results_dir, out=out, df=df, notes=notes, sections=sections, grid=grid, colours=colours)
    (out / "index.html").write_text(_html(**context), encoding="utf-8")
    (out / "report.md").write_text(_markdown(**context), encoding="utf-8")
    return out


def _grid_info(results_dir: Path) -> dict:
    path = results_dir / "grid.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _dataset_section(dataset, df, agg, teachers, curves, colours, markers, results_dir, plots_dir, samples_dir) -> Section:
    part = agg[agg["dataset"] == dataset]
    ok = part[part["n_ok"] > 0]
    tea = teachers[teachers["dataset"] == dataset]
    section = Section(dataset=dataset, table=part, teachers=tea)
    slug = _slug(dataset)
    title = dataset

    def draw(name, plot_title, caption, make):
        plot = Plot(name=f"{name}_{slug}", title=plot_title, caption=caption)
        fig = make()
        _save(fig, plots_dir, plot)
        section.plots.append(plot)

    def has(column):
        return len(ok) and ok[_centre(column)].notna().any()

    if not len(ok):
        section.skipped.append("no plots: every cell of this dataset failed")
        return section
    if has("arch_latency_ms"):
        section.front = pareto_front(ok, "arch_latency_ms_median", "student_acc_mean")
        teacher_lat = "teacher_latency_ms" in tea and tea["teacher_latency_ms"].notna().any()
        threads = df.loc[df["dataset"] == dataset, "latency_threads"].dropna().unique()
        thread_text = f", {int(threads[0])} thread{'s' if threads[0] != 1 else ''}" if len(threads) == 1 else ""
        draw("tradeoff", "Accuracy vs CPU latency",
             "Final test accuracy (error bars: std over seeds) against CPU latency (batch 1, median) of the student "
             "architecture: latency is pooled over every cell with the same student architecture (the median, error "
             "bars spanning the interquartile range of those measurements), since the method only changes the weights. The dashed step line is the "
             "Pareto front (no other point is both faster and more accurate). "
             + ("The star is the teacher." if teacher_lat else
                "The teacher's accuracy is a horizontal line (runs.csv has no teacher latency)."),
             lambda: _accuracy_vs(ok, tea, "arch_latency_ms", f"CPU latency (ms per image, batch 1, median{thread_text})",
                                  f"{title}: accuracy vs CPU latency", colours, markers,
                                  teacher_x="teacher_latency_ms", front=section.front))
    else:
        section.skipped.append("accuracy vs CPU latency (and its Pareto front): runs.csv has no latency_ms values")
    if has("macs"):
        draw("macs", "Accuracy vs MACs", "Final test accuracy against multiply-accumulates for one image; the "
             "star is the teacher.",
             lambda: _accuracy_vs(ok, tea, "macs", "MACs per image (multiply-accumulates)", f"{title}: accuracy vs MACs",
                                  colours, markers, teacher_x="teacher_macs"))
    else:
        section.skipped.append("accuracy vs MACs: runs.csv has no macs values")
    if has("params"):
        draw("params", "Accuracy vs parameters", "Final test accuracy against the deployed student's parameter "
             "count; the star is the teacher.",
             lambda: _accuracy_vs(ok, tea, "params", "parameters (count)", f"{title}: accuracy vs parameters",
                                  colours, markers, teacher_x="teacher_params"))
    else:
        section.skipped.append("accuracy vs parameters: runs.csv has no params values")
    if (ok["data_access"] != "?").any() or has("real_samples_used"):
        draw("data_access", "Accuracy vs real data used",
             "Left: by what each method may read (none = data-free, alt = out-of-domain real images, few = a few "
             "training samples, full = the whole training set). Right: by the number of this dataset's real "
             "training images actually read (0 for data-free and alternative-data methods).",
             lambda: _data_access_figure(ok, tea, title, colours, markers))
    else:
        section.skipped.append("accuracy vs real data used: runs.csv has no data_access or real_samples_used values")
    if has("distill_seconds"):
        device = ", ".join(sorted(set(df.loc[df["dataset"] == dataset, "device"]) - {""})) or "unknown device"
        draw("cost", "Accuracy vs distillation cost",
             f"Final test accuracy against the wall-clock seconds of the distillation (on {device}); teacher "
             "training is not included.",
             lambda: _accuracy_vs(ok, tea, "distill_seconds", f"distillation time (s, wall clock on {device})",
                                  f"{title}: accuracy vs distillation cost", colours, markers))
    else:
        section.skipped.append("accuracy vs distillation cost: runs.csv has no distill_seconds values")
    part_curves = curves[curves["dataset"] == dataset]
    if len(part_curves):
        plot = Plot(name=f"curves_{slug}", title="Training curves",
                    caption="The scalars each method logs (ctx.log), against its own iterations; one panel per scalar, "
                            "mean over seeds, band = min–max over seeds; line style = teacher → student pair.")
        fig, omitted = _curves_figure(part_curves, title, colours)
        _save(fig, plots_dir, plot)
        if omitted:
            plot.caption += f" Not shown (more than {MAX_CURVE_PANELS} scalars): {', '.join(omitted)}."
        section.plots.append(plot)
    else:
        section.skipped.append("training curves: no cells/<cell_id>/curve.jsonl found")
    rows = df[(df["dataset"] == dataset) & (df["status"] == "ok") & (df["cell_id"] != "")]
    for (label, pair), group in rows.sort_values("seed").groupby(["label", "pair"], sort=True):
        for _, row in group.iterrows():
            source = results_dir / "cells" / row["cell_id"] / "samples.png"
            if source.is_file():
                target = samples_dir / f"{slug}_{_slug(label)}_{_slug(row['student'])}_{row['cell_id']}.png"
                shutil.copyfile(source, target)
                seed = "" if pd.isna(row["seed"]) else f", seed {int(row['seed'])}"
                section.samples.append((f"{label} ({pair}{seed})", f"samples/{target.name}"))
                break  # one grid per method and pair: the lowest seed
    return section


def _environment(df: pd.DataFrame) -> list[tuple[str, str]]:
    def values(column, fmt=str):
        vs = sorted({fmt(v) for v in df[column] if not (isinstance(v, float) and math.isnan(v)) and v != ""})
        return ", ".join(vs) if vs else "– (not recorded)"

    started = [s for s in df["started"] if s]
    finished = [s for s in df["finished"] if s]
    items = [("device", values("device")), ("CPU", values("cpu")),
             ("latency threads", values("latency_threads", lambda v: str(int(v)))),
             ("torch", values("torch")), ("git commit", values("git_commit")), ("grid", values("grid")),
             ("budget", values("budget", lambda v: f"{v:g}")),
             ("runs", f"{min(started)} … {max(finished)}" if started and finished else "– (not recorded)"),
             ("report rendered", time.strftime("%Y-%m-%d %H:%M:%S"))]
    return items


def _failed(df: pd.DataFrame, results_dir: Path) -> list[dict[str, str]]:
    rows = []
    for _, row in df[df["status"] != "ok"].sort_values(["dataset", "pair", "label", "seed"]).iterrows():
        trace = ""
        path = results_dir / "cells" / str(row["cell_id"]) / "error.txt"
        if row["cell_id"] and path.is_file():
            trace = "\n".join(path.read_text(errors="replace").strip().splitlines()[-25:])
        seed = "" if pd.isna(row["seed"]) else str(int(row["seed"]))
        rows.append({"dataset": row["dataset"], "pair": row["pair"], "method": row["label"], "seed": seed,
                     "cell_id": row["cell_id"], "error": row["error"] or "(no error recorded)", "trace": trace})
    return rows


def _overview(df: pd.DataFrame, grid: dict) -> str:
    ok = int((df["status"] == "ok").sum())
    failed = len(df) - ok
    parts = [f"{len(df)} cells: {ok} finished, {failed} failed"]
    if grid.get("cells") and grid["cells"] != len(df):
        parts.append(f"(the grid has {grid['cells']} cells: {grid['cells'] - len(df)} not run yet)")
    parts.append(f"over {df['dataset'].nunique()} dataset(s), {df['pair'].nunique()} teacher → student pair(s), "
                 f"{df['label'].nunique()} method(s) and {df['seed'].nunique()} seed(s).")
    return " ".join(parts)


READING = ("Accuracy is the distilled student's final top-1 accuracy on the dataset's official test split "
           "(percent, mean ± std over seeds; std needs two or more seeds). Best-on-test, where a method tracks it, is "
           "the best test-set evaluation during training, the protocol some papers report: it peeks at the test set "
           "and is optimistic, so it is shown only in the tables and labelled. Latency: CPU, batch 1, median over "
           "repeated runs. MACs: multiply-accumulates for one image (papers often call these FLOPs). Real samples: "
           "images of the teacher's own training set the method read. Teacher queries: images passed through the "
           "teacher during distillation.")


# ---------------------------------------------------------------------------------------------- HTML
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2125;background:#fafbfc;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.6rem;margin:0 0 4px}h2{font-size:1.3rem;margin:36px 0 8px;padding-top:12px;border-top:2px solid #d8dde3}
h3{font-size:1.05rem;margin:26px 0 6px}
nav{background:#eef1f4;padding:8px 14px;border-radius:6px;font-size:.92rem;margin:12px 0}
nav a{margin-right:14px}
.muted{color:#5b6570;font-size:.9rem}.note{background:#fff6df;border-left:4px solid #e0a800;padding:6px 12px;margin:8px 0}
table{border-collapse:collapse;margin:8px 0 14px;font-size:.86rem;background:#fff}
th,td{border:1px solid #d8dde3;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#eef1f4;text-align:center;white-space:normal;max-width:150px}.scroll{overflow-x:auto}td.t{text-align:left}tr.best td{font-weight:600;background:#f0f7ee}
figure{margin:14px 0 22px;background:#fff;border:1px solid #e3e7eb;border-radius:6px;padding:10px}
figure img{max-width:100%;height:auto;display:block}figcaption{font-size:.86rem;color:#4a535c;margin-top:6px}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;margin:0 4px -1px 0}
.samples{display:flex;flex-wrap:wrap;gap:14px}.samples figure{margin:0;max-width:360px}
.samples img{image-rendering:pixelated;width:100%}
pre{background:#f3f4f6;padding:8px;overflow-x:auto;font-size:.78rem}details{margin:2px 0}
.failed td{vertical-align:top}.failed td.err{white-space:normal;text-align:left;max-width:560px}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _html_table(header, rows, flags=None, colours=None, label_col=None) -> str:
    out = ['<div class="scroll"><table><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = ' class="best"' if flags and flags[i] else ""
        cells = []
        for j, cell in enumerate(row):
            text = _e(cell)
            if colours is not None and j == label_col and cell in colours:
                text = f'<span class="swatch" style="background:{_hex(colours[cell])}"></span>{text}'
            cells.append(f'<td class="t">{text}</td>' if j < 3 else f"<td>{text}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(c * 255)):02x}" for c in rgb[:3])


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _html(results_dir, out, df, notes, sections, grid, colours) -> str:
    title = f"dfkd-bench report: {grid.get('name') or results_dir.resolve().name}"
    body = [f"<h1>{_e(title)}</h1>"]
    if grid.get("description"):
        body.append(f'<p class="muted">{_e(grid["description"])}</p>')
    body.append(f"<p>{_e(_overview(df, grid))} Results from <code>{_e(results_dir)}</code>.</p>")
    links = [f'<a href="#ds-{_slug(s.dataset)}">{_e(s.dataset)}</a>' for s in sections]
    links += ['<a href="#failed">failed cells</a>', '<a href="#environment">environment</a>']
    body.append("<nav>" + " ".join(links) + "</nav>")
    body += [f'<p class="note">{_e(n)}</p>' for n in notes]
    body.append(f'<p class="muted">{_e(READING)}</p>')
    for s in sections:
        body.append(f'<section id="ds-{_slug(s.dataset)}"><h2>{_e(s.dataset)}</h2>')
        for _, t in s.teachers.iterrows():
            body.append(f'<p class="muted">{_e(_teacher_line(t))}</p>')
        show_best = s.table["student_acc_best_mean"].notna().any()
        header, rows, flags = table_rows(s.table, show_best)
        plots = {p.name.split("_" + _slug(s.dataset))[0]: p for p in s.plots}
        if "tradeoff" in plots:
            body.append(_html_figure(plots["tradeoff"]))
            if s.front is not None and len(s.front):
                body.append("<h3>Pareto front (accuracy vs CPU latency)</h3>")
                front_rows = [[r["pair"], r["label"], r["data_access"], _pm(r["student_acc_mean"], r["student_acc_std"]),
                               _median_iqr(r["arch_latency_ms_median"], r["arch_latency_ms_iqr"])] for _, r in s.front.iterrows()]
                body.append(_html_table(["pair", "method", "data", "final acc %", "latency ms"], front_rows,
                                        colours=colours, label_col=1))
        body.append(f'<h3 id="table-{_slug(s.dataset)}">Pair × method</h3>')
        body.append(f'<p class="muted">Sorted by final accuracy within each pair; bold: the best final accuracy of the pair.'
                    f'{" Best-on-test: the paper protocol (best test evaluation during training), optimistic." if show_best else ""}</p>')
        body.append(_html_table(header, rows, flags, colours=colours, label_col=1))
        for key in ("macs", "params", "data_access", "cost", "curves"):
            if key in plots:
                body.append(_html_figure(plots[key]))
        if s.samples:
            body.append("<h3>Generated / synthesised samples</h3><div class=\"samples\">")
            for caption, rel in s.samples:
                body.append(f"<figure>{_img((out / rel).read_bytes(), caption)}<figcaption>{_e(caption)}</figcaption></figure>")
            body.append("</div>")
        if s.skipped:
            body.append('<p class="note">Not drawn: ' + "; ".join(_e(x) for x in s.skipped) + ".</p>")
        body.append("</section>")
    failed = _failed(df, results_dir)
    body.append(f'<section id="failed"><h2>Failed cells ({len(failed)})</h2>')
    if failed:
        body.append('<table class="failed"><thead><tr><th>dataset</th><th>pair</th><th>method</th><th>seed</th>'
                    '<th>cell</th><th>error</th></tr></thead><tbody>')
        for f in failed:
            trace = f"<details><summary>traceback</summary><pre>{_e(f['trace'])}</pre></details>" if f["trace"] else ""
            body.append(f"<tr><td class=\"t\">{_e(f['dataset'])}</td><td class=\"t\">{_e(f['pair'])}</td>"
                        f"<td class=\"t\">{_e(f['method'])}</td><td>{_e(f['seed'])}</td><td class=\"t\"><code>{_e(f['cell_id'])}</code></td>"
                        f"<td class=\"err\">{_e(f['error'])}{trace}</td></tr>")
        body.append("</tbody></table><p class=\"muted\">Re-run them with <code>bench run ... --rerun-failed</code>.</p>")
    else:
        body.append("<p>None.</p>")
    body.append("</section>")
    body.append('<section id="environment"><h2>Environment</h2>')
    env = _environment(df)
    body.append("<table><tbody>" + "".join(f'<tr><th>{_e(k)}</th><td class="t">{_e(v)}</td></tr>' for k, v in env) + "</tbody></table>")
    if df["device"].replace("", np.nan).dropna().nunique() > 1 or df["cpu"].replace("", np.nan).dropna().nunique() > 1:
        body.append('<p class="note">The cells ran on more than one machine: latencies and seconds compare only within one.</p>')
    body.append("</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body><main>\n" + "\n".join(body) + "\n</main></body></html>\n")


def _html_figure(plot: Plot) -> str:
    return (f"<figure id=\"fig-{_e(plot.name)}\">{_img(plot.png, plot.title)}<figcaption><b>{_e(plot.title)}.</b> "
            f"{_e(plot.caption)} <a href=\"plots/{_e(plot.name)}.svg\">SVG</a> · <a href=\"plots/{_e(plot.name)}.png\">PNG</a>"
            "</figcaption></figure>")


# ---------------------------------------------------------------------------------------------- Markdown
def _md_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header, rows, flags=None) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for i, row in enumerate(rows):
        cells = [_md_cell(c) for c in row]
        if flags and flags[i]:
            cells = [f"**{c}**" if c not in ("", "–") else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(results_dir, out, df, notes, sections, grid, colours) -> str:
    name = grid.get("name") or results_dir.resolve().name
    out = [f"# dfkd-bench report: {name}", ""]
    if grid.get("description"):
        out += [f"_{grid['description']}_", ""]
    out += [_overview(df, grid), ""]
    out += [f"> {n}" for n in notes]
    out += ["", READING, ""]
    for s in sections:
        out += [f"## {s.dataset}", ""]
        for _, t in s.teachers.iterrows():
            out.append(f"- {_teacher_line(t)}")
        out.append("")
        show_best = s.table["student_acc_best_mean"].notna().any()
        header, rows, flags = table_rows(s.table, show_best)
        plots = {p.name.split("_" + _slug(s.dataset))[0]: p for p in s.plots}
        if "tradeoff" in plots:
            p = plots["tradeoff"]
            out += [f"![{p.title}](plots/{p.name}.png)", "", f"_{p.caption}_ ([SVG](plots/{p.name}.svg))", ""]
            if s.front is not None and len(s.front):
                out += ["**Pareto front** (accuracy vs CPU latency):", ""]
                out.append(_md_table(["pair", "method", "data", "final acc %", "latency ms"],
                                     [[r["pair"], r["label"], r["data_access"], _pm(r["student_acc_mean"], r["student_acc_std"]),
                                       _median_iqr(r["arch_latency_ms_median"], r["arch_latency_ms_iqr"])] for _, r in s.front.iterrows()]))
                out.append("")
        out += ["### Pair × method", "",
                "Sorted by final accuracy within each pair; bold: the best of the pair."
                + (" Best-on-test: the paper protocol (best test evaluation during training), optimistic." if show_best else ""),
                "", _md_table(header, rows, flags), ""]
        for key in ("macs", "params", "data_access", "cost", "curves"):
            if key in plots:
                p = plots[key]
                out += [f"### {p.title}", "", f"![{p.title}](plots/{p.name}.png)", "", f"_{p.caption}_ ([SVG](plots/{p.name}.svg))", ""]
        if s.samples:
            out += ["### Generated / synthesised samples", ""]
            out += [f"![{caption}]({rel}) {caption}" for caption, rel in s.samples]
            out.append("")
        if s.skipped:
            out += ["Not drawn: " + "; ".join(s.skipped) + ".", ""]
    failed = _failed(df, results_dir)
    out += [f"## Failed cells ({len(failed)})", ""]
    if failed:
        out.append(_md_table(["dataset", "pair", "method", "seed", "cell", "error"],
                             [[f["dataset"], f["pair"], f["method"], f["seed"], f"`{f['cell_id']}`", f["error"]] for f in failed]))
        out += ["", "Re-run them with `bench run ... --rerun-failed`; tracebacks are in `cells/<cell>/error.txt`.", ""]
    else:
        out += ["None.", ""]
    out += ["## Environment", "", _md_table(["", ""], _environment(df)), ""]
    return "\n".join(out)
