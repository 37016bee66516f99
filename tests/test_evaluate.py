"""keras_arat.evaluate's CLI: checkpoint runs, SavedModels, ONNX, and its refusals."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1", PYTHONPATH=ROOT)


def run_module(module, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({proc.returncode}):\n"
                             f"{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("eval_run") / "run")
    run_module("keras_arat.train", "--dataset=digits", "--n_train=256", "--n_test=64",
               "--batch_size=64", "--cnn_width=8", "--attack_steps=2", "--eps=0.3",
               "--step_size=0.1", "--lr_values=0.05", "--lr_boundaries=", "--epochs=1",
               "--verbose=2", f"--workdir={path}")
    return path


class Serve(tf.Module):
    def __init__(self, net, softmax=False):
        super().__init__()
        self.net = net
        self.softmax = softmax

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32, name="images")])
    def serve(self, images):
        logits = self.net(images, training=False, branch="adv")
        return {"logits": tf.nn.softmax(logits) if self.softmax else logits}


def save_model(path, softmax=False):
    module = Serve(helpers.tiny_network(split_bn=False, trained=True), softmax)
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return path


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return save_model(str(tmp_path_factory.mktemp("sm") / "model"))


def test_cli_checkpoint_writes_every_file(workdir):
    proc = run_module("keras_arat.evaluate", f"--workdir={workdir}",
                      "--attacks=clean,pgd20,cw,autoattack", "--branch=both", "--n_examples=8",
                      "--batch_size=8", "--noprogress")
    printed = json.loads(proc.stdout)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert printed == results
    for key in ("clean_acc", "clean_acc_clean_branch", "pgd20_acc", "cw_acc", "autoattack_acc"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["n_examples"] == 8 and results["eps"] == pytest.approx(0.3)
    for branch in ("adv", "clean"):
        accs = results["per_branch"][branch]
        for attack in ("clean", "pgd20", "cw", "autoattack"):
            assert attack in accs and f"{attack}_time_s" in accs
        assert accs["clean"] >= accs["pgd20"] >= accs["autoattack"]
    with open(os.path.join(workdir, "autoattack_breakdown.json")) as f:
        breakdown = json.load(f)
    assert set(breakdown) == {"adv", "clean"}
    stages = breakdown["adv"]["stages"]
    assert [s["attack"] for s in stages] == ["clean", "pgd20", "cw", "apgd-ce", "apgd-t",
                                             "fab-t", "square"]
    assert all("time_s" in s and "robust_acc" in s for s in stages)
    assert stages[-1]["robust_acc"] == results["autoattack_acc"]
    assert results["autoattack_breakdown"]["adv"] == breakdown["adv"]
    with open(os.path.join(workdir, "robustbench.json")) as f:
        rb = json.load(f)
    assert rb["threat_model"] == "Linf" and rb["n_examples"] == 8
    assert rb["autoattack_acc"] == results["autoattack_acc"]
    assert rb["clean_acc"] == results["clean_acc"]
    assert {"model", "method", "dataset", "eps"} <= set(rb)


def test_cli_saved_model_and_onnx(saved_model, tmp_path):
    out = str(tmp_path / "out")
    run_module("keras_arat.evaluate", f"--saved_model={saved_model}", "--dataset=digits",
               "--eps=0.3", "--n_examples=8", "--batch_size=8",
               "--attacks=clean,pgd20,autoattack", f"--output_dir={out}", "--noprogress")
    with open(os.path.join(out, "deployed_results.json")) as f:
        entry = json.load(f)["saved_model"]
    assert entry["clean_acc"] >= entry["pgd20_acc"] >= entry["autoattack_acc"]
    assert entry["n_examples"] == 8 and entry["clean_acc"] >= 0.5
    assert os.path.exists(os.path.join(out, "robustbench_saved_model.json"))
    assert os.path.exists(os.path.join(out, "autoattack_breakdown_saved_model.json"))
    # In-process, the SavedModel agrees with the network it was exported from.
    from keras_arat.evaluate import saved_model_fn
    x = helpers.tiny_data().test[0][:8]
    net = helpers.tiny_network(split_bn=False, trained=True)
    np.testing.assert_allclose(saved_model_fn(saved_model)(x).numpy(),
                               net(x, training=False, branch="adv").numpy(), atol=1e-4)

    onnx_path = str(tmp_path / "model.onnx")
    run_module("tf2onnx.convert", "--saved-model", saved_model, "--output", onnx_path,
               "--opset", "17")
    proc = run_module("keras_arat.evaluate", f"--onnx={onnx_path}", "--dataset=digits",
                      "--eps=0.3", "--n_examples=8", "--batch_size=8",
                      "--attacks=clean,pgd20,autoattack", f"--output_dir={out}", "--noprogress")
    assert "no gradients" in proc.stderr
    with open(os.path.join(out, "deployed_results.json")) as f:
        both = json.load(f)
    assert set(both) == {"saved_model", "onnx"}
    onnx = both["onnx"]
    assert onnx["clean_acc"] == entry["clean_acc"]
    assert "pgd20_acc" not in onnx and "square_acc" in onnx
    assert onnx["square_acc"] <= onnx["clean_acc"]
    assert any("no gradients" in n for n in onnx["notes"])


def test_cli_refuses_probability_outputs(tmp_path):
    path = save_model(str(tmp_path / "probs"), softmax=True)
    proc = run_module("keras_arat.evaluate", f"--saved_model={path}", "--dataset=digits",
                      "--n_examples=8", "--attacks=clean", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "probabilities" in errors[0]
