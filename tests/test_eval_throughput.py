"""benchmarks/eval_throughput.py, as BENCHMARKS.md runs it, on test-size models and budgets."""

import argparse
import importlib.util
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
                   r"([\d.]+)\s+([\d.]+|inf)\s+([\d.]+)$", re.M)


def run_script(*args):
    proc = subprocess.run([sys.executable, "benchmarks/eval_throughput.py", *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def check_report(out, n):
    for attack in ("pgd20", "cw"):
        assert re.search(rf"; {attack} acc [\d.]+ in [\d.]+ s: [\d.]+ img/s", out), out
    # The figure's label: "standard", or the settings that differ from the standard version.
    total = re.search(r"AutoAttack (?:standard|\([^)]+\)) acc ([\d.]+) in ([\d.]+) s: "
                      r"([\d.]+) img/s", out)
    assert total, out
    rows = STAGE.findall(out)
    assert [r[0] for r in rows] == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"], out
    accs = [float(r[1]) for r in rows]
    assert accs == sorted(accs, reverse=True) and accs[-1] == float(total.group(1))
    attacked = [int(r[3]) for r in rows]
    assert attacked[0] == n and attacked == sorted(attacked, reverse=True)
    for r in rows[1:]:  # images/s is what was attacked over the stage's seconds
        if int(r[3]) and float(r[4]) > 0:
            # seconds are printed to 0.1 s (rounding: 0.05) and images/s to 0.01.
            assert abs(int(r[3]) / float(r[5]) - float(r[4])) <= 0.05 + 0.01 * float(r[4]), r
    cost = re.search(r"model alone on (\d+) images: forward ([\d.]+) ms, forward \+ input "
                     r"gradient ([\d.]+) ms, Square's query ([\d.]+) ms per image", out)
    assert cost and 0 < float(cost.group(2)) < float(cost.group(3)), out
    assert float(cost.group(4)) > 0, out
    # The model's share of a stage: seconds, not milliseconds (at these tiny budgets the
    # stage's own tracing makes it far longer than the model time).
    model_times = [(float(r[6]), float(r[4])) for r in rows[1:] if int(r[3])]
    assert max(m for m, _ in model_times) > 0, rows
    assert all(m <= t for m, t in model_times), rows


def test_random_weight_model(tmp_path):
    # BENCHMARKS.md: --model=resnet18 --n_examples=8 --batch_size=8; here a width-4 small CNN.
    out = run_script("--model=small_cnn", "--width=4", "--query_onnx=convert",
                     f"--robust_out={tmp_path / 'robust.npy'}", *TINY_BUDGET)
    check_report(out, 6)
    assert "labels = its predictions" in out
    assert re.search(r"Square queries the model converted to ONNX in memory \([\d.]+ s\) "
                     r"with onnxruntime", out), out
    import numpy as np
    robust = np.load(tmp_path / "robust.npy")
    total = re.search(r"AutoAttack \(2 iterations, 20 queries, 2 targets\) acc ([\d.]+)", out)
    assert total, out
    assert robust.shape == (6,) and robust.dtype == bool
    assert abs(robust.mean() - float(total.group(1))) < 1e-3
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
    out = run_script(f"--saved_model={path}", "--eps=0.25", "--square_rescale_schedule",
                     *TINY_BUDGET)
    check_report(out, 6)
    assert ("AutoAttack (2 iterations, 20 queries, 2 targets, Square's schedule rescaled) "
            "acc") in out, out
    # No export folder around it: Square queries the SavedModel itself.
    assert "Square queries the TensorFlow model (no checked model.onnx beside" in out, out


def test_square_rescale_schedule_reaches_square():
    script = load_script("eval_throughput")
    standard = argparse.Namespace(n_iter=100, n_queries=5000, n_target_classes=9,
                                  square_rescale_schedule=False)
    aa = script.autoattack_for(standard, 0.25)
    assert [a.name for a in aa.attacks] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert not aa.attacks[-1].rescale_schedule and script.budget_label(aa) == "standard"
    torch_like = argparse.Namespace(n_iter=10, n_queries=5000, n_target_classes=9,
                                    square_rescale_schedule=True)
    aa = script.autoattack_for(torch_like, 0.25)
    assert aa.attacks[-1].rescale_schedule and aa.attacks[-1].n_queries == 5000
    assert [a.n_iter for a in aa.attacks[:3]] == [10, 10, 10]
    assert script.budget_label(aa) == "(10 iterations, Square's schedule rescaled)"


def load_script(name):
    """benchmarks/<name>.py as a module (main() is not run; the torch reference's torch
    imports are inside its main())."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_reference_script():
    return load_script("torch_autoattack")


@pytest.mark.parametrize("n", [1, 200])
def test_torch_reference_attacks_the_images_we_attack(n):
    """benchmarks/torch_autoattack.py (run in a side environment with torch) must feed the
    reference the digits eval_throughput feeds ours: same pixels, labels and order."""
    import numpy as np
    from keras_arat.data.datasets import load_dataset
    x, y = load_reference_script().digits_nchw(n)
    data = load_dataset("digits", n_train=1, n_test=n)
    assert x.shape == (n, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x.transpose(0, 2, 3, 1),
                                  data.x_test[:n].astype(np.float32) / 255.0)
    np.testing.assert_array_equal(y, data.y_test[:n])


def test_torch_reference_without_torch_is_one_line():
    try:
        import torch  # noqa: F401
        pytest.skip("torch is installed here: the script would run the reference")
    except ImportError:
        pass
    proc = subprocess.run([sys.executable, "benchmarks/torch_autoattack.py",
                           "--onnx=model.onnx"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "is missing: this script runs in a side environment" in proc.stderr
