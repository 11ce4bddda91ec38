"""The translation section of the report: tables, trade-off plots and the images side by side.

``render(results_dir, out)`` writes ``out/translation.md``, ``out/index.html``, ``out/summary.csv`` and
``out/plots/``: class preservation (both directions) against CPU latency (both generators, batch 1) and
against MACs (both generators, one image each), one point per (method, ratio) with mean and std over seeds,
and, per ratio, the test images side by side: source, uncompressed, co-evolved, L1 (seed of the first row).
"""
from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench.translation.task import TASK  # noqa: E402

METRICS = ["class_pres_ab", "class_pres_ba", "frechet_ab", "frechet_ba", "cycle_l1_a", "cycle_l1_b"]
COSTS = ["params", "macs", "latency_ms", "search_seconds", "finetune_seconds", "generator_queries",
         "discriminator_queries"]
KEYS = ["domain_a", "domain_b", "generator", "label", "ratio"]


def is_translation(results_dir: Path) -> bool:
    """Whether ``results_dir/runs.csv`` holds translation rows (its header has the task column)."""
    path = Path(results_dir) / "runs.csv"
    if not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        header = f.readline().strip().split(",")
    return "task" in header and "class_pres_ab" in header


def load(results_dir: Path) -> pd.DataFrame:
    df = pd.read_csv(Path(results_dir) / "runs.csv", dtype=str, keep_default_na=False)
    df = df[df["task"] == TASK].copy()
    for column in METRICS + COSTS + ["seed", "teacher_latency_ms", "teacher_macs", "teacher_params",
                                     "classifier_acc_a", "classifier_acc_b"]:
        df[column] = pd.to_numeric(df[column], errors="coerce")
    df["ratio"] = df["ratio"].replace("", "1.0").astype(float)  # the uncompressed generators keep every filter
    return df


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds (``<metric>`` and ``<metric>_std``) and the seed count ``n`` per point."""
    ok = df[df["status"] == "ok"]
    rows = []
    for key, group in ok.groupby(KEYS, sort=True):
        row = dict(zip(KEYS, key))
        row["n"] = len(group)
        row["seeds"] = ",".join(str(int(s)) for s in sorted(group["seed"]))
        for column in METRICS + COSTS:
            row[column] = group[column].mean()
            row[f"{column}_std"] = group[column].std(ddof=1) if len(group) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(value: float, std: float, scale: float = 1.0, digits: int = 1) -> str:
    if pd.isna(value):
        return "–"
    return f"{value * scale:.{digits}f} ± {std * scale:.{digits}f}"


def table(agg: pd.DataFrame) -> str:
    """The Markdown table of the aggregated points."""
    head = ("| domains | generator | method | kept | n | class pres. A→B % | class pres. B→A % | Fréchet A→B | "
            "Fréchet B→A | cycle L1 A | cycle L1 B | params | MACs | latency ms (both) | search s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, r in agg.sort_values(["domain_a", "generator", "ratio", "label"], ascending=[True, True, False, True]).iterrows():
        lines.append(
            f"| {r.domain_a}↔{r.domain_b} | {r.generator} | {r.label} | {r.ratio:g} | {r.n} | "
            f"{_cell(r.class_pres_ab, r.class_pres_ab_std, 100)} | {_cell(r.class_pres_ba, r.class_pres_ba_std, 100)} | "
            f"{_cell(r.frechet_ab, r.frechet_ab_std)} | {_cell(r.frechet_ba, r.frechet_ba_std)} | "
            f"{_cell(r.cycle_l1_a, r.cycle_l1_a_std, 1, 3)} | {_cell(r.cycle_l1_b, r.cycle_l1_b_std, 1, 3)} | "
            f"{r.params:,.0f} | {r.macs:,.0f} | {_cell(r.latency_ms, r.latency_ms_std, 1, 3)} | "
            f"{_cell(r.search_seconds, r.search_seconds_std)} |")
    return "\n".join(lines)


def cost_table(agg: pd.DataFrame, df: pd.DataFrame) -> str:
    """The compute behind every point: search, queries, fine-tuning (per cell, mean over seeds) and the teacher."""
    lines = ["| method | kept | n | search s | generator queries | discriminator queries | fine-tune s |", "|---|---|---|---|---|---|---|"]
    for _, r in agg.sort_values(["ratio", "label"], ascending=[False, True]).iterrows():
        lines.append(f"| {r.label} | {r.ratio:g} | {r.n} | {_cell(r.search_seconds, r.search_seconds_std)} | "
                     f"{r.generator_queries:,.0f} | {r.discriminator_queries:,.0f} | "
                     f"{_cell(r.finetune_seconds, r.finetune_seconds_std)} |")
    ok = df[df["status"] == "ok"]
    teacher = ""
    if len(ok):
        steps = pd.to_numeric(ok["teacher_steps"], errors="coerce").iloc[0]
        seconds = pd.to_numeric(ok["teacher_seconds"], errors="coerce").iloc[0]
        teacher = f"CycleGAN teacher: {steps:,.0f} steps in {seconds:,.0f} s (trained once, cached). "
    return "\n".join(lines) + f"\n\n{teacher}Seconds are wall-clock on this machine's CPU ({ok['cpu'].iloc[0] if len(ok) else '?'}), " \
        f"{ok['threads'].iloc[0] if len(ok) else '?'} torch thread(s)."


def tradeoff_plot(agg: pd.DataFrame, cost: str, xlabel: str, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric, title in zip(axes, ("class_pres_ab", "class_pres_ba"), ("A→B", "B→A")):
        for label, group in agg.groupby("label"):
            group = group.sort_values(cost)
            ax.errorbar(group[cost], 100 * group[metric], yerr=100 * group[f"{metric}_std"], marker="o", capsize=3,
                        label=label)
            for _, r in group.iterrows():
                ax.annotate(f"{r.ratio:g}", (r[cost], 100 * r[metric]), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_title(f"class preservation {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("class preservation % (target-domain LeNet-5)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def images_plot(df: pd.DataFrame, results_dir: Path, ratio: float, path: Path) -> bool:
    """Rows: source A, uncompressed, co-evolved, L1 (A→B), then the same for B→A; False when a row is missing."""
    ok = df[df["status"] == "ok"].sort_values("seed")

    def samples(method: str, r: float | None) -> dict | None:
        rows = ok[(ok["method"] == method) & ((ok["ratio"] == r) if r is not None else True)]
        if rows.empty:
            return None
        file = Path(results_dir) / "cells" / rows.iloc[0]["cell_id"] / "samples.pt"
        return torch.load(file, weights_only=True) if file.is_file() else None

    full, coevo, l1 = samples("gan_uncompressed", None), samples("gan_coevolution", ratio), samples("gan_l1", ratio)
    if full is None or coevo is None or l1 is None:
        return False
    rows = [("source A", full["src_a"]), ("uncompressed A→B", full["fake_b"]), (f"co-evolved {ratio:g} A→B", coevo["fake_b"]),
            (f"L1 {ratio:g} A→B", l1["fake_b"]), ("source B", full["src_b"]), ("uncompressed B→A", full["fake_a"]),
            (f"co-evolved {ratio:g} B→A", coevo["fake_a"]), (f"L1 {ratio:g} B→A", l1["fake_a"])]
    n = rows[0][1].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9 + 1.6, len(rows) * 0.95))
    for i, (name, images) in enumerate(rows):
        for j in range(n):
            ax = axes[i, j]
            ax.imshow(images[j, 0].numpy(), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(results_dir: Path, out: Path | None = None) -> Path:
    results_dir = Path(results_dir)
    out = Path(out) if out is not None else results_dir / "report"
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    df = load(results_dir)
    agg = aggregate(df)
    agg.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    failed = df[df["status"] != "ok"]
    import json

    grid_file = results_dir / "grid.json"
    grid = json.loads(grid_file.read_text()) if grid_file.is_file() else {}
    parts = ["# Translation report", "",
             f"Grid `{grid.get('name', '?')}` (reproduce: `bench run --grid <its YAML> --out {results_dir}`). "
             f"{grid.get('description', '')}", "",
             f"Results: `{results_dir / 'runs.csv'}` ({int((df['status'] == 'ok').sum())} ok rows, {len(failed)} failed). "
             "Mean ± std over seeds; class preservation and Fréchet distance by the target domain's LeNet-5; "
             "latency: both generators at batch 1, eager PyTorch on the CPU; MACs and params: both generators.", ""]
    if len(df) and df["classifier_acc_a"].notna().any():
        first = df[df["status"] == "ok"].iloc[0]
        parts += [f"Classifiers' test accuracy: {first.domain_a} {100 * first.classifier_acc_a:.2f}%, "
                  f"{first.domain_b} {100 * first.classifier_acc_b:.2f}%.", ""]
    if len(agg):
        parts += [table(agg), "", cost_table(agg, df), ""]
        for cost, xlabel, name in (("latency_ms", "CPU latency, both generators, batch 1 (ms)", "quality_vs_latency"),
                                   ("macs", "MACs, both generators, one image", "quality_vs_macs")):
            if agg[cost].notna().any():
                tradeoff_plot(agg, cost, xlabel, plots / f"{name}.png")
                parts += [f"![{name}](plots/{name}.png)", ""]
        for ratio in sorted(set(agg["ratio"]) - {1.0}, reverse=True):
            name = f"images_{ratio:g}.png"
            if images_plot(df, results_dir, ratio, plots / name):
                parts += [f"Images at ratio {ratio:g} (source, uncompressed, co-evolved, L1):", "",
                          f"![images {ratio:g}](plots/{name})", ""]
    for _, r in failed.iterrows():
        parts.append(f"- failed: {r.cell_id} {r.label} ratio={r.ratio} seed={r.seed}: {r.error}")
    text = "\n".join(parts) + "\n"
    (out / "translation.md").write_text(text)
    (out / "index.html").write_text(to_html(text))
    return out


def to_html(markdown: str) -> str:
    """The report's Markdown as a small HTML page: paragraphs, images and the tables as tables."""
    body, rows = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                rows.append([html.escape(c.strip()) for c in line.strip("|").split("|")])
            continue
        if rows:
            head, *rest = rows
            body.append("<table border='1' cellspacing='0' cellpadding='3'><tr>" + "".join(f"<th>{c}</th>" for c in head)
                        + "</tr>" + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rest)
                        + "</table>")
            rows = []
        if line.startswith("!["):
            body.append(f"<p><img src='{html.escape(line[line.index('(') + 1:-1])}'></p>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    return f"<html><meta charset='utf-8'><body>{''.join(body)}</body></html>"
