"""The command line end to end: workdir files, resume, and one-line errors."""

import glob
import json
import os
import subprocess
import sys
import time

import pytest

from keras_arat.training.checkpoint import verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset=digits", "--n_train=256", "--n_test=128", "--batch_size=64",
        "--cnn_width=8", "--attack_steps=2", "--eps=0.3", "--step_size=0.1",
        "--lr_values=0.05,0.01", "--lr_boundaries=2", "--a_prev_examples=128",
        "--verbose=2"]


def run_cli(module, *args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1")
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - start


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run") / "tiny")
    proc, _ = run_cli("keras_arat.train", *TINY, "--epochs=2", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


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


def test_resume_continues_at_the_next_epoch(trained_run):
    workdir, _ = trained_run
    # A run begun before a flag existed resumes: the missing key counts at its default.
    config_path = os.path.join(workdir, "config.json")
    config = json.load(open(config_path))
    del config["mixed_precision"]
    json.dump(config, open(config_path, "w"))
    proc, _ = run_cli("keras_arat.train", *TINY, "--epochs=3", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from epoch 2" in proc.stdout + proc.stderr
    train = [ln for ln in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
             if ln.get("split", "train") == "train"]
    assert [ln["epoch"] for ln in train] == [1, 2, 3]
    assert [ln["step"] for ln in train] == [4, 8, 12]  # optimizer state restored
    assert train[2]["lr"] == 0.01  # schedule continues: epoch 3 is after boundary 2
    assert "epoch-0003" in os.listdir(os.path.join(workdir, "checkpoints"))
    # A different configuration in the same workdir is refused.
    proc, _ = run_cli("keras_arat.train", *TINY, "--epochs=3", "--seed=5",
                      f"--workdir={workdir}")
    assert proc.returncode == 2 and "different configuration" in proc.stderr
    assert "seed" in proc.stderr
    proc, _ = run_cli("keras_arat.train", *TINY, "--epochs=3", "--mixed_precision=bfloat16",
                      f"--workdir={workdir}")
    assert proc.returncode == 2 and "different configuration (mixed_precision)" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--flagfile=nope.flags"], "flagfile nope.flags not found"),
    (["--flagfile=quickstart.flags", "--attack_steps=0"], "--attack_steps must be >= 1"),
    (["--eps=2"], "--eps=2 must be in (0, 1]"),
    (["--model=vgg"], "unknown --model=vgg"),
    (["--method=fgsm"], "flag --method=fgsm: value should be one of <arat|pgd_at"),
    (["--step_size=1.5"], "--step_size=1.5 must be in (0, 1]"),
    (["--dataset=imagenet21k"], "unknown data set 'imagenet21k'"),
    (["--dataset=cifar10", "--data_dir={tmp}"], "not prepared"),
    (["--dataset=npz:{tmp}/missing.npz"], "missing.npz"),
    (["--epochs=2", "--eps_warmup_epochs=3"], "--eps_warmup_epochs must be in [0, --epochs=2]"),
    (["--keep_best=pgd20"], "--keep_best=pgd20 needs --eval_every_epochs=N"),
    (["--eval_every_epochs=1", "--eval_during_training_on=holdout", "--n_train=64",
      "--eval_examples_during_training=64"], "leaves no training images"),
])
def test_bad_input_is_one_line_and_fast(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc, seconds = run_cli("keras_arat.train", f"--workdir={tmp_path}/w", *args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert seconds < 60


def test_unknown_flag_in_flagfile_is_named(tmp_path):
    flagfile = tmp_path / "bad.flags"
    flagfile.write_text("--epochs=1\n--no_such_flag=3\n")
    proc, seconds = run_cli("keras_arat.train", f"--flagfile={flagfile}",
                            f"--workdir={tmp_path}/w")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: Unknown command line flag 'no_such_flag' (flags from {flagfile} "
                     "and the command line)"], proc.stderr
    assert seconds < 30


def test_evaluate_cli_on_the_run(trained_run):
    workdir, _ = trained_run
    proc, _ = run_cli("keras_arat.evaluate", f"--workdir={workdir}", "--branch=both",
                      "--attacks=clean,pgd20,cw", "--n_examples=64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads(proc.stdout)["evaluated"]
    assert [e["branch"] for e in evaluated] == ["adv", "clean"]
    for entry in evaluated:
        accs = entry["accuracy"]
        assert entry["n_examples"] == 64 and set(accs) == {"clean", "pgd20", "cw"}
        assert accs["pgd20"] <= accs["clean"] and accs["cw"] <= accs["clean"]
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["n_examples"] == 128  # training's figures keep their own label
    proc, _ = run_cli("keras_arat.evaluate", f"--workdir={workdir}/nope")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert "config.json not found" in proc.stderr and "Traceback" not in proc.stderr


def test_evaluation_during_training_and_the_best_checkpoint(tmp_path):
    workdir = str(tmp_path / "best")
    proc, _ = run_cli("keras_arat.train", *TINY, "--epochs=3", "--eval_every_epochs=2",
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
    proc, _ = run_cli("keras_arat.evaluate", f"--workdir={workdir}", "--checkpoint=best",
                      "--attacks=clean", "--n_examples=32", "--noprogress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (entry,) = json.loads(proc.stdout)["evaluated"]
    assert entry["checkpoint"] == results["best"]["checkpoint"]
    assert entry["epoch"] == best["epoch"]
    out = str(tmp_path / "export")
    proc, _ = run_cli("export", f"--workdir={workdir}", "--checkpoint=best", f"--out={out}",
                      "--formats=onnx", "--n_examples=32", "--pgd_examples=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(os.path.join(out, "export_report.json")))
    assert report["source"]["checkpoint"].endswith(f"best-{best['epoch']:04d}")
    # Without a best checkpoint, asking for one is one line.
    proc, _ = run_cli("keras_arat.evaluate", f"--workdir={workdir}", "--checkpoint=swa")
    assert proc.returncode == 2 and "no swa checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


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
    proc, _ = run_cli("keras_arat.train", *TINY, f"--epochs={epoch}", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint {os.path.join(checkpoints, latest)} is damaged" in proc.stderr
    assert f"from epoch {epoch - 1}" in proc.stdout
    # the damaged epoch was trained again and its checkpoint rewritten intact
    from keras_arat.training.checkpoint import verify
    assert verify(os.path.join(checkpoints, latest)) is None
