"""tf.distribute: two logical CPU devices train on the same global batch as one device."""

import os
import subprocess
import sys

from tests.test_cli import ROOT

SCRIPT = r'''
import numpy as np, tensorflow as tf
cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
from keras_arat.layers import split_batch_norm
from keras_arat.training import ARATModel, TorchSGD
from tests import helpers
x, y = helpers.tiny_data().train
ds = tf.data.Dataset.from_tensor_slices((x[:64], y[:64])).batch(64)
def make(strategy):
    split_batch_norm.SYNCHRONIZED_DEFAULT = strategy.num_replicas_in_sync > 1
    with strategy.scope():
        net = helpers.new_network(split_bn=True, seed=1)
        trainer = ARATModel(net, eps=0.3, step_size=0.1, attack_steps=2)
        trainer.compile(optimizer=TorchSGD(0.05))
    return trainer
one = make(tf.distribute.get_strategy())
two = make(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
assert two.distribute_strategy.num_replicas_in_sync == 2
for a, b in zip(one.weights, two.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
h1 = one.fit(ds, epochs=1, verbose=0, shuffle=False).history
h2 = two.fit(ds, epochs=1, verbose=0, shuffle=False).history
for key in ("loss", "ce_adv", "ce_clean", "invariance", "train_acc", "train_acc_clean"):
    np.testing.assert_allclose(h2[key][0], h1[key][0], rtol=1e-4, err_msg=key)
shared = [(a, b) for a, b in zip(one.network.weights, two.network.weights)]
for a, b in shared:
    np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-3, err_msg=a.path)
print("DISTRIBUTE-OK")
'''


def test_two_logical_devices_match_one_device():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert "DISTRIBUTE-OK" in proc.stdout, proc.stderr[-3000:]


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
