"""Each method's final accuracy on every track it ran (paper, tuned, oracle: docs/tuning.md), and its rank per track.

    bench run --grid examples/studies/tracks_fmnist.yaml --out results/tracks_fmnist
    python3 examples/studies/tracks_table.py results/tracks_fmnist

One row per method, mean ± std over seeds of the final validation and test accuracy (test is the headline),
the teacher queries and method seconds per cell, for each track. The rank columns order the methods by mean
final test accuracy within a track (1 = best); the oracle (tuned on the scored task) is shown, never ranked
against the others' paper or tuned numbers.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def track_table(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` (runs.csv rows) -> one row per (method, track) with mean/std accuracies, queries and seconds."""
    runs = runs[runs["status"] == "ok"].copy()
    runs["track"] = runs["tuning"].fillna("default").astype(str).str.split(":").str[0]
    grouped = runs.groupby(["method", "track"])
    table = pd.DataFrame({
        "seeds": grouped.size(),
        "test": grouped["student_acc"].mean(), "test_std": grouped["student_acc"].std(),
        "val": grouped["student_acc_val"].mean(), "val_std": grouped["student_acc_val"].std(),
        "queries": grouped["teacher_queries"].mean(), "seconds": grouped["distill_seconds"].mean(),
    }).reset_index()
    table["rank"] = table.groupby("track")["test"].rank(ascending=False, method="min").astype(int)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    table = track_table(pd.read_csv(args.results / "runs.csv"))
    cell = table.assign(text=lambda t: t.apply(
        lambda r: f"{r.test:.1f} ± {r.test_std:.1f} (val {r.val:.1f}, #{r['rank']})", axis=1))
    wide = cell.pivot(index="method", columns="track", values="text").fillna("-")
    lead = "tuned" if (table["track"] == "tuned").any() else "paper"  # rows in the order of the tuned track
    order = table[table["track"] == lead].set_index("method")["test"].reindex(wide.index)
    print(f"final test accuracy, mean ± std over seeds (final validation, rank within the track), by {lead}:")
    print(wide.loc[order.sort_values(ascending=False).index].to_string())
    cost = table.pivot(index="method", columns="track", values=["queries", "seconds"]).round(0)
    print("\nteacher queries and method seconds per cell:")
    print(cost.to_string())


if __name__ == "__main__":
    main()
