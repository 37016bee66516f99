"""Pre-activation Wide ResNet (TRADES / AR-AT layout) with split BatchNorm."""

import math

import keras

from keras_arat.layers.split_batch_norm import SplitBatchNormalization
from keras_arat.models.resnet import (ResidualBlock, build_stages, float32_classifier,
                                      positive_num_classes, run_blocks, torch_conv)


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


@keras.saving.register_keras_serializable(package="keras_arat")
class WideBasicBlock(ResidualBlock):
    """bn1 -> relu1 -> conv3x3(stride) -> bn2 -> relu2 -> conv3x3, plus shortcut.

    When the widths differ the shortcut is a 1x1 conv(stride) of relu1's output,
    otherwise the block input itself. Features: "relu1", "relu2".
    """

    def __init__(self, in_planes, planes, stride=1, split_bn=True, **kwargs):
        super().__init__(in_planes, planes, stride, split_bn, **kwargs)
        self.out_planes = self.planes
        self.equal_in_out = self.in_planes == self.out_planes
        if self.equal_in_out and self.stride != 1:
            # The reference code would add tensors of different sizes here.
            raise ValueError("an identity shortcut needs stride 1")
        self.bn1 = SplitBatchNormalization(split=self.split_bn, name="bn1")
        self.conv1 = _wrn_conv(self.out_planes, 3, self.stride, 1, "conv1")
        self.bn2 = SplitBatchNormalization(split=self.split_bn, name="bn2")
        self.conv2 = _wrn_conv(self.out_planes, 3, 1, 1, "conv2")
        if not self.equal_in_out:
            self.shortcut_conv = _wrn_conv(self.out_planes, 1, self.stride, 0,
                                           "shortcut_conv")

    def call(self, inputs, training=None, branch="adv", return_features=False):
        r1 = keras.ops.relu(self.bn1(inputs, training=training, branch=branch))
        r2 = keras.ops.relu(self.bn2(self.conv1(r1), training=training,
                                     branch=branch))
        out = self.conv2(r2)
        short = inputs if self.equal_in_out else self.shortcut_conv(r1)
        out = out + short
        if return_features:
            return out, {"relu1": r1, "relu2": r2}
        return out


@keras.saving.register_keras_serializable(package="keras_arat")
class WideResNet(keras.Model):
    """WRN-depth-width: stem conv3x3(16), three stages of n = (depth-4)/6 blocks
    at widths 16k, 32k, 64k and strides 1, 2, 2, final BN -> ReLU -> global
    average pool -> Dense. No dropout.

    Features: "block3.{i}.relu1", "block3.{i}.relu2" for every block i of the
    last stage and "pool" (the pooled 64k-d vector).
    """

    default_invariance_weight = 100.0

    def __init__(self, num_classes=10, split_bn=True, depth=34, width=10, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = positive_num_classes(num_classes)
        if isinstance(width, bool) or int(width) != width or int(width) < 1:
            raise ValueError(f"WideResNet width must be a positive integer, got {width!r}")
        self.depth = int(depth)
        self.width = int(width)
        self.blocks_per_stage = wrn_blocks_per_stage(depth)
        self.split_bn = bool(split_bn)
        n, k = self.blocks_per_stage, self.width
        channels = (16, 16 * k, 32 * k, 64 * k)

        self.conv1 = _wrn_conv(channels[0], 3, 1, 1, "conv1")
        self.blocks, self.block_names = build_stages(
            WideBasicBlock, channels[0], channels[1:], (1, 2, 2), (n, n, n), self.split_bn,
            "block")
        self.bn = SplitBatchNormalization(split=self.split_bn, name="bn")
        self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
        self.fc = float32_classifier(self.num_classes, "fc")

    @property
    def tap_names(self):
        names = []
        for i in range(self.blocks_per_stage):
            names += [f"block3.{i}.relu1", f"block3.{i}.relu2"]
        return tuple(names) + ("pool",)

    @property
    def default_taps(self):
        return self.tap_names

    def call(self, inputs, training=None, branch="adv", return_features=False):
        x, feats = run_blocks(self.blocks, self.block_names, self.conv1(inputs), "block3.",
                              ("relu1", "relu2"), training, branch)
        x = keras.ops.relu(self.bn(x, training=training, branch=branch))
        pooled = self.pool(x)
        feats["pool"] = pooled
        logits = self.fc(pooled)
        if return_features:
            return logits, feats
        return logits

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, split_bn=self.split_bn,
                      depth=self.depth, width=self.width)
        return config
