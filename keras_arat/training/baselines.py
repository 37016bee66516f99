"""Baselines in the same trainer: PGD-AT and standard training."""

import keras

from keras_arat.training.trainers import AdversarialTrainer, accuracy, mean_ce


@keras.saving.register_keras_serializable(package="keras_arat")
class PGDATModel(AdversarialTrainer):
    """PGD-AT (Madry et al.): cross-entropy on PGD examples only."""

    def losses_for(self, x, y):
        x_adv = self.adversarial(x, y)
        logits = self.network(x_adv, training=True, branch="adv")
        return mean_ce(logits, y), {"train_acc": accuracy(logits, y)}


@keras.saving.register_keras_serializable(package="keras_arat")
class StandardModel(AdversarialTrainer):
    """Standard (non-robust) training: cross-entropy on clean inputs."""

    uses_attack = False

    def losses_for(self, x, y):
        logits = self.network(x, training=True, branch="clean")
        return mean_ce(logits, y), {"train_acc": accuracy(logits, y)}
