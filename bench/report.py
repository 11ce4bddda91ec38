"""The comparison report: ``bench report RESULTS_DIR`` -> ``index.html``, ``report.md`` and every plot.

Input (written by ``bench run``):

- ``RESULTS_DIR/runs.csv``: one row per cell, columns :data:`bench.store.COLUMNS`;
- ``RESULTS_DIR/cells/<cell_id>/curve.jsonl``: the method's training log (JSON lines ``{"step": ..., <scalar>: ...}``;
  generator methods log ``sample_std``, methods with per-epoch evaluations log ``val_acc``);
- ``RESULTS_DIR/cells/<cell_id>/anytime.jsonl``: the harness's anytime curve, one line per compute checkpoint
  ``{"val_acc", "teacher_queries", "student_steps", "seconds"}`` (validation accuracy only, never test);
- ``RESULTS_DIR/cells/<cell_id>/samples.png``: generated/synthesised images (optional);
- ``RESULTS_DIR/cells/<cell_id>/error.txt``: the traceback of a failed cell (optional);
- ``RESULTS_DIR/grid.json``: the grid's name, description and current cell ids (optional).

Output (default ``<results dir>/report``, beside its runs.csv): ``index.html`` (self-contained: every plot
inline as a base64 PNG), ``report.md`` (plots linked from ``plots/``), ``summary.csv`` (the aggregated table),
``best_at_budget.csv`` and ``latency_budget.csv`` (the two decision tables) and every plot as
``plots/<name>.png`` and ``plots/<name>.svg``.

Per dataset, the engineer's question first: the decision table (rows: latency budgets; columns: the user's data
access, none / alt / few / full, and the API-teacher user where such rows exist; cells: the best student and method
with its final test accuracy, mean +- std over n seeds), accuracy vs latency with one panel and named Pareto front
per user, whether latency follows MACs, the fronts' table, the API-teacher methods against teacher queries; then the
pair x method table (final test accuracy, validation accuracy, budget, steps, queries, what stopped the cell, the
hyperparameters that differ from the method's preset), accuracy vs MACs, params, real data and seconds, per pair the
anytime curves (validation accuracy against teacher queries and against seconds, band over seeds) with the best
method at each compute budget, per pair the training curves (with the generator's ``sample_std`` and collapse
flags) and sample grids; then how to read the report, failed cells and the environment. Latencies are those of one
backend of :data:`bench.latency.BACKENDS` (:func:`choose_backend`: ONNX Runtime where timed, else eager PyTorch;
``bench report --latency-backend``), and the report names it with the CPU it ran on.

The headline is the final student's top-1 *test* accuracy, mean +- std over seeds; best-on-test appears only
in the table, labelled as the paper protocol; everything drawn from the anytime curves is *validation*
accuracy and says so. A user with data access L may use every method that needs no more data than L
(none < alt < few < full): the fronts and decision tables are cumulative in that order. The scatter figures tell
methods apart by family (:data:`FAMILIES`: marker and colour, 7 colours) and name the front points on the plot; the
curve figures, one per pair, give each method of the pair one colour (from its sorted label). Only pandas, matplotlib
and seaborn draw; the method registry is imported only to state which hyperparameters a row overrides.
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

from bench.latency import BACKENDS, LatencyBackend

from bench.store import COLUMNS, DEFAULTED, RECORD_ONLY

# Without these the rows cannot be placed in a table at all.
REQUIRED_COLUMNS = ("dataset", "teacher", "student", "method", "student_acc")
NUMERIC_COLUMNS = ("seed", "budget", "validation", "real_samples_used", "teacher_queries", "student_steps", "teacher_acc",
                   "student_acc", "student_acc_val", "student_acc_best", "params", "flops", "macs", "num_classes",
                   "teacher_params", "teacher_macs", "latency_ms", "latency_iqr_ms", "latency_threads", "throughput",
                   "distill_seconds", "search_seconds", "iterations", "peak_mem_mb", "teacher_latency_ms",
                   *(c for _, b in BACKENDS.items() for c in (*b.columns, b.teacher_column)))
DATA_ACCESS_ORDER = ("none", "alt", "few", "full")
DATA_ACCESS_TEXT = {"none": "none\n(data-free)", "alt": "alt\n(other real data)", "few": "few\nsamples",
                    "full": "full\ntraining set"}
# The heading of a cumulative column: a user with this access may use every method that needs no more.
USER_ACCESS_TEXT = {"none": "data-free (none)", "alt": "≤ alt (other real data)", "few": "≤ few samples",
                    "full": "≤ full (any method)", "api": "API teacher (no data)"}
# The "API teacher" user: no data and the teacher only behind an API, so only the methods that need no more than
# its outputs or labels and no data (teacher_access outputs/labels AND data_access none) are open to them.
API_USER = "api"
API_TEACHER_ACCESS = ("outputs", "labels")
# One colour and line style per data-access level, for the per-level Pareto fronts (method colours are separate).
ACCESS_STYLE = {"none": ("#b2182b", (0, (5, 2)), 1.6), "alt": ("#e08214", (0, (6, 2, 1, 2)), 2.2),
                "few": ("#2166ac", (0, (1, 1.5)), 2.8), "full": ("0.25", "-", 3.6), "api": ("#762a83", "-.", 1.6)}


@dataclass(frozen=True)
class Family:
    """A method family as the scatter figures draw it: one marker and one colour (Okabe-Ito, colour-blind safe)."""

    name: str
    marker: str
    colour: str


# Scatter figures tell methods apart by family (marker and colour), never by one hue per method: 7 colours at most.
FAMILIES: dict[str, Family] = {
    "with_data": Family("with-data KD", "o", "#0072B2"),
    "alt_data": Family("other real data", "h", "#56B4E9"),
    "few_sample": Family("few-sample", "s", "#009E73"),
    "generator": Family("data-free generator", "^", "#E69F00"),
    "inversion": Family("data-free inversion", "D", "#D55E00"),
    "api": Family("API teacher", "P", "#CC79A7"),
    "no_teacher": Family("no teacher", "X", "#7f7f7f"),
}
# The data-free methods that optimise the synthetic images themselves (model inversion: DeepInversion, ADI, CMI,
# Fast-DFKD, ZSKD's data impressions); the other data-free methods train a generator (DAFL, ZSKT, DFAD, DFQ).
INVERSION_METHODS = frozenset({"deepinversion", "adi", "cmi", "fast_dfkd", "zskd"})
ACCESS_FAMILY = {"full": "with_data", "alt": "alt_data", "few": "few_sample"}

LINESTYLES = ("-", "--", ":", "-.")
TEACHER_MARKER = "*"
MAX_CURVE_PANELS = 12
STAT_COLUMNS = ("student_acc", "student_acc_val", "student_acc_best", "params", "macs", "flops", "latency_ms",
                "latency_iqr_ms", "distill_seconds", "search_seconds", "real_samples_used", "teacher_queries",
                "student_steps", "throughput", "iterations")
COLLAPSE_STD = 0.02  # a generated batch whose per-pixel std falls below this is one image: the generator collapsed
ANYTIME_AXES = {"teacher_queries": "teacher queries (images through the teacher)",
                "seconds": "distillation seconds (wall clock)"}
ANYTIME_POINTS = 96  # points of the common geometric grid the seeds' anytime curves are read at
MAX_LADDER = 8  # rungs of the compute-budget ladder
ANYTIME_DECADES = 3.0  # the anytime axes start at most this many decades below the largest compute reached


class ReportError(ValueError):
    """The results folder cannot be turned into a report (missing or empty runs.csv, unusable columns)."""


# ---------------------------------------------------------------------------------------------- loading
TRACK_SUFFIX = {"tuned": " [tuned]", "oracle": " [oracle]"}  # appended to a row's label by its track


def tuning_note(df: pd.DataFrame) -> str:
    """What the tracks of the rows mean (docs/tuning.md); "" when every row ran paper or hand-set values."""
    tuned = sorted(set(df.loc[df["track"] == "tuned", "tuning"]))
    parts = []
    if tuned:
        parts.append(f"'[tuned]' rows ran the values `bench tune` chose on a development task ({', '.join(tuned)}: "
                     "dataset, trials and cap), never on the scored task.")
    if (df["track"] == "oracle").any():
        parts.append("'[oracle]' rows were tuned on the scored dataset's own validation split: an upper bound on what "
                     "tuning can give, not a method's result; compare them with the paper and tuned rows, never rank them.")
    if parts:
        parts.append("Rows without a mark ran the papers' values (tuning: paper) or hand-set ones (tuning: default).")
    return " ".join(parts)


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
    missing = [c for c in COLUMNS if c not in df.columns and c not in RECORD_ONLY and c not in DEFAULTED]
    if missing:
        notes.append(f"runs.csv lacks the column(s) {', '.join(missing)} (written by an older `bench run`): "
                     "what needs them is left out or shown as '–'.")
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
    # the track a row ran (bench.tracks): tuned and oracle rows are labelled, so every table and figure keeps them
    # apart from the paper track (and an oracle, tuned on the scored task, never passes for a method's result)
    track = df["tuning"].str.split(":").str[0]
    df["track"] = track.where(track != "", "paper")
    df["label"] = df["label"] + track.map(TRACK_SUFFIX).fillna("")
    for column in ("dataset", "teacher", "student", "label", "data_access"):
        df[column] = df[column].replace("", "?")
    df["pair"] = df["teacher"] + " → " + df["student"]
    df = df.reset_index(drop=True)
    df.attrs["missing_columns"] = missing
    return df, notes


MAX_COLOURS = 8  # distinguishable colours a figure relies on; past them, line styles tell methods apart
METHOD_DASHES = ("-", "--", "-.")  # ":" is kept for "finished: the final value holds"


def method_colours(labels: Iterable[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per method label, stable (sorted label order), from 8 colour-blind-safe colours: the
    ninth label takes the first colour again, with the next line style (:func:`method_dashes`)."""
    import seaborn as sns

    names = sorted(set(labels))
    palette = sns.color_palette("colorblind", MAX_COLOURS)
    return {name: tuple(palette[i % MAX_COLOURS]) for i, name in enumerate(names)}


def method_dashes(labels: Iterable[str]) -> dict[str, str]:
    """The line style that, with :func:`method_colours`, tells each method label apart."""
    names = sorted(set(labels))
    return {name: METHOD_DASHES[(i // MAX_COLOURS) % len(METHOD_DASHES)] for i, name in enumerate(names)}


def access_rank(level: str) -> int:
    """Position of a data-access level in none < alt < few < full; unknown levels come after full."""
    return DATA_ACCESS_ORDER.index(level) if level in DATA_ACCESS_ORDER else len(DATA_ACCESS_ORDER)


def usable_by(user_level: str, method_level: str) -> bool:
    """Whether a user with ``user_level`` data may run a method that needs ``method_level``.

    The levels form the chain none < alt < few < full; a level outside it (e.g. '?') is usable only by itself."""
    if user_level not in DATA_ACCESS_ORDER or method_level not in DATA_ACCESS_ORDER:
        return user_level == method_level
    return access_rank(method_level) <= access_rank(user_level)


def is_api_teacher(data_access: str, teacher_access: str) -> bool:
    """Whether a method serves a user who has no data and reaches the teacher only through an API: it needs
    no data (``none``) and no more of the teacher than its ``outputs`` or ``labels``."""
    return data_access == "none" and teacher_access in API_TEACHER_ACCESS


def family_of(method: str, data_access: str, teacher_access: str) -> str:
    """The :data:`FAMILIES` key of a method, from its declared access: no teacher > API teacher > its data access
    (full, alt, few) > data-free inversion (:data:`INVERSION_METHODS`) or generator."""
    if teacher_access == "none":
        return "no_teacher"
    if is_api_teacher(data_access, teacher_access):
        return "api"
    if data_access in ACCESS_FAMILY:
        return ACCESS_FAMILY[data_access]
    return "inversion" if method in INVERSION_METHODS else "generator"


def _family(row: pd.Series) -> Family:
    return FAMILIES[family_of(str(row.get("method", "")), str(row.get("data_access", "")), str(row.get("teacher_access", "")))]


def user_columns(points: pd.DataFrame) -> list[str]:
    """The users the decision tables and fronts have a column for: each data-access level present, in chain order,
    and :data:`API_USER` where some row serves an API-teacher user."""
    teacher = points["teacher_access"] if "teacher_access" in points else pd.Series("", index=points.index)
    api = any(is_api_teacher(a, t) for a, t in zip(points["data_access"], teacher))
    return access_levels(points["data_access"]) + ([API_USER] if api else [])


def usable_rows(points: pd.DataFrame, user: str) -> pd.DataFrame:
    """The rows of ``points`` user ``user`` may run: a data-access level runs every method needing no more data
    (:func:`usable_by`); the API-teacher user only the API-teacher methods (:func:`is_api_teacher`)."""
    if user == API_USER:
        teacher = points["teacher_access"] if "teacher_access" in points else pd.Series("", index=points.index)
        return points[[is_api_teacher(a, t) for a, t in zip(points["data_access"], teacher)]]
    return points[[usable_by(user, a) for a in points["data_access"]]]


def access_levels(levels: Iterable[str]) -> list[str]:
    """The levels present, in chain order (unknown ones last, sorted)."""
    present = set(levels)
    return [a for a in DATA_ACCESS_ORDER if a in present] + sorted(present - set(DATA_ACCESS_ORDER))


# ---------------------------------------------------------------------------------------------- aggregation
def arch_latency(ok: pd.DataFrame, backend: LatencyBackend | None = None) -> dict[tuple, tuple[float, float]]:
    """``{architecture key: (latency median ms, IQR ms)}`` for the finished rows ``ok`` on ``backend`` (default
    eager PyTorch: ``latency_ms``/``latency_iqr_ms``; see :mod:`bench.latency` for each backend's columns).

    Current runs time each architecture once, in quiet, after all cells: every row with the same ``arch_id``
    carries the same figure and its measured IQR. Rows of older runs (no ``arch_id``) carried a per-cell
    timing: those are pooled per (dataset, student, params, MACs), median and IQR of the pooled values,
    so that one cell timed while the machine was busy cannot move the point."""
    backend = backend or BACKENDS.get("eager")
    out = {}
    for key, group in ok.groupby(["dataset", "arch_id", "student", "params", "macs"], dropna=False):
        values = group[backend.median].dropna()
        if not len(values):
            continue
        if key[1]:
            iqr = group[backend.iqr].dropna()
            out[key] = (values.median(), iqr.median() if len(iqr) else math.nan)
        else:
            out[key] = (values.median(), values.quantile(0.75) - values.quantile(0.25) if len(values) > 1 else math.nan)
    return out


def aggregate(df: pd.DataFrame, backend: LatencyBackend | None = None) -> pd.DataFrame:
    """One row per (dataset, teacher, student, method label): mean and std over the finished seeds.

    ``arch_latency_ms_median/iqr`` is the student architecture's latency on ``backend`` (see :func:`arch_latency`): latency
    belongs to the architecture, not to the method that trained its weights. ``budget_text`` is the budget
    fraction and compute cap, ``stopped_by_text`` which cap stopped how many seeds, ``overrides`` the
    hyperparameters that differ from the method's preset (see :func:`method_overrides`)."""
    keys = ["dataset", "teacher", "student", "pair", "label"]
    ok_all = df[df["status"] == "ok"]
    latency = arch_latency(ok_all, backend)
    overrides = method_overrides(df)
    rows = []
    for key, group in df.groupby(keys, sort=True):
        ok = group[group["status"] == "ok"]
        row = dict(zip(keys, key))
        row.update(method=group["method"].iloc[0], data_access=_first(group["data_access"]),
                   teacher_access=_first(group["teacher_access"]), best_protocol=_first(ok["best_protocol"]),
                   n_ok=len(ok), n_total=len(group), budget_text=_budget_text(group), stopped_by_text=_stopped_text(ok),
                   overrides="; ".join(sorted(set(overrides.loc[group.index]) - {""})) or "")
        for column in STAT_COLUMNS:
            values = ok[column].dropna()
            row[f"{column}_mean"] = values.mean() if len(values) else math.nan
            row[f"{column}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
        arch = tuple(ok[["dataset", "arch_id", "student", "params", "macs"]].iloc[0]) if len(ok) else None
        row["arch_latency_ms_median"], row["arch_latency_ms_iqr"] = latency.get(arch, (math.nan, math.nan))
        rows.append(row)
    return pd.DataFrame(rows)


def _budget_text(rows: pd.DataFrame) -> str:
    """'0.05× paper', 'cap 30K teacher queries', or both; distinct values of the rows joined."""
    texts = []
    for fraction, cap in sorted({(f, c) for f, c in zip(rows["budget"], rows["compute_cap"])}, key=str):
        parts = []
        if isinstance(cap, str) and cap:
            parts += [_cap_text(c.strip()) for c in cap.split(",")]
        if fraction is not None and np.isfinite(fraction) and (fraction != 1 or not parts):
            parts.insert(0, f"{fraction:g}× paper")
        texts.append(", ".join(parts))
    return "; ".join(t for t in texts if t)


def _cap_text(cap: str) -> str:
    name, _, value = cap.partition("=")
    try:
        number = float(value)
    except ValueError:
        return f"cap {cap}"
    if name == "seconds":
        return f"cap {number:g} s"
    return f"cap {_si(number)} {name.replace('_', ' ')}"


def _stopped_text(ok: pd.DataFrame) -> str:
    """Which cap stopped the finished seeds: '2/3 seeds stopped by seconds'; '' when none did."""
    counts = ok["stopped_by"][ok["stopped_by"] != ""].value_counts()
    return ", ".join(f"{n}/{len(ok)} seeds stopped by {name}" for name, n in sorted(counts.items()))


_DEFAULTS_CACHE: dict[tuple[str, str, str], dict | None] = {}


def method_defaults(method: str, dataset: str, preset: str = "") -> dict | None:
    """The method's registered Config for ``dataset`` (its preset), as plain data; None if not registered here."""
    key = (method, dataset, preset)
    if key not in _DEFAULTS_CACHE:
        from bench.config import ConfigError, to_dict
        from bench.method import get_method

        try:
            _, config = get_method(method).resolve_config(dataset, preset=preset or None)
            _DEFAULTS_CACHE[key] = json.loads(json.dumps(to_dict(config), default=str))
        except (ConfigError, ImportError, TypeError):  # a plugin not loaded here, a preset renamed since
            _DEFAULTS_CACHE[key] = None
    return _DEFAULTS_CACHE[key]


def method_overrides(df: pd.DataFrame) -> pd.Series:
    """Per row: the fields of ``method_params`` that differ from the method's preset for the row's dataset.

    Text like ``batch_size=128, gen_width=32``; '' for none. Where the method is not registered in this
    process (a plugin) the row's fields are compared with the other rows of the same method and dataset
    instead, and the text ends with '(vs other rows)'."""
    parsed = {}
    for index, text in df["method_params"].items():
        try:
            value = json.loads(text) if isinstance(text, str) and text else None
        except json.JSONDecodeError:
            value = None
        parsed[index] = value if isinstance(value, dict) else None
    out = pd.Series("", index=df.index, dtype=object)
    for (method, dataset), group in df.groupby(["method", "dataset"], sort=False):
        for index, row in group.iterrows():
            params = parsed[index]
            if params is None:
                continue
            defaults = method_defaults(method, dataset, row["preset"] if isinstance(row["preset"], str) else "")
            if defaults is not None:
                diff = {k: v for k, v in params.items() if k not in defaults or defaults[k] != v}
                out[index] = _kv_text(diff)
            else:
                others = [parsed[i] for i in group.index if parsed[i] is not None]
                varying = {k for p in others for k in p if any(q.get(k) != p.get(k) for q in others)}
                out[index] = (_kv_text({k: params.get(k) for k in sorted(varying)}) + " (vs other rows)") if varying else ""
    return out


def _kv_text(values: dict) -> str:
    def fmt(v):
        return f"{v:g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return ", ".join(f"{k}={fmt(v)}" for k, v in sorted(values.items()))


def teachers_of(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, teacher arch): its accuracy, params, MACs (and latency when recorded)."""
    rows = []
    for (dataset, teacher), group in df.groupby(["dataset", "teacher"], sort=True):
        rows.append({"dataset": dataset, "teacher": teacher,
                     **{c: group[c].mean() for c in ("teacher_acc", "teacher_params", "teacher_macs",
                                                     *(b.teacher_column for _, b in BACKENDS.items())) if c in group}})
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


def ranked(points: pd.DataFrame) -> pd.DataFrame:
    """The rows a ranking may pick: all but the oracle track's (tuned on the scored task: an upper bound)."""
    return points[~points["label"].astype(str).str.endswith(TRACK_SUFFIX["oracle"])]


def access_fronts(points: pd.DataFrame, cost: str, gain: str) -> dict[str, pd.DataFrame]:
    """``{user: Pareto front}`` per user of :func:`user_columns`: the front of the methods that user may run
    (oracle rows never make a front)."""
    points = ranked(points)
    return {user: pareto_front(usable_rows(points, user), cost, gain) for user in user_columns(points)}


def latency_budget_table(points: pd.DataFrame) -> pd.DataFrame:
    """For each latency budget (the distinct student latencies) and user (:func:`user_columns`: each data-access
    level, and the API-teacher user where present): the student and method with the best mean final test accuracy
    among the rows at or under that latency that the user may run (:func:`usable_rows`; ties: the faster, then the
    label). ``points``: aggregated rows with ``arch_latency_ms_median``."""
    usable = ranked(points).dropna(subset=["arch_latency_ms_median", "student_acc_mean"])
    rows = []
    for budget in sorted(usable["arch_latency_ms_median"].unique()):
        under = usable[usable["arch_latency_ms_median"] <= budget]
        for level in user_columns(usable):
            candidates = usable_rows(under, level)
            if not len(candidates):
                rows.append({"latency_budget_ms": budget, "user_access": level})
                continue
            best = candidates.sort_values(["student_acc_mean", "arch_latency_ms_median", "label"],
                                          ascending=[False, True, True]).iloc[0]
            rows.append({"latency_budget_ms": budget, "user_access": level,
                         **{c: best[c] for c in ("dataset", "pair", "student", "label", "data_access", "student_acc_mean",
                                                 "student_acc_std", "n_ok", "params_mean", "macs_mean",
                                                 "arch_latency_ms_median", "arch_latency_ms_iqr")}})
    return pd.DataFrame(rows)


def _first(values: pd.Series) -> str:
    values = [v for v in values if isinstance(v, str) and v]
    return values[0] if values else ""


# ---------------------------------------------------------------------------------------------- anytime curves
def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed run
        if isinstance(record, dict):
            records.append(record)
    return records


def load_anytime(df: pd.DataFrame, results_dir: Path) -> pd.DataFrame:
    """Every finished cell's ``anytime.jsonl`` as rows (cell_id, dataset, pair, label, data_access, seed, order,
    val_acc, teacher_queries, student_steps, seconds, final). Failed cells are left out: a partial curve is
    not a result."""
    columns = ["cell_id", "dataset", "pair", "label", "data_access", "seed", "order", "val_acc", "teacher_queries",
               "student_steps", "seconds", "final"]
    frames = []
    for _, row in df[(df["status"] == "ok") & (df["cell_id"] != "")].iterrows():
        path = results_dir / "cells" / str(row["cell_id"]) / "anytime.jsonl"
        if not path.is_file():
            continue
        records = [r for r in _read_jsonl(path) if isinstance(r.get("val_acc"), (int, float))]
        if not records:
            continue
        frame = pd.DataFrame(records).reindex(columns=["val_acc", "teacher_queries", "student_steps", "seconds", "final"])
        frame = frame.apply(pd.to_numeric, errors="coerce")
        frame["final"] = frame["final"].fillna(0).astype(bool)
        frame = frame.assign(cell_id=row["cell_id"], dataset=row["dataset"], pair=row["pair"], label=row["label"],
                             data_access=row["data_access"], seed=row["seed"], order=range(len(frame)))
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


def step_values(x: Iterable[float], y: Iterable[float], at: Iterable[float]) -> np.ndarray:
    """The accuracy of the last checkpoint at or before each point of ``at`` (step-wise; NaN before the first).

    Checkpoints with equal x (e.g. teacher queries flat while the student trains on stored images) resolve to
    the latest one in their given order. After the last checkpoint the final value holds: a cell that finished
    within budget x has that accuracy at every larger budget."""
    x, y, at = np.asarray(x, dtype=float), np.asarray(y, dtype=float), np.asarray(at, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    index = np.searchsorted(x, at, side="right") - 1
    return np.where(index >= 0, y[np.clip(index, 0, None)] if len(y) else np.nan, np.nan)


def geometric_grid(lo: float, hi: float, n: int = ANYTIME_POINTS) -> np.ndarray:
    """``n`` points spaced geometrically from ``lo`` to ``hi`` (both > 0); one point when they are equal."""
    if not (lo > 0 and hi >= lo):
        raise ValueError(f"a geometric grid needs 0 < lo <= hi, got lo={lo}, hi={hi}")
    return np.array([lo]) if hi == lo else np.geomspace(lo, hi, n)


def anytime_band(curves: pd.DataFrame, x: str, at: np.ndarray) -> pd.DataFrame:
    """The seeds of one method read at ``at`` (see :func:`step_values`): per point mean, std, min, max over the
    seeds that have a checkpoint at or before it, and their number ``n`` (of ``n_seeds``)."""
    values = []
    for _, cell in curves.sort_values("order").groupby("cell_id", sort=True):
        values.append(step_values(cell[x], cell["val_acc"], at))
    matrix = np.vstack(values) if values else np.full((0, len(at)), np.nan)
    n = np.isfinite(matrix).sum(axis=0)
    with np.errstate(all="ignore"), _quiet_nan_warnings():
        mean = np.where(n > 0, np.nanmean(matrix, axis=0), np.nan)
        std = np.where(n > 1, np.nanstd(matrix, axis=0, ddof=1), np.nan)
        low = np.where(n > 0, np.nanmin(matrix, axis=0), np.nan)
        high = np.where(n > 0, np.nanmax(matrix, axis=0), np.nan)
    return pd.DataFrame({"x": at, "mean": mean, "std": std, "min": low, "max": high, "n": n, "n_seeds": len(values)})


@contextlib.contextmanager
def _quiet_nan_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: handled by the n > 0 masks
        yield


def anytime_range(values: pd.Series) -> tuple[float, float]:
    """The x range of an anytime axis: from the smallest positive checkpoint (but at most ``ANYTIME_DECADES``
    decades below the largest: the untrained start is not worth half the axis) to the largest."""
    hi = float(values.max())
    return max(float(values[values > 0].min()), hi / 10 ** ANYTIME_DECADES), hi


def budget_ladder(lo: float, hi: float, max_rungs: int = MAX_LADDER) -> list[float]:
    """Round compute budgets from ``lo`` to ``hi``: 1 and 3 times powers of ten (powers of ten only when that
    gives more than ``max_rungs``, then the largest ``max_rungs``), ending with ``hi``, the largest reached."""
    if not (lo > 0 and hi >= lo):
        return [hi] if hi > 0 else []
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    rungs = [v for k in decades for m in (1, 3) if lo <= (v := float(f"{m}e{k}")) < hi / 1.2]  # exact decimals
    if len(rungs) >= max_rungs:
        rungs = [r for r in rungs if math.isclose(10 ** round(math.log10(r)), r)]
    rungs = rungs[-(max_rungs - 1):] if max_rungs > 1 else []
    return rungs + [float(hi)]


def report_ladder(values: pd.Series, named: Iterable[float] = ()) -> list[float]:
    """The budgets a best-at-budget table reads: the round ladder over the compute reached, and the ``named``
    budgets (a grid's ``report_budgets``) up to the largest compute reached."""
    lo, hi = anytime_range(values)
    return sorted(set(budget_ladder(lo, hi)) | {float(b) for b in named if float(b) <= hi})


def best_at_budget(anytime: pd.DataFrame, x: str, budgets: Iterable[float]) -> pd.DataFrame:
    """For each compute budget and user data-access level: the method label with the highest mean validation
    accuracy at that budget among the methods the level may run (ties: the first label; ``tied`` lists them all),
    its mean, and over how many seeds (those with a checkpoint at or before the budget). ``anytime``: the rows
    of one dataset and pair."""
    budgets = np.asarray(list(budgets), dtype=float)
    stats = {}
    for label, curves in anytime.groupby("label", sort=True):
        if label.endswith(TRACK_SUFFIX["oracle"]):
            continue  # an oracle (tuned on the scored task) is an upper bound, never a winner (see ranked())
        band = anytime_band(curves, x, budgets)
        stats[label] = (_first(curves["data_access"]), band)
    rows = []
    for i, budget in enumerate(budgets):
        for level in access_levels(a for a, _ in stats.values()):
            candidates = [(band["mean"].iloc[i], label, access, band) for label, (access, band) in stats.items()
                          if usable_by(level, access) and band["n"].iloc[i] > 0]
            row = {"budget": budget, "axis": x, "user_access": level}
            if candidates:
                mean, label, access, band = min(candidates, key=lambda c: (-c[0], c[1]))
                tied = sorted(c[1] for c in candidates if c[0] >= mean - 1e-9)
                row.update(label=label, data_access=access, val_acc_mean=mean, val_acc_std=band["std"].iloc[i],
                           n=int(band["n"].iloc[i]), n_seeds=int(band["n_seeds"].iloc[i]),
                           tied=",".join(tied) if len(tied) > 1 else "")
            rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- training curves
def load_curves(df: pd.DataFrame, results_dir: Path) -> pd.DataFrame:
    """Every cell's curve.jsonl as long rows (cell_id, dataset, label, pair, seed, status, step, key, value)."""
    frames = []
    for _, row in df.iterrows():
        path = results_dir / "cells" / str(row["cell_id"]) / "curve.jsonl"
        if not row["cell_id"] or not path.is_file():
            continue
        records = [r for r in _read_jsonl(path) if isinstance(r.get("step"), (int, float))]
        if not records:
            continue
        wide = pd.DataFrame(records)
        long = wide.melt(id_vars="step", var_name="key", value_name="value")
        long["value"] = pd.to_numeric(long["value"], errors="coerce")
        long = long.dropna(subset=["value"])
        long = long.assign(cell_id=row["cell_id"], dataset=row["dataset"], label=row["label"], pair=row["pair"],
                           seed=row["seed"], status=row["status"])
        frames.append(long)
    if not frames:
        return pd.DataFrame(columns=["step", "key", "value", "cell_id", "dataset", "label", "pair", "seed", "status"])
    return pd.concat(frames, ignore_index=True)


def collapse_flags(curves: pd.DataFrame, threshold: float = COLLAPSE_STD) -> pd.DataFrame:
    """Cells whose logged ``sample_std`` (the per-pixel std of a generated batch) fell below ``threshold``: the
    first such step, the value there and the last value logged (a generator rarely recovers)."""
    columns = ["cell_id", "dataset", "pair", "label", "seed", "step", "sample_std", "last_sample_std"]
    std = curves[curves["key"] == "sample_std"]
    rows = []
    for cell_id, cell in std.sort_values("step").groupby("cell_id", sort=False):
        low = cell[cell["value"] < threshold]
        if len(low):
            first = low.iloc[0]
            rows.append({"cell_id": cell_id, "dataset": first["dataset"], "pair": first["pair"], "label": first["label"],
                         "seed": first["seed"], "step": int(first["step"]), "sample_std": first["value"],
                         "last_sample_std": cell["value"].iloc[-1]})
    return pd.DataFrame(rows, columns=columns).sort_values(["dataset", "pair", "label", "seed"]).reset_index(drop=True)


def collapse_text(flag: pd.Series, threshold: float = COLLAPSE_STD) -> str:
    seed = "" if pd.isna(flag["seed"]) else f", seed {int(flag['seed'])}"
    return (f"{flag['label']} ({flag['pair']}{seed}): generator collapsed at step {int(flag['step'])} "
            f"(sample_std {flag['sample_std']:.3g} < {threshold:g}; last logged {flag['last_sample_std']:.3g})")


# ---------------------------------------------------------------------------------------------- plotting
@dataclass
class Plot:
    name: str  # file stem under plots/
    title: str
    caption: str
    png: bytes = b""


@dataclass
class Block:
    """One piece of a dataset section, rendered to HTML and to Markdown alike."""
    kind: str  # heading | text | note | table | figure | samples | list
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    flags: list[bool] | None = None  # table rows shown bold
    label_col: int | None = None  # table column holding a method label (gets its colour swatch)
    left: tuple[int, ...] = (0,)  # table columns aligned left (text)
    plot: Plot | None = None
    items: list = field(default_factory=list)  # list: strings; samples: (caption, relative path)
    anchor: str = ""
    nav: str = ""  # a heading with an anchor and this text is linked from the page's navigation bar


@dataclass
class Section:
    dataset: str
    table: pd.DataFrame
    teachers: pd.DataFrame
    blocks: list[Block] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    fronts: dict[str, pd.DataFrame] = field(default_factory=dict)
    best_at_budget: pd.DataFrame | None = None
    latency_budget: pd.DataFrame | None = None
    collapses: pd.DataFrame | None = None
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


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kwargs):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg via savefig

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
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
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    values = [v for v in values if v is not None and np.isfinite(v) and v > 0]
    if values and max(values) / min(values) >= ratio:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        if max(values) / min(values) < 1e4:  # ticks at 1, 2, 5 x 10^k as plain numbers: readable, and no minor labels
            target = ax.xaxis if axis == "x" else ax.yaxis  # (3×10¹ 4×10¹ ...) to collide
            target.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.10g}"))
            target.set_minor_formatter(NullFormatter())
        return True
    return False


def _family_handles(agg: pd.DataFrame) -> list:
    """One legend entry per method family present in ``agg`` (marker and colour), in :data:`FAMILIES` order."""
    from matplotlib.lines import Line2D

    present = {family_of(str(r.get("method", "")), str(r.get("data_access", "")), str(r.get("teacher_access", "")))
               for _, r in agg.iterrows()}
    return [Line2D([], [], color=f.colour, marker=f.marker, linestyle="none", markersize=8, label=f.name)
            for key, f in FAMILIES.items() if key in present]


def _legend(fig, agg: pd.DataFrame, extra=()):
    """The scatter figures' legend, beside the plot: method families (see :data:`FAMILIES`), then ``extra``."""
    fig.legend(handles=_family_handles(agg) + list(extra), loc="outside right upper", frameon=False,
               title="method family", alignment="left")


def _centre(x: str) -> str:
    """The aggregated column plotted for ``x``: the architecture's latency median, else the mean over seeds."""
    return f"{x}_median" if x == "arch_latency_ms" else f"{x}_mean"


def _spread(row: pd.Series, x: str) -> float:
    """Half-width of the x error bar: half the latency IQR for the architecture latency, else the std over seeds."""
    return row[f"{x}_iqr"] / 2 if x == "arch_latency_ms" else row[f"{x}_std"]


def _points(ax, agg: pd.DataFrame, x: str, *, xerr: bool = True) -> None:
    """Accuracy (mean, std bar) against ``x``, one point per aggregated row, marker and colour by method family."""
    for _, row in agg.iterrows():
        xv, yv = row[_centre(x)], row["student_acc_mean"]
        if not (np.isfinite(xv) and np.isfinite(yv)):
            continue
        family = _family(row)
        ax.errorbar(xv, yv, yerr=_nan0(row["student_acc_std"]), xerr=_nan0(_spread(row, x)) if xerr else None,
                    fmt=family.marker, color=family.colour, markersize=8, capsize=3, elinewidth=1.2,
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


def _draw_fronts(ax, fronts: dict[str, pd.DataFrame], x: str) -> list:
    """One step line (and ring per point) per user data-access level; wider and lighter for more access, so
    that fronts that coincide stay visible as nested strokes."""
    from matplotlib.lines import Line2D

    handles = []
    for level in reversed(list(fronts)):
        front = fronts[level]
        if not len(front):
            continue
        colour, dash, width = ACCESS_STYLE.get(level, ("0.5", "-", 1.2))
        fx, fy = front[_centre(x)].to_numpy(), front["student_acc_mean"].to_numpy()
        ax.step(fx, fy, where="post", color=colour, linestyle=dash, linewidth=width, alpha=0.75, zorder=2)
        size = 150 + 70 * access_rank(level)
        ax.scatter(fx, fy, s=size, facecolors="none", edgecolors=colour, linewidths=1.3, zorder=2)
        handles.append(Line2D([], [], color=colour, linestyle=dash, linewidth=width, marker="o", markerfacecolor="none",
                              markersize=7 + access_rank(level), label=f"front: {USER_ACCESS_TEXT.get(level, level)}"))
    if handles:
        handles.insert(0, Line2D([], [], linestyle="none", label=""))
    return handles[:1] + handles[1:][::-1]


def _accuracy_vs(agg, teachers, x, xlabel, title, *, teacher_x=None, fronts=None):
    """Accuracy (mean +- std over seeds) against ``x``; the teacher as a point (or a line without ``teacher_x``);
    the points of the front over every row (lower ``x``, higher accuracy) named on the plot."""
    fig, axes = _figure(8.6, 4.6)
    ax = axes[0, 0]
    _points(ax, agg, x)
    _label_points(ax, pareto_front(agg, _centre(x), "student_acc_mean"), x)
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
    if fronts:
        extra += _draw_fronts(ax, fronts, x)
    _log_if_wide(ax, xs)
    ax.margins(0.08)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%, final, mean ± std over seeds)")
    ax.set_title(title, loc="left", fontsize="medium")
    _legend(fig, agg, extra)
    return fig


def _point_name(row: pd.Series) -> str:
    return f"{row['label']} · {row['student']}"


def _label_points(ax, points: pd.DataFrame, x: str, fontsize: float = 7.0) -> None:
    """Name each point (method · student) with a leader line to it, alternately above and below so neighbours do not
    collide; the right half of the points is named to their left, so that no name runs off the axes."""
    ordered = points.sort_values(_centre(x))
    for i, (_, row) in enumerate(ordered.iterrows()):
        xv, yv = row[_centre(x)], row["student_acc_mean"]
        if not (np.isfinite(xv) and np.isfinite(yv)):
            continue
        above, left = i % 2 == 0, len(ordered) > 1 and i >= len(ordered) / 2
        ax.annotate(_point_name(row), (xv, yv), xytext=(-10 if left else 10, 16 if above else -16), textcoords="offset points",
                    fontsize=fontsize, ha="right" if left else "left", va="bottom" if above else "top", color="0.1", zorder=5,
                    arrowprops=dict(arrowstyle="-", color="0.45", linewidth=0.6, shrinkA=0, shrinkB=4),
                    bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.75))


def _tradeoff_panel(ax, ok: pd.DataFrame, user: str, front: pd.DataFrame, teachers: pd.DataFrame,
                    backend: LatencyBackend) -> None:
    """One user's panel: every row faint, the rows the user may run by family, its front as a step line, named."""
    x = "arch_latency_ms"
    usable = usable_rows(ok, user)
    ax.scatter(ok[_centre(x)], ok["student_acc_mean"], s=14, color="0.85", zorder=1)
    _points(ax, usable, x)
    if len(front):
        ax.step(front[_centre(x)], front["student_acc_mean"], where="post", color="0.15", linewidth=1.3, zorder=2)
        _label_points(ax, front, x)
    for _, t in teachers.iterrows():
        if np.isfinite(t.get(backend.teacher_column, np.nan)) and np.isfinite(t.get("teacher_acc", np.nan)):
            ax.plot(t[backend.teacher_column], t["teacher_acc"], marker=TEACHER_MARKER, color="0.15", markersize=13,
                    linestyle="none", zorder=4)
    ax.set_title(f"user: {USER_ACCESS_TEXT.get(user, user)} ({len(usable)} of {len(ok)} rows)", loc="left",
                 fontsize="medium")


def _tradeoff_figure(ok: pd.DataFrame, teachers: pd.DataFrame, fronts: dict[str, pd.DataFrame],
                     backend: LatencyBackend, xlabel: str):
    """Accuracy vs latency, one panel per user (:func:`user_columns`), shared axes; the legend below the panels."""
    from matplotlib.lines import Line2D

    users = list(fronts)
    ncols = min(len(users), 3)
    nrows = -(-len(users) // ncols)
    fig, axes = _figure(4.6 * ncols, 3.9 * nrows + 0.9, ncols=ncols, nrows=nrows, sharex=True, sharey=True)
    flat = list(axes.flat)
    for ax, user in zip(flat, users):
        _tradeoff_panel(ax, ok, user, fronts[user], teachers, backend)
    for ax in flat[len(users):]:
        ax.set_axis_off()
    xs = list(ok[_centre("arch_latency_ms")]) + [t for t in teachers.get(backend.teacher_column, []) if np.isfinite(t)]
    _log_if_wide(flat[0], xs, ratio=8.0)
    flat[0].margins(x=0.12, y=0.1)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%, final)")
    extra = [Line2D([], [], color="0.85", marker="o", linestyle="none", label="rows this user may not run"),
             Line2D([], [], color="0.15", linewidth=1.3, label="Pareto front (named)")]
    if any(np.isfinite(t) for t in teachers.get(backend.teacher_column, [])):
        extra.append(Line2D([], [], color="0.15", marker=TEACHER_MARKER, markersize=11, linestyle="none", label="teacher"))
    handles = _family_handles(ok) + extra
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), frameon=False)
    return fig


def _data_access_figure(agg, teachers, title):
    fig, axes = _figure(11.5, 4.6, ncols=2)
    ax, ax2 = axes[0]
    present = access_levels(agg["data_access"])
    for ci, access in enumerate(present):
        group = agg[agg["data_access"] == access].sort_values(["label", "student"])
        offsets = np.linspace(-0.3, 0.3, len(group)) if len(group) > 1 else [0.0]
        for off, (_, row) in zip(offsets, group.iterrows()):
            if np.isfinite(row["student_acc_mean"]):
                family = _family(row)
                ax.errorbar(ci + off, row["student_acc_mean"], yerr=_nan0(row["student_acc_std"]), fmt=family.marker,
                            color=family.colour, markersize=8, capsize=3, markeredgecolor="white", zorder=3)
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
        _points(ax2, agg, "real_samples_used", xerr=False)
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
    _legend(fig, agg, extra)
    return fig


def _anytime_figure(anytime: pd.DataFrame, x: str, title: str, colours):
    """Validation accuracy against compute ``x`` (log axis) for every method of one dataset and pair.

    Each seed's curve is read step-wise on a common geometric grid (:func:`anytime_band`); the line is the
    mean over seeds, the band min–max, drawn where every seed has a checkpoint. Past the last checkpoint of
    its last seed a method's line continues dotted: it had finished, its final value holds."""
    from matplotlib.lines import Line2D

    fig, axes = _figure(8.6, 4.4)
    ax = axes[0, 0]
    lo, hi = anytime_range(anytime[x])
    ends = anytime.groupby("cell_id")[x].max()
    # each cell's last checkpoint joins the grid, so that a line reaches its final value before turning dotted
    grid = np.unique(np.concatenate([geometric_grid(lo, hi), ends[(ends >= lo) & (ends <= hi)].to_numpy(dtype=float)]))
    handles = []
    dashes = method_dashes(anytime["label"])
    for label, curves in anytime.groupby("label", sort=True):
        band = anytime_band(curves, x, grid)
        end = curves.groupby("cell_id")[x].max().max()
        full = (band["n"] == band["n_seeds"]).to_numpy()
        xs, mean = band["x"].to_numpy(), band["mean"].to_numpy()
        i_end = int(np.searchsorted(xs, end, side="right")) - 1
        live = full & (np.arange(len(xs)) <= i_end)
        held = full & (np.arange(len(xs)) >= max(i_end, 0))
        colour = colours[label]
        if live.any():
            ax.step(xs[live], mean[live], where="post", color=colour, linewidth=1.8, linestyle=dashes[label], zorder=3)
            if band["n_seeds"].iloc[0] > 1:
                ax.fill_between(xs[live], band["min"].to_numpy()[live], band["max"].to_numpy()[live], step="post",
                                color=colour, alpha=0.18, linewidth=0, zorder=2)
            ax.plot(xs[live][-1], mean[live][-1], marker="o", color=colour, markersize=5, zorder=4)
        if held.any():
            ax.step(xs[held], mean[held], where="post", color=colour, linewidth=1.2, linestyle=":", zorder=3)
        note = " (no teacher queries)" if x == "teacher_queries" and end <= 0 else ""
        seeds = band["n_seeds"].iloc[0]
        handles.append(Line2D([], [], color=colour, linewidth=1.8, linestyle=dashes[label], label=f"{label}{note}, {seeds} seed{'s' if seeds != 1 else ''}"))
    handles += [Line2D([], [], linestyle="none", label=""),
                Line2D([], [], color="0.3", linewidth=1.8, marker="o", markersize=5, label="mean over seeds (● last checkpoint)"),
                Line2D([], [], color="0.3", linewidth=1.2, linestyle=":", label="finished: final value holds"),
                Line2D([], [], color="0.3", linewidth=6, alpha=0.18, label="band: min–max over seeds")]
    ax.set_xscale("log")
    ax.set_xlabel(f"{ANYTIME_AXES.get(x, x)} (log)")
    ax.set_ylabel("validation accuracy (%) — not test")
    ax.set_title(title, loc="left", fontsize="medium")
    fig.legend(handles=handles, loc="outside right upper", frameon=False, title="method (colour)", alignment="left")
    return fig


def _curve_keys(curves: pd.DataFrame) -> list[str]:
    keys = [k for k in curves["key"].unique() if k != "lr" and not k.startswith("lr_")]  # schedules: not results
    spread = curves.groupby("key")["label"].nunique()
    first = ("loss", "val_acc", "test_acc", "sample_std")
    return sorted(keys, key=lambda k: (first.index(k) if k in first else len(first), -spread[k], k))


CURVE_YLABEL = {"val_acc": "validation accuracy (%)", "test_acc": "test accuracy (%)",
                "sample_std": "std of generated pixels (log)"}


def _curves_figure(curves, title, colours, collapses=None):
    from matplotlib.lines import Line2D

    keys = _curve_keys(curves)
    shown = keys[:MAX_CURVE_PANELS]
    ncols = min(3, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig, axes = _figure(3.2 * ncols + 2.4, 2.7 * nrows + 0.4, ncols=ncols, nrows=nrows)
    pairs = sorted(curves["pair"].unique())
    styles = {p: LINESTYLES[i % len(LINESTYLES)] for i, p in enumerate(pairs)}
    dashes = method_dashes(curves["label"])
    if len(pairs) == 1:  # one pair per figure: the line style tells apart methods that share a colour
        styles = {}

    def style(label: str, pair: str) -> str:
        return styles.get(pair) or dashes[label]

    for ax, key in zip(axes.flat, shown):
        part = curves[curves["key"] == key]
        if key == "sample_std":  # one line per seed: a mean would hide the one seed whose generator collapsed
            for (label, pair, _), group in part.groupby(["label", "pair", "cell_id"], sort=True):
                group = group.sort_values("step")
                ax.plot(group["step"], group["value"], color=colours[label], linestyle=style(label, pair), linewidth=1.2,
                        marker="o" if len(group) <= 2 else None, markersize=4)
        for (label, pair), group in part.groupby(["label", "pair"], sort=True) if key != "sample_std" else ():
            stats = group.groupby("step")["value"].agg(["mean", "min", "max"]).sort_index()
            ax.plot(stats.index, stats["mean"], color=colours[label], linestyle=style(label, pair), linewidth=1.5,
                    marker="o" if len(stats) <= 2 else None, markersize=4)
            if group["seed"].nunique() > 1:
                ax.fill_between(stats.index, stats["min"], stats["max"], color=colours[label], alpha=0.15, linewidth=0)
        if key == "sample_std":
            ax.axhline(COLLAPSE_STD, color="#b2182b", linewidth=1, linestyle=":", zorder=1)
            ax.text(0.99, COLLAPSE_STD, f"collapse < {COLLAPSE_STD:g}", color="#b2182b", fontsize="x-small", ha="right",
                    va="bottom", transform=ax.get_yaxis_transform())
            if collapses is not None and len(collapses):
                for _, flag in collapses.iterrows():
                    ax.plot(flag["step"], max(flag["sample_std"], 1e-6), marker="X", color=colours[flag["label"]],
                            markersize=9, markeredgecolor="#b2182b", zorder=5)
            positive = part["value"][part["value"] > 0]
            if len(positive):
                ax.set_yscale("log")
                ax.set_ylim(min(positive.min(), COLLAPSE_STD) / 2, positive.max() * 2)
        elif key not in ("test_acc", "val_acc"):
            _log_if_wide(ax, part["value"], axis="y", ratio=100)
        ax.set_title(key + (" (generator collapse)" if key == "sample_std" else ""), loc="left", fontsize="medium")
        ax.set_xlabel("iteration")
        ax.set_ylabel(CURVE_YLABEL.get(key, f"{key} (value)"))
    for ax in list(axes.flat)[len(shown):]:
        ax.set_axis_off()
    handles = [Line2D([], [], color=colours[m], linestyle=dashes[m] if not styles else "-", label=m)
               for m in sorted(curves["label"].unique())]
    if styles:
        handles.append(Line2D([], [], linestyle="none", label=""))
        handles += [Line2D([], [], color="0.35", linestyle=styles[p], label=p) for p in pairs]
    if collapses is not None and len(collapses):
        handles.append(Line2D([], [], color="0.5", marker="X", markeredgecolor="#b2182b", linestyle="none",
                              markersize=9, label="generator collapsed"))
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
    if median is None or not np.isfinite(median):
        return "–"
    return f"{median:.3f} (IQR {iqr:.3f})" if iqr is not None and np.isfinite(iqr) else f"{median:.3f}"


def _seconds(value: float) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    return f"{value:.1f}" if value < 600 else f"{value / 60:.1f} min"


def _budget_value(value: float, axis: str) -> str:
    return f"{value:.3g} s" if axis == "seconds" else _si(value)


def _steps(row: pd.Series) -> str:
    """Student steps (mean over seeds); the iterations column of older runs where there are none."""
    steps = row.get("student_steps_mean", math.nan)
    return _si(steps if np.isfinite(steps) else row.get("iterations_mean", math.nan))


TABLE_TEXT_HEADERS = ("pair", "method", "data", "budget (stopped by)", "overrides (vs the method's preset)", "collapsed")


def table_rows(agg: pd.DataFrame, show_best: bool, collapsed: dict[tuple[str, str], int] | None = None,
               backend: str = "eager") -> tuple[list[str], list[list[str]], list[bool]]:
    """Header, formatted rows and which rows hold the best final accuracy of their pair.

    ``collapsed``: ``{(pair, label): seeds whose generator collapsed}`` adds a column when given; ``backend``: the
    latency backend of ``arch_latency_ms_*``, named in its header."""
    header = ["pair", "method", "data", "seeds ok", "final test acc %", "val acc %"]
    if show_best:
        header.append("best-on-test acc % (paper protocol)")
    if collapsed is not None:
        header.append("collapsed")
    header += ["budget (stopped by)", "overrides (vs the method's preset)", "student steps", "teacher queries",
               "distill s", "real samples", "params", "MACs", f"latency ms ({backend}, b=1, per student arch)"]
    agg = agg.sort_values(["pair", "student_acc_mean", "label"], ascending=[True, False, True], na_position="last")
    best = agg.groupby("pair")["student_acc_mean"].transform("max")
    rows, flags = [], []
    for (_, row), top in zip(agg.iterrows(), best):
        acc = _pm(row["student_acc_mean"], row["student_acc_std"]) if row["n_ok"] else "failed"
        cells = [row["pair"], row["label"], row["data_access"], f"{row['n_ok']}/{row['n_total']}", acc,
                 _pm(row["student_acc_val_mean"], row["student_acc_val_std"])]
        if show_best:
            cells.append(_pm(row["student_acc_best_mean"], row["student_acc_best_std"]))
        if collapsed is not None:
            n = collapsed.get((row["pair"], row["label"]), 0)
            cells.append(f"{n}/{row['n_ok']} seeds" if n else "")
        budget = row["budget_text"] or "–"
        if row["stopped_by_text"]:
            budget += f"; {row['stopped_by_text']}"
        cells += [budget, row["overrides"] or "none", _steps(row), _si(row["teacher_queries_mean"]),
                  _seconds(row["distill_seconds_mean"]), _si(row["real_samples_used_mean"]), _si(row["params_mean"]),
                  _si(row["macs_mean"]), _median_iqr(row["arch_latency_ms_median"], row["arch_latency_ms_iqr"])]
        rows.append(cells)
        flags.append(bool(np.isfinite(row["student_acc_mean"]) and row["student_acc_mean"] == top))
    return header, rows, flags


def front_rows(fronts: dict[str, pd.DataFrame]) -> tuple[list[str], list[list[str]]]:
    header = ["user's data access", "pair", "method", "method's data", "final test acc %", "latency ms"]
    rows = [[USER_ACCESS_TEXT.get(level, level), r["pair"], r["label"], r["data_access"],
             _pm(r["student_acc_mean"], r["student_acc_std"]), _median_iqr(r["arch_latency_ms_median"], r["arch_latency_ms_iqr"])]
            for level, front in fronts.items() for _, r in front.iterrows()]
    return header, rows


def latency_budget_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = ["latency ≤ ms", "user's data access", "method", "student (pair)", "method's data", "final test acc %",
              "params", "MACs", "latency ms"]
    rows = []
    for _, r in table.iterrows():
        if not isinstance(r.get("label"), str):
            rows.append([f"{r['latency_budget_ms']:.3f}", USER_ACCESS_TEXT.get(r["user_access"], r["user_access"]), "–",
                         "(no student this fast)", "", "", "", "", ""])
            continue
        rows.append([f"{r['latency_budget_ms']:.3f}", USER_ACCESS_TEXT.get(r["user_access"], r["user_access"]), r["label"],
                     r["pair"], r["data_access"], _pm(r["student_acc_mean"], r["student_acc_std"]), _si(r["params_mean"]),
                     _si(r["macs_mean"]), _median_iqr(r["arch_latency_ms_median"], r["arch_latency_ms_iqr"])])
    return header, rows


def decision_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The report's first table, wide: one row per latency budget, one column per user; each cell the best student
    and method under that budget for that user with its final test accuracy, mean ± std over its n seeds."""
    users = list(dict.fromkeys(table["user_access"]))
    header = ["latency ≤ ms"] + [USER_ACCESS_TEXT.get(u, u) for u in users]
    rows = []
    for budget, group in table.groupby("latency_budget_ms", sort=True):
        by_user = {r["user_access"]: r for _, r in group.iterrows()}
        cells = [f"{budget:.3g}"]
        for user in users:
            r = by_user.get(user)
            if r is None or not isinstance(r.get("label"), str):
                cells.append("–")
                continue
            seeds = int(r["n_ok"])
            cells.append(f"{r['student']} · {r['label']}: {_pm(r['student_acc_mean'], r['student_acc_std'])} "
                         f"(n={seeds})")
        rows.append(cells)
    return header, rows


def latency_vs_macs(points: pd.DataFrame) -> list[str]:
    """Where the latency ranking of the student architectures is not monotone in their MACs: for each architecture
    that is faster than one with fewer MACs, a sentence naming both. Empty: monotone."""
    arch = (points.dropna(subset=["arch_latency_ms_median", "macs_mean"])
            .drop_duplicates("student").sort_values(["macs_mean", "arch_latency_ms_median"]))
    breaks = []
    fewer = []
    for _, row in arch.iterrows():
        slower = [r for r in fewer if r["arch_latency_ms_median"] > row["arch_latency_ms_median"] and r["macs_mean"] < row["macs_mean"]]
        if slower:
            worst = max(slower, key=lambda r: r["arch_latency_ms_median"])
            breaks.append(f"{row['student']} ({_si(row['macs_mean'])} MACs, {row['arch_latency_ms_median']:.3g} ms) runs "
                          f"faster than {worst['student']} ({_si(worst['macs_mean'])} MACs, "
                          f"{worst['arch_latency_ms_median']:.3g} ms)")
        fewer.append(row)
    return breaks


def best_at_budget_rows(table: pd.DataFrame, axis: str) -> tuple[list[str], list[list[str]]]:
    """Wide: one row per budget, one column per user data-access level, the winner with its mean and seeds."""
    levels = access_levels(table["user_access"])
    header = [("teacher queries ≤" if axis == "teacher_queries" else "seconds ≤")] + \
             [USER_ACCESS_TEXT.get(level, level) for level in levels]
    rows = []
    for budget, group in table.groupby("budget", sort=True):
        cells = [_budget_value(budget, axis)]
        by_level = {r["user_access"]: r for _, r in group.iterrows()}
        for level in levels:
            r = by_level.get(level)
            if r is None or not isinstance(r.get("label"), str):
                cells.append("–")
                continue
            own = f" [{r['data_access']}]" if r["data_access"] != level else ""
            tied = r["tied"].split(",") if isinstance(r.get("tied"), str) and r["tied"] else []
            if len(tied) > 2:
                cells.append(f"tie of {len(tied)} methods: {r['val_acc_mean']:.2f}")
            else:
                name = " = ".join(tied) if tied else f"{r['label']}{own}"
                cells.append(f"{name}: {r['val_acc_mean']:.2f} ({int(r['n'])}/{int(r['n_seeds'])} seeds)")
        rows.append(cells)
    return header, rows


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
    if np.isfinite(t.get("teacher_ort_latency_ms", np.nan)):
        parts.append(f"{t['teacher_ort_latency_ms']:.3f} ms on ONNX Runtime")
    return f"teacher {t['teacher']}: " + (", ".join(parts) or "no metrics recorded")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


# ---------------------------------------------------------------------------------------------- render
def choose_backend(df: pd.DataFrame, name: str | None = None) -> LatencyBackend:
    """The latency backend the trade-off figure and the decision tables use: ``name`` (an error when it is unknown or
    runs.csv has none of its figures), else ONNX Runtime where the rows carry its figures, else eager PyTorch."""
    if name is not None:
        backend = BACKENDS.get(name)
        if not (df["status"] == "ok").any() or df.loc[df["status"] == "ok", backend.median].notna().any():
            return backend
        raise ReportError(f"--latency-backend {name}: runs.csv has no {backend.median} values (timed only where "
                          f"{backend.title} is installed; {backend.missing() or 'it is installed here'}); "
                          f"valid here: {', '.join(n for n, b in BACKENDS.items() if df[b.median].notna().any()) or 'none'}")
    ort = BACKENDS.get("onnxruntime")
    return ort if df[ort.median].notna().any() else BACKENDS.get("eager")


def _latency_text(df: pd.DataFrame, dataset: str, backend: LatencyBackend) -> str:
    """Which backend, settings and machine the latencies of ``dataset`` were taken on, for captions."""
    rows = df[(df["dataset"] == dataset) & (df["status"] == "ok")]
    threads = sorted({int(t) for t in rows["latency_threads"].dropna()})
    cpus = sorted(set(rows["cpu"]) - {""})
    thread_text = f"{', '.join(map(str, threads))} thread{'s' if threads != [1] else ''}" if threads else "threads not recorded"
    return (f"{backend.title}, batch 1, median over timed blocks, {thread_text}, on "
            f"{'; '.join(cpus) if cpus else 'an unrecorded CPU'}")


def render(results_dir: Path, out: Path | None = None, latency_backend: str | None = None) -> Path:
    """Write the report of ``results_dir`` into ``out`` (default ``<results_dir>/report``); return ``out``.

    ``latency_backend``: the :data:`bench.latency.BACKENDS` name whose latencies the trade-off figure and the
    decision tables use (default: :func:`choose_backend`)."""
    results_dir = Path(results_dir)
    from bench.translation import report as translation_report  # the translation task's own section

    if translation_report.is_translation(results_dir):
        return translation_report.render(results_dir, out)
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

    if tuning_note(df):
        notes.append(tuning_note(df))
    backend = choose_backend(df, latency_backend)
    agg = aggregate(df, backend)
    teachers = teachers_of(df)
    colours = method_colours(df["label"])
    curves = load_curves(df, results_dir)
    anytime = load_anytime(df, results_dir)
    if not len(anytime) and (df["status"] == "ok").any():
        notes.append("No cell has an anytime.jsonl (written by an older `bench run`): the anytime curves and the "
                     "best-method-per-budget tables are left out.")
    sections = []
    with _style():
        for dataset in sorted(df["dataset"].unique()):
            sections.append(_dataset_section(dataset, df, agg, teachers, curves, anytime, colours, backend, results_dir,
                                             plots_dir, samples_dir, grid.get("report_budgets") or {}))
    agg.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    for name, attribute in (("best_at_budget", "best_at_budget"), ("latency_budget", "latency_budget")):
        frames = [getattr(s, attribute) for s in sections if getattr(s, attribute) is not None and len(getattr(s, attribute))]
        path = out / f"{name}.csv"
        if frames:
            pd.concat(frames, ignore_index=True).to_csv(path, index=False, float_format="%.6g")
        elif path.exists():
            path.unlink()
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


BEST_AT_BUDGET_TEXT = (
    "Which method reaches the highest mean VALIDATION accuracy within each compute budget, for a user with each "
    "level of data access (a column admits every method needing no more data: none < alt < few < full; "
    "[level] marks a winner from a lower level). Read from the anytime curves: each seed counts its last "
    "checkpoint at or before the budget (a cell that finished earlier keeps its final value); seeds: how many "
    "had a checkpoint by then. These are validation accuracies for choosing a method at equal compute; the "
    "headline result stays the final test accuracy of the pair × method table.")


def _dataset_section(dataset, df, agg, teachers, curves, anytime, colours, backend, results_dir, plots_dir,
                     samples_dir, report_budgets: dict[str, list[float]]) -> Section:
    part = agg[agg["dataset"] == dataset]
    ok = part[part["n_ok"] > 0]
    tea = teachers[teachers["dataset"] == dataset]
    section = Section(dataset=dataset, table=part, teachers=tea)
    blocks = section.blocks
    slug = _slug(dataset)
    title = dataset

    def draw(name, plot_title, caption, make) -> Plot:
        plot = Plot(name=f"{name}_{slug}", title=plot_title, caption=caption)
        _save(make(), plots_dir, plot)
        section.plots.append(plot)
        blocks.append(Block("figure", plot=plot))
        return plot

    def has(column):
        return len(ok) and ok[_centre(column)].notna().any()

    part_curves = curves[curves["dataset"] == dataset]
    section.collapses = collapse_flags(part_curves)
    collapsed = section.collapses.groupby(["pair", "label"]).size().to_dict() if len(section.collapses) else None
    show_best = part["student_acc_best_mean"].notna().any()
    header, rows, flags = table_rows(part, show_best, collapsed, backend.name)
    text_cols = tuple(i for i, h in enumerate(header) if h in TABLE_TEXT_HEADERS)
    pair_method = [
        Block("heading", "Pair × method", anchor=f"table-{slug}", nav="table"),
        Block("text", "Sorted by final test accuracy within each pair; bold: the best of the pair. val acc: the "
              "validation split (held out from every method; what defaults and budgets may be chosen on). Budget: "
              "the fraction of the paper's iteration budget and any compute cap, and which cap ended how many seeds "
              "early. Overrides: hyperparameters that differ from the method's registered preset for this "
              "dataset." + (" Best-on-test: the paper protocol (best test evaluation during training), optimistic."
                            if show_best else "")),
        Block("table", header=header, rows=rows, flags=flags, label_col=1, left=text_cols)]
    if len(section.collapses):
        pair_method.append(Block("list", f"Generator collapse (the logged sample_std fell below {COLLAPSE_STD:g}: the "
                                 "generator emits one image; the student then learns from almost nothing):",
                                 items=[collapse_text(f) for _, f in section.collapses.iterrows()]))

    if not len(ok):
        section.skipped.append("no plots: every cell of this dataset failed")
        blocks += pair_method
        return _finish(section)
    if has("arch_latency_ms"):
        _tradeoff_blocks(section, df, ok, tea, backend, draw)
    else:
        section.skipped.append(f"the latency-budget table and accuracy vs latency (and its Pareto fronts): runs.csv "
                               f"has no {backend.median} values")
    blocks += [Block("text", _teacher_line(t)) for _, t in tea.iterrows()]
    _api_queries_blocks(section, df, anytime[anytime["dataset"] == dataset], plots_dir, slug, title)
    blocks += pair_method
    if has("macs"):
        draw("macs", "Accuracy vs MACs", "Final test accuracy against multiply-accumulates for one image; the "
             "star is the teacher.",
             lambda: _accuracy_vs(ok, tea, "macs", "MACs per image (multiply-accumulates)", f"{title}: accuracy vs MACs",
                                  teacher_x="teacher_macs"))
    else:
        section.skipped.append("accuracy vs MACs: runs.csv has no macs values")
    if has("params"):
        draw("params", "Accuracy vs parameters", "Final test accuracy against the deployed student's parameter "
             "count; the star is the teacher.",
             lambda: _accuracy_vs(ok, tea, "params", "parameters (count)", f"{title}: accuracy vs parameters",
                                  teacher_x="teacher_params"))
    else:
        section.skipped.append("accuracy vs parameters: runs.csv has no params values")
    if (ok["data_access"] != "?").any() or has("real_samples_used"):
        draw("data_access", "Accuracy vs real data used",
             "Left: by what each method may read (none = data-free, alt = out-of-domain real images, few = a few "
             "training samples, full = the whole training set). Right: by the number of this dataset's real "
             "training images actually read (0 for data-free and alternative-data methods).",
             lambda: _data_access_figure(ok, tea, title))
    else:
        section.skipped.append("accuracy vs real data used: runs.csv has no data_access or real_samples_used values")
    if has("distill_seconds"):
        device = ", ".join(sorted(set(df.loc[df["dataset"] == dataset, "device"]) - {""})) or "unknown device"
        draw("cost", "Accuracy vs distillation cost",
             f"Final test accuracy against the wall-clock seconds of the distillation (on {device}); teacher "
             "training is not included.",
             lambda: _accuracy_vs(ok, tea, "distill_seconds", f"distillation time (s, wall clock on {device})",
                                  f"{title}: accuracy vs distillation cost"))
    else:
        section.skipped.append("accuracy vs distillation cost: runs.csv has no distill_seconds values")
    _anytime_blocks(section, anytime[anytime["dataset"] == dataset], colours, plots_dir, slug, title, report_budgets)
    _curves_blocks(section, part_curves, colours, plots_dir, slug, title)
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
    if section.samples:
        blocks += [Block("heading", "Generated / synthesised samples"), Block("samples", items=section.samples)]
    return _finish(section)


DECISION_TEXT = (
    "Which student and method to deploy under a latency budget: for each budget (the distinct student latencies) and "
    "each user, the most accurate student at or under that latency among the methods the user may run; accuracy is "
    "the final test accuracy, mean ± std over the n seeds that finished. A user with more data may run every method "
    "needing less (none < alt < few < full); the API-teacher user has no data and only the teacher's outputs or "
    "labels (rows with teacher_access outputs/labels and data_access none).")


def _tradeoff_blocks(section: Section, df: pd.DataFrame, ok: pd.DataFrame, tea: pd.DataFrame, backend: LatencyBackend,
                     draw) -> None:
    """The report's answer, first in the section: the decision table, then accuracy vs latency per user with the named
    Pareto fronts, whether latency follows MACs, and the fronts' table."""
    slug, latency = _slug(section.dataset), _latency_text(df, section.dataset, backend)
    section.latency_budget = latency_budget_table(ok)
    dh, dr = decision_rows(section.latency_budget)
    section.blocks += [Block("heading", "Which student for a latency budget?", anchor=f"latency-{slug}", nav="latency budgets"),
                       Block("text", f"{DECISION_TEXT} Latency: {latency}."),
                       Block("table", header=dh, rows=dr, left=tuple(range(1, len(dh))))]
    section.fronts = access_fronts(ok, "arch_latency_ms_median", "student_acc_mean")
    draw("tradeoff", f"Accuracy vs latency ({backend.title})",
         f"Final test accuracy (error bars: std over seeds) against the latency of the student architecture ({latency}; "
         "error bars: the interquartile range), timed once per architecture since the method only changes the weights. "
         "One panel per user: in colour the methods that user may run, marked by family, grey the rest; the step line "
         "is that user's Pareto front (none of its points is beaten on both axes), each front point named "
         "method · student. The star is the teacher.",
         lambda: _tradeoff_figure(ok, tea, section.fronts, backend, f"latency (ms per image, batch 1, {backend.name})"))
    breaks = latency_vs_macs(ok)
    section.blocks.append(Block("text", f"Latency ranking against MACs on {backend.title}: "
                                + ("monotone (more MACs never ran faster)." if not breaks else
                                   "not monotone: " + "; ".join(breaks) + ".")))
    fh, fr = front_rows(section.fronts)
    section.blocks += [Block("heading", "Pareto fronts per user (accuracy vs latency)"),
                       Block("table", header=fh, rows=fr, left=(0, 1, 2, 3))]  # no method swatch: the figure colours families


def _api_queries_blocks(section: Section, df: pd.DataFrame, anytime: pd.DataFrame, plots_dir: Path, slug: str,
                        title: str) -> None:
    """Validation accuracy against teacher queries (log axis) for the API-teacher rows, every pair in one figure,
    so that black-box methods compare at equal queries."""
    serves_api = pd.Series([is_api_teacher(a, t) for a, t in zip(df["data_access"], df["teacher_access"])], index=df.index)
    api = df[(df["status"] == "ok") & (df["dataset"] == section.dataset) & serves_api]
    part = anytime[anytime["cell_id"].isin(set(api["cell_id"]))]
    if not len(part) or not (part["teacher_queries"] > 0).any():
        section.skipped.append("accuracy vs teacher queries of the API-teacher methods: no such row (teacher_access "
                               "outputs/labels with data_access none) has an anytime curve with teacher queries")
        return
    if part["pair"].nunique() > 1:
        part = part.assign(label=part["label"] + " (" + part["pair"].str.split(" → ").str[-1] + ")")
    plot = Plot(name=f"api_queries_{slug}", title="API teacher: validation accuracy vs teacher queries",
                caption="The methods an API-teacher user may run (teacher_access outputs or labels, data_access none), "
                        "every pair together: validation accuracy (not test) at the harness's compute checkpoints "
                        "against the images sent to the teacher, log scale; line: mean over seeds, band: min–max, "
                        "dotted: finished, its final value holds. Compare black-box methods at equal queries.")
    _save(_anytime_figure(part, "teacher_queries", f"{title}: API-teacher methods vs teacher queries",
                          method_colours(part["label"])), plots_dir, plot)
    section.plots.append(plot)
    section.blocks += [Block("heading", "API teacher: accuracy against teacher queries", anchor=f"api-{slug}",
                             nav="API teacher"), Block("figure", plot=plot)]


def _curves_blocks(section: Section, curves: pd.DataFrame, colours, plots_dir: Path, slug: str, title: str) -> None:
    """The training curves, one figure per teacher → student pair (a pair runs at most ~10 methods, so a figure needs
    no more colours than that; the whole grid in one figure would need one hue per method)."""
    if not len(curves):
        section.skipped.append("training curves: no cells/<cell_id>/curve.jsonl found")
        return
    for pair, part in curves.groupby("pair", sort=True):
        plot = Plot(name=f"curves_{slug}_{_slug(pair)}", title=f"Training curves: {pair}",
                    caption="The scalars each method logs (ctx.log), against its own iterations; one panel per scalar, "
                            "mean over seeds, band = min–max over seeds."
                            + (f" sample_std (one line per seed): the per-pixel std of a generated batch; below {COLLAPSE_STD:g} "
                               "(dotted) the generator has collapsed (X: the first such step of a cell)."
                               if (part["key"] == "sample_std").any() else ""))
        collapses = section.collapses[section.collapses["pair"] == pair] if len(section.collapses) else section.collapses
        fig, omitted = _curves_figure(part, f"{title}, {pair}", colours, collapses)
        _save(fig, plots_dir, plot)
        if omitted:
            plot.caption += f" Not shown (more than {MAX_CURVE_PANELS} scalars): {', '.join(omitted)}."
        section.plots.append(plot)
        section.blocks.append(Block("figure", plot=plot))


def _finish(section: Section) -> Section:
    if section.skipped:
        section.blocks.append(Block("note", "Not drawn: " + "; ".join(section.skipped) + "."))
    return section


def _anytime_blocks(section: Section, anytime: pd.DataFrame, colours, plots_dir: Path, slug: str, title: str,
                    report_budgets: dict[str, list[float]]) -> None:
    """Per pair: validation accuracy vs teacher queries and vs seconds, and the best method at each budget (the
    ladder of round budgets, plus the budgets the grid's ``report_budgets`` names for that axis)."""
    if not len(anytime):
        section.skipped.append("anytime curves and best method per compute budget: no cells/<cell_id>/anytime.jsonl")
        return
    section.blocks += [Block("heading", "Anytime: validation accuracy against compute", anchor=f"anytime-{slug}", nav="anytime"),
                       Block("note", BEST_AT_BUDGET_TEXT)]
    tables = []
    for pair, part in anytime.groupby("pair", sort=True):
        section.blocks.append(Block("heading", f"{pair}", anchor=f"anytime-{slug}-{_slug(pair)}"))
        for x, what in (("teacher_queries", "teacher queries"), ("seconds", "seconds")):
            if not (part[x] > 0).any():
                section.skipped.append(f"validation accuracy vs {what} for {pair}: no method of the pair "
                                       f"{'queried the teacher' if x == 'teacher_queries' else 'recorded seconds'}")
                continue
            plot = Plot(name=f"anytime_{'queries' if x == 'teacher_queries' else x}_{slug}_{_slug(pair)}",
                        title=f"Validation accuracy vs {what}: {pair}",
                        caption=f"Validation accuracy (not test) of the student at the harness's compute checkpoints "
                                f"against the {ANYTIME_AXES[x]}, log scale. Each seed is read step-wise (its last "
                                "checkpoint at or before x) on a common geometric grid; line: mean over seeds, band: "
                                "min–max, drawn where every seed has a checkpoint; dotted: the method had finished "
                                "and its final value holds."
                                + (" Methods that never query the teacher sit at their final value all along."
                                   if x == "teacher_queries" and (part.groupby("label")[x].max() <= 0).any() else "")
                                + (" Seconds are wall-clock time on a shared machine: compare within one run."
                                   if x == "seconds" else ""))
            _save(_anytime_figure(part, x, f"{title}, {pair}: validation accuracy vs {what}", colours), plots_dir, plot)
            section.plots.append(plot)
            section.blocks.append(Block("figure", plot=plot))
            table = best_at_budget(part, x, report_ladder(part[x], report_budgets.get(x, ())))
            table.insert(0, "pair", pair)
            table.insert(0, "dataset", section.dataset)
            tables.append(table)
            header, rows = best_at_budget_rows(table, x)
            section.blocks += [Block("text", f"Best method at each {what} budget (validation accuracy %, mean over seeds):"),
                               Block("table", header=header, rows=rows, left=tuple(range(1, len(header))))]
    section.best_at_budget = pd.concat(tables, ignore_index=True) if tables else None


def _environment(df: pd.DataFrame) -> list[tuple[str, str]]:
    def values(column, fmt=str):
        vs = sorted({fmt(v) for v in df[column] if not (isinstance(v, float) and math.isnan(v)) and v != ""})
        return ", ".join(vs) if vs else "– (not recorded)"

    started = [s for s in df["started"] if s]
    finished = [s for s in df["finished"] if s]
    dirty = df["git_dirty"].astype(str).str.lower()
    n_dirty, n_known = int(dirty.isin(["true", "1", "yes"]).sum()), int(dirty.isin(["true", "1", "yes", "false", "0", "no"]).sum())
    if not n_known:
        tree = "– (not recorded)"
    elif n_dirty:
        tree = (f"DIRTY for {n_dirty} of {n_known} cells: they ran from uncommitted changes, so the commit alone does "
                "not reproduce them")
    else:
        tree = f"clean (all {n_known} cells ran from the committed tree)"
    recorded = set(COLUMNS) - set(df.attrs.get("missing_columns", ()))
    resumed = int((df["resumed"].astype(str) != "").sum())
    items = [("device", values("device")), ("CPU", values("cpu")),
             ("latency threads", values("latency_threads", lambda v: str(int(v)))),
             ("torch", values("torch")), ("git commit", values("git_commit")), ("git tree", tree),
             ("grid", values("grid")), ("budget (fraction of the paper's)", values("budget", lambda v: f"{v:g}")),
             ("compute caps", values("compute_cap")),
             ("validation images held out", values("validation", lambda v: str(int(v)))),
             ("cells resumed after a stop", str(resumed) if "resumed" in recorded else "– (not recorded)"),
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
           "(percent, mean ± std over seeds; std needs two or more seeds): the headline. Validation accuracy (val acc, "
           "the anytime curves and the best-method-per-budget tables) is measured on a split held out from the "
           "training set, the one on which choices may be made; it is not the test result. Best-on-test, where a "
           "method tracks it, is the best test-set evaluation during training, the protocol some papers report: it "
           "peeks at the test set and is optimistic, so it is shown only in the tables and labelled. Latency: CPU, "
           "batch 1, median over repeated runs, timed once per student architecture, on the backend each section names "
           "(ONNX Runtime's CPU provider where it was timed, else eager PyTorch; bench report --latency-backend). MACs: multiply-accumulates for "
           "one image (papers often call these FLOPs). Real samples: images of the teacher's own training set the "
           "method read. Teacher queries: images passed through the teacher during distillation. Data access "
           "levels form a chain none < alt < few < full: a user with a level may run every method needing no more.")


# ---------------------------------------------------------------------------------------------- HTML
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2125;background:#fafbfc;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.6rem;margin:0 0 4px}h2{font-size:1.3rem;margin:36px 0 8px;padding-top:12px;border-top:2px solid #d8dde3}
h3{font-size:1.05rem;margin:26px 0 6px}
nav{background:#eef1f4;padding:8px 14px;border-radius:6px;font-size:.92rem;margin:12px 0}
nav a{margin-right:14px}
.muted{color:#5b6570;font-size:.9rem}.note{background:#fff6df;border-left:4px solid #e0a800;padding:6px 12px;margin:8px 0}
.warn{background:#fdecea;border-left:4px solid #b2182b;padding:6px 12px;margin:8px 0}.warn ul{margin:4px 0}
table{border-collapse:collapse;margin:8px 0 14px;font-size:.86rem;background:#fff}
th,td{border:1px solid #d8dde3;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#eef1f4;text-align:center;white-space:normal;max-width:150px}.scroll{overflow-x:auto}td.t{text-align:left}tr.best td{font-weight:600;background:#f0f7ee}
td.w{white-space:normal;min-width:160px;max-width:320px;text-align:left;font-size:.8rem}
figure{margin:14px 0 22px;background:#fff;border:1px solid #e3e7eb;border-radius:6px;padding:10px}
figure img{max-width:100%;height:auto;display:block}figcaption{font-size:.86rem;color:#4a535c;margin-top:6px}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;margin:0 4px -1px 0}
.samples{display:flex;flex-wrap:wrap;gap:14px}.samples figure{margin:0;max-width:360px}
.samples img{image-rendering:pixelated;width:100%}
pre{background:#f3f4f6;padding:8px;overflow-x:auto;font-size:.78rem}details{margin:2px 0}
.failed td{vertical-align:top}.failed td.err{white-space:normal;text-align:left;max-width:560px}
"""
# columns whose text wraps: long settings, and the decision table's one column per user (five users side by side
# must fit a page without a horizontal scroll)
WRAP_HEADERS = ("overrides (vs the method's preset)", "budget (stopped by)", *USER_ACCESS_TEXT.values())


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _html_table(header, rows, flags=None, colours=None, label_col=None, left=(0, 1, 2)) -> str:
    wrap = {j for j, h in enumerate(header) if h in WRAP_HEADERS}
    out = ['<div class="scroll"><table><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = ' class="best"' if flags and flags[i] else ""
        cells = []
        for j, cell in enumerate(row):
            text = _e(cell)
            if colours is not None and j == label_col and cell in colours:
                text = f'<span class="swatch" style="background:{_hex(colours[cell])}"></span>{text}'
            cells.append(f'<td class="w">{text}</td>' if j in wrap else f'<td class="t">{text}</td>' if j in left else f"<td>{text}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(c * 255)):02x}" for c in rgb[:3])


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _html_block(block: Block, out: Path, colours) -> str:
    anchor = f' id="{_e(block.anchor)}"' if block.anchor else ""
    if block.kind == "heading":
        return f"<h3{anchor}>{_e(block.text)}</h3>"
    if block.kind == "text":
        return f'<p class="muted">{_e(block.text)}</p>'
    if block.kind == "note":
        return f'<p class="note">{_e(block.text)}</p>'
    if block.kind == "list":
        return f'<div class="warn">{_e(block.text)}<ul>' + "".join(f"<li>{_e(i)}</li>" for i in block.items) + "</ul></div>"
    if block.kind == "table":
        return _html_table(block.header, block.rows, block.flags, colours, block.label_col, block.left)
    if block.kind == "figure":
        return _html_figure(block.plot)
    if block.kind == "samples":
        return ('<div class="samples">' + "".join(
            f"<figure>{_img((out / rel).read_bytes(), caption)}<figcaption>{_e(caption)}</figcaption></figure>"
            for caption, rel in block.items) + "</div>")
    raise ValueError(f"unknown report block kind {block.kind!r}")


def _html(results_dir, out, df, notes, sections, grid, colours) -> str:
    title = f"dfkd-bench report: {grid.get('name') or results_dir.resolve().name}"
    body = [f"<h1>{_e(title)}</h1>"]
    if grid.get("description"):
        body.append(f'<p class="muted">{_e(grid["description"])}</p>')
    body.append(f"<p>{_e(_overview(df, grid))} Results from <code>{_e(results_dir)}</code>.</p>")
    links = []
    for s in sections:
        links.append(f'<a href="#ds-{_slug(s.dataset)}">{_e(s.dataset)}</a>')
        links += [f'<a href="#{_e(b.anchor)}">{_e(b.nav)}</a>' for b in s.blocks if b.anchor and b.nav]
    links += ['<a href="#reading">how to read</a>', '<a href="#failed">failed cells</a>', '<a href="#environment">environment</a>']
    body.append("<nav>" + " ".join(links) + "</nav>")
    body += [f'<p class="note">{_e(n)}</p>' for n in notes]
    for s in sections:
        body.append(f'<section id="ds-{_slug(s.dataset)}"><h2>{_e(s.dataset)}</h2>')
        body += [_html_block(b, out, colours) for b in s.blocks]
        body.append("</section>")
    body.append(f'<section id="reading"><h2>How to read this report</h2><p class="muted">{_e(READING)}</p></section>')
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


def _md_block(block: Block) -> list[str]:
    if block.kind == "heading":
        return [f"### {block.text}", ""]
    if block.kind == "text":
        return [block.text, ""]
    if block.kind == "note":
        return [f"> {block.text}", ""]
    if block.kind == "list":
        return [f"**{block.text}**", ""] + [f"- {i}" for i in block.items] + [""]
    if block.kind == "table":
        return [_md_table(block.header, block.rows, block.flags), ""]
    if block.kind == "figure":
        p = block.plot
        return [f"![{p.title}](plots/{p.name}.png)", "", f"_{p.title}. {p.caption}_ ([SVG](plots/{p.name}.svg))", ""]
    if block.kind == "samples":
        return [f"![{caption}]({rel}) {caption}" for caption, rel in block.items] + [""]
    raise ValueError(f"unknown report block kind {block.kind!r}")


def _markdown(results_dir, out, df, notes, sections, grid, colours) -> str:
    name = grid.get("name") or results_dir.resolve().name
    out = [f"# dfkd-bench report: {name}", ""]
    if grid.get("description"):
        out += [f"_{grid['description']}_", ""]
    out += [_overview(df, grid), ""]
    out += [f"> {n}" for n in notes]
    out.append("")
    for s in sections:
        out += [f"## {s.dataset}", ""]
        for b in s.blocks:
            out += _md_block(b)
    out += ["## How to read this report", "", READING, ""]
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
