"""A grid's report (python -m keras_arat.experiments): per row the seeds' figures and
verdicts, mean and sample std over the converged seeds, the reference row's comparisons,
written as table.md, table.csv and the clean vs robust plot tradeoff.png."""

import csv
import math
import os

from keras_arat.grid_figures import ATTACK_NAMES, cell_figures, verdict


# ------------------------------------------------------------------ the summary

def mean_std(values):
    """Mean and sample standard deviation (ddof=1; None for fewer than two values)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def summarize(grid, rule):
    """Per row: each seed's figures and verdict, and mean/std over the converged seeds.

    A cell that crashed, or trained but missed the convergence rule (a
    grid_spec.ConvergenceRule), is listed with its reason and left out of the row's mean
    and std: a run that did not train is a failed run, not a data point. `complete` says
    whether every seed of the row converged.
    """
    robust = [a for a in grid.attacks if a != "clean"]
    columns = list(grid.attacks) + [f"clean+{a}" for a in robust]
    summary = []
    for row in grid.rows:
        cells, failed = _row_cells(grid, row, robust, rule)
        good = [c["figures"] for c in cells if c["converged"]]
        method = dict(grid.shared + row["overrides"]).get("method") or _base_method(
            grid.base_of(row))
        summary.append({"row": row["name"], "method": method,
                        "recipe": os.path.basename(grid.base_of(row)),
                        "overrides": ",".join(f"{k}={v}" for k, v in row["overrides"]),
                        "seeds": [c["seed"] for c in cells if c["converged"]],
                        "cells": cells, "failed": failed, "stats": _stats(good, columns),
                        "complete": len(good) == len(grid.seeds)})
    return columns, summary


def _row_cells(grid, row, robust, rule):
    """([{seed, figures, converged, reason}] of the row's evaluated cells,
    [(seed, why)] of its crashed and unconverged ones)."""
    cells, failed = [], []
    for seed in grid.seeds:
        entry = grid.state["cells"].get(grid.key(row, seed), {})
        if entry.get("status") == "failed":
            failed.append((seed, "crashed: " + (entry.get("error") or "?").splitlines()[0]))
            continue
        if entry.get("status") != "done":
            continue
        figures = cell_figures(grid, row, seed)
        if figures is None or figures["clean"] is None or figures["pgd20"] is None:
            continue
        for a in robust:
            if figures.get(a) is not None:
                figures[f"clean+{a}"] = figures["clean"] + figures[a]
        converged, why = verdict(figures, rule)
        cells.append({"seed": seed, "figures": figures, "converged": converged,
                      "reason": why})
        if not converged:
            failed.append((seed, why))
    return cells, failed


def _stats(good, columns):
    """{column: (mean, std), column + ":n": count} over the converged cells' figures."""
    stats = {}
    for c in columns:
        stats[c] = mean_std([v[c] for v in good if v.get(c) is not None])
        stats[c + ":n"] = sum(1 for v in good if v.get(c) is not None)
    return stats


def _base_method(path):
    method = "arat"  # the trainer's default
    with open(path) as f:
        for line in f:
            if line.strip().startswith("--method="):
                method = line.strip().split("=", 1)[1]
    return method


def _pct(mean, std):
    if mean is None:
        return "–"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def image_counts(summary):
    """Sorted numbers of test images over the grid's evaluated cells (one, normally)."""
    return sorted({c["figures"]["n_examples"] for s in summary for c in s["cells"]
                   if c["figures"].get("n_examples") is not None})


def _label(column):
    return " + ".join(ATTACK_NAMES.get(p, p) for p in column.split("+"))


# ------------------------------------------------------------------ comparisons

def comparisons(grid, summary, compare_to=None):
    """The reference row's (compare_to, default the first row) clean + robust sums
    against every other row's.

    A lead counts as clear when the difference of the means exceeds twice the larger of
    the two rows' seed standard deviations. Only rows whose every seed converged are
    compared; the others are named as not comparable.
    """
    by_name = {s["row"]: s for s in summary}
    ref_name = compare_to or grid.rows[0]["name"]
    if ref_name not in by_name:
        return ref_name, []
    ref = by_name[ref_name]
    sums = [c for c in (f"clean+{a}" for a in grid.attacks if a != "clean")]
    return ref_name, [_compare(ref, s, column) for s in summary if s is not ref
                      for column in sums]


def _compare(ref, s, column):
    """{row, column, verdict[, diff, threshold]} of row s against the reference row."""
    (ma, sa), (mb, sb) = ref["stats"][column], s["stats"][column]
    item = {"row": s["row"], "column": column}
    if not (ref["complete"] and s["complete"]) or ma is None or mb is None:
        item["verdict"] = "not comparable (" + (
            "a seed did not converge" if not (ref["complete"] and s["complete"])
            else "missing figures") + ")"
        return item
    diff = ma - mb
    threshold = 2 * max(sa or 0.0, sb or 0.0)
    item.update(diff=diff, threshold=threshold)
    if abs(diff) < 0.005:  # equal at the table's two decimals
        item["verdict"] = "level"
    elif diff > threshold:
        item["verdict"] = "clear lead"
    elif diff > 0:
        item["verdict"] = "ahead, within 2 seed-std"
    elif diff >= -threshold:
        item["verdict"] = "behind, within 2 seed-std"
    else:
        item["verdict"] = "clearly behind"
    return item


# ------------------------------------------------------------------ table.csv, table.md

def write_csv(grid, columns, summary, counts):
    """table.csv: per row its settings, seed counts and every column's mean, std and n."""
    csv_path = os.path.join(grid.workdir, "table.csv")
    header = ["row", "method", "recipe", "overrides", "seeds_converged", "seeds_total",
              "seeds_failed", "n_examples"]
    for c in columns:
        header += [f"{c}_mean", f"{c}_std", f"{c}_n"]
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for s in summary:
            line = [s["row"], s["method"], s["recipe"], s["overrides"], len(s["seeds"]),
                    len(grid.seeds), len(s["failed"]), ",".join(str(n) for n in counts)]
            for c in columns:
                mean, std = s["stats"][c]
                line += ["" if mean is None else repr(mean), "" if std is None else repr(std),
                         s["stats"][c + ":n"]]
            writer.writerow(line)
    os.replace(csv_path + ".tmp", csv_path)
    return csv_path


def write_table(grid, columns, summary, counts, rule, compare_to=None):
    """table.csv and table.md; returns their paths (md, csv)."""
    csv_path = write_csv(grid, columns, summary, counts)
    lines = (_intro_lines(grid, summary, counts, rule) + _row_lines(grid, columns, summary)
             + _seed_lines(grid, summary)
             + _comparison_lines(*comparisons(grid, summary, compare_to)))
    md_path = os.path.join(grid.workdir, "table.md")
    with open(md_path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(md_path + ".tmp", md_path)
    return md_path, csv_path


def _intro_lines(grid, summary, counts, rule):
    """The title and what every figure is: settings, images, the convergence rule."""
    eps = sorted({c["figures"]["eps"] for s in summary for c in s["cells"]
                  if c["figures"].get("eps") is not None})
    floors = [f"clean ≥ {rule.min_clean_acc:g}" if rule.min_clean_acc is not None else "",
              f"PGD-20 ≥ {rule.min_robust_acc:g}" if rule.min_robust_acc is not None else ""]
    floors = " and ".join(r for r in floors if r)
    n_text = ", ".join(str(n) for n in counts) or "?"
    return [
        "# Clean / robust trade-off",
        "",
        f"Shared overrides: `{','.join(f'{k}={v}' for k, v in grid.shared) or 'none'}`; seeds "
        f"{','.join(str(s) for s in grid.seeds)}; eps {', '.join(f'{e:.4g}' for e in eps) or '?'}"
        " (L-inf).",
        f"Every column is measured on the same first {n_text} test images, through the adv "
        "branch, at the checkpoint training ended with. Accuracies in %: mean ± sample std "
        "over the seeds that converged (no ± with one seed).",
        (f"Convergence rule: {floors}, in every seed. A cell that misses it did not train: it "
         "is listed as FAILED and left out of its row's mean." if floors else
         "No convergence rule was set (--min_clean_acc, --min_robust_acc)."),
        "",
    ]


def _row_lines(grid, columns, summary):
    """The per-row table: mean ± std of every column."""
    lines = ["| Row | Recipe | Method | Overrides | Seeds | " + " | ".join(
        _label(c) for c in columns) + " |",
        "|---|---|---|---|---|" + "---:|" * len(columns)]
    for s in summary:
        seeds = f"{len(s['seeds'])}/{len(grid.seeds)}"
        if s["failed"]:
            seeds += f" ({len(s['failed'])} FAILED)"
        name = s["row"] if s["complete"] else f"{s['row']} (FAILED)"
        cells = [_pct(*s["stats"][c]) for c in columns]
        lines.append(f"| {name} | {s['recipe']} | {s['method']} | {s['overrides'] or '–'} | "
                     f"{seeds} | " + " | ".join(cells) + " |")
    return lines


def _seed_lines(grid, summary):
    """The per-seed table: every cell's figures and verdict, crashed cells last per row."""
    lines = ["", "Per seed (%):", "",
             "| Row | Seed | " + " | ".join(ATTACK_NAMES.get(a, a) for a in grid.attacks)
             + " | Verdict |", "|---|---:|" + "---:|" * len(grid.attacks) + "---|"]
    for s in summary:
        reasons = dict(s["failed"])
        for c in s["cells"]:
            accs = [_pct(c["figures"].get(a), None) for a in grid.attacks]
            lines.append(f"| {s['row']} | {c['seed']} | " + " | ".join(accs) + " | "
                         + ("converged" if c["converged"] else f"FAILED: {c['reason']}") + " |")
        for seed, why in s["failed"]:
            if why.startswith("crashed"):
                lines.append(f"| {s['row']} | {seed} | " + " | ".join("–" for _ in grid.attacks)
                             + f" | FAILED: {reasons[seed]} |")
    return lines


def _comparison_lines(ref, comps):
    """The reference row's sums against the others' (nothing when there are none)."""
    if not comps:
        return []
    lines = ["", f"Clean + robust sums against `{ref}` (a clear lead: the difference of "
             "the means exceeds twice the larger seed std of the two rows):", ""]
    for c in comps:
        if "diff" in c:
            lines.append(f"- {ref} vs {c['row']}, {_label(c['column'])}: "
                         f"{100 * c['diff']:+.2f} points (2 seed-std: "
                         f"{100 * c['threshold']:.2f}): {c['verdict']}")
        else:
            lines.append(f"- {ref} vs {c['row']}, {_label(c['column'])}: {c['verdict']}")
    return lines


# ------------------------------------------------------------------ tradeoff.png

def write_plot(grid, columns, summary, counts):
    """tradeoff.png (clean vs robust, mean ± std per row, FAILED cells as grey crosses);
    its path, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None  # the tables are written; write_report says the plot is missing
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = [s for s in summary if s["stats"]["clean"][0] is not None]
    robust = _robust_axis(columns, plotted)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    _plot_rows(ax, plotted, robust)
    failed = _plot_failed_cells(ax, summary, robust)
    n_text = ", ".join(str(n) for n in counts) or "?"
    ax.set_xlabel(f"{ATTACK_NAMES[robust]} accuracy (%, first {n_text} test images)")
    ax.set_ylabel(f"Clean accuracy (%, the same {n_text} test images)")
    ax.margins(x=0.12)  # room for the labels of the rightmost points
    ax.set_title("Clean vs robust accuracy (mean ± std over converged seeds)")
    ax.grid(True, alpha=0.3)
    if plotted or failed:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no finished cells yet", ha="center", va="center",
                transform=ax.transAxes)
    fig.tight_layout()
    path = os.path.join(grid.workdir, "tradeoff.png")
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def _robust_axis(columns, plotted):
    """AutoAttack when every plotted row has it, else PGD-20."""
    if "autoattack" in columns and plotted and all(
            s["stats"]["autoattack"][0] is not None for s in plotted):
        return "autoattack"
    return "pgd20"


def _plot_rows(ax, plotted, robust):
    """One labelled marker per row at its mean, error bars = std."""
    placed = []
    for s in plotted:
        cm, cs = s["stats"]["clean"]
        rm, rs = s["stats"][robust]
        ax.errorbar(100 * rm, 100 * cm, xerr=100 * (rs or 0.0), yerr=100 * (cs or 0.0),
                    fmt="o", capsize=3, label=s["row"])
        # rows that land on (almost) the same point get their labels stacked downwards
        near = sum(1 for px, py in placed if abs(px - rm) < 0.03 and abs(py - cm) < 0.03)
        placed.append((rm, cm))
        tag = f"n={len(s['seeds'])}" + ("" if s["complete"] else
                                         f", {len(s['failed'])} FAILED")
        ax.annotate(f"{s['row']} ({tag})", (100 * rm, 100 * cm),
                    textcoords="offset points", xytext=(5, 5 - 11 * near), fontsize=8)


def _plot_failed_cells(ax, summary, robust):
    """A grey cross per cell that missed the convergence rule; returns those cells."""
    failed = [(s["row"], c) for s in summary for c in s["cells"] if not c["converged"]]
    for i, (name, c) in enumerate(failed):
        r = c["figures"].get(robust)
        if r is None:
            continue
        ax.plot(100 * r, 100 * c["figures"]["clean"], "x", color="grey",
                label="FAILED cells (not averaged)" if i == 0 else None)
        ax.annotate(f"{name} seed {c['seed']} FAILED", (100 * r, 100 * c["figures"]["clean"]),
                    textcoords="offset points", xytext=(5, -10), fontsize=7, color="grey")
    return failed


# ------------------------------------------------------------------ the report

def write_report(grid, rule, compare_to, log):
    """Summarize the grid's cells and write table.md, table.csv and tradeoff.png (logged);
    returns table.md's path."""
    columns, summary = summarize(grid, rule)
    counts = image_counts(summary)  # the test images behind every figure
    md_path, csv_path = write_table(grid, columns, summary, counts, rule, compare_to)
    png_path = write_plot(grid, columns, summary, counts)
    if png_path is None:
        log("warning: matplotlib is not installed (pip install -r requirements.txt): "
            "no tradeoff.png")
    log(f"wrote {md_path}, {csv_path}" + (f", {png_path}" if png_path else ""))
    return md_path
