"""SWA: the average is the mean of the snapshots; BN re-estimation of each branch (adv on
PGD examples, clean on the clean images) touches only that branch."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from keras_arat.attacks import PGD
from keras_arat.training.swa import (SWAState, branch_batch_norms, reestimate_bn,
                                     reestimate_branches)
from tests import helpers
from tests.cli import run_cli
from tests.test_cli import TINY


def test_average_equals_mean_of_snapshots():
    variables = [tf.Variable(np.zeros((3, 2), np.float32)), tf.Variable(np.zeros(4, np.float32))]
    state = SWAState(variables)
    rng = np.random.RandomState(0)
    snapshots = []
    for _ in range(5):
        values = [rng.randn(*v.shape).astype(np.float32) for v in variables]
        for v, val in zip(variables, values):
            v.assign(val)
        snapshots.append(values)
        state.update(variables)
    assert int(state.count) == 5
    for i, avg in enumerate(state.averages):
        np.testing.assert_allclose(avg.numpy(), np.mean([s[i] for s in snapshots], 0),
                                   rtol=1e-5, atol=1e-6)
    target = [tf.Variable(tf.zeros_like(v)) for v in variables]
    state.copy_to(target)
    np.testing.assert_array_equal(target[0].numpy(), state.averages[0].numpy())


def test_reestimation_changes_only_adv_statistics_and_averages_batches():
    net = helpers.new_network(split_bn=True)
    x, y = helpers.tiny_data().train
    for _ in range(3):  # give both branches non-trivial statistics
        net(x[:64], training=True, branch="clean")
        net(x[64:128], training=True, branch="adv")
    clean_before = [v.numpy().copy() for bn in branch_batch_norms(net, "clean")
                    for v in (bn.moving_mean, bn.moving_variance)]
    batches = [(tf.constant(x[i:i + 32]), tf.constant(y[i:i + 32])) for i in (0, 32, 64)]
    attack = PGD(eps=0.3, step_size=0.1, steps=2)
    n = reestimate_bn(net, batches, attack, "adv", seed=0)
    assert n == 3
    clean_after = [v.numpy() for bn in branch_batch_norms(net, "clean")
                   for v in (bn.moving_mean, bn.moving_variance)]
    for a, b in zip(clean_before, clean_after):
        np.testing.assert_array_equal(a, b)
    # The first BN's statistics must be the equal-weight mean of the three batches'
    # statistics of conv1's output on the same attack examples.
    first_bn = branch_batch_norms(net, "adv")[0]
    estimated = first_bn.moving_mean.numpy().copy()  # read now: attacks below move it
    # Training-mode outputs do not depend on moving statistics, so the attack
    # examples are reproducible here.
    conv1 = net.graph.get_layer("conv1")
    means = []
    for k, (xb, yb) in enumerate(batches):
        x_adv = attack(lambda z: net(z, training=True, branch="adv"), xb, yb,
                       tf.constant([0, k], tf.int64))
        means.append(conv1(x_adv).numpy().mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(estimated, np.mean(means, 0),
                               rtol=1e-4, atol=1e-5)


def test_clean_branch_reestimated_on_clean_images_for_the_averaged_weights():
    """The clean branch's statistics belong to the averaged weights too: re-estimated on
    the clean images (no attack), the equal-weight mean of the batches' statistics, the
    adv branch untouched; reestimate_branches does both, one pass each."""
    net = helpers.new_network(split_bn=True)
    x, y = helpers.tiny_data().train
    for _ in range(3):
        net(x[:64], training=True, branch="clean")
        net(x[64:128], training=True, branch="adv")
    adv_before = [v.numpy().copy() for bn in branch_batch_norms(net, "adv")
                  for v in (bn.moving_mean, bn.moving_variance)]
    batches = [(tf.constant(x[i:i + 32]), tf.constant(y[i:i + 32])) for i in (0, 32, 64)]
    assert reestimate_bn(net, batches, None, "clean") == 3
    for a, bn_vars in zip(adv_before, [v for bn in branch_batch_norms(net, "adv")
                                       for v in (bn.moving_mean, bn.moving_variance)]):
        np.testing.assert_array_equal(a, bn_vars.numpy())
    first = branch_batch_norms(net, "clean")[0]
    conv1 = net.graph.get_layer("conv1")
    outs = [conv1(xb).numpy() for xb, _ in batches]
    np.testing.assert_allclose(first.moving_mean.numpy(),
                               np.mean([o.mean(axis=(0, 1, 2)) for o in outs], 0),
                               rtol=1e-4, atol=1e-5)
    # PyTorch's running variance: each batch's unbiased variance, averaged.
    unbiased = [o.reshape(-1, o.shape[-1]).var(axis=0, ddof=1) for o in outs]
    np.testing.assert_allclose(first.moving_variance.numpy(), np.mean(unbiased, 0),
                               rtol=1e-4, atol=1e-5)
    passes = []

    def batches_fn():
        passes.append(1)
        return batches
    counts = reestimate_branches(net, batches_fn, PGD(eps=0.3, step_size=0.1, steps=1))
    assert counts == {"adv": 3, "clean": 3} and len(passes) == 2
    single = helpers.new_network(split_bn=False)
    assert reestimate_branches(single, batches_fn, PGD(eps=0.3, step_size=0.1, steps=1),
                               split=False) == {"adv": 3}


@pytest.mark.slow
def test_swa_cli_writes_its_checkpoint_and_results(tmp_path):
    workdir = str(tmp_path / "swa")
    proc = run_cli("keras_arat.train", *TINY, "--epochs=2", "--swa", "--swa_start_epoch=2",
                      "--swa_every_steps=2", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(os.path.join(workdir, "results.json")))
    swa = results["swa"]
    assert swa["n_averaged"] == 2  # steps 6 and 8 of 8 (4 per epoch)
    assert swa["bn_reestimation_batches"] == 4 and swa["bn_reestimated"] == ["adv", "clean"]
    for key in ("clean_acc", "pgd20_acc", "clean_acc_clean_branch"):
        assert 0.0 <= swa[key] <= 1.0
    assert os.path.isdir(os.path.join(workdir, swa["checkpoint"]))
    proc = run_cli("keras_arat.train", *TINY, "--epochs=2", "--swa", "--swa_start_epoch=3",
                      f"--workdir={tmp_path}/bad")
    assert proc.returncode == 2 and "nothing would be averaged" in proc.stderr
