"""No lost training: atomic, verified checkpoints; NaN handling; kill -9 and resume."""

import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import tensorflow as tf

from keras_arat.training.checkpoint import CheckpointManager, verify
from tests.cli import run_cli, start_cli
from tests.test_cli import TINY, read_jsonl


def small_state():
    module = tf.Module()
    module.w = tf.Variable(np.arange(6, dtype=np.float32))
    return module


def test_damaged_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    module = small_state()
    manager = CheckpointManager(str(tmp_path), module=module)
    manager.save(1)
    module.w.assign(module.w * 2)
    path2 = manager.save(2)
    data = [n for n in os.listdir(path2) if n.startswith("ckpt.data")][0]
    with open(os.path.join(path2, data), "r+b") as f:
        f.truncate(8)
    assert "checksum mismatch" in verify(path2) or "missing" in verify(path2)
    epoch, path = manager.latest()
    assert epoch == 1 and path.endswith("epoch-0001")
    module.w.assign(tf.zeros(6))
    manager.restore(path)
    np.testing.assert_array_equal(module.w.numpy(), np.arange(6, dtype=np.float32))
    os.remove(os.path.join(path, "manifest.json"))
    assert manager.latest() is None


def test_a_failed_write_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    module = small_state()
    manager = CheckpointManager(str(tmp_path), module=module)
    manager.save(1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager.checkpoint, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        manager.save(2)
    assert sorted(os.listdir(tmp_path)) == ["epoch-0001"]
    assert manager.latest()[0] == 1


def test_keeps_only_the_newest_checkpoints(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep=2, module=small_state())
    for epoch in range(1, 5):
        manager.save(epoch)
    assert sorted(os.listdir(tmp_path)) == ["epoch-0003", "epoch-0004"]


def test_best_checkpoints_survive_a_kill_between_best_and_epoch(tmp_path):
    module = small_state()
    manager = CheckpointManager(str(tmp_path), module=module)
    manager.save(1, prefix="best")
    manager.save(1)
    manager.save(2, prefix="best")  # a new best, then the run is killed before epoch-0002
    assert [e for e, _ in manager.folders("best")] == [2, 1]
    manager.discard_after(1, "best")  # what resuming from epoch-0001 does
    assert [e for e, _ in manager.folders("best")] == [1]
    manager.save(2, prefix="best")
    manager.save(2)  # the epoch passes the newest best: older ones go
    assert [e for e, _ in manager.folders("best")] == [2]
    manager.save(3)
    assert [e for e, _ in manager.folders("best")] == [2]
    assert sorted(os.listdir(tmp_path)) == ["best-0002", "epoch-0001", "epoch-0002",
                                            "epoch-0003"]


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    proc = run_cli("keras_arat.train", *TINY, "--epochs=2", "--lr_values=1e30,1e30",
                      f"--workdir={workdir}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    error = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(error) == 1 and "loss became" in error[0] and "at step" in error[0]
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "epoch-0001"))
    assert not os.path.exists(os.path.join(workdir, "results.json"))


@pytest.mark.slow
def test_nan_in_a_later_epoch_keeps_the_previous_checkpoint_intact(tmp_path):
    # Epoch 1 trains at a sane rate; from epoch 2 on the rate diverges (4 steps an epoch).
    workdir = str(tmp_path / "late_nan")
    proc = run_cli("keras_arat.train", *TINY, "--epochs=3", "--lr_values=0.05,1e30",
                      "--lr_boundaries=1", f"--workdir={workdir}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    error = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(error) == 1, proc.stderr[-2000:]
    step = int(re.search(r"at step (\d+) \(epoch 2, batch \d\)", error[0]).group(1))
    assert 5 <= step <= 8 and "learning rate is likely too high" in error[0]
    checkpoints = os.path.join(workdir, "checkpoints")
    assert sorted(n for n in os.listdir(checkpoints) if n.startswith("epoch-")) == [
        "epoch-0001"]
    assert verify(os.path.join(checkpoints, "epoch-0001")) is None
    for name, value in final_weights(workdir, 1).items():
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            assert np.all(np.isfinite(value)), name
    assert not os.path.exists(os.path.join(workdir, "results.json"))


@pytest.mark.slow
def test_nan_policy_skip_batch_counts_and_continues(tmp_path):
    workdir = str(tmp_path / "skip")
    proc = run_cli("keras_arat.train", *TINY, "--epochs=2", "--lr_values=1e30,1e30",
                      "--nan_policy=skip_batch", f"--workdir={workdir}")
    lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [ln["epoch"] for ln in lines] == [1, 2]  # trained on past the bad batches
    assert 1 <= lines[0]["skipped_batches"] <= 4 and np.isfinite(lines[0]["loss"])
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["epoch-0001",
                                                                       "epoch-0002"]
    # The first step at lr 1e30 left weights whose logits are not finite: the final
    # evaluation says so in one line instead of reporting an accuracy of a broken model.
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "non-finite logits" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(workdir, "results.json"))


def final_weights(workdir, epoch, kind="epoch"):
    reader = tf.train.load_checkpoint(
        os.path.join(workdir, "checkpoints", f"{kind}-{epoch:04d}", "ckpt"))
    names = [n for n in reader.get_variable_to_shape_map() if "OBJECT_GRAPH" not in n]
    return {n: reader.get_tensor(n) for n in names}


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_ends_with_the_same_weights(tmp_path):
    # SWA from epoch 2: the run is killed in epoch 3, so the checkpoint it resumes from
    # carries a non-empty average that must be continued, not restarted.
    # The eps warm-up (2.5 epochs of 16 steps) and the best checkpoint of the evaluations
    # during training must continue exactly where the killed run left them.
    args = [*TINY, "--n_train=1024", "--epochs=4", "--deterministic", "--eval_examples=32",
            "--swa", "--swa_start_epoch=2", "--swa_every_steps=2", "--eps_warmup_epochs=2.5",
            "--eval_every_epochs=1", "--eval_examples_during_training=32",
            "--keep_best=pgd20"]
    straight = str(tmp_path / "straight")
    proc = run_cli("keras_arat.train", *args, f"--workdir={straight}")
    assert proc.returncode == 0, proc.stderr[-2000:]

    killed = str(tmp_path / "killed")
    child = start_cli("keras_arat.train", *args, f"--workdir={killed}",
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = os.path.join(killed, "checkpoints", "epoch-0002")
    deadline = time.time() + 240
    while not os.path.exists(first) and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 3
    assert child.poll() is None, "the run finished before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done = sorted(n for n in os.listdir(os.path.join(killed, "checkpoints"))
                  if n.startswith("epoch-"))
    assert done and done[-1] in ("epoch-0002", "epoch-0003")
    reader = tf.train.load_checkpoint(os.path.join(killed, "checkpoints", done[-1], "ckpt"))
    assert any(n.startswith("swa") for n in reader.get_variable_to_shape_map())

    proc = run_cli("keras_arat.train", *args, f"--workdir={killed}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"from epoch {int(done[-1][-4:])}" in proc.stdout
    a, b = final_weights(straight, 4), final_weights(killed, 4)
    assert a.keys() == b.keys() and len(a) > 20
    assert any(name.startswith("swa") for name in a)
    for name in a:  # model, optimizer, a_prev, step counter, SWA average and count
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)
    metrics = {d: read_jsonl(os.path.join(d, "metrics.jsonl")) for d in (straight, killed)}
    lines = [ln for ln in metrics[killed] if ln.get("split", "train") == "train"]
    assert [ln["epoch"] for ln in lines] == [1, 2, 3, 4]
    # Epoch means of the training eps: steps s = 0..63 use 0.3 * min(1, s / 40).
    expected = [0.3 * np.mean(np.minimum(1.0, np.arange(16 * e, 16 * e + 16) / 40.0))
                for e in range(4)]
    for d in (straight, killed):
        train = [ln for ln in metrics[d] if ln.get("split", "train") == "train"]
        np.testing.assert_allclose([ln["attack_eps"] for ln in train], expected, atol=1e-6)
    tests = {d: [{k: v for k, v in ln.items() if k != "eval_time_s"} for ln in metrics[d]
                 if ln.get("split") == "test"] for d in (straight, killed)}
    assert [ln["epoch"] for ln in tests[killed]] == [1, 2, 3, 4]
    assert tests[straight] == tests[killed]
    ra = json.load(open(os.path.join(straight, "results.json")))
    rb = json.load(open(os.path.join(killed, "results.json")))
    assert ra["clean_acc"] == rb["clean_acc"] and ra["pgd20_acc"] == rb["pgd20_acc"]
    best = max(tests[straight], key=lambda ln: (ln["pgd20_acc"], -ln["epoch"]))
    assert ra["best"] == rb["best"] and ra["best"]["epoch"] == best["epoch"]
    assert ra["best"]["pgd20_acc"] == best["pgd20_acc"]
    for d in (straight, killed):
        assert sorted(n for n in os.listdir(os.path.join(d, "checkpoints"))
                      if n.startswith("best-")) == [f"best-{best['epoch']:04d}"]
    a, b = (final_weights(d, best["epoch"], "best") for d in (straight, killed))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)
    assert ra["swa"]["n_averaged"] == rb["swa"]["n_averaged"] == 3 * 16 // 2
    assert ra["swa"] == rb["swa"]
    sa, sb = (tf.train.load_checkpoint(os.path.join(d, "checkpoints", "swa-0004", "ckpt"))
              for d in (straight, killed))
    for name in sa.get_variable_to_shape_map():  # the averaged, re-estimated model
        if "OBJECT_GRAPH" not in name:
            np.testing.assert_allclose(sa.get_tensor(name), sb.get_tensor(name), rtol=0,
                                       atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_full_disk_is_one_line_and_the_same_command_completes_once_freed(tmp_path):
    disk = tmp_path / "small_disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.strip()}")
    try:
        workdir = str(disk / "run")
        args = [*TINY, "--epochs=2", "--eval_examples=32", f"--workdir={workdir}"]
        proc = run_cli("keras_arat.train", *args)
        assert proc.returncode == 1
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: No space left on device (")
        assert "epoch-0001" in last and "run the same command again" in last
        assert "Traceback" not in proc.stderr
        # nothing half-written: no temporary or partial checkpoint folder remains
        assert os.listdir(os.path.join(workdir, "checkpoints")) == []
        assert json.load(open(os.path.join(workdir, "config.json")))["epochs"] == 2

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        proc = run_cli("keras_arat.train", *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == \
            ["epoch-0001", "epoch-0002"]
        lines = [ln for ln in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
                 if ln.get("split", "train") == "train"]
        assert [ln["epoch"] for ln in lines] == [1, 2]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
