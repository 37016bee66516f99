"""Evaluate a trained run: clean and adversarial accuracy through either BN branch.

    python -m keras_arat.evaluate --workdir=RUN [--branch=adv|clean|both]
        [--attacks=clean,pgd20,cw] [--n_examples=N] [--batch_size=B]
"""

import json
import os
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from keras_arat.attacks import PGD, core

ATTACKS = ("clean", "pgd20", "cw")


def make_attack(name, eps):
    """The evaluation protocol's attacks: PGD-20 on CE and on the CW margin, step eps/4."""
    if name == "pgd20":
        return PGD(eps=eps, step_size=eps / 4, steps=20, loss=core.cross_entropy)
    if name == "cw":
        return PGD(eps=eps, step_size=eps / 4, steps=20, loss=core.cw_margin)
    raise ValueError(f"unknown attack {name!r}; choose from {ATTACKS}")


def correct_mask(network, x, y, branch, attack=None, batch_size=256, seed=0):
    """Per-example correctness (bool [N]) of `branch` in inference mode, under `attack`."""

    def predict(z):
        return network(z, training=False, branch=branch)

    @tf.function
    def batch_correct(xb, yb, batch_seed):
        if attack is not None:
            xb = attack(predict, xb, yb, batch_seed)
        return tf.equal(tf.argmax(predict(xb), -1), tf.cast(yb, tf.int64))

    out = []
    for i, start in enumerate(range(0, len(x), batch_size)):
        xb = tf.convert_to_tensor(x[start:start + batch_size], tf.float32)
        yb = tf.convert_to_tensor(y[start:start + batch_size])
        out.append(batch_correct(xb, yb, tf.constant([seed, i], tf.int64)).numpy())
    return np.concatenate(out) if out else np.zeros([0], bool)


def evaluate_network(network, x, y, eps, branches=("adv",), attacks=("clean", "pgd20"),
                     batch_size=256, seed=0):
    """{branch: {attack: accuracy}} plus the time each took; x float32 in [0,1]."""
    results = {}
    for branch in branches:
        results[branch] = {}
        for name in attacks:
            start = time.time()
            attack = None if name == "clean" else make_attack(name, eps)
            mask = correct_mask(network, x, y, branch, attack, batch_size, seed)
            results[branch][name] = float(mask.mean())
            results[branch][f"{name}_time_s"] = round(time.time() - start, 3)
    return results


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("workdir", None, "Training run folder (with config.json, checkpoints/).")
    flags.DEFINE_enum("branch", "adv", ["adv", "clean", "both"], "BN branch to evaluate.")
    flags.DEFINE_list("attacks", ["clean", "pgd20"], f"Comma list from {ATTACKS}.")
    flags.DEFINE_integer("n_examples", None, "First N test examples (default: all).")
    flags.DEFINE_integer("batch_size", 256, "Evaluation batch size.")
    flags.DEFINE_integer("seed", 0, "Seed of the attacks' random starts.")


def main(argv):
    from keras_arat import runs  # heavy imports after flag parsing
    del argv
    try:
        if not FLAGS.workdir:
            raise runs.UsageError("--workdir is required")
        unknown = [a for a in FLAGS.attacks if a not in ATTACKS]
        if unknown:
            raise runs.UsageError(f"unknown attack(s) {unknown}; choose from {list(ATTACKS)}")
        if FLAGS.n_examples is not None and FLAGS.n_examples < 1:
            raise runs.UsageError("--n_examples must be >= 1")
        run = runs.load_run(FLAGS.workdir)
        x, y = run.test_arrays(FLAGS.n_examples)
        branches = ("adv", "clean") if FLAGS.branch == "both" else (FLAGS.branch,)
        results = evaluate_network(run.network, x, y, run.config["eps"], branches,
                                   FLAGS.attacks, FLAGS.batch_size, FLAGS.seed)
        merged = runs.update_results(FLAGS.workdir, run, results, len(x))
    except runs.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(merged, indent=1))


if __name__ == "__main__":
    define_flags()
    app.run(main)
