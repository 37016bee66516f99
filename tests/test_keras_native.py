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
