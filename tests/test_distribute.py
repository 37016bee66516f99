"""tf.distribute: two logical CPU devices train on the same global batch as one device."""

import os
import subprocess
import sys

from tests.test_cli import ROOT

SCRIPT = r'''
import keras, numpy as np, tensorflow as tf
cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
from keras_arat.attacks import core
from keras_arat.layers.split_batch_norm import SplitBatchNormalization
from keras_arat.training import ARATModel
from tests import helpers
x, y = helpers.tiny_data().train
x, y = x[:64], y[:64]
ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

def make(strategy, fixed_attack=False, attack_steps=2, dtype="float32"):
    # No setting anywhere: the split layers (synchronized=None) reduce their batch
    # statistics across replicas because the strategy runs two.
    keras.config.set_dtype_policy(dtype)  # float64: weights, activations and losses
    try:
        with strategy.scope():
            net = helpers.new_network(split_bn=True, seed=1)
            trainer = ARATModel(net, eps=0.3, step_size=0.1, attack_steps=attack_steps)
            # plain SGD at lr 1: one step moves every weight by exactly minus its gradient
            trainer.compile(optimizer=keras.optimizers.SGD(1.0))
    finally:
        keras.config.set_dtype_policy("float32")
    assert all(w.dtype == dtype for w in trainer.weights if w.dtype.startswith("float"))
    assert all(layer.synchronized is None for layer in net.graph.layers
               if isinstance(layer, SplitBatchNormalization))
    if fixed_attack:  # a smooth function of x in place of PGD: see part 2 for why
        trainer.adversarial = lambda x_, y_, branch="adv": tf.clip_by_value(
            x_ + 0.2 * tf.sin(40.0 * x_ + 1.0), 0.0, 1.0)
    return trainer

def one_step_each(fixed_attack, dtype="float32"):
    one = make(tf.distribute.get_strategy(), fixed_attack, dtype=dtype)
    two = make(mirrored, fixed_attack, dtype=dtype)
    assert two.distribute_strategy.num_replicas_in_sync == 2
    start = [w.numpy().copy() for w in one.weights]
    for a, b in zip(one.weights, two.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    data = tf.data.Dataset.from_tensor_slices((x.astype(dtype), y)).batch(64)
    h1 = one.fit(data, epochs=1, verbose=0, shuffle=False).history
    h2 = two.fit(data, epochs=1, verbose=0, shuffle=False).history
    return one, two, start, h1, h2

# 1. Same adversarial batch: the distributed step computes the one-device step.
# Synchronized BN sums its statistics in another order, and BN's backward pass amplifies
# that rounding in the network's gradients: measured 1.2e-3 of their norm in float32
# and 6e-13 in float64, so it is rounding and nothing else. Bounds: float64 1e-10;
# float32 5e-3 for the network (4x the measured figure, for CPUs that round otherwise) and
# for all gradients, the predictors' included (measured 1.4e-3: with PyTorch's Linear
# init the predictors' gradients no longer dwarf the network's). The
# logged losses are Keras' float32 metrics whatever the dtype: 1e-5 in float32, 1e-6
# (their own rounding) in float64.
def flat(model, start, keep):  # the gradient (= minus the step) as one vector
    return np.concatenate([(w.numpy() - s).ravel() for w, s in zip(model.weights, start)
                           if w.trainable and keep(w.path)])
gaps = {}
for dtype, loss_rtol, tols in (("float64", 1e-6, (1e-10, 1e-10)),
                               ("float32", 1e-5, (5e-3, 5e-3))):
    one, two, start, h1, h2 = one_step_each(fixed_attack=True, dtype=dtype)
    for key in ("loss", "ce_adv", "ce_clean", "invariance", "train_acc", "train_acc_clean"):
        np.testing.assert_allclose(h2[key][0], h1[key][0], rtol=loss_rtol, err_msg=key)
    print(f"same adversarial batch, {dtype}: loss relative difference "
          f"{abs(h2['loss'][0] - h1['loss'][0]) / abs(h1['loss'][0]):.1e} ({loss_rtol:.0e} allowed)")
    for name, keep, tol in (("network", lambda p: not p.startswith("predictor"), tols[0]),
                            ("all", lambda p: True, tols[1])):
        g1, g2 = flat(one, start, keep), flat(two, start, keep)
        rel = np.linalg.norm(g2 - g1) / np.linalg.norm(g1)
        assert np.linalg.norm(g1) > 0 and rel < tol, (dtype, name, rel, tol)
        gaps[dtype, name] = rel
        print(f"same adversarial batch, {dtype}: {name} gradients differ by {rel:.1e} of "
              f"their norm ({tol:.0e} allowed)")
shrink = gaps['float32', 'network'] / max(gaps['float64', 'network'], 1e-300)
print(f"float64 shrinks the network gradients' gap {shrink:.0e} times")
moving = [(a, b) for a, b in zip(one.weights, two.weights) if "moving" in a.path]
assert moving
for a, b in moving:  # synchronized BN statistics: those of the global batch
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5, err_msg=a.path)
print(f"same adversarial batch: BN moving statistics differ by at most "
      f"{max(np.abs(b.numpy() - a.numpy()).max() for a, b in moving):.1e}")

# 2. The PGD attack itself: each replica starts from its slice of the global batch's
# random start and, with synchronized BN, ascends the same loss. It takes the sign of
# the input gradient, so a pixel whose gradient is ~0 may flip its step on float
# rounding alone: after one step only such pixels may differ (|grad| < 1e-6 of the
# largest); later steps carry a flip on, so after two at most 1% of pixels differ
# (measured with one-pass synchronized BN statistics: 1 pixel, then 0.16%, losses 2e-4;
# with the two-pass ones: no pixel, losses 5e-7), and the losses within 1e-3.
xt, yt = tf.constant(x), tf.constant(y)
batch = next(iter(mirrored.experimental_distribute_dataset(ds)))
for steps in (1, 2):
    one, two = make(tf.distribute.get_strategy(), attack_steps=steps), make(mirrored, attack_steps=steps)
    a1 = tf.function(lambda a, b: one.adversarial(a, b))(xt, yt).numpy()
    per_replica = mirrored.run(tf.function(lambda a, b: two.adversarial(a, b)), args=batch)
    a2 = np.concatenate([t.numpy() for t in mirrored.experimental_local_results(per_replica)])
    assert np.abs(a2 - xt.numpy()).max() <= 0.3 + 1e-6 and a2.min() >= 0 and a2.max() <= 1
    differ = np.abs(a1 - a2) > 1e-6
    if steps == 1:
        begin = core.random_start(xt, 0.3, one.attack_seed())
        with tf.GradientTape() as tape:
            tape.watch(begin)
            logits = one.network(begin, training=one.attack_training, branch="adv")
            loss = tf.reduce_sum(one.attack.loss(logits, yt))
        grad = np.abs(tape.gradient(loss, begin).numpy())
        assert not differ.any() or grad[differ].max() < 1e-6 * grad.max(), grad[differ].max()
        print(f"PGD, 1 step: {differ.sum()} of {differ.size} pixels differ, largest |input "
              f"gradient| there {grad[differ].max() if differ.any() else 0:.1e} (median "
              f"{np.median(grad):.1e}, largest {grad.max():.1e})")
    else:
        assert differ.mean() <= 0.01, differ.mean()
        print(f"PGD, 2 steps: {differ.mean():.2%} of pixels differ (1% allowed)")
one, two, _, h1, h2 = one_step_each(fixed_attack=False)
for key in ("loss", "ce_adv", "ce_clean", "invariance"):
    np.testing.assert_allclose(h2[key][0], h1[key][0], rtol=1e-3, err_msg=key)
print(f"PGD training step: loss relative difference "
      f"{abs(h2['loss'][0] - h1['loss'][0]) / abs(h1['loss'][0]):.1e} (1e-3 allowed)")
print("DISTRIBUTE-OK")
'''


def test_two_logical_devices_match_one_device():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert "DISTRIBUTE-OK" in proc.stdout, proc.stderr[-3000:]
    print(proc.stdout)  # the measured differences, shown with pytest -s


def test_mirrored_cli_trains_and_checkpoints(tmp_path):
    import json

    from tests.test_cli import TINY, run_cli
    workdir = str(tmp_path / "mirrored")
    proc, _ = run_cli("keras_arat.train", *TINY, "--epochs=1", "--strategy=mirrored",
                      "--cpu_devices=2", "--eval_examples=32", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "strategy mirrored: 2 replicas" in proc.stdout
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["epoch-0001"]
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert 0.0 <= results["pgd20_acc"] <= results["clean_acc"] <= 1.0


def free_ports(n):
    import socket
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_workers_train_like_two_mirrored_devices(tmp_path):
    """MultiWorkerMirroredStrategy, two processes on 127.0.0.1: one checkpoint, written
    by the chief; the same figures as two mirrored devices of one process."""
    import json

    from tests.test_cli import TINY, read_jsonl, run_cli
    common = [*TINY, "--epochs=1", "--eval_examples=32"]
    workdir = str(tmp_path / "workers")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    ports = free_ports(2)
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                     "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1",
                   TF_CONFIG=json.dumps(tf_config), TMPDIR=str(scratch))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "keras_arat.train", *common, "--strategy=multi_worker",
             f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "strategy multi_worker: 2 replicas; this is worker 0 (chief)" in outputs[0][0]
    assert "this is worker 1" in outputs[1][0] and "(chief)" not in outputs[1][0]
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["epoch-0001"]
    assert os.listdir(scratch) == []  # the non-chief's private folder is gone

    mirrored = str(tmp_path / "mirrored")
    proc, _ = run_cli("keras_arat.train", *common, "--strategy=mirrored", "--cpu_devices=2",
                      f"--workdir={mirrored}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = read_jsonl(os.path.join(workdir, "metrics.jsonl")), \
        read_jsonl(os.path.join(mirrored, "metrics.jsonl"))
    for key in ("loss", "ce_adv", "ce_clean", "invariance"):
        assert abs(got[0][key] - want[0][key]) <= 1e-5 * abs(want[0][key]), key
    results = [json.load(open(os.path.join(d, "results.json"))) for d in (workdir, mirrored)]
    assert results[0]["clean_acc"] == results[1]["clean_acc"]
    assert results[0]["pgd20_acc"] == results[1]["pgd20_acc"]


def test_multi_worker_needs_tf_config(tmp_path):
    from tests.test_cli import TINY, run_cli
    env_config = os.environ.pop("TF_CONFIG", None)
    try:
        proc, seconds = run_cli("keras_arat.train", *TINY, "--strategy=multi_worker",
                                f"--workdir={tmp_path / 'w'}")
    finally:
        if env_config is not None:
            os.environ["TF_CONFIG"] = env_config
    assert proc.returncode != 0
    assert "--strategy=multi_worker needs TF_CONFIG" in proc.stderr
    assert "Traceback" not in proc.stderr


# The library as a user writes it under strategy.scope(), and what the command line builds
# for the same run (keras_arat.train: the same seed, data pipeline, network, trainer and
# optimizer): one step on the same global batch of 64 on two logical CPU devices.
LIBRARY_RUN = r'''
import json
import keras, tensorflow as tf
cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
import keras_arat
from keras_arat.data import a_prev_batches, load_dataset, make_train_dataset
from keras_arat.training.callbacks import APrevCallback
data = load_dataset("digits", n_train=64, n_test=32)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
keras.utils.set_random_seed(0)
with strategy.scope():
    net = keras_arat.build_model("small_cnn", num_classes=10, width=8, input_shape=(32, 32, 3))
    arat = keras_arat.ARATModel(net, eps=0.3, step_size=0.1, attack_steps=2)
    arat.compile(optimizer=keras_arat.TorchSGD(0.05, momentum=0.9, l2_weight_decay=5e-4))
batches, _ = make_train_dataset(data, 64, 1, 0, crop_padding=2, flip=False)
a_prev = APrevCallback(sample=lambda epoch: a_prev_batches(data, 64, 64, 0, epoch, 2, False))
history = arat.fit(batches, epochs=1, verbose=0, callbacks=[a_prev])
print("HISTORY", json.dumps({k: float(v[0]) for k, v in history.history.items()}))
'''


def test_library_under_a_strategy_scope_trains_as_the_command_line(tmp_path):
    import json

    from tests.test_cli import read_jsonl, run_cli
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", LIBRARY_RUN], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert "HISTORY" in proc.stdout, proc.stderr[-3000:]
    library = json.loads(proc.stdout.split("HISTORY", 1)[1])
    workdir = str(tmp_path / "cli")
    proc, _ = run_cli("keras_arat.train", "--dataset=digits", "--n_train=64", "--n_test=32",
                      "--batch_size=64", "--cnn_width=8", "--eps=0.3", "--step_size=0.1",
                      "--attack_steps=2", "--lr_values=0.05", "--lr_boundaries=", "--epochs=1",
                      "--a_prev_examples=64", "--crop_padding=2", "--flip=false", "--seed=0",
                      "--strategy=mirrored", "--cpu_devices=2", "--eval_examples=32",
                      f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
               if r.get("split", "train") == "train"]
    for key in ("loss", "ce_adv", "ce_clean", "invariance", "a_prev", "train_acc"):
        assert abs(library[key] - line[key]) <= 1e-5 * max(abs(line[key]), 1e-12), \
            (key, library[key], line[key])
