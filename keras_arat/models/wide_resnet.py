"""Pre-activation Wide ResNet (TRADES / AR-AT layout) with split BatchNorm."""

import math

import keras

from keras_arat.models.resnet import (bn_layer, float32_classifier, input_dtype,
                                      positive_num_classes, stage_blocks, torch_conv)
from keras_arat.network import SplitBNNetwork


def wrn_blocks_per_stage(depth):
    """n = (depth - 4) / 6, which must be a positive integer."""
    if isinstance(depth, bool) or int(depth) != depth or (int(depth) - 4) % 6 != 0 \
            or int(depth) < 10:
        raise ValueError(
            f"WideResNet depth must satisfy (depth - 4) % 6 == 0 with depth >= 10 "
            f"(e.g. 10, 16, 22, 28, 34), got {depth!r}")
    return (int(depth) - 4) // 6


def _he_conv_initializer(kernel_size, filters):
    """N(0, sqrt(2 / (k * k * out_channels))), as in the TRADES code."""
    return keras.initializers.RandomNormal(
        stddev=math.sqrt(2.0 / (kernel_size * kernel_size * filters)))


def _wrn_conv(filters, kernel_size, stride, padding, name):
    return torch_conv(filters, kernel_size, stride, padding, name,
                      kernel_initializer=_he_conv_initializer(kernel_size, filters))


def wide_block(x, in_planes, planes, stride, split, name):
    """bn1 -> relu1 -> conv3x3(stride) -> bn2 -> relu2 -> conv3x3, plus shortcut.

    When the widths differ the shortcut is a 1x1 conv(stride) of relu1's output,
    otherwise the block input itself. Layers are made in the order bn1, conv1, bn2,
    conv2, shortcut (a seeded model draws the weights it always drew)."""
    equal_in_out = in_planes == planes
    if equal_in_out and stride != 1:
        # The reference code would add tensors of different sizes here.
        raise ValueError("an identity shortcut needs stride 1")
    bn1, conv1 = bn_layer(split, f"{name}.bn1"), _wrn_conv(planes, 3, stride, 1,
                                                          f"{name}.conv1")
    bn2, conv2 = bn_layer(split, f"{name}.bn2"), _wrn_conv(planes, 3, 1, 1, f"{name}.conv2")
    shortcut = None if equal_in_out else _wrn_conv(planes, 1, stride, 0,
                                                   f"{name}.shortcut_conv")
    r1 = keras.layers.ReLU(name=f"{name}.relu1")(bn1(x))
    r2 = keras.layers.ReLU(name=f"{name}.relu2")(bn2(conv1(r1)))
    out = conv2(r2)
    short = x if shortcut is None else shortcut(r1)
    return keras.layers.Add(name=f"{name}.add")([out, short])


@keras.saving.register_keras_serializable(package="keras_arat")
class WideResNet(SplitBNNetwork):
    """WRN-depth-width: stem conv3x3(16), three stages of n = (depth-4)/6 blocks
    at widths 16k, 32k, 64k and strides 1, 2, 2, final BN -> ReLU -> global
    average pool -> Dense. No dropout. A functional graph.

    Features: "block3.{i}.relu1", "block3.{i}.relu2" for every block i of the
    last stage and "pool" (the pooled 64k-d vector); all of them are the default taps.
    """

    def __init__(self, num_classes=10, split_bn=True, depth=34, width=10,
                 input_shape=(32, 32, 3), name=None, **kwargs):
        num_classes = positive_num_classes(num_classes)
        if isinstance(width, bool) or int(width) != width or int(width) < 1:
            raise ValueError(f"WideResNet width must be a positive integer, got {width!r}")
        depth, width = int(depth), int(width)
        n = wrn_blocks_per_stage(depth)
        name = name or f"wrn_{depth}_{width}"
        image_shape = tuple(int(d) for d in input_shape)
        split = bool(split_bn)
        channels = (16, 16 * width, 32 * width, 64 * width)
        features = {}
        with keras.name_scope(name):  # weight paths "<name>/<layer>/..."
            images = keras.Input(image_shape, name="images", dtype=input_dtype())
            x = _wrn_conv(channels[0], 3, 1, 1, "conv1")(images)
            in_planes = channels[0]
            for layer, feature, planes, stride in stage_blocks(channels[1:], (1, 2, 2),
                                                               (n, n, n), "block"):
                x = wide_block(x, in_planes, planes, stride, split, layer)
                in_planes = planes
                if feature.startswith("block3."):
                    features[f"{feature}.relu1"] = f"{layer}.relu1"
                    features[f"{feature}.relu2"] = f"{layer}.relu2"
            bn = bn_layer(split, "bn")
            x = keras.layers.ReLU(name="relu")(bn(x))
            pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x)
            logits = float32_classifier(num_classes, "fc")(pooled)
            graph = keras.Model(images, logits, name=name)
        features["pool"] = "pool"
        super().__init__(graph, features=features, default_taps=tuple(features),
                         default_invariance_weight=100.0, name=name, **kwargs)
        self.num_classes, self.split_bn, self.image_shape = num_classes, split, image_shape
        self.depth, self.width, self.blocks_per_stage = depth, width, n

    def get_config(self):
        return {"name": self.name, "num_classes": self.num_classes, "split_bn": self.split_bn,
                "depth": self.depth, "width": self.width, "input_shape": list(self.image_shape)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
