"""The trainer base class: a keras.Model wrapping a classifier with a custom train_step.

The wrapped `network` follows the keras_arat.models contract:
network(x, training=..., branch="clean"|"adv", return_features=False).
"""

import keras
import tensorflow as tf

from keras_arat.attacks import PGD, core


def mean_ce(logits, y):
    return tf.reduce_mean(core.cross_entropy(logits, y))


def accuracy(logits, y):
    return tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1), tf.cast(y, tf.int64)),
                                  tf.float32))


def pooled_feature(t):
    """ARAT's z_l: ReLU, then global average pooling of a spatial map."""
    t = tf.nn.relu(t)
    if t.shape.rank == 4:
        t = tf.reduce_mean(t, axis=[1, 2])
    return t


def mean_cosine(a, b):
    a = tf.math.l2_normalize(a, axis=-1, epsilon=1e-12)
    b = tf.math.l2_normalize(b, axis=-1, epsilon=1e-12)
    return tf.reduce_mean(tf.reduce_sum(a * b, axis=-1))


class AdversarialTrainer(keras.Model):
    """Shared machinery: the PGD attack, seeding, loss trackers, inference calls.

    Subclasses implement `losses(x, y)` returning (total_loss, {name: scalar}).
    Every logged figure goes through a keras.metrics.Mean, so `fit` reports the
    epoch mean of each (a raw tensor named "loss" would be shadowed by Keras'
    own loss tracker).
    """

    uses_attack = True
    # BN mode of the network while attacking: ARAT and PGD-AT attack in training mode
    # (batch statistics), TRADES and MART in inference mode, as their reference code.
    attack_training = True

    def __init__(self, network, eps=8 / 255, step_size=2 / 255, attack_steps=10, seed=0,
                 **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.attack = self.build_attack(eps, step_size, attack_steps)
        self.seed = int(seed)
        self.trackers = {}

    def build_attack(self, eps, step_size, steps):
        """The training attack: PGD on cross-entropy from a uniform random start."""
        return PGD(eps=eps, step_size=step_size, steps=steps)

    def track(self, values):
        for name, value in values.items():
            if name not in self.trackers:
                self.trackers[name] = keras.metrics.Mean(name=name)
            self.trackers[name].update_state(value)
        return {name: t.result() for name, t in self.trackers.items()}

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, x, training=False, branch="adv"):
        return self.network(x, training=training, branch=branch)

    def attack_seed(self):
        """A fresh [2] seed per optimisation step: deterministic and resumable."""
        step = tf.cast(self.optimizer.iterations, tf.int64)
        return tf.stack([tf.constant(self.seed, tf.int64), step])

    def adversarial(self, x, target, branch="adv"):
        """Attack examples against `branch`, BN in the mode `attack_training` names."""
        return self.attack(
            lambda z: self.network(z, training=self.attack_training, branch=branch),
            x, target, self.attack_seed())

    def losses_for(self, x, y):
        raise NotImplementedError

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            loss, logs = self.losses_for(x, y)
        variables = self.trainable_variables
        grads = tape.gradient(loss, variables)
        self.optimizer.apply(grads, variables)
        return self.track({"loss": loss, **logs})
