"""A grid cell's figures (its accuracies under each attack, all on the same test images)
and its verdict under the convergence rule; read by the runner and the report alike."""

import os

from keras_arat import records
from keras_arat.grid_spec import BUILTIN_ATTACKS

ATTACK_NAMES = {"clean": "Clean", "pgd20": "PGD-20", "cw": "CW-20", "autoattack": "AutoAttack"}


def metric(results, name):
    """Training's own figure of attack `name` (adv branch) from results.json, or None."""
    if results is None:
        return None
    value = results.get(f"{name}_acc")
    return None if value is None else float(value)


def cell_figures(grid, row, seed):
    """{attack: accuracy or None} of a cell, every figure on the same test images.

    clean and PGD-20 come from training's final evaluation (results.json); the other
    attacks from keras_arat.evaluate's record of exactly that setting: the same
    checkpoint, adv branch, eps and first-N test images. A figure measured on other
    images or at another eps is not this cell's and is not used.
    """
    results = grid.results(row, seed)
    if results is None:
        return None
    figures = {a: metric(results, a) for a in BUILTIN_ATTACKS}
    source = os.path.basename(results.get("checkpoint", ""))
    for attack in grid.attacks:
        if attack in BUILTIN_ATTACKS:
            continue
        entry = records.find_evaluation(grid.cell_dir(row, seed), source, attack, "adv",
                                        results["eps"], results["n_examples"])
        figures[attack] = None if entry is None else float(entry["acc"])
    figures["n_examples"] = results.get("n_examples")
    figures["eps"] = results.get("eps")
    return figures


def extra_attacks_missing(grid, row, seed):
    """The attacks beyond the trainer's own that the cell has no figure of yet."""
    figures = cell_figures(grid, row, seed) or {}
    return [a for a in grid.attacks if a not in BUILTIN_ATTACKS and figures.get(a) is None]


def verdict(figures, rule):
    """(True, "") if a cell meets the convergence rule (a grid_spec.ConvergenceRule: the
    command's --min_clean_acc, --min_robust_acc), else (False, the reason)."""
    reasons = []
    for name, flag in (("clean", "min_clean_acc"), ("pgd20", "min_robust_acc")):
        floor = getattr(rule, flag)
        if floor is not None and figures.get(name) is not None and figures[name] < floor:
            reasons.append(f"{ATTACK_NAMES[name]} {figures[name]:.3f} < {floor:g}")
    return not reasons, "; ".join(reasons)
