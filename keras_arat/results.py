"""RUN/results.json: the figures training's final evaluation writes, with their labels."""

import os
import time

from keras_arat import files


def update_results(workdir, run, evaluation, n_examples, attacks):
    """Write training's final evaluation into RUN/results.json (RobustBench-like keys).

    evaluation: {branch: {attack: acc, f"{attack}_time_s": s}}. Every adv-branch figure
    lands at the top as f"{attack}_acc" (the clean branch's clean accuracy as
    clean_acc_clean_branch), labelled by the keys beside it: eps, n_examples (the first N
    test images), checkpoint, the attacks' settings, and reference_noise_leak (whether the
    run trained with the official code's in-place random start; such a run also has
    pgd20_leak_acc, the official code's PGD-20, whose settings give its 2-eps ball).
    Only training writes these; keras_arat.evaluate records its own figures elsewhere
    (RUN/evals/).
    """
    cfg = run.config
    adv, clean = evaluation.get("adv", {}), evaluation.get("clean", {})
    results = {"dataset": cfg.dataset, "model": cfg.model, "method": cfg.method,
               "branch": "adv", "eps": cfg.eps, "norm": "linf", "n_examples": n_examples,
               "test_images": f"the first {n_examples} of the test split",
               "epoch": run.epoch, "checkpoint": f"checkpoints/epoch-{run.epoch:04d}",
               "reference_noise_leak": bool(cfg.reference_noise_leak),
               "attacks": attacks}
    for name, value in adv.items():
        if not name.endswith("_time_s"):  # pgd20-leak -> pgd20_leak_acc
            results[f"{name.replace('-', '_')}_acc"] = value
    if "clean" in clean:
        results["clean_acc_clean_branch"] = clean["clean"]
    # Each figure once: the accuracies are above, their times here.
    results["time_s"] = {branch: {name[:-len("_time_s")]: value
                                  for name, value in accs.items() if name.endswith("_time_s")}
                         for branch, accs in evaluation.items()}
    results["evaluated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    old = files.read_json(os.path.join(workdir, "results.json"), {})
    for key in ("swa", "best"):  # written at other moments of the same run
        if key in old:
            results[key] = old[key]
    files.write_json(os.path.join(workdir, "results.json"), results)
    return results


def merge_results(workdir, entries):
    """Merge top-level `entries` into RUN/results.json as they are (written atomically)."""
    path = os.path.join(workdir, "results.json")
    results = files.read_json(path, {})
    results.update(entries)
    files.write_json(path, results)
    return results
