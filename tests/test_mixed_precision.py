"""--mixed_precision: low-precision compute, float32 weights, logits and attack arithmetic."""

import json
import os

import pytest

from keras_arat import config, runs
from keras_arat.config import RunConfig
from tests.cli import run_cli
from tests.test_cli import TINY

# A global dtype policy must not leak into other tests: each check runs in its own process.
SCRIPT = r'''
import sys
import keras, numpy as np, tensorflow as tf
keras.mixed_precision.set_dtype_policy(sys.argv[1])
from keras_arat.training import ARATModel, TorchSGD
from tests import helpers
compute = keras.mixed_precision.dtype_policy().compute_dtype
x, y = helpers.tiny_data().train
x, y = x[:64], y[:64]
net = helpers.new_network(split_bn=True, seed=1)
trainer = ARATModel(net, eps=0.3, step_size=0.1, attack_steps=3)
trainer.compile(optimizer=TorchSGD(0.05))
assert all(v.dtype == "float32" for v in trainer.weights), "weights must stay float32"
logits, feats = net(x, training=False, return_features=True)
assert logits.dtype == tf.float32, logits.dtype
assert any(t.dtype == compute for t in feats.values()), [t.dtype for t in feats.values()]
x_adv = trainer.adversarial(tf.constant(x), tf.constant(y))
assert x_adv.dtype == tf.float32, x_adv.dtype
delta = np.abs(x_adv.numpy() - x).max()
assert delta <= 0.3 + 1e-6, delta
assert delta > 0.25, delta  # three steps of 0.1 reach the ball's surface
assert x_adv.numpy().min() >= 0.0 and x_adv.numpy().max() <= 1.0
before = [w.numpy().copy() for w in net.trainable_weights]
ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat(20)
trainer.fit(ds, epochs=1, verbose=0)
moved = max(float(np.abs(w.numpy() - b).max()) for w, b in zip(net.trainable_weights, before))
assert moved > 0, "no step was applied"
assert all(np.isfinite(w.numpy()).all() for w in trainer.weights)
print("MIXED-OK", compute, type(trainer.optimizer).__name__)
'''


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_policy_keeps_float32_weights_logits_and_attack(policy):
    proc = run_cli("-c", SCRIPT, policy, timeout=300)
    assert "MIXED-OK" in proc.stdout, proc.stderr[-3000:]
    compute = policy.split("_")[1]
    assert f"MIXED-OK {compute}" in proc.stdout
    if policy == "mixed_float16":  # float16 needs loss scaling; bfloat16 does not
        assert "LossScaleOptimizer" in proc.stdout
    else:
        assert "LossScaleOptimizer" not in proc.stdout


@pytest.mark.slow
def test_cli_bfloat16_run_trains_and_evaluates_in_float32(tmp_path):
    import numpy as np
    workdir = str(tmp_path / "bf16")
    proc = run_cli("keras_arat.train", *TINY, "--epochs=2", "--mixed_precision=bfloat16",
                      "--swa", "--swa_start_epoch=2", "--swa_every_steps=1",
                      "--eval_examples=64", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixed precision: mixed_bfloat16" in proc.stdout
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_records = [r for r in records if "loss" in r]
    assert len(train_records) == 2
    assert all(0 < r["loss"] < 100 for r in train_records)
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert 0.0 <= results["pgd20_acc"] <= results["clean_acc"] <= 1.0
    # The SWA checkpoint holds the averaged float32 weights that were evaluated.
    assert results["swa"]["n_averaged"] == 4  # epoch 2's four steps
    run = runs.load_run(workdir, os.path.join(workdir, results["swa"]["checkpoint"]))
    x, y = run.test_arrays(64)
    logits = run.network(x, training=False, branch="adv").numpy()
    acc = float(np.mean(logits.argmax(-1) == y))
    assert abs(acc - results["swa"]["clean_acc"]) <= 1 / 64, (acc, results["swa"])
    last = runs.load_run(workdir, os.path.join(workdir, "checkpoints", "epoch-0002"))
    gap = max(float(np.abs(a.numpy() - b.numpy()).max())
              for a, b in zip(run.network.trainable_weights, last.network.trainable_weights))
    assert gap > 1e-4, "the SWA checkpoint holds the last weights, not their average"


def test_mixed_precision_cannot_change_on_resume():
    assert "mixed_precision" not in config.RESUMABLE_CHANGES  # the optimizer state differs


def test_auto_policy(monkeypatch):
    import tensorflow as tf
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    monkeypatch.setattr(runs, "cpu_has_bfloat16", lambda: True)
    assert config.precision_policy(RunConfig(mixed_precision="auto")) is None  # float32 on a CPU
    assert config.precision_policy(RunConfig(mixed_precision="off")) is None
    assert config.precision_policy(RunConfig(mixed_precision="bfloat16")) == "mixed_bfloat16"
    assert config.precision_policy(RunConfig(mixed_precision="float16")) == "mixed_float16"
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"])
    assert config.precision_policy(RunConfig(mixed_precision="auto")) == "mixed_float16"


def test_attack_losses_and_margins_are_float32_for_float16_logits():
    """Every attack loss and margin reads float16 logits as float32: the margins' 1e9 mask
    is inf in float16 (inf * 0 = NaN there), and a confident prediction's softmax rounds
    its other classes to 0."""
    import numpy as np
    import tensorflow as tf

    from keras_arat.attacks import core
    logits = tf.constant([[12.0, -3.0, 1.5, 0.0], [0.5, 9.0, -1.0, 2.0]], tf.float16)
    labels = tf.constant([0, 1], tf.int64)
    target = tf.constant([2, 3], tf.int64)
    outputs = {"cross_entropy": core.cross_entropy(logits, labels),
               "cw_margin": core.cw_margin(logits, labels),
               "true_margin": core.true_margin(logits, labels),
               "dlr": core.dlr(logits, labels),
               "targeted_dlr": core.targeted_dlr(logits, labels, target),
               "kl_to_target": core.kl_to_target(logits, tf.nn.softmax(tf.cast(logits,
                                                                                tf.float32)))}
    for name, value in outputs.items():
        assert value.dtype == tf.float32, name
        assert np.all(np.isfinite(value.numpy())), (name, value.numpy())
    np.testing.assert_allclose(outputs["cw_margin"].numpy(), [-10.5, -7.0])
    np.testing.assert_allclose(outputs["kl_to_target"].numpy(), [0.0, 0.0], atol=1e-6)


# An overconfident user model under mixed_float16, and the same weights in float32: a
# Sequential (conv, BatchNormalization, dense) trained on the digits, its last layer then
# scaled by 16, so that a confident prediction's cross-entropy gradient (~1e-12) is zero
# in float16.
OVERCONFIDENT = r'''
import keras, numpy as np, tensorflow as tf
from keras_arat.attacks import PGD, Square, core, run_attack
from tests import helpers

def build():
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(8, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(), keras.layers.Flatten(), keras.layers.Dense(10)])

keras.mixed_precision.set_dtype_policy("mixed_float16")
keras.utils.set_random_seed(0)
x, y = helpers.tiny_data().train
xt, yt = helpers.tiny_data().test
half = build()
half.compile(optimizer=keras.optimizers.Adam(1e-3),
             loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
half.fit(x, y, batch_size=64, epochs=5, verbose=0)
kernel, bias = half.layers[-1].get_weights()
half.layers[-1].set_weights([16 * kernel, 16 * bias])
keras.mixed_precision.set_dtype_policy("float32")
full = build()
full.set_weights(half.get_weights())
eps = 0.1
figures = {}
for name, model in (("float16", half), ("float32", full)):
    f = lambda z, model=model: model(z, training=False)
    assert (name == "float16") == (f(xt[:2]).dtype == tf.float16)
    adv = PGD(eps=eps, step_size=eps / 4, steps=10)(
        f, tf.constant(xt), tf.constant(yt), tf.constant([0, 0], tf.int64)).numpy()
    delta = adv - xt
    at_bound = (np.abs(np.abs(delta) - eps) < 1e-3) | (adv <= 1e-6) | (adv >= 1 - 1e-6)
    _, square = run_attack(Square(eps=eps, n_queries=200), f, xt, yt, 256, 0)
    figures[name] = {
        "at_bound": float(at_bound.mean()),
        "cw_finite": bool(np.all(np.isfinite(core.cw_margin(f(xt), yt).numpy()))),
        "clean": float(np.mean(np.argmax(f(xt).numpy(), 1) == yt)),
        "pgd10": float(np.mean(np.argmax(f(adv).numpy(), 1) == yt)),
        "square": float(square.mean())}
print("FIGURES", figures)
'''


@pytest.mark.slow  # 25 s: trains a small model under mixed_float16 in its own process
def test_attacks_on_a_float16_user_model_match_float32():
    """PGD moves the points of an overconfident float16 model (per-example loss scaling),
    CW margins stay finite, Square breaks points, and the figures are those of the same
    weights in float32, within 2 points."""
    proc = run_cli("-c", OVERCONFIDENT, timeout=600)
    assert "FIGURES" in proc.stdout, proc.stderr[-3000:]
    figures = eval(proc.stdout.split("FIGURES", 1)[1].strip())
    print(figures)
    half, full = figures["float16"], figures["float32"]
    assert half["at_bound"] >= 0.9, half  # PGD-10 reached the ball's surface or the box
    assert half["cw_finite"] and full["cw_finite"]
    assert half["square"] < half["clean"] - 0.2, half  # Square breaks an undefended model
    for key in ("clean", "pgd10", "square"):
        assert abs(half[key] - full[key]) <= 0.02, (key, half, full)
