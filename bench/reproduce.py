"""``bench reproduce``: each paper table of :file:`bench/papers.yaml` with the paper's number beside ours.

Ours come from the ``ok`` rows of the results folders given (default: every ``results/*/runs.csv``)
that match a table row's dataset, teacher, student and method (and, where the row names one, the grid
entry's label): final accuracy as mean +- std over the seeds (the headline), and best-on-test where the
paper's protocol was the best epoch and the method records it. Each row shows the gap to the paper, the
fraction of the paper's budget ours used, and, where ours falls short by more than
:data:`GAP_TO_EXPLAIN` points, the causes the results show: a teacher weaker than the paper's by more
than :data:`TEACHER_TOLERANCE`, a fraction of the budget, a deviation from the paper's protocol that the
table records. A table row without any matching result says "not run" and what is missing: the method
(not registered here), the dataset's files (and where to put them), or the command that runs the cell
(first the ``reproduce`` grid's, ``bench/grids/reproduce.yaml``).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from bench.config import ConfigError
from bench.data import DatasetMissingError, load_dataset
from bench.method import list_methods
from bench.store import ResultsStore

ROW_KEYS = ("label", "paper", "dataset", "teacher", "student", "method", "note", "deviation", "match_label")
TEACHER_TOLERANCE = 0.3  # points: a teacher this much weaker than the paper's explains a gap (issue 22)
GAP_TO_EXPLAIN = 1.0  # points: a shortfall larger than this gets a word on why


@dataclass
class PaperRow:
    label: str
    paper: float
    dataset: str
    teacher: str
    student: str
    method: str
    note: str = ""
    deviation: str = ""  # how our protocol differs from the paper's for this row (shown when ours falls short)
    match_label: str = ""  # only results of this grid entry label count (e.g. one of a method's several settings)


@dataclass
class PaperTable:
    id: str
    title: str
    source: str
    protocol: str
    note: str
    rows: list[PaperRow] = field(default_factory=list)


def papers_file() -> Path:
    return Path(str(resources.files("bench") / "papers.yaml"))


def load_papers(path: Path | None = None) -> list[PaperTable]:
    """The tables of ``papers.yaml``, validated (every row names its dataset, pair, method and number)."""
    path = path or papers_file()
    raw = yaml.safe_load(path.read_text())
    tables = []
    for i, t in enumerate(raw.get("tables") or []):
        where = f"{path}: tables[{i}]"
        defaults = t.get("defaults") or {}
        rows = []
        for j, r in enumerate(t.get("rows") or []):
            values = {**defaults, **r}
            unknown = sorted(set(values) - set(ROW_KEYS))
            missing = [k for k in ROW_KEYS[:6] if k not in values]
            if unknown or missing:
                raise ConfigError(f"{where}.rows[{j}]: unknown keys {unknown} / missing keys {missing}; valid: {', '.join(ROW_KEYS)}")
            rows.append(PaperRow(**{k: values[k] for k in ROW_KEYS if k in values}))
        if t.get("protocol") not in ("best", "final"):
            raise ConfigError(f"{where}: protocol must be best or final, got {t.get('protocol')!r}")
        tables.append(PaperTable(t["id"], t["title"], t["source"], t["protocol"], t.get("note", ""), rows))
    return tables


def default_results() -> list[Path]:
    return sorted(p.parent for p in Path("results").glob("*/runs.csv"))


def load_rows(folders: list[Path]) -> list[dict[str, str]]:
    rows = []
    for folder in folders:
        if not (Path(folder) / "runs.csv").is_file():
            raise ConfigError(f"--results {folder}: no runs.csv there (give a folder that `bench run --out` wrote)")
        rows += [r for r in ResultsStore(Path(folder)).rows.values() if r["status"] == "ok"]
    return rows


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _budget(row: dict[str, str]) -> tuple[float, str]:
    return float(row.get("budget") or 1), row.get("compute_cap") or ""


class Reproduction:
    """Looks up our results and what is missing for each paper row."""

    def __init__(self, rows: list[dict[str, str]], data_root: Path | None = None):
        self.rows = rows
        self.data_root = data_root
        self.methods = set(list_methods())
        self._missing_data: dict[str, str] = {}
        self._grid_cells: dict[str, set[tuple[str, str, str, str, str]]] = {}

    def missing_data(self, dataset: str) -> str:
        if dataset not in self._missing_data:
            try:
                load_dataset(dataset, self.data_root, "cpu", download=False)
                self._missing_data[dataset] = ""
            except DatasetMissingError as exc:
                self._missing_data[dataset] = str(exc)
        return self._missing_data[dataset]

    def grid_cells(self, name: str) -> set[tuple[str, str, str, str, str]]:
        """(dataset, teacher, student, method, label) of every cell of the named grid (empty if it does not load)."""
        if name not in self._grid_cells:
            from bench.grid import expand, load_grid

            try:
                self._grid_cells[name] = {(c.dataset, c.teacher, c.student, c.method, c.label)
                                          for c in expand(load_grid(name))}
            except ConfigError:
                self._grid_cells[name] = set()
        return self._grid_cells[name]

    def how_to_run(self, row: PaperRow) -> str:
        if row.method != "teacher" and row.method not in self.methods:
            return f"method {row.method!r} is not registered in this dfkd-bench"
        if self.missing_data(row.dataset):
            return f"{row.dataset} files missing (see below the table)"
        method = "kd" if row.method == "teacher" else row.method
        for grid in ("reproduce", "full"):
            labels = sorted(label for (d, t, s, m, label) in self.grid_cells(grid)
                            if (d, t, s, m) == (row.dataset, row.teacher, row.student, method)
                            and (not row.match_label or label == row.match_label))
            if labels:
                return f"run: bench run --grid {grid} --only {','.join(labels)} (its {row.dataset} {row.teacher} -> {row.student} cells)"
        return (f"run: bench distill --dataset {row.dataset} --teacher {row.teacher} --student {row.student} "
                f"--method {method} --seed 0 (then seeds 1, 2)")

    def teacher_accs(self, dataset: str, teacher: str) -> list[float]:
        """Our distinct teacher accuracies for this dataset and architecture (one per trained teacher)."""
        return sorted({float(r["teacher_acc"]) for r in self.rows
                       if (r["dataset"], r["teacher"]) == (dataset, teacher) and r.get("teacher_acc")})

    def matching(self, row: PaperRow) -> list[dict[str, str]]:
        return [r for r in self.rows
                if (r["dataset"], r["teacher"], r["student"], r["method"]) == (row.dataset, row.teacher, row.student, row.method)
                and (not row.match_label or r.get("label") == row.match_label)]

    def why_short(self, table: PaperTable, row: PaperRow, fraction: float) -> str:
        """The causes the results show for a shortfall: weaker teacher, budget fraction, the row's deviation."""
        causes = []
        paper_teacher = next((r.paper for r in table.rows if r.method == "teacher"
                              and (r.dataset, r.teacher) == (row.dataset, row.teacher)), None)
        ours_teacher = self.teacher_accs(row.dataset, row.teacher)
        if paper_teacher is not None and ours_teacher and max(ours_teacher) < paper_teacher - TEACHER_TOLERANCE:
            causes.append(f"teacher weaker ({max(ours_teacher):.2f} vs {paper_teacher:.2f})")
        if fraction < 1.0:
            causes.append(f"{fraction:.0%} of the paper's budget")
        if row.deviation:
            causes.append(f"deviation: {row.deviation}")
        return "; ".join(causes) or "cause not known"

    def ours(self, table: PaperTable, row: PaperRow) -> dict[str, Any]:
        empty = {"final": "not run", "best": "", "gap": "", "seeds": "", "budget": "", "why": "", "missing": self.how_to_run(row)}
        if row.method == "teacher":
            accs = self.teacher_accs(row.dataset, row.teacher)
            if not accs:
                return empty
            return {**empty, "final": _mean_std(accs), "gap": f"{max(accs) - row.paper:+.2f}",
                    "seeds": f"{len(accs)} teacher(s)", "missing": ""}
        like = self.matching(row)
        if not like:
            return empty
        groups: dict[tuple[float, str, str], list[dict[str, str]]] = {}
        for r in like:
            groups.setdefault((*_budget(r), r.get("label") or r["method"]), []).append(r)
        # the paper's full budget (the method's own entry first), else the largest fraction run
        key = max(groups, key=lambda k: (k[:2] == (1.0, ""), k[0], -len(k[1]), k[2] == row.method))
        chosen = groups[key]
        finals = [float(r["student_acc"]) for r in chosen]
        bests = [float(r["student_acc_best"]) for r in chosen if r.get("student_acc_best")]
        fraction = statistics.mean(budget_used(r) for r in chosen)
        protocol_best = table.protocol == "best" and len(bests) == len(chosen)
        compared = statistics.mean(bests if protocol_best else finals)
        gap = compared - row.paper
        seeds = sorted({int(r["seed"]) for r in chosen})
        budget = f"{fraction:.0%}" + (f" ({key[1]})" if key[1] else "") + (f", {key[2]}" if key[2] != row.method else "")
        return {"final": _mean_std(finals), "best": _mean_std(bests) if table.protocol == "best" and bests else "",
                "gap": f"{gap:+.2f}" + (" (final)" if table.protocol == "best" and not protocol_best else ""),
                "seeds": f"{len(chosen)} ({','.join(map(str, seeds))})", "budget": budget,
                "why": self.why_short(table, row, fraction) if gap < -GAP_TO_EXPLAIN else "", "missing": ""}


def budget_used(row: dict[str, str]) -> float:
    """The fraction of the paper's budget a cell used: its budget fraction, times the share of its planned
    steps it ran when a compute cap stopped it early."""
    fraction = float(row.get("budget") or 1)
    if row.get("stopped_by") and row.get("iterations") and row.get("student_steps"):
        fraction *= min(1.0, float(row["student_steps"]) / max(1.0, float(row["iterations"])))
    return fraction


def render(tables: list[PaperTable], rows: list[dict[str, str]], folders: list[Path], data_root: Path | None = None) -> str:
    """The reproduction tables as Markdown text."""
    rep = Reproduction(rows, data_root)
    out = ["# Paper numbers beside ours", "",
           f"ours: {len(rows)} ok rows from {', '.join(str(f) for f in folders) or '(no results folder)'}; "
           "final = accuracy at the end of training, mean ± std over seeds (the harness's headline); "
           "best = best test-set epoch, shown where that was the paper's protocol; gap = ours - paper, on the "
           "paper's protocol where ours records it; budget = the fraction of the paper's budget ours used; "
           f"why = the causes the results show where ours is more than {GAP_TO_EXPLAIN:g} point short", ""]
    for table in tables:
        best_col = table.protocol == "best"
        out += [f"## {table.title}", "", f"source: {table.source}. paper protocol: "
                f"{'best test-set epoch' if best_col else 'final accuracy'}" + (f". {table.note}" if table.note else ""), ""]
        header = ["setting", "method", "paper", "ours final", *(["ours best"] if best_col else []), "gap", "seeds",
                  "budget used", "why / missing / note"]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        missing_data = []
        for row in table.rows:
            ours = rep.ours(table, row)
            if ours["missing"] and row.dataset not in missing_data and rep.missing_data(row.dataset):
                missing_data.append(row.dataset)
            note = "; ".join(x for x in (ours["why"], ours["missing"], row.note) if x)
            cells = [row.label, row.method, f"{row.paper:.2f}", ours["final"], *([ours["best"] or "-"] if best_col else []),
                     ours["gap"] or "-", ours["seeds"] or "-", ours["budget"] or "-", note.replace("|", "/")]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        out += [f"{rep.missing_data(d)}" for d in missing_data] + ([""] if missing_data else [])
    return "\n".join(out)
