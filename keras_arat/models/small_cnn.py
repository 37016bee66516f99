"""A small four-convolution CNN, the quick model for tests and small data sets."""

import keras

from keras_arat.layers.split_batch_norm import SplitBatchNormalization
from keras_arat.models.resnet import logits_dtype


def _positive_int(value, what):
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


@keras.saving.register_keras_serializable(package="keras_arat")
class SmallCNN(keras.Model):
    """conv-BN-ReLU x4 (strides 1, 2, 1, 2) -> flatten -> Dense-ReLU -> Dense.

    Channels are (w, w, 2w, 2w) for `width=w`. Every BN is a
    `SplitBatchNormalization` (a single shared BN when `split_bn=False`).

    Features (`return_features=True`): "conv1".."conv4" are the BN outputs
    before their ReLU, "dense" is the hidden Dense layer after its ReLU.
    """

    tap_names = ("conv1", "conv2", "conv3", "conv4", "dense")
    default_taps = ("conv3", "conv4", "dense")
    default_invariance_weight = 30.0

    def __init__(self, num_classes=10, split_bn=True, width=32, dense_units=128,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_classes = _positive_int(num_classes, "num_classes")
        self.split_bn = bool(split_bn)
        self.width = _positive_int(width, "width")
        self.dense_units = _positive_int(dense_units, "dense_units")

        filters = (self.width, self.width, 2 * self.width, 2 * self.width)
        strides = (1, 2, 1, 2)
        self.convs = [
            keras.layers.Conv2D(f, 3, strides=s, padding="same", use_bias=False,
                                name=f"conv{i + 1}")
            for i, (f, s) in enumerate(zip(filters, strides))
        ]
        self.bns = [
            SplitBatchNormalization(split=self.split_bn, name=f"bn{i + 1}")
            for i in range(len(filters))
        ]
        self.flatten = keras.layers.Flatten(name="flatten")
        self.hidden = keras.layers.Dense(self.dense_units, name="dense")
        self.classifier = keras.layers.Dense(self.num_classes, name="classifier",
                                             dtype=logits_dtype())

    def call(self, inputs, training=None, branch="adv", return_features=False):
        feats = {}
        x = inputs
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = bn(conv(x), training=training, branch=branch)
            feats[f"conv{i + 1}"] = x
            x = keras.ops.relu(x)
        x = keras.ops.relu(self.hidden(self.flatten(x)))
        feats["dense"] = x
        logits = self.classifier(x)
        if return_features:
            return logits, feats
        return logits

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, split_bn=self.split_bn,
                      width=self.width, dense_units=self.dense_units)
        return config
