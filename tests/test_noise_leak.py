"""--reference_noise_leak: the official AR-AT attack's in-place random start, as an opt-in.

tests/test_torch_equivalence.py proves it against the official code; these tests need
no fixture: what the attack and the ARAT step do with it, and the command line.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from keras_arat.attacks import PGD, core
from keras_arat.training import ARATModel, TorchSGD
from tests import helpers
from tests.test_cli import TINY, run_cli

pytestmark = pytest.mark.slow  # end to end: subprocesses, training, export

EPS = 0.1


def linear_model(z):
    return tf.reduce_mean(z, axis=[1, 2]) * tf.constant([3.0, -2.0, 1.0])


def test_noise_leak_starts_unclipped_and_centres_the_ball_on_its_start():
    """noise_leak starts at x + U(-eps, eps), not clipped to [0,1], and projects onto the
    eps-ball around that start (so up to 2 eps from x); the default stays within eps."""
    x = tf.constant(helpers.tiny_data().test[0][:4])
    y = tf.constant([0, 1, 2, 0])
    seed = tf.constant([5, 7], tf.int64)
    attack = PGD(eps=EPS, step_size=EPS / 4, steps=8, noise_leak=True)
    x_adv, center = attack(linear_model, x, y, seed, return_center=True)
    noise = core.uniform_noise(x, EPS, seed).numpy()
    np.testing.assert_array_equal(center.numpy(), (x + noise).numpy())
    assert center.numpy().min() < 0  # digits have black pixels: the start leaves [0, 1]
    assert np.abs(x_adv.numpy() - center.numpy()).max() <= EPS + 1e-6
    assert 0.0 <= x_adv.numpy().min() and x_adv.numpy().max() <= 1.0
    assert np.abs(x_adv.numpy() - x.numpy()).max() > EPS + 1e-3
    plain, plain_center = dataclasses.replace(attack, noise_leak=False)(
        linear_model, x, y, seed, return_center=True)
    assert plain_center is not None and np.array_equal(plain_center.numpy(), x.numpy())
    assert np.abs(plain.numpy() - x.numpy()).max() <= EPS + 1e-6
    # An explicit start is used as given, and with noise_leak it is the centre.
    start = x + 0.05
    _, c = attack(linear_model, x, y, seed, start=start, return_center=True)
    np.testing.assert_array_equal(c.numpy(), start.numpy())
    with pytest.raises(ValueError, match="noise_leak"):
        PGD(eps=EPS, step_size=EPS / 4, steps=2, init="normal", noise_leak=True)


def test_arat_step_with_the_leak_trains_the_clean_branch_on_the_noisy_batch():
    x, y = helpers.tiny_data().train
    x, y = tf.constant(x[:32]), tf.constant(y[:32])
    network = helpers.new_network(split_bn=True, seed=2)
    trainer = ARATModel(network, eps=EPS, step_size=EPS / 4, attack_steps=2,
                        reference_noise_leak=True)
    trainer.compile(optimizer=TorchSGD(0.01))
    seed = trainer.attack_seed()
    noisy = x + core.uniform_noise(x, EPS, seed)
    _, logs = trainer.losses_for(x, y)
    # The step's clean branch saw the noisy batch (training mode: batch statistics).
    from keras_arat.training.trainers import mean_ce
    want = mean_ce(network(noisy, training=True, branch="clean"), y)
    np.testing.assert_allclose(float(logs["ce_clean"]), float(want), rtol=1e-5)
    clean = mean_ce(network(x, training=True, branch="clean"), y)
    assert abs(float(logs["ce_clean"]) - float(clean)) > 1e-4


def test_cli_records_the_leak_and_refuses_it_for_other_methods(tmp_path):
    workdir = str(tmp_path / "leak")
    proc, _ = run_cli("keras_arat.train", *TINY, "--epochs=1", "--eval_examples=32",
                      "--eval_every_epochs=1", "--eval_examples_during_training=32",
                      "--reference_noise_leak", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(os.path.join(workdir, "config.json")))["reference_noise_leak"]
    # During training and at the end: PGD-20 at eps, and the official code's PGD-20 beside
    # it under a name and settings of its own (its 2-eps ball).
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        during = [r for r in map(json.loads, f) if r.get("split") == "test"]
    assert len(during) == 1 and during[0]["reference_noise_leak"] is True, during
    assert {"pgd20_acc", "pgd20_leak_acc"} <= set(during[0])
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["reference_noise_leak"] is True
    assert results["attacks"]["pgd20"]["reference_noise_leak"] is False
    leak = results["attacks"]["pgd20-leak"]
    assert leak["reference_noise_leak"] is True
    assert leak["ball_radius"] == pytest.approx(2 * results["eps"])
    assert 0.0 <= results["pgd20_leak_acc"] <= results["clean_acc"]
    # evaluate adds pgd20-leak for such a run unless told otherwise, never in place of pgd20
    for flag, leak in (("--reference_noise_leak", True), ("--noreference_noise_leak", False),
                       (None, True)):
        proc, _ = run_cli("keras_arat.evaluate", f"--workdir={workdir}", "--n_examples=32",
                          "--attacks=clean,pgd20", *([flag] if flag else []), "--noprogress")
        assert proc.returncode == 0, proc.stderr[-3000:]
        (entry,) = json.loads(proc.stdout)["evaluated"]
        assert list(entry["accuracy"]) == (["clean", "pgd20", "pgd20-leak"] if leak
                                           else ["clean", "pgd20"])
    assert json.load(open(os.path.join(workdir, "results.json"))) == results  # untouched
    record = json.load(open(os.path.join(workdir, entry["record"])))
    leaks = sorted(r["settings"]["reference_noise_leak"] for r in record["results"]
                   if r["attack"].startswith("pgd20"))
    assert leaks == [False, True]  # two figures side by side, each labelled
    proc, _ = run_cli("keras_arat.train", *TINY, "--epochs=1", "--method=pgd_at",
                      "--reference_noise_leak", f"--workdir={tmp_path / 'other'}")
    assert proc.returncode == 2
    assert "--reference_noise_leak reproduces the official AR-AT training attack" in \
        proc.stderr
    assert not (tmp_path / "other").exists()
