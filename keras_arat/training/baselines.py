"""Baselines in the same trainer: PGD-AT, TRADES, MART and standard training."""

import keras
import tensorflow as tf

from keras_arat.attacks import PGD, core
from keras_arat.training.trainers import AdversarialTrainer, accuracy, mean_ce, weighted_mean


@keras.saving.register_keras_serializable(package="keras_arat")
class PGDATModel(AdversarialTrainer):
    """PGD-AT (Madry et al.): cross-entropy on PGD examples only."""

    def losses_for(self, x, y, sample_weight=None):
        x_adv = self.adversarial(x, y)
        logits = self.network(x_adv, training=True, branch="adv")
        return mean_ce(logits, y, sample_weight), {"train_acc": accuracy(logits, y,
                                                                         sample_weight)}


@keras.saving.register_keras_serializable(package="keras_arat")
class StandardModel(AdversarialTrainer):
    """Standard (non-robust) training: cross-entropy on clean inputs."""

    uses_attack = False

    def losses_for(self, x, y, sample_weight=None):
        logits = self.network(x, training=True, branch="clean")
        return mean_ce(logits, y, sample_weight), {"train_acc": accuracy(logits, y,
                                                                         sample_weight)}


@keras.saving.register_keras_serializable(package="keras_arat")
class TRADESModel(AdversarialTrainer):
    """TRADES (Zhang et al., 2019): CE(f(x), y) + beta * KL(f(x) || f(x')).

    x' maximises the KL itself (PGD on KL from x + 0.001 * N(0, 1)), attacked with
    BN in inference mode as in the reference code.
    """

    attack_training = False
    log_names = ("ce_clean", "kl", "train_acc", "train_acc_clean")

    def __init__(self, network, beta=6.0, **kwargs):
        super().__init__(network, **kwargs)
        self.beta = float(beta)

    def get_config(self):
        return {**super().get_config(), "beta": self.beta}

    def build_attack(self, eps, step_size, steps):
        return PGD(eps=eps, step_size=step_size, steps=steps, loss=core.kl_to_target,
                   init="normal", init_scale=0.001)

    def losses_for(self, x, y, sample_weight=None):
        p_clean = tf.nn.softmax(core.wide(self.network(x, training=False, branch="adv")))
        x_adv = self.adversarial(x, tf.stop_gradient(p_clean))
        logits_nat = self.network(x, training=True, branch="adv")
        logits_adv = self.network(x_adv, training=True, branch="adv")
        ce = mean_ce(logits_nat, y, sample_weight)
        kl = weighted_mean(core.kl_to_target(logits_adv, tf.nn.softmax(core.wide(logits_nat))),
                           sample_weight)
        return ce + self.beta * kl, {"ce_clean": ce, "kl": kl,
                                     "train_acc": accuracy(logits_adv, y, sample_weight),
                                     "train_acc_clean": accuracy(logits_nat, y, sample_weight)}


@keras.saving.register_keras_serializable(package="keras_arat")
class MARTModel(AdversarialTrainer):
    """MART (Wang et al., 2020): boosted CE on x' + beta * (1 - p_y(x)) * KL(f(x) || f(x')).

    Boosted CE = CE(f(x'), y) - log(1 - max_{k != y} p_k(x')); x' is PGD on CE from
    x + 0.001 * N(0, 1), attacked with BN in inference mode as in the reference code.
    """

    attack_training = False
    log_names = ("bce_adv", "kl_weighted", "train_acc", "train_acc_clean")

    def __init__(self, network, beta=5.0, **kwargs):
        super().__init__(network, **kwargs)
        self.beta = float(beta)

    def get_config(self):
        return {**super().get_config(), "beta": self.beta}

    def build_attack(self, eps, step_size, steps):
        return PGD(eps=eps, step_size=step_size, steps=steps, init="normal", init_scale=0.001)

    def losses_for(self, x, y, sample_weight=None):
        x_adv = self.adversarial(x, y)
        logits_nat = core.wide(self.network(x, training=True, branch="adv"))
        logits_adv = core.wide(self.network(x_adv, training=True, branch="adv"))
        p_adv, p_nat = tf.nn.softmax(logits_adv), tf.nn.softmax(logits_nat)
        onehot = tf.one_hot(tf.cast(y, tf.int32), tf.shape(logits_adv)[-1],
                            dtype=logits_adv.dtype)
        # The most likely wrong class under attack (the reference's argsort trick).
        p_wrong = tf.reduce_max(p_adv - 2.0 * onehot, axis=-1)
        bce = weighted_mean(core.cross_entropy(logits_adv, y)
                            - tf.math.log(1.0001 - p_wrong + 1e-12), sample_weight)
        # As the reference's KLDivLoss(log(p_adv + 1e-12), p_nat): no 1e-12 inside log(p_nat).
        kl = tf.reduce_sum(tf.math.xlogy(p_nat, p_nat) - p_nat * tf.math.log(p_adv + 1e-12),
                           axis=-1)
        p_true = tf.reduce_sum(p_nat * onehot, axis=-1)
        robust = weighted_mean(kl * (1.0000001 - p_true), sample_weight)
        return bce + self.beta * robust, {"bce_adv": bce, "kl_weighted": robust,
                                          "train_acc": accuracy(logits_adv, y, sample_weight),
                                          "train_acc_clean": accuracy(logits_nat, y,
                                                                      sample_weight)}
