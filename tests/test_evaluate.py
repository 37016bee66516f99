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


def read_record(out_dir, record):
    with open(os.path.join(out_dir, record)) as f:
        return json.load(f)


def test_cli_checkpoint_writes_every_file(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        training = json.load(f)
    proc = run_module("keras_arat.evaluate", f"--workdir={workdir}",
                      "--attacks=clean,pgd20,cw,autoattack", "--branch=both", "--n_examples=8",
                      "--batch_size=8", "--noprogress")
    printed = json.loads(proc.stdout)
    # Training's own figures are left exactly as training wrote them.
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f) == training
    assert [e["branch"] for e in printed["evaluated"]] == ["adv", "clean"]
    for entry in printed["evaluated"]:
        assert entry["n_examples"] == 8 and entry["eps"] == pytest.approx(0.3)
        assert entry["checkpoint"] == "checkpoints/epoch-0001" and entry["norm"] == "linf"
        accs = entry["accuracy"]
        assert list(accs) == ["clean", "pgd20", "cw", "autoattack"]
        assert accs["clean"] >= accs["pgd20"] >= accs["autoattack"]
        assert accs["cw"] >= accs["autoattack"]
        record = read_record(workdir, entry["record"])
        assert entry["record"] == (f"evals/epoch-0001-{entry['branch']}-linf-eps0.3-n8.json")
        assert record["branch"] == entry["branch"] and record["n_examples"] == 8
        assert record["test_images"] == "the first 8 of the test split"
        by_attack = {r["attack"]: r for r in record["results"]}
        assert {a: r["acc"] for a, r in by_attack.items()} == accs
        assert by_attack["pgd20"]["settings"] == {
            "eps": pytest.approx(0.3), "norm": "linf", "seed": 0, "steps": 20,
            "step_size": pytest.approx(0.075), "random_start": "uniform",
            "loss": "cross_entropy", "restarts": 1, "reference_noise_leak": False}
        assert by_attack["autoattack"]["worst_case_over"] == ["clean", "pgd20", "cw",
                                                             "autoattack"]
        stages = by_attack["autoattack"]["breakdown"]["stages"]
        assert [s["attack"] for s in stages] == ["clean", "pgd20", "cw", "apgd-ce", "apgd-t",
                                                 "fab-t", "square"]
        assert all("time_s" in s and "robust_acc" in s for s in stages)
        assert stages[-1]["robust_acc"] == accs["autoattack"]
    with open(os.path.join(workdir, "robustbench.json")) as f:
        rb = json.load(f)
    adv = printed["evaluated"][0]["accuracy"]
    assert rb["threat_model"] == "Linf" and rb["n_examples"] == 8
    assert rb["autoattack_acc"] == adv["autoattack"] and rb["clean_acc"] == adv["clean"]
    assert {"model", "method", "dataset", "eps"} <= set(rb)


def test_evaluation_at_another_eps_and_n_keeps_training_figures_and_labels_its_own(
        workdir, tmp_path):
    with open(os.path.join(workdir, "results.json")) as f:
        training = json.load(f)
    proc = run_module("keras_arat.evaluate", f"--workdir={workdir}", "--eps=0.05",
                      "--n_examples=16", "--attacks=clean,pgd20", "--noprogress")
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f) == training  # pgd20_acc, eps, n_examples untouched
    (entry,) = json.loads(proc.stdout)["evaluated"]
    assert entry["eps"] == pytest.approx(0.05) and entry["n_examples"] == 16
    record = read_record(workdir, entry["record"])
    assert entry["record"] == "evals/epoch-0001-adv-linf-eps0.05-n16.json"
    assert record["eps"] == pytest.approx(0.05) and record["n_examples"] == 16
    (pgd,) = [r for r in record["results"] if r["attack"] == "pgd20"]
    assert pgd["settings"]["eps"] == pytest.approx(0.05)
    assert pgd["settings"]["step_size"] == pytest.approx(0.0125)
    assert pgd["acc"] == entry["accuracy"]["pgd20"] >= training["pgd20_acc"] - 1.0 / 16
    # The same setting again replaces only the same measurement; another seed is added.
    run_module("keras_arat.evaluate", f"--workdir={workdir}", "--eps=0.05", "--n_examples=16",
               "--attacks=pgd20", "--seed=3", "--noprogress")
    record = read_record(workdir, entry["record"])
    seeds = sorted(r["settings"]["seed"] for r in record["results"] if r["attack"] == "pgd20")
    assert seeds == [0, 3]
    # --output_dir is honoured for a checkpoint too: nothing new lands in the run.
    out = str(tmp_path / "elsewhere")
    before = sorted(os.listdir(os.path.join(workdir, "evals")))
    proc = run_module("keras_arat.evaluate", f"--workdir={workdir}", "--n_examples=8",
                      "--attacks=clean", f"--output_dir={out}", "--noprogress")
    assert sorted(os.listdir(os.path.join(workdir, "evals"))) == before
    assert os.listdir(os.path.join(out, "evals")) == ["epoch-0001-adv-linf-eps0.3-n8.json"]
    events = os.listdir(os.path.join(out, "tensorboard"))
    assert events and events[0].startswith("events.out.tfevents")
    tags = {v.tag for path in events for event in tf.compat.v1.train.summary_iterator(
        os.path.join(out, "tensorboard", path)) for v in event.summary.value}
    assert tags == {"evaluate/adv/clean/linf_eps=0.3_n=8"}


def test_cli_saved_model_and_onnx(saved_model, tmp_path):
    out = str(tmp_path / "out")
    proc = run_module("keras_arat.evaluate", f"--saved_model={saved_model}",
                      "--dataset=digits", "--eps=0.3", "--n_examples=8", "--batch_size=8",
                      "--attacks=clean,pgd20,autoattack", f"--output_dir={out}", "--noprogress")
    (entry,) = json.loads(proc.stdout)["evaluated"]
    accs = entry["accuracy"]
    assert accs["clean"] >= accs["pgd20"] >= accs["autoattack"]
    assert entry["n_examples"] == 8 and accs["clean"] >= 0.5
    assert entry["kind"] == "saved_model" and entry["dataset"] == "digits"
    record = read_record(out, entry["record"])
    assert {r["attack"]: r["acc"] for r in record["results"]} == accs
    assert os.path.exists(os.path.join(out, "robustbench_saved_model.json"))
    # In-process, the SavedModel agrees with the network it was exported from.
    from keras_arat.deployed import SavedModelRunner
    x = helpers.tiny_data().test[0][:8]
    net = helpers.tiny_network(split_bn=False, trained=True)
    np.testing.assert_allclose(SavedModelRunner(saved_model).predict(x),
                               net(x, training=False, branch="adv").numpy(), atol=1e-4)

    onnx_path = str(tmp_path / "model.onnx")
    run_module("tf2onnx.convert", "--saved-model", saved_model, "--output", onnx_path,
               "--opset", "17")
    proc = run_module("keras_arat.evaluate", f"--onnx={onnx_path}", "--dataset=digits",
                      "--eps=0.3", "--n_examples=8", "--batch_size=8",
                      "--attacks=clean,pgd20,autoattack", f"--output_dir={out}", "--noprogress")
    assert "no gradients" in proc.stderr
    (onnx,) = json.loads(proc.stdout)["evaluated"]
    assert onnx["kind"] == "onnx" and onnx["record"] != entry["record"]
    assert sorted(os.listdir(os.path.join(out, "evals"))) == sorted(
        os.path.basename(e["record"]) for e in (entry, onnx))
    assert onnx["accuracy"]["clean"] == accs["clean"]
    assert "pgd20" not in onnx["accuracy"] and "square" in onnx["accuracy"]
    assert onnx["accuracy"]["square"] <= onnx["accuracy"]["clean"]
    assert any("no gradients" in n for n in onnx["notes"])


def test_cli_refuses_probability_outputs(tmp_path):
    path = save_model(str(tmp_path / "probs"), softmax=True)
    proc = run_module("keras_arat.evaluate", f"--saved_model={path}", "--dataset=digits",
                      "--n_examples=8", "--attacks=clean", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "probabilities" in errors[0]
