"""Validation accuracy of each method at several compute levels, read from the cells' anytime curves.

Under a seconds cap a method keeps its nominal schedule and is stopped where the time runs out, so the
student at 15 s of a 90 s cell is the student a 15 s cell would end with. For each cell this takes the
last anytime point at or below each level (seconds of method time, or teacher queries with
``--unit teacher_queries``), then averages over seeds per method:

    bench run --grid examples/studies/datafree_fmnist.yaml
    python3 examples/studies/datafree_levels.py results/datafree_fmnist --levels 15,45,90

The final test accuracy (the headline) is printed beside it, read from runs.csv, for the last level only;
then each method's rank at each level and Kendall's tau between the first level's ranking and each later one.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def level_accuracy(curve: list[dict], unit: str, level: float) -> float | None:
    """Validation accuracy of the last anytime point with ``unit`` <= ``level`` (None before the first)."""
    points = [p for p in curve if p[unit] <= level]
    return points[-1]["val_acc"] if points else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--levels", default="15,45,90")
    parser.add_argument("--unit", default="seconds", choices=["seconds", "teacher_queries", "student_steps"])
    args = parser.parse_args()
    levels = [float(v) for v in args.levels.split(",")]
    runs = pd.read_csv(args.results / "runs.csv")
    runs = runs[runs["status"] == "ok"]
    rows = []
    for _, run in runs.iterrows():
        path = args.results / "cells" / run["cell_id"] / "anytime.jsonl"
        curve = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        row = {"method": run["label"], "seed": run["seed"], "test_final": run["student_acc"],
               "val_final": run["student_acc_val"], "queries": run["teacher_queries"],
               "steps": run["student_steps"], "seconds": run["distill_seconds"]}
        for level in levels:
            row[f"val@{level:g}"] = level_accuracy(curve, args.unit, level)
        rows.append(row)
    table = pd.DataFrame(rows)
    stats = table.drop(columns="seed").groupby("method").agg(["mean", "std"]).round(1)
    stats.columns = [f"{a} {b}" for a, b in stats.columns]
    stats.insert(0, "seeds", table.groupby("method").size())
    for level in levels:  # rank by mean validation accuracy at each level (1 = best)
        stats[f"rank@{level:g}"] = stats[f"val@{level:g} mean"].rank(ascending=False, method="min").astype("Int64")
    print(stats.sort_values(f"val@{levels[-1]:g} mean", ascending=False).to_string())
    first = stats[f"val@{levels[0]:g} mean"]
    for level in levels[1:]:  # does the order at the first level (where the methods were tuned) hold later?
        tau = first.corr(stats[f"val@{level:g} mean"], method="kendall")
        print(f"Kendall tau between the rankings at {levels[0]:g} and {level:g} {args.unit}: {tau:.2f}")


if __name__ == "__main__":
    main()
