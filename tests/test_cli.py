"""The command line end to end: workdir files, resume, and one-line errors."""

import glob
import json
import os
import re

import pytest

from keras_arat.training.checkpoint import verify
from tests import cli
from tests.cli import ROOT, assert_error  # noqa: F401  ROOT: for test_distribute

TINY = ["--dataset=digits", "--n_train=256", "--n_test=128", "--batch_size=64",
        "--cnn_width=8", "--attack_steps=2", "--eps=0.3", "--step_size=0.1",
        "--lr_values=0.05,0.01", "--lr_boundaries=2", "--a_prev_examples=128",
        "--verbose=2"]


def run_cli(module, *args, **kwargs):
    """(proc, seconds): the form tests/test_distribute.py imports as run_cli (it is being
    changed elsewhere; it can move to tests.cli.run_cli, which this wraps)."""
    proc = cli.run_cli(module, *args, **kwargs)
    return proc, proc.seconds


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run") / "tiny")
    # Piped, as in a log; a progress line at every step (instead of every 10 s).
    proc = cli.run_cli("keras_arat.train", *TINY, "--epochs=2", "--tensorboard_every_steps=2",
                       f"--workdir={workdir}", env={"KERAS_ARAT_PROGRESS_SECONDS": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def scalars(workdir):
    """{tag: [(step, value)]} of a run's TensorBoard events."""
    import tensorflow as tf
    found = {}
    for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                found.setdefault(v.tag, []).append(
                    (event.step, float(tf.make_ndarray(v.tensor))))
    return found


@pytest.mark.slow
def test_training_log_is_quiet_with_a_start_line_and_progress(trained_run):
    workdir, proc = trained_run
    out = proc.stdout.splitlines()
    assert out[0] == (f"training arat in {workdir}: data digits (256 train / 128 test images, "
                      "32x32x3, 10 classes), model small_cnn (split BN), 2 epochs of 4 steps "
                      "(batch 64), eps 0.3")
    assert out[1] == "Epoch 1/2" and "\r" not in proc.stdout + proc.stderr
    err = proc.stderr.splitlines()
    # Progress between Keras' epoch lines: steps 1-3 of 4 (the 4th is Keras' own line).
    steps = [ln for ln in err if ln.startswith("epoch ")]
    assert [ln.split(",")[0] for ln in steps] == [
        f"epoch {e}/2: {s}/4 steps" for e in (1, 2) for s in (1, 2, 3)]
    assert all(", ETA " in ln for ln in steps)
    # Nothing else: no TensorFlow start-up log.
    assert [ln for ln in err if not ln.startswith(("epoch ", "pgd20: "))] == [
        "final evaluation on the first 128 test images, eps 0.3: clean and PGD-20 accuracy of "
        "the adv branch, clean accuracy of the clean branch"]
    assert re.match(r"^pgd20: 128/128 images in \d+ s$", err[-1])


@pytest.mark.slow
def test_tensorboard_has_per_step_points_that_average_to_the_epochs(trained_run):
    workdir, _ = trained_run
    found = scalars(workdir)
    for name in ("loss", "ce_adv", "train_acc", "a_prev"):
        per_step = dict(found[f"train_steps/{name}"])
        assert sorted(per_step) == [2, 4, 6, 8]  # --tensorboard_every_steps=2, 8 steps
        for epoch, value in found[f"train/{name}"]:
            # Two points an epoch, each the mean of its 2 steps: their mean is the epoch's.
            first = 4 * (epoch - 1)
            assert (per_step[first + 2] + per_step[first + 4]) / 2 == pytest.approx(
                value, rel=1e-5, abs=1e-6), name


@pytest.mark.slow
def test_train_writes_every_workdir_file(trained_run):
    workdir, proc = trained_run
    config = json.load(open(os.path.join(workdir, "config.json")))
    for key in ("dataset", "data_dir", "model", "method", "epochs", "batch_size", "lr_values",
                "lr_boundaries", "weight_decay", "eps", "step_size", "attack_steps",
                "invariance_weight", "seed", "workdir", "resume"):
        assert key in config
    assert config["eps"] == pytest.approx(0.3) and config["method"] == "arat"

    lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    train = [ln for ln in lines if ln.get("split", "train") == "train"]
    final = [ln for ln in lines if ln.get("split") == "final"]
    assert [ln["epoch"] for ln in train] == [1, 2]
    assert [ln["step"] for ln in train] == [4, 8]  # 256 images / batch 64
    assert [ln["lr"] for ln in train] == [0.05, 0.05]
    for ln in train:
        for key in ("loss", "a_prev", "train_acc", "train_acc_clean", "ce_adv", "ce_clean",
                    "invariance"):
            assert key in ln
        assert 0.0 <= ln["a_prev"] <= 1.0 and 0.0 <= ln["train_acc"] <= 1.0
    assert train[0]["a_prev"] < 0.5  # random init: about chance level on 10 classes
    assert len(final) == 1 and final[0]["n_examples"] == 128 and final[0]["epoch"] == 2

    events = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert events
    import tensorflow as tf
    tags = set()
    for path in events:
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    assert {"train/loss", "train/a_prev", "train/train_acc", "train/attack_eps",
            "final/pgd20_acc"} <= tags

    ckpts = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    assert ckpts == ["epoch-0001", "epoch-0002"]
    assert verify(os.path.join(workdir, "checkpoints", "epoch-0002")) is None

    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["branch"] == "adv" and results["n_examples"] == 128
    assert results["eps"] == pytest.approx(0.3) and results["norm"] == "linf"
    assert results["checkpoint"] == "checkpoints/epoch-0002" and results["epoch"] == 2
    assert results["attacks"]["pgd20"]["steps"] == 20
    assert results["attacks"]["pgd20"]["step_size"] == pytest.approx(0.075)
    for key in ("clean_acc", "clean_acc_clean_branch", "pgd20_acc"):
        assert 0.0 <= results[key] <= 1.0
    assert results["pgd20_acc"] <= results["clean_acc"]
    printed = proc.stdout[proc.stdout.rindex("\n{") + 1:]  # the results, printed last
    assert json.loads(printed)["clean_acc"] == results["clean_acc"]


@pytest.mark.slow
def test_resume_continues_at_the_next_epoch(trained_run):
    workdir, _ = trained_run
    # A run begun before a flag existed resumes: the missing key counts at its default.
    config_path = os.path.join(workdir, "config.json")
    config = json.load(open(config_path))
    del config["mixed_precision"]
    json.dump(config, open(config_path, "w"))
    proc = cli.run_cli("keras_arat.train", *TINY, "--epochs=3", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from epoch 2" in proc.stdout + proc.stderr
    train = [ln for ln in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
             if ln.get("split", "train") == "train"]
    assert [ln["epoch"] for ln in train] == [1, 2, 3]
    assert [ln["step"] for ln in train] == [4, 8, 12]  # optimizer state restored
    assert train[2]["lr"] == 0.01  # schedule continues: epoch 3 is after boundary 2
    assert "epoch-0003" in os.listdir(os.path.join(workdir, "checkpoints"))
    # A different configuration in the same workdir is refused.
    proc = cli.run_cli("keras_arat.train", *TINY, "--epochs=3", "--seed=5",
                      f"--workdir={workdir}")
    assert proc.returncode == 2 and "different configuration" in proc.stderr
    assert "seed" in proc.stderr
    proc = cli.run_cli("keras_arat.train", *TINY, "--epochs=3", "--mixed_precision=bfloat16",
                      f"--workdir={workdir}")
    assert proc.returncode == 2 and "different configuration (mixed_precision)" in proc.stderr
    # --overwrite with flags refused only once the network is built deletes nothing.
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    proc = cli.run_cli("keras_arat.train", *TINY, "--epochs=3", "--overwrite", "--swa",
                       "--swa_every_steps=1000000", f"--workdir={workdir}")
    assert proc.returncode == 2 and "nothing would be averaged" in proc.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
    assert len(read_jsonl(os.path.join(workdir, "metrics.jsonl"))) >= 3
    assert json.load(open(config_path))["seed"] == config["seed"]


def test_a_metrics_line_cut_off_by_a_crash_is_dropped_on_resume(tmp_path):
    from keras_arat.train import trim_metrics
    lines = [{"epoch": 1, "loss": 2.0}, {"split": "test", "epoch": 1, "pgd20_acc": 0.5},
             {"epoch": 2, "loss": 1.5}, {"split": "final", "epoch": 2, "clean_acc": 0.9}]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (tmp_path / "metrics.jsonl").write_text(text + '{"epoch": 3, "lo')  # no space left
    trim_metrics(str(tmp_path), 2)
    assert read_jsonl(tmp_path / "metrics.jsonl") == lines[:3]


@pytest.mark.parametrize("tf_config", ['{"cluster": {"worker": ["a:1"]}, "task": {"index": 0}}',
                                       '{"cluster": [], "task": {"type": "worker", "index": 0}}',
                                       '{"cluster": {"worker": ["a:1"]}}', "[1]", "{"])
def test_a_malformed_tf_config_is_a_usage_error(monkeypatch, tf_config):
    from keras_arat import errors, train
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(errors.UsageError, match="TF_CONFIG is not a valid cluster"):
        train.check_tf_config()


def write_npz(path, **arrays):
    import numpy as np
    np.savez(path, **arrays)
    return path


# (flags, message, before_tensorflow): errors found before TensorFlow loads are reported
# with TensorFlow unimportable (tests/cli.without_tensorflow), which proves they came first.
BAD_TRAIN_INPUT = [
    (["--flagfile=nope.flags"], "flagfile nope.flags not found", True),
    (["--flagfile=quickstart.flags", "--attack_steps=0"], "--attack_steps must be >= 1", True),
    (["--eps=2"], "--eps=2 must be in (0, 1]", True),
    (["--method=fgsm"], "flag --method=fgsm: value should be one of <arat|pgd_at", True),
    (["--step_size=1.5"], "--step_size=1.5 must be in (0, 1]", True),
    (["--dataset=imagenet21k"], "unknown data set 'imagenet21k'", True),
    (["--dataset=npz:{tmp}/missing.npz"], "missing.npz", True),
    (["--dataset=npz:{tmp}/images.npy"], "holds a single array, not an .npz archive", True),
    (["--dataset=npz:{tmp}/notes.npz"], "cannot read", True),
    (["--dataset=npz:{tmp}/float.npz"], "x_train has dtype float32 but images must be uint8",
     True),
    (["--epochs=2", "--eps_warmup_epochs=3"], "--eps_warmup_epochs must be in [0, --epochs=2]",
     True),
    (["--keep_best=pgd20"], "--keep_best=pgd20 needs --eval_every_epochs=N", True),
    (["--tensorboard_every_steps=-1"], "--tensorboard_every_steps must be >= 0", True),
    (["--workdir={tmp}/notes.npz"], "is a file, not a folder", True),
    (["--model=vgg"], "unknown --model=vgg", False),
    (["--dataset=cifar10", "--data_dir={tmp}"], "not prepared", False),
    (["--eval_every_epochs=1", "--eval_during_training_on=holdout", "--n_train=64",
      "--eval_examples_during_training=64"], "leaves no training images", False),
]


@pytest.mark.parametrize("args,message,before_tensorflow", [
    pytest.param(*case, id=case[1], marks=() if case[2] else pytest.mark.slow)
    for case in BAD_TRAIN_INPUT])
def test_bad_input_is_one_line_and_fast(tmp_path, args, message, before_tensorflow):
    import numpy as np
    np.save(tmp_path / "images.npy", np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "notes.npz").write_text("not an archive")
    x = np.zeros((4, 8, 8, 3), np.float32)
    y = np.zeros(4, np.int64)
    write_npz(tmp_path / "float.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = cli.without_tensorflow(str(tmp_path)) if before_tensorflow else None
    proc = cli.run_cli("keras_arat.train", f"--workdir={tmp_path}/w", *args, timeout=120,
                   env=env)
    # Nothing else on stderr either: no TensorFlow start-up log, no traceback.
    assert_error(proc, message)
    assert not os.path.exists(tmp_path / "w")  # nothing written
    assert proc.seconds < (15 if before_tensorflow else 90)


def test_unknown_flag_in_flagfile_is_named(tmp_path):
    flagfile = tmp_path / "bad.flags"
    flagfile.write_text("--epochs=1\n--no_such_flag=3\n")
    proc = cli.run_cli("keras_arat.train", f"--flagfile={flagfile}", f"--workdir={tmp_path}/w",
                   env=cli.without_tensorflow(str(tmp_path)))
    assert_error(proc, f"error: Unknown command line flag 'no_such_flag' (flags from {flagfile} "
                       "and the command line)")


@pytest.mark.slow
def test_evaluate_cli_on_the_run(trained_run):
    workdir, _ = trained_run
    proc = cli.run_cli("keras_arat.evaluate", f"--workdir={workdir}", "--branch=both",
                      "--attacks=clean,pgd20,cw", "--n_examples=64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads(proc.stdout)["evaluated"]
    assert [e["branch"] for e in evaluated] == ["adv", "clean"]
    for entry in evaluated:
        accs = entry["accuracy"]
        assert entry["n_examples"] == 64
        assert set(accs) == {"clean", "pgd20", "cw", "worst_case"}
        assert accs["pgd20"] <= accs["clean"] and accs["cw"] <= accs["clean"]
        assert accs["worst_case"] <= min(accs["pgd20"], accs["cw"])
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["n_examples"] == 128  # training's figures keep their own label
    proc = cli.run_cli("keras_arat.evaluate", f"--workdir={workdir}/nope")
    assert_error(proc, f"--workdir={workdir}/nope is not a folder")


@pytest.mark.slow
def test_evaluation_during_training_and_the_best_checkpoint(tmp_path):
    workdir = str(tmp_path / "best")
    proc = cli.run_cli("keras_arat.train", *TINY, "--epochs=3", "--eval_every_epochs=2",
                      "--eval_examples_during_training=64", "--eval_during_training_on=holdout",
                      "--keep_best=pgd20", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    train = [ln for ln in lines if ln.get("split", "train") == "train"]
    assert [ln["step"] for ln in train] == [3, 6, 9]  # 256 - 64 held out = 3 batches of 64
    tests = [ln for ln in lines if ln.get("split") == "test"]
    assert [ln["epoch"] for ln in tests] == [2, 3]  # every 2 epochs, and after the last
    for ln in tests:
        assert ln["n_examples"] == 64 and ln["data"] == "holdout"
        assert ln["eps"] == pytest.approx(0.3)  # the full eps, not the training one
        assert 0 <= ln["pgd20_acc"] <= ln["clean_acc"] <= 1
    best = max(tests, key=lambda ln: (ln["pgd20_acc"], -ln["epoch"]))
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["best"]["epoch"] == best["epoch"]
    assert results["best"]["pgd20_acc"] == best["pgd20_acc"]
    assert results["best"]["checkpoint"] == f"checkpoints/best-{best['epoch']:04d}"
    assert verify(os.path.join(workdir, results["best"]["checkpoint"])) is None
    import tensorflow as tf
    tags = {v.tag for path in glob.glob(os.path.join(workdir, "tensorboard", "events.*"))
            for event in tf.compat.v1.train.summary_iterator(path) for v in event.summary.value}
    assert {"test/clean_acc", "test/pgd20_acc"} <= tags
    # evaluate and export take --checkpoint=best
    proc = cli.run_cli("keras_arat.evaluate", f"--workdir={workdir}", "--checkpoint=best",
                      "--attacks=clean", "--n_examples=32", "--noprogress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (entry,) = json.loads(proc.stdout)["evaluated"]
    assert entry["checkpoint"] == results["best"]["checkpoint"]
    assert entry["epoch"] == best["epoch"]
    out = str(tmp_path / "export")
    proc = cli.run_cli("export", f"--workdir={workdir}", "--checkpoint=best", f"--out={out}",
                      "--formats=onnx", "--n_examples=32", "--pgd_examples=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(os.path.join(out, "export_report.json")))
    assert report["source"]["checkpoint"].endswith(f"best-{best['epoch']:04d}")
    # Without a best checkpoint, asking for one is one line.
    proc = cli.run_cli("keras_arat.evaluate", f"--workdir={workdir}", "--checkpoint=swa")
    assert proc.returncode == 2 and "no swa checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_damaged_latest_checkpoint_is_named_and_the_previous_one_resumed(trained_run,
                                                                          tmp_path):
    import shutil
    source, _ = trained_run
    workdir = str(tmp_path / "copy")
    shutil.copytree(source, workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    latest = max(n for n in os.listdir(checkpoints) if n.startswith("epoch-"))
    data = [n for n in os.listdir(os.path.join(checkpoints, latest)) if ".data-" in n][0]
    with open(os.path.join(checkpoints, latest, data), "r+b") as f:
        f.truncate(100)  # a half-copied file
    epoch = int(latest[-4:])
    proc = cli.run_cli("keras_arat.train", *TINY, f"--epochs={epoch}", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint {os.path.join(checkpoints, latest)} is damaged" in proc.stderr
    assert f"from epoch {epoch - 1}" in proc.stdout
    # the damaged epoch was trained again and its checkpoint rewritten intact
    from keras_arat.training.checkpoint import verify
    assert verify(os.path.join(checkpoints, latest)) is None
