"""``bench reproduce``: each paper table of :file:`bench/papers.yaml` with the paper's number beside ours.

Ours come from the ``ok`` rows of the results folders given (default: every ``results/*/runs.csv``)
that match a table row's dataset, teacher, student and method: final accuracy as mean +- std over the
seeds (the headline), and best-on-test where the paper's protocol was the best epoch and the method
records it. Rows at another budget than the paper's full one say at which. A table row without any
matching result says "not run" and what is missing: the method (not registered here), the dataset's
files (and where to put them), or the command that runs the cell.
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

ROW_KEYS = ("label", "paper", "dataset", "teacher", "student", "method", "note")


@dataclass
class PaperRow:
    label: str
    paper: float
    dataset: str
    teacher: str
    student: str
    method: str
    note: str = ""


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
        self._grid_cells: set[tuple[str, str, str, str]] | None = None

    def missing_data(self, dataset: str) -> str:
        if dataset not in self._missing_data:
            try:
                load_dataset(dataset, self.data_root, "cpu", download=False)
                self._missing_data[dataset] = ""
            except DatasetMissingError as exc:
                self._missing_data[dataset] = str(exc)
        return self._missing_data[dataset]

    def full_grid_cells(self) -> set[tuple[str, str, str, str]]:
        if self._grid_cells is None:
            from bench.grid import expand, load_grid

            try:
                self._grid_cells = {(c.dataset, c.teacher, c.student, c.method) for c in expand(load_grid("full"))}
            except ConfigError:
                self._grid_cells = set()
        return self._grid_cells

    def how_to_run(self, row: PaperRow) -> str:
        if row.method != "teacher" and row.method not in self.methods:
            return f"method {row.method!r} is not registered in this dfkd-bench"
        if self.missing_data(row.dataset):
            return f"{row.dataset} files missing (see below the table)"
        method = "kd" if row.method == "teacher" else row.method
        if (row.dataset, row.teacher, row.student, method) in self.full_grid_cells():
            return f"run: bench run --grid full --only {method} (its {row.dataset} {row.teacher} -> {row.student} cells)"
        return (f"run: bench distill --dataset {row.dataset} --teacher {row.teacher} --student {row.student} "
                f"--method {method} --seed 0 (then seeds 1, 2)")

    def ours(self, table: PaperTable, row: PaperRow) -> dict[str, Any]:
        like = [r for r in self.rows if (r["dataset"], r["teacher"], r["student"]) == (row.dataset, row.teacher, row.student)]
        if row.method == "teacher":
            accs = sorted({float(r["teacher_acc"]) for r in like if r.get("teacher_acc")}
                          | {float(r["teacher_acc"]) for r in self.rows
                             if (r["dataset"], r["teacher"]) == (row.dataset, row.teacher) and r.get("teacher_acc")})
            if not accs:
                return {"final": "not run", "best": "", "seeds": "", "budget": "", "missing": self.how_to_run(row)}
            return {"final": _mean_std(accs), "best": "", "seeds": f"{len(accs)} teacher(s)", "budget": "", "missing": ""}
        like = [r for r in like if r["method"] == row.method]
        if not like:
            return {"final": "not run", "best": "", "seeds": "", "budget": "", "missing": self.how_to_run(row)}
        groups: dict[tuple[float, str], list[dict[str, str]]] = {}
        for r in like:
            groups.setdefault(_budget(r), []).append(r)
        # the paper's full budget when we have it, else the largest fraction run
        key = (1.0, "") if (1.0, "") in groups else max(groups, key=lambda k: (k[0], -len(k[1])))
        chosen = groups[key]
        finals = [float(r["student_acc"]) for r in chosen]
        bests = [float(r["student_acc_best"]) for r in chosen if r.get("student_acc_best")]
        seeds = sorted({int(r["seed"]) for r in chosen})
        budget = "paper's" if key == (1.0, "") else ", ".join(x for x in (f"{key[0]:g} of the paper's", key[1]) if x)
        return {"final": _mean_std(finals), "best": _mean_std(bests) if table.protocol == "best" and bests else "",
                "seeds": f"{len(chosen)} ({','.join(map(str, seeds))})", "budget": budget, "missing": ""}


def render(tables: list[PaperTable], rows: list[dict[str, str]], folders: list[Path], data_root: Path | None = None) -> str:
    """The reproduction tables as Markdown text."""
    rep = Reproduction(rows, data_root)
    out = ["# Paper numbers beside ours", "",
           f"ours: {len(rows)} ok rows from {', '.join(str(f) for f in folders) or '(no results folder)'}; "
           "final = accuracy at the end of training, mean ± std over seeds (the harness's headline); "
           "best = best test-set epoch, shown where that was the paper's protocol", ""]
    for table in tables:
        best_col = table.protocol == "best"
        out += [f"## {table.title}", "", f"source: {table.source}. paper protocol: "
                f"{'best test-set epoch' if best_col else 'final accuracy'}" + (f". {table.note}" if table.note else ""), ""]
        header = ["setting", "method", "paper", "ours final", *(["ours best"] if best_col else []), "seeds", "budget", "missing / note"]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        missing_data = []
        for row in table.rows:
            ours = rep.ours(table, row)
            if ours["missing"] and row.dataset not in missing_data and rep.missing_data(row.dataset):
                missing_data.append(row.dataset)
            note = "; ".join(x for x in (ours["missing"], row.note) if x)
            cells = [row.label, row.method, f"{row.paper:.2f}", ours["final"], *([ours["best"] or "-"] if best_col else []),
                     ours["seeds"] or "-", ours["budget"] or "-", note.replace("|", "/")]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        out += [f"{rep.missing_data(d)}" for d in missing_data] + ([""] if missing_data else [])
    return "\n".join(out)
