"""The trainers and attacks as a Keras user meets them: evaluate() and validation, Keras'
callbacks, sample and class weights, the user's BatchNormalization settings, saving and
loading, and attacks called on any model."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_arat.layers.split_batch_norm import SplitBatchNormalization
from keras_arat.network import to_split_bn
from keras_arat.training import ARATModel, TorchSGD
from tests import helpers


def bn_model(**bn):
    images = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, use_bias=False)(images)
    x = keras.layers.BatchNormalization(name="bn", **bn)(x)
    x = keras.layers.GlobalAveragePooling2D(name="pooled")(keras.layers.ReLU()(x))
    return keras.Model(images, keras.layers.Dense(3)(x))


def test_to_split_bn_keeps_every_batch_norm_setting():
    model = bn_model(momentum=0.95, epsilon=1e-4, center=False, scale=True,
                     gamma_initializer="glorot_uniform",
                     gamma_regularizer=keras.regularizers.L2(0.01),
                     gamma_constraint=keras.constraints.NonNeg(), synchronized=True)
    model.get_layer("bn").trainable = False
    split = to_split_bn(model).graph.get_layer("bn")
    assert isinstance(split, SplitBatchNormalization) and not split.trainable
    for branch in ("clean", "adv"):
        bn = split.branch_layer(branch)
        assert (bn.momentum, bn.epsilon, bn.center, bn.scale) == (0.95, 1e-4, False, True)
        assert bn.synchronized is True
        assert isinstance(bn.gamma_regularizer, keras.regularizers.L2)
        assert bn.gamma_regularizer.get_config()["l2"] == pytest.approx(0.01)
        assert isinstance(bn.gamma_constraint, keras.constraints.NonNeg)
        assert isinstance(bn.gamma_initializer, keras.initializers.GlorotUniform)
        assert bn.beta is None  # center=False: no beta, in either branch
    # The layer round-trips through its config with all of them.
    again = SplitBatchNormalization.from_config(split.get_config())
    assert again.momentum == 0.95 and again.synchronized is True and again.center is False
    # An argument overrides any setting, for every layer; the others stay.
    split = to_split_bn(model, momentum=0.9, epsilon=1e-5).graph.get_layer("bn")
    assert (split.momentum, split.epsilon) == (0.9, 1e-5)
    assert isinstance(split.branch_layer("adv").gamma_regularizer, keras.regularizers.L2)
    # Keras' default synchronized=False means "not asked": the strategy decides (None);
    # synchronized=False given to to_split_bn keeps per-replica statistics.
    assert to_split_bn(bn_model()).graph.get_layer("bn").synchronized is None
    assert to_split_bn(bn_model(), synchronized=False).graph.get_layer("bn").synchronized \
        is False
    with pytest.raises(TypeError, match="unknown BatchNormalization settings"):
        to_split_bn(bn_model(), momentun=0.9)


def test_the_regularizers_of_a_users_model_reach_the_training_loss():
    """A regularizer counts in the loss a trainer minimises and logs, as in Keras' fit."""
    model = bn_model(gamma_regularizer=keras.regularizers.L2(0.5))
    net = to_split_bn(model, momentum=0.9)
    gammas = [net.graph.get_layer("bn").branch_layer(b).gamma for b in ("clean", "adv")]
    penalty = sum(0.5 * float(tf.reduce_sum(tf.square(g))) for g in gammas)
    assert penalty > 0.5
    x = np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 3)).astype("float32")
    y = np.arange(16) % 3
    trainer = ARATModel(net, eps=0.05, step_size=0.02, attack_steps=1, predictor=False)
    trainer.compile(optimizer=TorchSGD(0.0))  # lr 0: the weights stay, the loss is logged
    trainer.a_prev.assign(0.5)
    want, _ = trainer.losses_for(tf.constant(x), tf.constant(y))
    logs = trainer.train_step((tf.constant(x), tf.constant(y)))
    assert float(logs["loss"]) == pytest.approx(float(want) + penalty, rel=1e-5)


# --- evaluate() and validation --------------------------------------------------------

def state_of(trainer):
    """Everything a validation must leave alone: the training figures, a_prev and every
    BN statistic (the network's and the predictors' non-trainable variables)."""
    variables = [v for t in trainer.trackers.values() for v in t.variables]
    variables += [v for v in trainer.weights if not v.trainable]
    return [v.numpy().copy() for v in variables]


@pytest.mark.parametrize("name", ["arat", "pgd_at", "trades", "mart", "standard"])
def test_evaluate_and_validation_report_clean_and_pgd_figures(name):
    """evaluate() and fit(validation_data=..., validation_freq=2) report the validation
    figures under Keras' names; they are what a PGD at the full eps (not the warm-up's,
    1/500 of it at these steps) with the trainer's steps and step size computes; and a
    validation changes no training figure, no a_prev and no BN statistic."""
    from keras_arat.attacks import PGD
    from keras_arat.training import TRAINERS
    from keras_arat.training.trainers import correct
    keras.utils.set_random_seed(0)
    net = helpers.new_network(split_bn=name == "arat", width=4)
    trainer = TRAINERS[name](net, eps=0.2, step_size=0.05, attack_steps=1,
                             eps_warmup_steps=1000, val_attack_steps=3, val_step_size=0.1)
    trainer.compile(optimizer=TorchSGD(0.05))
    (x, y), (xt, yt) = helpers.tiny_data().train, helpers.tiny_data().test
    xt, yt = xt[:64], yt[:64]
    history = trainer.fit(x[:128], y[:128], batch_size=64, epochs=2, verbose=0,
                          validation_data=(xt, yt), validation_freq=2).history
    names = {"loss", "clean_acc", "pgd_acc"} | ({"clean_acc_clean_branch"}
                                                if name == "arat" else set())
    assert {k for k in history if k.startswith("val_")} == {f"val_{n}" for n in names}
    assert all(len(history[f"val_{n}"]) == 1 for n in names)  # epoch 2 only
    before = state_of(trainer)
    figures = trainer.evaluate(xt, yt, batch_size=64, verbose=0, return_dict=True)
    for a, b in zip(before, state_of(trainer)):
        np.testing.assert_array_equal(a, b)
    assert set(figures) == names
    deployed = lambda z: net(z, training=False, branch="adv")  # noqa: E731
    seed = tf.constant([trainer.VAL_SEED_OFFSET, 4], tf.int64)  # (seed 0 + offset, step 4)
    x_adv = PGD(eps=0.2, step_size=0.1, steps=3)(deployed, tf.constant(xt), tf.constant(yt),
                                                  seed)
    hits = correct(deployed(xt), yt).numpy()
    adv_hits = correct(deployed(x_adv), yt).numpy()
    assert figures["clean_acc"] == pytest.approx(hits.mean(), abs=1e-6)
    assert figures["pgd_acc"] == pytest.approx((hits * adv_hits).mean(), abs=1e-6)
    assert figures["pgd_acc"] < figures["clean_acc"]  # the full eps breaks points
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yt, logits=deployed(x_adv))
    assert figures["loss"] == pytest.approx(float(tf.reduce_mean(ce)), rel=1e-5)
    if name == "arat":
        clean = correct(net(xt, training=False, branch="clean"), yt).numpy().mean()
        assert figures["clean_acc_clean_branch"] == pytest.approx(clean, abs=1e-6)


def test_validation_attack_takes_the_trainers_settings():
    from keras_arat.attacks import PGD, Restarts
    net = helpers.new_network(split_bn=True, width=4)
    trainer = ARATModel(net, eps=0.3, step_size=0.05, attack_steps=2)
    attack = trainer.validation_attack()  # default: the training eps and step size, 10 steps
    assert isinstance(attack, PGD) and (attack.eps, attack.step_size, attack.steps) == \
        (0.3, 0.05, 10)
    trainer = ARATModel(net, eps=0.3, step_size=0.05, attack_steps=2, val_attack_steps=20,
                        val_step_size=0.075, val_restarts=3)
    attack = trainer.validation_attack()
    assert isinstance(attack, Restarts) and attack.n == 3
    assert (attack.attack.eps, attack.attack.step_size, attack.attack.steps) == \
        (0.3, 0.075, 20)


# --- sample and class weights ---------------------------------------------------------

def bn_free_network():
    """A network without BatchNormalization: its examples do not interact in a batch, so
    a weighted batch can be compared with a batch holding each example w times."""
    images = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(images)
    x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
    return to_split_bn(keras.Model(images, keras.layers.Dense(10)(x)))


@pytest.mark.parametrize("name", ["arat", "pgd_at", "trades", "mart", "standard"])
def test_sample_weight_weights_every_term_as_keras_does(name):
    """A weight of k counts an example k times (Keras' sum over the batch size): the loss
    of a weighted batch is that of the batch with each example repeated w times, times
    len(repeated) / len(batch), term by term; accuracies are weighted means."""
    from keras_arat.training import TRAINERS
    keras.utils.set_random_seed(0)
    kwargs = {"predictor": False} if name == "arat" else {}  # the predictor has a BN
    trainer = TRAINERS[name](bn_free_network(), eps=0.1, step_size=0.05, attack_steps=1,
                             **kwargs)
    trainer.compile(optimizer=TorchSGD(0.01))
    if name == "arat":
        trainer.a_prev.assign(0.4)
    # A fixed attack (a function of x), so that repeated examples get the same point.
    trainer.adversarial = lambda x, target, branch="adv", **kw: tf.clip_by_value(
        x + 0.1 * tf.sin(30.0 * x), 0.0, 1.0)
    x, y = helpers.tiny_data().train
    x, y = x[:6], y[:6]
    weights = np.array([2, 1, 0, 3, 1, 1], np.float32)
    repeated = np.repeat(np.arange(6), weights.astype(int))
    loss, logs = trainer.losses_for(tf.constant(x), tf.constant(y), tf.constant(weights))
    want, want_logs = trainer.losses_for(tf.constant(x[repeated]), tf.constant(y[repeated]))
    scale = len(repeated) / len(x)
    assert float(loss) == pytest.approx(float(want) * scale, rel=1e-5)
    for key, value in logs.items():
        if key in ("a_prev",):
            continue
        factor = 1.0 if "acc" in key else scale
        # 1 - cos of near-parallel features loses float32 digits: 2e-6 absolute there.
        assert float(value) == pytest.approx(float(want_logs[key]) * factor, rel=1e-5,
                                             abs=2e-6 if key == "invariance" else 1e-7), key
    if name == "standard":  # Keras' own loss with the same weights
        logits = trainer.network(x, training=True, branch="clean")
        keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            y, logits, sample_weight=weights)
        assert float(loss) == pytest.approx(float(keras_loss), rel=1e-5)


def test_fit_passes_sample_and_class_weights_to_the_loss():
    """fit's sample_weight and class_weight (which Keras turns into sample weights) reach
    the trainer: weights of zero on every example leave the loss at zero."""
    x, y = helpers.tiny_data().train
    x, y = x[:64], y[:64]
    for weights, factor in (({"sample_weight": np.zeros(64, np.float32)}, 0.0),
                            ({"class_weight": {c: 0.0 for c in range(10)}}, 0.0),
                            ({"class_weight": {c: 2.0 for c in range(10)}}, 2.0)):
        losses = []
        for given in (weights, {}):
            keras.utils.set_random_seed(0)
            trainer = ARATModel(bn_free_network(), eps=0.1, step_size=0.05, attack_steps=1,
                                predictor=False)
            trainer.compile(optimizer=TorchSGD(0.0))
            losses.append(trainer.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False,
                                      a_prev_data=(x, y), **given).history["loss"][0])
        assert losses[0] == pytest.approx(factor * losses[1], rel=1e-5, abs=1e-7), weights
        assert losses[1] > 0.1


# --- attacks on any Keras model ---------------------------------------------------------

def test_attacks_made_with_a_keras_applications_model():
    """PGD(model, eps, steps)(x, y) and AutoAttack(model, eps)(x, y) on a keras.applications
    network (weights=None), labels its own predictions: images within eps that it
    misclassifies, a plain int seed, and the same points as the parts' form."""
    from keras_arat.attacks import PGD, AutoAttack
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                           classes=10, classifier_activation=None)
    x = np.random.default_rng(0).uniform(0, 1, (8, 32, 32, 3)).astype("float32")
    y = np.argmax(model(x, training=False).numpy(), 1)
    x_adv = PGD(model, eps=0.3, steps=10)(x, y, seed=3)
    assert isinstance(x_adv, np.ndarray) and np.abs(x_adv - x).max() <= 0.3 + 1e-6
    assert np.mean(np.argmax(model(x_adv, training=False).numpy(), 1) != y) >= 0.5
    same = PGD(eps=0.3, steps=10)(lambda z: model(z, training=False), tf.constant(x),
                                  tf.constant(y), tf.constant([3, 0], tf.int64))
    np.testing.assert_allclose(x_adv, same.numpy(), atol=1e-6)  # batch 0 of seed 3
    as_int = PGD(eps=0.3, steps=10)(lambda z: model(z, training=False), x, y, 3)
    np.testing.assert_array_equal(as_int.numpy(), same.numpy())  # an int seed is (3, 0)
    x_aa, robust = AutoAttack(model, eps=0.3, n_iter=5, n_queries=50, n_target_classes=2)(
        x, y)
    assert robust.dtype == bool and robust.shape == (8,) and not robust.any()
    assert np.abs(x_aa - x).max() <= 0.3 + 1e-6
    assert np.all(np.argmax(model(x_aa, training=False).numpy(), 1) != y)
    with pytest.raises(ValueError, match="made without a model"):
        PGD(eps=0.1)(x, y)


# --- Keras' own callbacks ---------------------------------------------------------------

@pytest.mark.slow  # 20 s: five short fits
def test_keras_callbacks_read_the_validation_figures(tmp_path):
    """ModelCheckpoint keeps the best epoch by val_pgd_acc, EarlyStopping and
    ReduceLROnPlateau act on validation figures, TensorBoard writes them."""
    import glob

    from keras_arat.training import EpochPiecewiseConstant
    keras.utils.set_random_seed(0)
    net = helpers.new_network(split_bn=True, width=4)
    trainer = ARATModel(net, eps=0.2, step_size=0.05, attack_steps=1, val_attack_steps=3)
    trainer.compile(optimizer=TorchSGD(0.05))
    (x, y), (xt, yt) = helpers.tiny_data().train, helpers.tiny_data().test
    weights = []
    best = str(tmp_path / "best.keras")
    callbacks = [
        keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: weights.append(
            [w.numpy().copy() for w in trainer.weights])),
        keras.callbacks.ModelCheckpoint(best, monitor="val_pgd_acc", mode="max",
                                        save_best_only=True),
        # No epoch can gain 2.0 of accuracy: it stops after the second epoch.
        keras.callbacks.EarlyStopping(monitor="val_clean_acc", mode="max", min_delta=2.0,
                                      patience=1),
        # val_loss never falls by 1e9: the rate halves after every epoch but the first.
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=0,
                                          min_delta=1e9),
        keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb")),
    ]
    history = trainer.fit(x[:256], y[:256], batch_size=64, epochs=6, verbose=0,
                          validation_data=(xt[:64], yt[:64]), callbacks=callbacks).history
    assert len(history["loss"]) == 2  # EarlyStopping
    assert float(trainer.optimizer.learning_rate.numpy()) == pytest.approx(0.025)
    pgd = history["val_pgd_acc"]
    chosen = int(np.argmax(pgd))  # the first best: Keras keeps it on a tie
    loaded = keras.models.load_model(best)
    assert isinstance(loaded, ARATModel)
    for a, b in zip(loaded.weights, weights[chosen]):
        np.testing.assert_array_equal(a.numpy(), b)
    events = glob.glob(str(tmp_path / "tb" / "validation" / "events.*"))
    tags = {v.tag for path in events for event in tf.compat.v1.train.summary_iterator(path)
            for v in event.summary.value}
    assert {"epoch_pgd_acc", "epoch_clean_acc", "epoch_loss"} <= tags
    # A learning-rate schedule cannot be changed from outside: Keras says so in one line.
    scheduled = ARATModel(net, eps=0.2, step_size=0.05, attack_steps=1)
    scheduled.compile(optimizer=TorchSGD(EpochPiecewiseConstant(4, [1], [0.05, 0.005])))
    with pytest.raises(TypeError, match="LearningRateSchedule"):
        scheduled.fit(x[:128], y[:128], batch_size=64, epochs=3, verbose=0,
                      validation_data=(xt[:64], yt[:64]),
                      callbacks=[keras.callbacks.ReduceLROnPlateau(
                          monitor="val_loss", patience=0, min_delta=1e9)])


# Save and load, and BackupAndRestore, under op determinism (a process of its own: the
# setting cannot be undone): training goes on exactly as an uninterrupted run.
RESUME = r'''
import os, sys, tempfile
import keras, numpy as np, tensorflow as tf
tf.config.experimental.enable_op_determinism()
from keras_arat.training import ARATModel, EpochPiecewiseConstant, TorchSGD
from tests import helpers
x, y = helpers.tiny_data().train
x, y = x[:256], y[:256]
folder = tempfile.mkdtemp()

def make():
    keras.utils.set_random_seed(0)
    net = helpers.new_network(split_bn=True, width=4)
    trainer = ARATModel(net, eps=0.2, step_size=0.05, attack_steps=2)
    trainer.compile(optimizer=TorchSGD(EpochPiecewiseConstant(4, [1], [0.05, 0.01]),
                                       momentum=0.9))
    return trainer

def gap(a, b):
    return max(float(np.abs(u.numpy() - v.numpy()).max()) for u, v in zip(a.weights, b.weights))

whole = make()
whole.fit(x, y, batch_size=64, epochs=3, verbose=0, shuffle=False)

# 1. save after epoch 1, load, go on
first = make()
first.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
first.save(os.path.join(folder, "run.keras"))
loaded = keras.models.load_model(os.path.join(folder, "run.keras"))
assert type(loaded) is ARATModel and type(loaded.optimizer) is TorchSGD
assert float(loaded.a_prev.numpy()) == float(first.a_prev.numpy()) > 0
assert int(loaded.optimizer.iterations.numpy()) == 4
momentum = [v for v in loaded.optimizer.variables if "momentum" in v.path]
assert momentum and max(float(np.abs(v.numpy()).max()) for v in momentum) > 0
loaded.fit(x, y, batch_size=64, epochs=3, initial_epoch=1, verbose=0, shuffle=False)
print("SAVE-LOAD gap", gap(whole, loaded))

# 2. BackupAndRestore: a fit stopped at the start of epoch 3, then the same fit again
class Killed(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("killed")

backup = os.path.join(folder, "backup")
try:
    make().fit(x, y, batch_size=64, epochs=3, verbose=0, shuffle=False,
               callbacks=[keras.callbacks.BackupAndRestore(backup), Killed()])
except RuntimeError:
    pass
resumed = make()
history = resumed.fit(x, y, batch_size=64, epochs=3, verbose=0, shuffle=False,
                      callbacks=[keras.callbacks.BackupAndRestore(backup)])
assert len(history.history["loss"]) == 1  # only the third epoch ran
print("BACKUP gap", gap(whole, resumed))
'''


@pytest.mark.slow  # 30 s: four short fits in a process with op determinism
def test_save_load_and_backup_and_restore_go_on_as_an_uninterrupted_run():
    from tests.cli import run_cli
    proc = run_cli("-c", RESUME, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gaps = {line.split()[0]: float(line.split()[-1]) for line in proc.stdout.splitlines()
            if line.endswith(tuple("0123456789")) and " gap " in line}
    print(gaps)
    assert gaps == {"SAVE-LOAD": 0.0, "BACKUP": 0.0}
