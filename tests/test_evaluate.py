"""keras_arat.evaluate's CLI: checkpoint runs, SavedModels, ONNX, and its refusals."""

import functools
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tests import cli, helpers
from tests.cli import assert_error
from tests.test_robustbench import check_model_info


run_module = functools.partial(cli.run_cli, check=True)


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


@pytest.mark.slow
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
        assert list(accs) == ["clean", "pgd20", "cw", "autoattack", "worst_case"]
        # Each figure is its attack alone; worst_case is over all three.
        assert all(accs["clean"] >= accs[a] >= accs["worst_case"]
                   for a in ("pgd20", "cw", "autoattack"))
        record = read_record(workdir, entry["record"])
        assert entry["record"] == (f"evals/epoch-0001-{entry['branch']}-linf-eps0.3-n8.json")
        assert record["branch"] == entry["branch"] and record["n_examples"] == 8
        assert record["test_images"] == "the first 8 of the test split of digits"
        by_attack = {r["attack"]: r for r in record["results"]}
        assert {a: r["acc"] for a, r in by_attack.items()} == accs
        assert by_attack["pgd20"]["settings"] == {
            "eps": pytest.approx(0.3), "norm": "linf", "seed": 0, "steps": 20,
            "step_size": pytest.approx(0.075), "random_start": "uniform",
            "loss": "cross_entropy", "restarts": 1, "reference_noise_leak": False}
        assert by_attack["autoattack"]["worst_case_over"] == ["clean", "autoattack"]
        assert by_attack["cw"]["worst_case_over"] == ["clean", "cw"]
        assert by_attack["worst_case"]["worst_case_over"] == ["clean", "pgd20", "cw",
                                                             "autoattack"]
        stages = by_attack["autoattack"]["breakdown"]["stages"]
        assert [s["attack"] for s in stages] == ["clean", "apgd-ce", "apgd-t", "fab-t",
                                                 "square"]
        assert all("time_s" in s and "robust_acc" in s for s in stages)
        assert stages[-1]["robust_acc"] == accs["autoattack"]
    with open(os.path.join(workdir, "robustbench.json")) as f:
        rb = json.load(f)
    adv = printed["evaluated"][0]["accuracy"]
    check_model_info(rb)  # RobustBench's model_info format, percent strings
    assert rb["autoattack_acc"] == f"{100 * adv['autoattack']:.2f}"
    assert rb["clean_acc"] == f"{100 * adv['clean']:.2f}"
    assert rb["eps"] == "0.3" and rb["dataset"] == "digits"
    assert rb["architecture"] == "SmallCNN-8" and "first 8 test images" in rb["footnote"]
    # Which model the figures are of: the checkpoint and its branch.
    assert (f"Evaluated: {os.path.join(os.path.abspath(workdir), 'checkpoints/epoch-0001')} "
            f"(adv branch).") in rb["footnote"], rb["footnote"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_cli_checkpoint_square_queries_each_branch_converted(workdir, tmp_path):
    out = str(tmp_path / "out")
    proc = run_module("keras_arat.evaluate", f"--workdir={workdir}", "--attacks=clean,square",
                      "--branch=both", "--n_examples=8", "--batch_size=8", "--noprogress",
                      "--query_onnx=convert", f"--output_dir={out}")
    entries = json.loads(proc.stdout)["evaluated"]
    assert [e["branch"] for e in entries] == ["adv", "clean"]
    # One conversion per branch (the branches are different models), each checked.
    assert proc.stderr.count("Square queries the model converted to ONNX in memory with "
                             "onnxruntime (its logits are checked against the network's") == 2
    for entry in entries:
        assert any(n.startswith("square queried the model converted to ONNX in memory "
                                "(logits within") for n in entry["notes"]), entry["notes"]
        assert entry["accuracy"]["clean"] >= entry["accuracy"]["square"]


@pytest.fixture(scope="module")
def onnx_model(saved_model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("onnx") / "model.onnx")
    run_module("tf2onnx.convert", "--saved-model", saved_model, "--output", path,
               "--opset", "17")
    return path


@pytest.mark.slow
def test_cli_saved_model_and_onnx(saved_model, onnx_model, tmp_path):
    out = str(tmp_path / "out")
    proc = run_module("keras_arat.evaluate", f"--saved_model={saved_model}",
                      "--dataset=digits", "--eps=0.3", "--n_examples=8", "--batch_size=8",
                      "--attacks=clean,pgd20,autoattack", f"--output_dir={out}", "--noprogress",
                      f"--query_onnx={onnx_model}")
    (entry,) = json.loads(proc.stdout)["evaluated"]
    accs = entry["accuracy"]
    # Square queried the ONNX model with onnxruntime, and the record says so.
    assert f"Square queries {onnx_model} with onnxruntime" in proc.stderr
    assert any(n.startswith(f"square queried {onnx_model} (logits within") for n in
               entry["notes"]), entry["notes"]
    assert accs["clean"] >= max(accs["pgd20"], accs["autoattack"])
    assert accs["worst_case"] <= min(accs["pgd20"], accs["autoattack"])
    assert entry["n_examples"] == 8 and accs["clean"] >= 0.5
    assert entry["kind"] == "saved_model" and entry["dataset"] == "digits"
    record = read_record(out, entry["record"])
    assert {r["attack"]: r["acc"] for r in record["results"]} == accs
    with open(os.path.join(out, "robustbench_saved_model.json")) as f:
        rb = json.load(f)
    check_model_info(rb)
    assert rb["clean_acc"] == f"{100 * accs['clean']:.2f}"
    assert rb["autoattack_acc"] == f"{100 * accs['autoattack']:.2f}"
    # In-process, the SavedModel agrees with the network it was exported from.
    from keras_arat.deployed import SavedModelRunner
    x = helpers.tiny_data().test[0][:8]
    net = helpers.tiny_network(split_bn=False, trained=True)
    np.testing.assert_allclose(SavedModelRunner(saved_model).predict(x),
                               net(x, training=False, branch="adv").numpy(), atol=1e-4)

    proc = run_module("keras_arat.evaluate", f"--onnx={onnx_model}", "--dataset=digits",
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


@pytest.mark.slow
def test_autoattack_alone_reports_its_own_clean_accuracy(saved_model, tmp_path):
    out = str(tmp_path / "out")
    proc = run_module("keras_arat.evaluate", f"--saved_model={saved_model}", "--eps=0.3",
                      "--n_examples=8", "--batch_size=8", "--attacks=autoattack",
                      f"--output_dir={out}", "--noprogress")
    (entry,) = json.loads(proc.stdout)["evaluated"]
    assert list(entry["accuracy"]) == ["autoattack"]
    (result,) = read_record(out, entry["record"])["results"]
    clean = result["breakdown"]["clean_acc"]
    assert 0.5 <= clean <= 1.0 and clean >= entry["accuracy"]["autoattack"]
    with open(os.path.join(out, "robustbench_saved_model.json")) as f:
        rb = json.load(f)
    check_model_info(rb)
    assert rb["clean_acc"] == f"{100 * clean:.2f}"  # not null: AutoAttack measured it
    assert rb["autoattack_acc"] == f"{100 * entry['accuracy']['autoattack']:.2f}"


@pytest.mark.slow
def test_cli_refuses_probability_outputs(tmp_path):
    path = save_model(str(tmp_path / "probs"), softmax=True)
    proc = run_module("keras_arat.evaluate", f"--saved_model={path}", "--dataset=digits",
                      "--n_examples=8", "--attacks=clean", check=False)
    assert_error(proc, "probabilities", alone=False)  # after the evaluation's start line


def bad_files(tmp_path):
    """Files of the wrong kind and shape; {sm} and {onnx} stand-ins (the checks before
    TensorFlow loads look at the files, not at the models in them)."""
    x = np.zeros((8, 28, 28, 1), np.uint8)  # MNIST-shaped, the models take 32x32x3
    y = np.arange(8) % 2
    np.savez(tmp_path / "mnist28.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    np.save(tmp_path / "images.npy", np.zeros((8, 32, 32, 3), np.uint8))
    for folder in (tmp_path / "sm", tmp_path / "export" / "saved_model" / "m" / "1"):
        folder.mkdir(parents=True)
        (folder / "saved_model.pb").write_bytes(b"\x08\x01")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x08\x12\x07tf2onnx")
    with open(tmp_path / "net.keras", "wb") as f:
        np.savez(f, w=np.zeros(3))  # a zip archive, as .keras files are
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "file.txt").write_text("x")
    return {"{tmp}": str(tmp_path), "{sm}": str(tmp_path / "sm"),
            "{onnx}": str(tmp_path / "model.onnx")}


def fill(args, message, paths):
    for key, value in paths.items():
        args = [a.replace(key, value) for a in args]
        message = message.replace(key, value)
    return args, message


# Checked before TensorFlow loads, and reported with TensorFlow unimportable
# (tests/cli.without_tensorflow), which proves they come first.
BAD_INPUT_BEFORE_TENSORFLOW = [
    (["--workdir={tmp}/absent"], "is not a folder"),
    (["--workdir={tmp}/not_a_run"], "config.json not found"),
    (["--saved_model={onnx}"], "is a file (an ONNX model? pass --onnx)"),
    (["--saved_model={tmp}/export"], "did you mean --saved_model={tmp}/export/saved_model/m/1"),
    (["--saved_model={tmp}/absent"], "not found"),
    (["--onnx={sm}"], "is a folder (a SavedModel? pass --saved_model)"),
    (["--onnx={tmp}/net.keras"], "is a zip archive"),
    (["--saved_model={sm}", "--dataset=npz:{tmp}/images.npy"], "not an .npz archive"),
    (["--saved_model={sm}", "--dataset=npz:{tmp}/absent.npz"], "npz file not found"),
    (["--saved_model={sm}", "--eps=9"], "--eps=9 must be in (0, 1]"),
    (["--saved_model={sm}", "--output_dir={tmp}/file.txt"], "is a file, not a folder"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT_BEFORE_TENSORFLOW,
                         ids=[m for _, m in BAD_INPUT_BEFORE_TENSORFLOW])
def test_bad_input_is_one_error_line_before_tensorflow_loads(tmp_path, args, message):
    args, message = fill(args, message, bad_files(tmp_path))
    proc = run_module("keras_arat.evaluate", *args, "--n_examples=8", check=False,
                      env=cli.without_tensorflow(str(tmp_path)))
    assert_error(proc, message)  # and nothing else on stderr, nothing on stdout
    assert proc.stdout == "" and proc.seconds < 15


# Found once the model is loaded: one error line all the same, and no TensorFlow log.
BAD_INPUT_AFTER_TENSORFLOW = [
    (["--saved_model={sm}", "--dataset=npz:{tmp}/mnist28.npz"],
     "the images are 28x28x1 but {sm} takes 32x32x3"),
    (["--onnx={onnx}", "--dataset=npz:{tmp}/mnist28.npz"],
     "the images are 28x28x1 but {onnx} takes 32x32x3"),
    (["--saved_model={sm}", "--attacks=clean,fgsm"], "unknown attack(s) ['fgsm']"),
    (["--saved_model={sm}", "--onnx={onnx}"], "give --saved_model or --onnx, not both"),
    (["--saved_model={sm}", "--attacks=square", "--query_onnx={tmp}/absent.onnx"],
     "--query_onnx={tmp}/absent.onnx: not auto, convert, none or a file"),
    (["--onnx={onnx}", "--query_onnx={onnx}"],
     "--query_onnx applies to --saved_model and --workdir only"),
    (["--workdir={tmp}/run", "--query_onnx={onnx}"],
     "--query_onnx={onnx}: a checkpoint takes auto, convert or none"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args,message", BAD_INPUT_AFTER_TENSORFLOW,
                         ids=[m for _, m in BAD_INPUT_AFTER_TENSORFLOW])
def test_bad_input_is_one_error_line_after_tensorflow_loads(saved_model, onnx_model, tmp_path,
                                                            args, message):
    paths = {**bad_files(tmp_path), "{sm}": saved_model, "{onnx}": onnx_model}
    args, message = fill(args, message, paths)
    proc = run_module("keras_arat.evaluate", *args, "--n_examples=8", check=False)
    assert_error(proc, message)
    assert proc.stdout == ""


def test_exit_status_tells_a_refused_request_from_a_broken_model():
    from keras_arat import evaluate
    from keras_arat.attacks import (BudgetError, EvaluationError, InputRangeError,
                                    NonFiniteOutputError, ProbabilityOutputError, check_logits)
    from keras_arat.errors import UsageError
    for error, status in ((UsageError("x"), 2), (InputRangeError("x"), 2),
                          (ProbabilityOutputError("x"), 2), (EvaluationError("x"), 2),
                          (NonFiniteOutputError("x"), 1), (BudgetError("x"), 1)):
        assert evaluate.exit_status(error) == status, error
    x = np.zeros((4, 8, 8, 1), np.float32)
    with pytest.raises(NonFiniteOutputError, match="non-finite logits"):
        check_logits(lambda t: np.full((len(t), 10), np.nan, np.float32), x)


def test_stray_arguments_are_refused():
    proc = cli.run_cli("keras_arat.evaluate", "--attacks=clean", "autoattack")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: unexpected arguments "
                                                     "['autoattack'] (flags are --name=value)")


def test_deployed_models_are_named_by_their_folders():
    from keras_arat.evaluate import model_name
    assert model_name("exports/quickstart/saved_model/quickstart/1/") == "quickstart-v1"
    assert model_name("exports/clean/saved_model/quickstart_clean/2") == "quickstart_clean-v2"
    assert model_name("exports/quickstart/model.onnx") == "quickstart"
    assert model_name("/tmp/net_adv.onnx") == "net_adv"
    assert model_name("/tmp/my_saved_model") == "my_saved_model"
