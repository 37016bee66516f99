"""A small four-convolution CNN, the quick model for tests and small data sets."""

import keras

from keras_arat.layers.split_batch_norm import SplitBatchNormalization
from keras_arat.models.resnet import input_dtype, logits_dtype
from keras_arat.network import SplitBNNetwork


def _positive_int(value, what):
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


@keras.saving.register_keras_serializable(package="keras_arat")
class SmallCNN(SplitBNNetwork):
    """conv-BN-ReLU x4 (strides s, 2, 1, 2) -> flatten -> Dense-ReLU -> Dense.

    s = `stem_stride` (default 1); 2 runs every later layer at half the resolution.

    Channels are (w, w, 2w, 2w) for `width=w`. Every BN is a
    `SplitBatchNormalization` (a single shared BN when `split_bn=False`). A functional
    graph: layers conv1..conv4, bn1..bn4, relu1..relu4, flatten, dense, dense_relu,
    classifier.

    Features (`return_features=True`): "conv1".."conv4" are the BN outputs before their
    ReLU, "dense" is the hidden Dense layer after its ReLU.
    """

    FEATURES = {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3", "conv4": "bn4",
                "dense": "dense_relu"}
    DEFAULT_TAPS = ("conv3", "conv4", "dense")

    def __init__(self, num_classes=10, split_bn=True, width=32, dense_units=128,
                 input_shape=(32, 32, 3), stem_stride=1, name="small_cnn", **kwargs):
        num_classes = _positive_int(num_classes, "num_classes")
        width = _positive_int(width, "width")
        dense_units = _positive_int(dense_units, "dense_units")
        stem_stride = _positive_int(stem_stride, "stem_stride")
        image_shape = tuple(int(d) for d in input_shape)
        filters = (width, width, 2 * width, 2 * width)
        with keras.name_scope(name):  # weight paths "<name>/<layer>/..."
            images = keras.Input(image_shape, name="images", dtype=input_dtype())
            x = images
            for i, (f, stride) in enumerate(zip(filters, (stem_stride, 2, 1, 2)), 1):
                x = keras.layers.Conv2D(f, 3, strides=stride, padding="same", use_bias=False,
                                        name=f"conv{i}")(x)
                x = SplitBatchNormalization(split=bool(split_bn), name=f"bn{i}")(x)
                x = keras.layers.ReLU(name=f"relu{i}")(x)
            x = keras.layers.Flatten(name="flatten")(x)
            x = keras.layers.Dense(dense_units, name="dense")(x)
            x = keras.layers.ReLU(name="dense_relu")(x)
            # float32 logits under a mixed-precision policy (attacks and losses need them)
            logits = keras.layers.Dense(num_classes, name="classifier",
                                        dtype=logits_dtype())(x)
            graph = keras.Model(images, logits, name=name)
        super().__init__(graph, features=self.FEATURES, default_taps=self.DEFAULT_TAPS,
                         default_invariance_weight=30.0, name=name, **kwargs)
        self.num_classes, self.split_bn = num_classes, bool(split_bn)
        self.width, self.dense_units, self.image_shape = width, dense_units, image_shape
        self.stem_stride = stem_stride

    def get_config(self):
        return {"name": self.name, "num_classes": self.num_classes, "split_bn": self.split_bn,
                "width": self.width, "dense_units": self.dense_units,
                "input_shape": list(self.image_shape), "stem_stride": self.stem_stride}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
