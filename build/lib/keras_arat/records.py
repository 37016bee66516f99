"""Where evaluation figures are recorded, and how they are found again (no TensorFlow).

An evaluation setting is what makes two figures comparable: the model (a checkpoint
folder name such as epoch-0006, or a deployed file), the BN branch, the norm, eps and the
number of test images (always the first N of the test split). keras_arat.evaluate keeps
one file per setting, RUN/evals/<setting>.json:

    {"source", "branch", "norm", "eps", "n_examples", "test_images", ..., "warnings",
     "results": [{"attack", "acc", "time_s", "settings", "worst_case_over",
                  "evaluated_at", ["breakdown"]}, ...]}
"""

import os
import re

from keras_arat import files


def slug(text):
    """`text` as a file-name piece."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", str(text)).strip("_") or "model"


def record_path(out_dir, source, branch, norm, eps, n_examples):
    """OUT/evals/<setting>.json of one evaluation setting."""
    name = f"{slug(source)}-{branch}-{norm}-eps{eps:.6g}-n{n_examples}.json"
    return os.path.join(out_dir, "evals", name)


def find_evaluation(out_dir, source, attack, branch, eps, n_examples, norm="linf"):
    """The latest recorded entry of `attack` at exactly this setting, or None."""
    record = files.read_json(record_path(out_dir, source, branch, norm, eps, n_examples))
    entries = [r for r in (record or {}).get("results", []) if r["attack"] == attack]
    return entries[-1] if entries else None
