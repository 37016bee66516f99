"""Export: BN folding parity for every family and branch, the CLI end to end, errors."""

import glob
import json
import os
import shutil
import time

import keras
import numpy as np
import pytest

from keras_arat.deployed import OnnxRunner, SavedModelRunner
from keras_arat.export import convert, exporter, fold
from keras_arat.layers.split_batch_norm import SplitBatchNormalization
from tests.cli import assert_error, run_cli, without_tensorflow
from tests.helpers import new_network

ATOL = 1e-4
TINY = ["--dataset=digits", "--n_train=256", "--n_test=128", "--batch_size=64",
        "--cnn_width=8", "--attack_steps=2", "--eps=0.3", "--step_size=0.1",
        "--lr_values=0.05", "--lr_boundaries=", "--a_prev_examples=64", "--epochs=1",
        "--verbose=2"]
FAMILIES = [("small_cnn", {"width": 8}), ("resnet18", {}),
            ("wrn", {"depth": 10, "width": 1}), ("preact_resnet18", {})]


def randomize_bn(network, seed=0):
    """Distinct, non-trivial statistics per branch (fresh BNs are the identity)."""
    rng = np.random.default_rng(seed)
    for layer in network._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, SplitBatchNormalization):
            for bn in layer.bns.values():
                c = bn.gamma.shape[-1]
                bn.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
                bn.beta.assign(rng.normal(0, 0.2, c).astype("float32"))
                bn.moving_mean.assign(rng.normal(0, 0.2, c).astype("float32"))
                bn.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))


@pytest.mark.parametrize("family,kwargs", [  # the two 18-layer families take longest
    pytest.param(f, k, id=f, marks=pytest.mark.slow if f.endswith("18") else ())
    for f, k in FAMILIES])
def test_fold_parity_every_family_both_branches(family, kwargs, tmp_path):
    net = new_network(model=family, input_shape=(16, 16, 3), **kwargs)
    randomize_bn(net)
    x = np.random.default_rng(1).uniform(0, 1, (6, 16, 16, 3)).astype("float32")
    per_branch = {}
    for branch in ("adv", "clean"):
        folded = fold.fold_network(net, branch)
        assert fold.count_layers(folded, keras.layers.BatchNormalization) == 0
        assert fold.count_layers(folded, SplitBatchNormalization) == 0
        assert folded.input.name == "images" and folded.output.shape[-1] == 10
        for layer in folded.layers:  # plain Keras only: loads without keras_arat
            assert type(layer).__module__.startswith("keras."), type(layer)
        want = net(x, training=False, branch=branch).numpy()
        got = folded(x).numpy()
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
        per_branch[branch] = want
    # The branches really differ, so a fold of the wrong branch would be caught.
    assert np.max(np.abs(per_branch["adv"] - per_branch["clean"])) > 1e-3
    # The adv branch through a SavedModel and onnxruntime (no BatchNormalization node).
    sm = convert.saved_model_dir(str(tmp_path), family)
    convert.save_saved_model(folded_adv := fold.fold_network(net, "adv"), sm, (16, 16, 3))
    onnx_path = str(tmp_path / "model.onnx")
    convert.onnx_from_saved_model(sm, onnx_path, (16, 16, 3))
    assert convert.check_onnx(onnx_path) == []
    diffs = {"folded": np.max(np.abs(folded_adv(x).numpy() - per_branch["adv"])),
             "saved_model": np.max(np.abs(SavedModelRunner(sm).predict(x) - per_branch["adv"])),
             "onnxruntime": np.max(np.abs(OnnxRunner(onnx_path)(x) - per_branch["adv"]))}
    print(f"{family}: max abs logit difference of the folded adv branch: "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= ATOL


def test_fold_rejects_bad_input():
    net = new_network()
    with pytest.raises(fold.FoldError, match="unknown branch"):
        fold.fold_network(net, "both")
    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(fold.FoldError, match="cannot fold: .*subclassed Subclassed"):
        fold.fold_network(Subclassed())


def test_fold_single_bn_network():
    net = new_network(split_bn=False)
    randomize_bn(net)
    x = np.random.default_rng(2).uniform(0, 1, (3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(fold.fold_network(net, "clean")(x).numpy(),
                               net(x, training=False).numpy(), atol=ATOL, rtol=0)


# --- the CLI end to end -------------------------------------------------------------------
# run_dir: a tiny training run (config.json for the test data, checkpoints for the error
# cases). net_file: a split-BN network with distinct branch statistics saved as .keras,
# the source of the end-to-end export (see test_checkpoint_export_or_refusal for why).

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("exportrun") / "tiny")
    proc = run_cli("keras_arat.train", *TINY, f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def net_file(tmp_path_factory):
    net = new_network(width=8, seed=3)
    randomize_bn(net, seed=3)
    path = str(tmp_path_factory.mktemp("netfile") / "net.keras")
    net.save(path)
    return path, net


@pytest.fixture(scope="module")
def exported(run_dir, net_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exported") / "new" / "out")  # parent made too
    start = time.time()
    proc = run_cli("export", f"--keras_model={net_file[0]}", f"--workdir={run_dir}",
                   f"--out={out}", "--name=tiny", "--pgd_examples=64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, time.time() - start


def no_leftovers(out):
    parent = os.path.dirname(out)
    return [p for p in os.listdir(parent) if ".export-" in p or ".old-" in p] == []


@pytest.mark.slow
def test_cli_writes_every_file(exported):
    out, proc, _ = exported
    assert sorted(os.listdir(out)) == ["export_report.json", "model.keras", "model.onnx",
                                       "saved_model"]
    sm = os.path.join(out, "saved_model", "tiny", "1")
    assert os.path.isfile(os.path.join(sm, "saved_model.pb"))
    assert os.path.isdir(os.path.join(sm, "variables"))
    assert no_leftovers(out)
    assert "wrote" in proc.stdout
    # stderr: what the export is doing, and nothing from TensorFlow's start-up.
    steps = proc.stderr.splitlines()
    assert steps[:2] == ["export: folding the adv branch, then saved_model, onnx, keras with "
                         "parity checks on 128 test images",
                         "export: writing and checking the SavedModel"], proc.stderr
    assert all(s.startswith(("export: ", "PGD-20, original: ", "PGD-20, folded_keras: "))
               for s in steps), proc.stderr
    assert steps[-1].startswith("PGD-20, folded_keras: 64/64 images in ")


@pytest.mark.slow
def test_report_proves_parity(exported):
    out, _, _ = exported
    report = json.load(open(os.path.join(out, "export_report.json")))
    assert report["branch"] == "adv" and report["passed"] is True
    assert report["tolerance_abs_logits"] == ATOL
    diffs = report["max_abs_logit_diff_vs_original"]
    assert set(diffs) == {"folded_keras", "saved_model", "onnxruntime", "keras_file"}
    assert max(diffs.values()) <= ATOL
    assert max(report["max_abs_logit_diff_between_exports"].values()) <= ATOL
    acc = report["accuracy"]
    assert len(set(acc.values())) == 1, acc  # same predictions everywhere
    assert report["n_examples"] == 128
    pgd = report["pgd20_accuracy"]
    assert pgd["steps"] == 20 and pgd["step_size"] == pytest.approx(0.3 / 4)
    assert abs(pgd["original"] - pgd["folded_keras"]) <= 2 / 64
    assert report["onnx"]["opset"] == 17
    assert "BatchNormalization" not in report["onnx"]["op_types"]


@pytest.mark.slow
def test_saved_model_cli_shows_the_signature(exported):
    out, _, _ = exported
    proc = run_cli("tensorflow.python.tools.saved_model_cli", "show", "--dir",
                   os.path.join(out, "saved_model", "tiny", "1"), "--tag_set", "serve",
                   "--signature_def", "serving_default", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "inputs['images'] tensor_info" in text
    assert "dtype: DT_FLOAT" in text and "shape: (-1, 32, 32, 3)" in text
    assert "outputs['logits'] tensor_info" in text and "shape: (-1, 10)" in text
    assert "Method name is: tensorflow/serving/predict" in text


@pytest.mark.slow
def test_onnx_graph_contract_and_dynamic_batch(exported, net_file):
    import onnx
    out, _, _ = exported
    path = os.path.join(out, "model.onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert convert.check_onnx(path) == []
    from tests.helpers import tiny_data
    x = tiny_data().test[0][:7]
    want = net_file[1](x, training=False, branch="adv").numpy()
    ort = OnnxRunner(path)
    np.testing.assert_allclose(ort(x), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(ort(x[:1]), want[:1], atol=ATOL, rtol=0)
    keras_model = keras.saving.load_model(os.path.join(out, "model.keras"))
    np.testing.assert_allclose(keras_model(x).numpy(), want, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_clean_branch_from_keras_file(run_dir, net_file, tmp_path):
    report = exporter.export_run(log=lambda *_: None, **dict(
        keras_model=net_file[0], workdir=run_dir, out=str(tmp_path / "clean"),
        branch="clean", formats=["onnx"], pgd_examples=0, n_examples=32))
    assert report["branch"] == "clean" and report["passed"] and report["name"] == "net"
    assert report["pgd20_accuracy"] is None
    assert report["source"]["parity_data"]["dataset"] == "digits"  # the run's test set
    # --dataset replaces the run's test images for a .keras file too.
    npz = str(tmp_path / "mine.npz")
    rng = np.random.default_rng(3)
    np.savez(npz, x_test=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             y_test=rng.integers(0, 10, 8))
    other = exporter.export_run(log=lambda *_: None, **dict(
        keras_model=net_file[0], workdir=run_dir, dataset=npz, out=str(tmp_path / "npz"),
        formats=["onnx"], pgd_examples=0, n_examples=32))
    assert other["passed"] and other["source"]["parity_data"]["dataset"] == npz
    assert other["n_examples"] == 8
    assert sorted(os.listdir(tmp_path / "clean")) == ["export_report.json", "model.onnx"]
    x = np.random.default_rng(4).uniform(0, 1, (5, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(OnnxRunner(str(tmp_path / "clean" / "model.onnx"))(x),
                               net_file[1](x, training=False, branch="clean").numpy(),
                               atol=ATOL, rtol=0)


@pytest.mark.slow
def test_checkpoint_export_or_refusal(run_dir, tmp_path):
    """Export from the last and from a named checkpoint, checked against load_run."""
    from keras_arat import runs
    ckpt = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "epoch-*")))[-1]
    names = [n for n, _ in __import__("tensorflow").train.list_variables(
        os.path.join(ckpt, "ckpt"))]
    # Every network weight, BN moving statistics of both branches included, is saved.
    assert len([n for n in names if "moving_mean" in n and "network" in n]) == 8
    for checkpoint in (None, ckpt):
        args = dict(workdir=run_dir, checkpoint=checkpoint,
                                out=str(tmp_path / "ck"), formats=["onnx"],
                                pgd_examples=0, n_examples=32, overwrite=True)
        report = exporter.export_run(log=lambda *_: None, **args)
        assert report["passed"] and report["source"]["epoch"] == 1
        run = runs.load_run(run_dir, checkpoint)
        x, _ = run.test_arrays(9)
        np.testing.assert_allclose(
            OnnxRunner(str(tmp_path / "ck" / "model.onnx"))(x),
            run.network(x, training=False, branch="adv").numpy(), atol=ATOL, rtol=0)


# --- errors: one line, non-zero exit, nothing written -----------------------------------

@pytest.mark.slow
def test_errors_are_one_line_and_write_nothing(run_dir, net_file, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    shutil.copy(os.path.join(run_dir, "config.json"), empty / "config.json")
    other = tmp_path / "other_arch"
    shutil.copytree(run_dir, other)
    cfg = json.load(open(other / "config.json"))
    cfg["cnn_width"] = 16  # the checkpoint holds a width-8 network
    json.dump(cfg, open(other / "config.json", "w"))
    existing = tmp_path / "exists"
    existing.mkdir()
    seq_file = tmp_path / "seq.keras"
    keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                      keras.layers.Dense(10)]).save(seq_file)
    cases = [
        (dict(workdir=str(empty)), "no complete checkpoint"),
        (dict(workdir=str(other)), "cannot restore checkpoint"),
        (dict(workdir=run_dir, branch="both"), "unknown --branch"),
        (dict(workdir=run_dir, out=str(existing)), "exists; pass --overwrite"),
        (dict(workdir=run_dir, checkpoint=str(tmp_path / "nope")), "not a checkpoint"),
        (dict(workdir=run_dir, formats=["tflite"]), "unknown --formats"),
        (dict(keras_model=str(tmp_path / "absent.keras"), workdir=run_dir), "not a file"),
        (dict(keras_model=str(seq_file), workdir=run_dir), "the images are 32x32x3 but the "
                                                            "network takes 28x28x1"),
        # --overwrite never replaces the run or the file being exported.
        (dict(workdir=str(other), out=str(other), overwrite=True), "holds --workdir"),
        (dict(workdir=str(other), out=str(tmp_path), overwrite=True), "holds --workdir"),
        (dict(keras_model=str(seq_file), out=str(tmp_path), overwrite=True),
         "holds --keras_model"),
    ]
    from keras_arat import errors
    for overrides, message in cases:
        overrides.setdefault("out", str(tmp_path / "out"))
        with pytest.raises((exporter.UsageError, errors.UsageError), match=message):
            exporter.export_run(log=lambda *_: None, **overrides)
        assert not os.path.exists(tmp_path / "out"), overrides
        assert no_leftovers(str(tmp_path / "out"))
    assert os.listdir(existing) == []
    assert os.path.isfile(other / "config.json") and os.path.isfile(seq_file)
    # Through the command line: one "error:" line and nothing else on stderr (no
    # TensorFlow log, no traceback). Errors found before TensorFlow loads are reported
    # with TensorFlow unimportable, which proves they came first.
    (tmp_path / "file.txt").write_text("not a model")
    out = str(tmp_path / "out")
    for args, message, before_tensorflow in [
            ([f"--workdir={other}", f"--out={out}"], "cannot restore checkpoint", False),
            ([f"--workdir={run_dir}", f"--out={existing}"], "exists; pass --overwrite", True),
            ([f"--workdir={run_dir}", f"--out={out}", "--branch=mixed"], "unknown --branch",
             True),
            ([f"--workdir={tmp_path / 'absent'}", f"--out={out}"], "is not a folder", True),
            ([f"--workdir={tmp_path / 'file.txt'}", f"--out={out}"], "is not a folder", True),
            ([f"--keras_model={tmp_path / 'file.txt'}", "--eps=0.3", f"--out={out}"],
             "is not a .keras file", True),
            ([f"--workdir={run_dir}", f"--out={tmp_path / 'file.txt' / 'out'}"],
             "is a file, not a folder", True)]:
        env = without_tensorflow(str(tmp_path)) if before_tensorflow else None
        proc = run_cli("export", *args, env=env)
        assert_error(proc, message)
        assert not os.path.exists(out)
    # Folders missing above --out are made for the export and removed when it fails.
    proc = run_cli("export", f"--keras_model={net_file[0]}", f"--workdir={run_dir}",
                   f"--out={tmp_path / 'new' / 'deeper' / 'out'}", "--atol=1e-15",
                   "--formats=keras", "--pgd_examples=0", "--n_examples=32")
    assert_error(proc, "export check failed: logits differ by", status=1, alone=False)
    assert not os.path.exists(tmp_path / "new")


@pytest.mark.slow
def test_parity_failure_fails_loudly_and_keeps_old_output(run_dir, net_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    with pytest.raises(exporter.ExportCheckError, match="above --atol"):
        exporter.export_run(keras_model=net_file[0], workdir=run_dir, out=str(out),
                            overwrite=True, atol=1e-15, formats=["keras"], pgd_examples=0,
                            n_examples=64, log=lambda *_: None)
    assert os.listdir(out) == ["old.txt"] and no_leftovers(str(out))
    # --overwrite replaces it when the checks pass.
    exporter.export_run(keras_model=net_file[0], workdir=run_dir, out=str(out),
                        overwrite=True, formats=["keras"], pgd_examples=0, n_examples=64,
                        log=lambda *_: None)
    assert sorted(os.listdir(out)) == ["export_report.json", "model.keras"]
    assert no_leftovers(str(out))


def test_output_folder_parents_are_created_but_a_file_in_the_way_is_an_error(tmp_path):
    from keras_arat.export.exporter import UsageError, check_out
    nested = str(tmp_path / "a" / "b" / "out")
    assert check_out(nested, False) == nested
    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError, match="exists; pass --overwrite"):
        check_out(str(tmp_path / "taken"), False)
    assert check_out(str(tmp_path / "taken"), True) == str(tmp_path / "taken")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_out(str(tmp_path / "file" / "sub" / "out"), False)
