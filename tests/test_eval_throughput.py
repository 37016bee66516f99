"""benchmarks/eval_throughput.py, as BENCHMARKS.md runs it, on test-size models and budgets."""

import os
import re
import subprocess
import sys

import tensorflow as tf

from tests import helpers

import pytest

pytestmark = pytest.mark.slow  # end to end: subprocesses, training, export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1", PYTHONPATH=ROOT)
TINY_BUDGET = ["--n_examples=6", "--batch_size=4", "--n_iter=2", "--n_queries=20",
               "--n_target_classes=2"]
STAGE = re.compile(r"^(clean|apgd-ce|apgd-t|fab-t|square)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+"
                   r"([\d.]+)\s+([\d.]+|inf)$", re.M)


def run_script(*args):
    proc = subprocess.run([sys.executable, "benchmarks/eval_throughput.py", *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def check_report(out, n):
    for attack in ("pgd20", "cw"):
        assert re.search(rf"; {attack} acc [\d.]+ in [\d.]+ s: [\d.]+ img/s", out), out
    total = re.search(r"AutoAttack standard acc ([\d.]+) in ([\d.]+) s: ([\d.]+) img/s", out)
    assert total, out
    rows = STAGE.findall(out)
    assert [r[0] for r in rows] == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"], out
    accs = [float(r[1]) for r in rows]
    assert accs == sorted(accs, reverse=True) and accs[-1] == float(total.group(1))
    attacked = [int(r[3]) for r in rows]
    assert attacked[0] == n and attacked == sorted(attacked, reverse=True)
    for r in rows[1:]:  # images/s is what was attacked over the stage's seconds
        if int(r[3]) and float(r[4]) > 0:
            assert abs(float(r[5]) - int(r[3]) / float(r[4])) <= 0.05 * float(r[5]) + 0.1, r


def test_random_weight_model(tmp_path):
    # BENCHMARKS.md: --model=resnet18 --n_examples=8 --batch_size=8; here a width-4 small CNN.
    out = run_script("--model=small_cnn", "--width=4", *TINY_BUDGET)
    check_report(out, 6)
    assert "labels = its predictions" in out
    assert re.search(r"clean acc 1\.000", out)  # its own predictions are the labels


def test_saved_model(tmp_path):
    # BENCHMARKS.md: --saved_model=... --eps=0.25 --n_examples=200 (the setting).
    class Serve(tf.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32,
                                                    name="images")])
        def serve(self, images):
            return {"logits": self.net(images, training=False, branch="adv")}

    module = Serve(helpers.tiny_network(split_bn=False, trained=True))
    path = str(tmp_path / "model")
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    out = run_script(f"--saved_model={path}", "--eps=0.25", *TINY_BUDGET)
    check_report(out, 6)
